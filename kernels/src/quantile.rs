//! Relative-accuracy quantile sketches for `quantile` (DDSketch: Masson, Rim and Lee,
//! "DDSketch: a fast and fully-mergeable quantile sketch with relative-error
//! guarantees", VLDB 2019).
//!
//! A value `x` falls in the logarithmic bin `i = ⌈log_γ |x|⌉`, `γ = (1 + α) / (1 − α)`;
//! every value of a bin is within `α · |x|` of the bin's representative `2γ^i / (γ + 1)`,
//! so the quantile read from the bins is within `α` of the exact one (DESIGN §3b). Bins
//! are keyed in the order of their values: negative values by decreasing `i`, then zero,
//! then positive values by increasing `i`. A sketch is one group of f64 words:
//!
//! ```text
//!  [k | bin 0 | bin 1 | … | bin k−1 | unused …]     1 + capacity(α) words
//!  bin: the bits (key + 2^23) << 40 | count, ascending: sorted by key
//! ```
//!
//! When a sketch would hold more bins than its capacity, its lowest bin is folded into
//! the next (DDSketch's collapsing-lowest store): the sketch is then the capacity − 1
//! highest keys and one bin with the rest, at the lowest kept key. This is a function of
//! the multiset of keys, whatever the order of insertions and merges, so every backend
//! and grouping gives the same bits. The capacity covers twelve decades of values at
//! the sketch's accuracy; only quantiles among the collapsed, lowest values lose
//! accuracy.

/// Smallest and largest relative accuracy.
pub const ACCURACY: (f64, f64) = (1e-4, 0.5);

/// Key offset of the positive bins (bin indices stay within ±2^22 for finite values
/// at the smallest accuracy: `|ln x| ≤ 745`, `ln γ ≥ 2e-4`).
const OFFSET: i64 = 1 << 22;

/// `γ` of accuracy `alpha`, made a millionth tighter so that rounding in `ln` at a bin
/// boundary cannot push an answer past `alpha`.
#[inline]
fn gamma(alpha: f64) -> f64 {
    let a = alpha * (1.0 - 1e-6);
    (1.0 + a) / (1.0 - a)
}

/// Bins a sketch of accuracy `alpha` holds: twelve decades of values (both signs
/// together), between 64 and 4096 bins (1 382 at `alpha` = 0.01).
pub fn capacity(alpha: f64) -> usize {
    ((1e12f64).ln() / gamma(alpha).ln())
        .ceil()
        .clamp(64.0, 4096.0) as usize
}

/// f64 words of a sketch of accuracy `alpha`.
pub fn words(alpha: f64) -> usize {
    1 + capacity(alpha)
}

/// The key of value `x` (not NaN).
#[inline]
fn key(x: f64, ln_gamma: f64) -> i64 {
    if x == 0.0 {
        return 0;
    }
    let i = (x.abs().ln() / ln_gamma)
        .ceil()
        .clamp(-(OFFSET as f64) + 1.0, OFFSET as f64 - 1.0) as i64;
    let k = i + OFFSET;
    if x > 0.0 { k } else { -k }
}

/// The representative value of key `k`.
fn representative(k: i64, g: f64) -> f64 {
    if k == 0 {
        return 0.0;
    }
    let v = 2.0 * g.powi((k.abs() - OFFSET) as i32) / (g + 1.0);
    if k > 0 { v } else { -v }
}

#[inline]
fn pack(key: i64, count: u64) -> f64 {
    f64::from_bits(((key + (1 << 23)) as u64) << 40 | count)
}

#[inline]
fn unpack(w: f64) -> (i64, u64) {
    let b = w.to_bits();
    ((b >> 40) as i64 - (1 << 23), b & ((1 << 40) - 1))
}

/// Adds `count` values of key `k` to sketch `s`.
fn insert(s: &mut [f64], k: i64, count: u64, cap: usize) {
    let n = s[0] as usize;
    let bins = &mut s[1..1 + n];
    match bins.binary_search_by_key(&k, |&w| unpack(w).0) {
        Ok(at) => {
            let (_, c) = unpack(bins[at]);
            bins[at] = pack(k, c + count);
        }
        Err(at) if n < cap => {
            s.copy_within(1 + at..1 + n, 2 + at);
            s[1 + at] = pack(k, count);
            s[0] = (n + 1) as f64;
        }
        // Full: of the n + 1 keys, the lowest folds into the second lowest.
        Err(0) => {
            let (k0, c0) = unpack(s[1]);
            s[1] = pack(k0, c0 + count);
        }
        Err(1) => {
            let (_, c0) = unpack(s[1]);
            s[1] = pack(k, c0 + count);
        }
        Err(at) => {
            let (_, c0) = unpack(s[1]);
            let (k1, c1) = unpack(s[2]);
            s[2] = pack(k1, c0 + c1);
            s.copy_within(2..1 + at, 1);
            s[at] = pack(k, count);
        }
    }
}

/// Whether `s` is a sketch of accuracy `alpha` as far as reading it safely goes: it
/// holds at most its capacity of bins (a checkpoint is a file, and a file may lie).
pub(crate) fn is_valid(s: &[f64], alpha: f64) -> bool {
    crate::level::count_within(s[0], capacity(alpha))
}

/// The key [`add`] inserts for each of `xs` at accuracy `alpha`, as an f64 (0 for a
/// NaN, which is never added). The GPU backend computes keys on the host: WGSL has no
/// f64 logarithm.
#[cfg(feature = "gpu")]
pub(crate) fn keys(xs: &[f64], alpha: f64) -> Vec<f64> {
    let ln_gamma = gamma(alpha).ln();
    xs.iter()
        .map(|&x| {
            if x.is_nan() {
                0.0
            } else {
                key(x, ln_gamma) as f64
            }
        })
        .collect()
}

/// Adds value `x` to sketch `s` of accuracy `alpha`.
#[inline]
pub(crate) fn add(s: &mut [f64], x: f64, alpha: f64) {
    insert(s, key(x, gamma(alpha).ln()), 1, capacity(alpha));
}

/// Merges sketch `src` into `dst` (same accuracy).
pub(crate) fn merge(dst: &mut [f64], src: &[f64], alpha: f64) {
    let cap = capacity(alpha);
    for &w in &src[1..1 + src[0] as usize] {
        let (k, c) = unpack(w);
        insert(dst, k, c, cap);
    }
}

/// The `q`-quantile of sketch `s`: the representative of the bin holding the value of
/// rank `⌊q · (n − 1)⌋` in ascending order; `None` for an empty sketch.
pub fn quantile(s: &[f64], q: f64, alpha: f64) -> Option<f64> {
    let bins = &s[1..1 + s[0] as usize];
    let n: u64 = bins.iter().map(|&w| unpack(w).1).sum();
    if n == 0 {
        return None;
    }
    let rank = (q * (n - 1) as f64).floor() as u64;
    let mut seen = 0;
    for &w in bins {
        let (k, c) = unpack(w);
        seen += c;
        if seen > rank {
            return Some(representative(k, gamma(alpha)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(values: &[f64], alpha: f64) -> Vec<f64> {
        let mut s = vec![0.0; words(alpha)];
        for &x in values {
            add(&mut s, x, alpha);
        }
        s
    }

    /// A deterministic spread of values: negatives, zeros and positives over several
    /// decades.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                match z % 10 {
                    0 => 0.0,
                    1 | 2 => -(10f64.powf(u * 4.0 - 1.0)),
                    _ => 10f64.powf(u * 6.0 - 2.0),
                }
            })
            .collect()
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        for alpha in [0.01, 0.05, 0.001] {
            for n in [1, 2, 7, 100, 5_000] {
                let mut v = values(n, n as u64);
                let s = sketch(&v, alpha);
                v.sort_by(f64::total_cmp);
                for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0] {
                    let x = v[(q * (n - 1) as f64).floor() as usize];
                    let e = quantile(&s, q, alpha).unwrap();
                    assert!(
                        (e - x).abs() <= alpha * x.abs(),
                        "alpha {alpha} n {n} q {q}: {e} for {x}"
                    );
                }
            }
        }
        assert_eq!(quantile(&sketch(&[], 0.01), 0.5, 0.01), None);
    }

    #[test]
    fn a_merge_is_the_sketch_of_the_union_even_when_collapsed() {
        let alpha = 0.2; // 64 bins; values over 60 decades need about 340.
        let all: Vec<f64> = values(3_000, 9).iter().map(|x| x.powi(10)).collect();
        assert!(sketch(&all, alpha)[0] as usize == capacity(alpha));
        let bits = |s: &[f64]| s.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
        for cut in [0, 1, 1_000, 2_999] {
            let (a, b) = all.split_at(cut);
            let mut ab = sketch(a, alpha);
            merge(&mut ab, &sketch(b, alpha), alpha);
            let mut ba = sketch(b, alpha);
            merge(&mut ba, &sketch(a, alpha), alpha);
            assert_eq!(bits(&ab), bits(&sketch(&all, alpha)), "cut {cut}");
            assert_eq!(bits(&ba), bits(&sketch(&all, alpha)), "cut {cut}");
        }
        // High quantiles stay accurate after collapsing.
        let mut v = all.clone();
        v.sort_by(f64::total_cmp);
        let x = v[(0.99 * 2_999.0) as usize];
        let e = quantile(&sketch(&all, alpha), 0.99, alpha).unwrap();
        assert!((e - x).abs() <= alpha * x.abs(), "{e} for {x}");
    }

    #[test]
    fn keys_keep_the_order_of_values() {
        let ln_g = gamma(0.01).ln();
        let xs = [-1e300, -5.0, -1e-300, 0.0, 1e-300, 1.0, 2.0, 1e300];
        for w in xs.windows(2) {
            assert!(key(w[0], ln_g) < key(w[1], ln_g), "{} {}", w[0], w[1]);
        }
        assert_eq!(key(-0.0, ln_g), 0);
        let (k, c) = unpack(pack(-OFFSET * 2 + 1, (1 << 40) - 1));
        assert_eq!((k, c), (-OFFSET * 2 + 1, (1 << 40) - 1));
    }
}

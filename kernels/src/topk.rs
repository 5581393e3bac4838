//! Frequent values for `top_k`: a mergeable Misra–Gries summary (Agarwal et al.,
//! "Mergeable summaries", PODS 2012).
//!
//! A summary of capacity `c` is one group of f64 words:
//!
//! ```text
//!  [m | value 0, count 0 | … | value m−1, count m−1 | unused …]   1 + 2c words
//!  m ≤ c counters, ascending by value (−0.0 counted as 0.0)
//! ```
//!
//! While the values added hold at most `c` distinct ones, the counters are their exact
//! counts, a function of the multiset of values, so every backend and grouping gives
//! the same bits. Past that, a merge of two summaries (an added value is a summary of
//! one) sums their counters and, when more than `c` remain, subtracts the (c + 1)-th
//! largest count from every counter and drops those left at zero or below: every value
//! more frequent than `n / (c + 1)` keeps a counter, each count at most `n / (c + 1)`
//! below the truth. Past capacity the summary depends on how events were grouped.

use std::cmp::Ordering;

/// Largest `k`.
pub const MAX_K: u16 = 100;
/// Largest capacity.
pub const MAX_CAPACITY: u16 = 10_000;

/// The default capacity for `k`: `max(64, 4k)`.
pub fn default_capacity(k: u16) -> u16 {
    (4 * k).max(64)
}

/// f64 words of a summary of capacity `c`.
pub fn words(capacity: u16) -> usize {
    1 + 2 * usize::from(capacity)
}

/// The counters of `g`, as (value, count).
fn counters(g: &[f64]) -> impl Iterator<Item = (f64, f64)> + '_ {
    (0..g[0] as usize).map(move |i| (g[1 + 2 * i], g[2 + 2 * i]))
}

/// Adds value `x` (not NaN) to summary `g`.
#[inline]
pub(crate) fn add(g: &mut [f64], x: f64, capacity: u16) {
    let x = x + 0.0; // −0.0 is 0.0
    let m = g[0] as usize;
    match search(g, m, x) {
        Ok(i) => g[2 + 2 * i] += 1.0,
        Err(i) if m < usize::from(capacity) => {
            g.copy_within(1 + 2 * i..1 + 2 * m, 3 + 2 * i);
            g[1 + 2 * i] = x;
            g[2 + 2 * i] = 1.0;
            g[0] = (m + 1) as f64;
        }
        // Full: the new value's count, 1, is the (c + 1)-th largest.
        Err(_) => write(g, counters(g).map(|(v, c)| (v, c - 1.0)).collect()),
    }
}

/// The counter of value `x` among the `m` of `g` (`Ok(i)`), or where it would go.
fn search(g: &[f64], m: usize, x: f64) -> Result<usize, usize> {
    let (mut lo, mut hi) = (0, m);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match g[1 + 2 * mid].total_cmp(&x) {
            Ordering::Less => lo = mid + 1,
            Ordering::Greater => hi = mid,
            Ordering::Equal => return Ok(mid),
        }
    }
    Err(lo)
}

/// Merges summary `src` into `dst` (same capacity).
pub(crate) fn merge(dst: &mut [f64], src: &[f64], capacity: u16) {
    if src[0] == 0.0 {
        return;
    }
    let mut all: Vec<(f64, f64)> = Vec::with_capacity(dst[0] as usize + src[0] as usize);
    let (mut a, mut b) = (counters(dst).peekable(), counters(src).peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.0.total_cmp(&y.0) {
                Ordering::Less => a.next(),
                Ordering::Greater => b.next(),
                Ordering::Equal => {
                    let (v, c) = a.next().expect("peeked");
                    Some((v, c + b.next().expect("peeked").1))
                }
            },
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        all.extend(next);
    }
    drop((a, b));
    let c = usize::from(capacity);
    if all.len() > c {
        let mut counts: Vec<f64> = all.iter().map(|x| x.1).collect();
        counts.sort_by(|x, y| y.total_cmp(x));
        let cut = counts[c];
        for x in &mut all {
            x.1 -= cut;
        }
    }
    write(dst, all);
}

/// Writes counters (ascending by value) into `g`, dropping those at zero or below.
fn write(g: &mut [f64], counters: Vec<(f64, f64)>) {
    let mut m = 0;
    for (v, c) in counters.into_iter().filter(|x| x.1 > 0.0) {
        g[1 + 2 * m] = v;
        g[2 + 2 * m] = c;
        m += 1;
    }
    g[1 + 2 * m..].fill(0.0);
    g[0] = m as f64;
}

/// The `k` values with the largest counters, largest first (ties: smaller value first).
pub fn top(g: &[f64], k: u16) -> Vec<f64> {
    let ranked = ranked(g, k);
    top_of(&ranked, k, f64::total_cmp)
}

/// The `k` counters with the largest counts (ties: smaller value first), then every
/// further counter tied with the k-th, flattened as `[value, count, …]`: what
/// [`top_of`] needs to pick the `k` in another order of values (strings, which the
/// state holds as ids, go by their text).
pub fn ranked(g: &[f64], k: u16) -> Vec<f64> {
    let mut c: Vec<(f64, f64)> = counters(g).collect();
    c.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.total_cmp(&y.0)));
    let k = usize::from(k);
    if k > 0 && c.len() > k {
        let kth = c[k - 1].1;
        let ties = c[k..].iter().take_while(|x| x.1 == kth).count();
        c.truncate(k + ties);
    }
    c.into_iter().flat_map(|(v, n)| [v, n]).collect()
}

/// The `k` most frequent values of `ranked` (from [`ranked`]), most frequent first,
/// ties in the order `order` gives.
pub fn top_of(ranked: &[f64], k: u16, mut order: impl FnMut(&f64, &f64) -> Ordering) -> Vec<f64> {
    let mut c: Vec<(f64, f64)> = ranked.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    c.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| order(&x.0, &y.0)));
    c.iter().take(usize::from(k)).map(|x| x.0).collect()
}

/// Whether `g` can be read without going out of its words (a checkpoint may lie).
pub(crate) fn is_valid(g: &[f64], capacity: u16) -> bool {
    crate::level::count_within(g[0], usize::from(capacity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(values: &[f64], c: u16) -> Vec<f64> {
        let mut g = vec![0.0; words(c)];
        for &x in values {
            add(&mut g, x, c);
        }
        g
    }

    fn exact_top(values: &[f64], k: usize) -> Vec<f64> {
        let mut counts: Vec<(f64, usize)> = Vec::new();
        for &x in values {
            let x = x + 0.0;
            match counts.iter_mut().find(|e| e.0 == x) {
                Some(e) => e.1 += 1,
                None => counts.push((x, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
        counts.iter().take(k).map(|e| e.0).collect()
    }

    fn values(n: usize, distinct: u64, seed: u64) -> Vec<f64> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Skewed: small values more often.
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                ((u * u * distinct as f64).floor() - 3.0).max(-0.0)
                    * if z.is_multiple_of(7) { -1.0 } else { 1.0 }
            })
            .collect()
    }

    #[test]
    fn exact_within_capacity_in_any_split() {
        let v = values(3_000, 25, 3);
        let c = 64;
        let whole = summary(&v, c);
        assert_eq!(top(&whole, 10), exact_top(&v, 10));
        for cut in [0, 1, 1_500, 2_999] {
            let mut a = summary(&v[..cut], c);
            merge(&mut a, &summary(&v[cut..], c), c);
            assert_eq!(a, whole, "cut {cut}");
        }
        assert_eq!(top(&summary(&[-0.0, 0.0, 2.0], c), 5), vec![0.0, 2.0]);
    }

    #[test]
    fn ranked_keeps_the_ties_of_the_kth_for_another_order() {
        let g = summary(&[5.0, 5.0, 1.0, 2.0, 3.0, 4.0, 4.0], 64);
        // Counts: 4 and 5 twice, the rest once; k = 3 ends inside the run of ones.
        assert_eq!(
            ranked(&g, 3),
            vec![4.0, 2.0, 5.0, 2.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0]
        );
        assert_eq!(top(&g, 3), vec![4.0, 5.0, 1.0]);
        let descending = top_of(&ranked(&g, 3), 3, |a, b| b.total_cmp(a));
        assert_eq!(descending, vec![5.0, 4.0, 3.0]);
        assert_eq!(ranked(&g, 2), vec![4.0, 2.0, 5.0, 2.0]);
        assert!(ranked(&summary(&[], 64), 3).is_empty());
    }

    #[test]
    fn past_capacity_every_heavy_hitter_is_kept() {
        let v = values(20_000, 200, 5);
        let c = 16;
        let n = v.len() as f64;
        let mut exact: Vec<(f64, usize)> = Vec::new();
        for &x in &v {
            match exact.iter_mut().find(|e| e.0 == x + 0.0) {
                Some(e) => e.1 += 1,
                None => exact.push((x + 0.0, 1)),
            }
        }
        let heavy: Vec<f64> = exact
            .iter()
            .filter(|e| e.1 as f64 > n / (f64::from(c) + 1.0))
            .map(|e| e.0)
            .collect();
        assert!(!heavy.is_empty());
        // One summary, and one merged from pieces.
        let mut merged = summary(&v[..7_000], c);
        merge(&mut merged, &summary(&v[7_000..12_000], c), c);
        merge(&mut merged, &summary(&v[12_000..], c), c);
        for g in [summary(&v, c), merged] {
            let kept = top(&g, c);
            for h in &heavy {
                assert!(kept.contains(h), "{h} is a heavy hitter: {kept:?}");
            }
        }
    }
}

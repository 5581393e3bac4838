//! The newest `n` values for `last_n`.
//!
//! A cell keeps, of the values added to it, the `n` with the greatest (time, arrival),
//! as one group of f64 words:
//!
//! ```text
//!  [k | ts 0, value 0 | ts 1, value 1 | … | ts k−1, value k−1 | unused …]   1 + 2n words
//!  ascending by (ts, arrival): a value added later sorts after the values of its time
//! ```
//!
//! Arrival needs no counter: values of one time fall in one pane, a cell's values are
//! added in arrival order, and a merge adds values that arrived after the cell's
//! (`merge_after`) or of other panes. So the kept values depend only on the events,
//! whatever the grouping, and every backend gives the same bits.

use crate::level::{bits, int};

/// Largest `n`.
pub const MAX_N: u16 = 1000;

/// f64 words of the group of `n` values.
pub fn words(n: u16) -> usize {
    1 + 2 * usize::from(n)
}

/// Adds value `x` at time `ts` (arriving after every value of `g`) to group `g`.
#[inline]
pub(crate) fn add(g: &mut [f64], ts: i64, x: f64, n: u16) {
    let n = usize::from(n);
    let k = g[0] as usize;
    // Entries 0..k at words 1 + 2i (ts) and 2 + 2i (value); the first one newer.
    let at = (0..k)
        .rev()
        .find(|&i| int(g[1 + 2 * i]) <= ts)
        .map_or(0, |i| i + 1);
    if k < n {
        g.copy_within(1 + 2 * at..1 + 2 * k, 3 + 2 * at);
        g[1 + 2 * at] = bits(ts);
        g[2 + 2 * at] = x;
        g[0] = (k + 1) as f64;
    } else if at > 0 {
        // Full: the oldest goes.
        g.copy_within(3..1 + 2 * at, 1);
        g[2 * at - 1] = bits(ts);
        g[2 * at] = x;
    }
}

/// Merges group `src` into `dst`: `src`'s values arrived after `dst`'s, or belong to
/// other panes.
pub(crate) fn merge(dst: &mut [f64], src: &[f64], n: u16) {
    for i in 0..src[0] as usize {
        add(dst, int(src[1 + 2 * i]), src[2 + 2 * i], n);
    }
}

/// The values of group `g`, newest first.
pub fn newest_first(g: &[f64]) -> impl Iterator<Item = f64> + '_ {
    (0..g[0] as usize).rev().map(move |i| g[2 + 2 * i])
}

/// Whether `g` can be read without going out of its words (a checkpoint may lie).
pub(crate) fn is_valid(g: &[f64], n: u16) -> bool {
    crate::level::count_within(g[0], usize::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(events: &[(i64, f64)], n: u16) -> Vec<f64> {
        let mut g = vec![0.0; words(n)];
        for &(ts, x) in events {
            add(&mut g, ts, x, n);
        }
        g
    }

    /// The reference: the n greatest (ts, arrival), newest first.
    fn reference(events: &[(i64, f64)], n: usize) -> Vec<f64> {
        let mut e: Vec<(i64, usize, f64)> = events
            .iter()
            .enumerate()
            .map(|(i, &(t, x))| (t, i, x))
            .collect();
        e.sort_by_key(|&(t, i, _)| std::cmp::Reverse((t, i)));
        e.iter().take(n).map(|x| x.2).collect()
    }

    #[test]
    fn keeps_the_newest_with_ties_to_the_later_arrival() {
        let mut z = 7u64;
        for n in [1u16, 3, 10] {
            for len in [0, 1, 5, 40] {
                let events: Vec<(i64, f64)> = (0..len)
                    .map(|i| {
                        z = z.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((z >> 60) as i64, i as f64)
                    })
                    .collect();
                let g = group(&events, n);
                let got: Vec<f64> = newest_first(&g).collect();
                assert_eq!(got, reference(&events, n.into()), "n {n} {events:?}");
                // Split anywhere, merged: the same.
                for cut in 0..events.len() {
                    let mut a = group(&events[..cut], n);
                    merge(&mut a, &group(&events[cut..], n), n);
                    assert_eq!(a, g, "n {n} cut {cut}");
                }
            }
        }
    }
}

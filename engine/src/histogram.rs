//! A lock-free latency histogram with fixed buckets, exported in Prometheus' format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 25 µs to 10 s.
pub const BUCKETS: [f64; 18] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
];

/// Counts of durations per bucket, their count and their sum. Recording is two
/// relaxed atomic adds; reading is not atomic across buckets (as in Prometheus'
/// own clients, a scrape may see one observation in the count but not yet in a bucket).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` observations of one duration.
    pub fn record_n(&self, d: Duration, n: u64) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q`-quantile in seconds, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does (the last finite bound for the overflow
    /// bucket); `None` before the first observation.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = BUCKETS.get(i) else {
                    return BUCKETS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        BUCKETS.last().copied()
    }

    /// Writes the histogram as Prometheus text: `name_bucket{labels,le=..}`, `_sum`,
    /// `_count`. `labels` is empty or `key="value",...` without braces.
    pub fn write_prometheus(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 100 observations in (1 ms, 2.5 ms], one in (5 s, 10 s].
        for _ in 0..100 {
            h.record(Duration::from_micros(2_000));
        }
        h.record(Duration::from_secs(7));
        let p50 = h.quantile(0.5).unwrap();
        assert!(
            (p50 - (1e-3 + 1.5e-3 * 50.5 / 100.0)).abs() < 1e-12,
            "{p50}"
        );
        assert_eq!(h.quantile(1.0), Some(10.0));
        h.record(Duration::from_secs(60));
        assert_eq!(
            h.quantile(1.0),
            Some(10.0),
            "overflow: the last finite bound"
        );
    }

    #[test]
    fn buckets_are_cumulative_and_inf_counts_everything() {
        let h = Histogram::default();
        h.record(Duration::from_micros(10));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let mut s = String::new();
        h.write_prometheus(&mut s, "x_seconds", "view=\"v\"");
        assert!(
            s.contains("x_seconds_bucket{view=\"v\",le=\"0.000025\"} 1"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{view=\"v\",le=\"0.005\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{view=\"v\",le=\"10\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{view=\"v\",le=\"+Inf\"} 3"),
            "{s}"
        );
        assert!(s.contains("x_seconds_count{view=\"v\"} 3"), "{s}");
        assert_eq!(h.count(), 3);
    }
}

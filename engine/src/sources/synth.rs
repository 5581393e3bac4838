//! A synthetic stream of card transactions: Zipf-distributed card ids, event times
//! with a little disorder, a few late events and a few bad rows. It drives `panes demo`
//! and the benchmarks, so it needs no external service.

use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};

/// Shape of the synthetic stream.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// Distinct cards.
    pub keys: u64,
    /// Zipf exponent of card popularity (1.1 = a few very hot cards).
    pub zipf: f64,
    /// Card ids as strings (`card-000042`) instead of Int64.
    pub string_keys: bool,
    /// Event time of the first event, epoch ms.
    pub start_ms: i64,
    /// Event-time rate: events per second of event time.
    pub events_per_second: f64,
    /// Each event's time is moved back by up to this many ms (disorder within lateness).
    pub disorder_ms: i64,
    /// Fraction of events moved back by `late_by_ms` (beyond the lateness bound).
    pub late_fraction: f64,
    /// How far back late events are moved.
    pub late_by_ms: i64,
    /// Fraction of rows with a null card or a null time.
    pub bad_fraction: f64,
    /// Fraction of null amounts.
    pub null_fraction: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            keys: 100_000,
            zipf: 1.1,
            string_keys: false,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            events_per_second: 10_000.0,
            disorder_ms: 2_000,
            late_fraction: 0.001,
            late_by_ms: 3_600_000,
            bad_fraction: 0.0005,
            null_fraction: 0.01,
            seed: 42,
        }
    }
}

/// The generator.
#[derive(Debug)]
pub struct Synth {
    cfg: SynthConfig,
    rng: StdRng,
    zipf: Zipf<f64>,
    amount: LogNormal<f64>,
    produced: u64,
    schema: SchemaRef,
}

impl Synth {
    /// A generator for `cfg`.
    ///
    /// # Panics
    /// When `cfg.keys` is 0 or `cfg.zipf` is not positive.
    pub fn new(cfg: SynthConfig) -> Self {
        let key_type = if cfg.string_keys {
            DataType::Utf8
        } else {
            DataType::Int64
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("card", key_type, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("amount", DataType::Float64, true),
            Field::new("items", DataType::Int32, false),
        ]));
        Synth {
            rng: StdRng::seed_from_u64(cfg.seed),
            zipf: Zipf::new(cfg.keys as f64, cfg.zipf).expect("keys > 0 and zipf > 0"),
            amount: LogNormal::new(3.5, 1.0).expect("valid lognormal"),
            produced: 0,
            schema,
            cfg,
        }
    }

    /// The schema of the batches.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Events produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Event time of the latest event produced (before disorder).
    pub fn clock_ms(&self) -> i64 {
        self.cfg.start_ms + (self.produced as f64 * 1000.0 / self.cfg.events_per_second) as i64
    }

    /// The card id of popularity rank `rank` (1 = hottest) as generated.
    pub fn card(rank: u64) -> i64 {
        // Spread ranks over a wide id space so hot cards are not small integers.
        (rank.wrapping_mul(0x9e37_79b9) % 1_000_000_007) as i64
    }

    /// The next `rows` events.
    pub fn next_batch(&mut self, rows: usize) -> RecordBatch {
        let cfg = &self.cfg;
        let mut ts = TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC");
        let mut amount = Float64Builder::with_capacity(rows);
        let mut items = Int32Builder::with_capacity(rows);
        let mut int_keys = Int64Builder::with_capacity(rows);
        let mut str_keys = StringBuilder::with_capacity(rows, rows * 12);
        for _ in 0..rows {
            let base =
                cfg.start_ms + (self.produced as f64 * 1000.0 / cfg.events_per_second) as i64;
            self.produced += 1;
            let mut t = base - self.rng.random_range(0..=cfg.disorder_ms);
            if self.rng.random_bool(cfg.late_fraction) {
                t -= cfg.late_by_ms;
            }
            let rank = self.zipf.sample(&mut self.rng) as u64;
            let bad = self.rng.random_bool(cfg.bad_fraction);
            let null_key = bad && self.rng.random_bool(0.5);
            let null_ts = bad && !null_key;
            match (cfg.string_keys, null_key) {
                (_, true) => {
                    int_keys.append_null();
                    str_keys.append_null();
                }
                (false, false) => int_keys.append_value(Self::card(rank)),
                (true, false) => str_keys.append_value(format!("card-{:09}", Self::card(rank))),
            }
            if null_ts {
                ts.append_null()
            } else {
                ts.append_value(t)
            }
            if self.rng.random_bool(cfg.null_fraction) {
                amount.append_null();
            } else {
                amount.append_value((self.amount.sample(&mut self.rng) * 100.0).round() / 100.0);
            }
            items.append_value(self.rng.random_range(1..=12));
        }
        let key: ArrayRef = if cfg.string_keys {
            Arc::new(str_keys.finish())
        } else {
            Arc::new(int_keys.finish())
        };
        RecordBatch::try_new(
            self.schema.clone(),
            vec![
                key,
                Arc::new(ts.finish()),
                Arc::new(amount.finish()),
                Arc::new(items.finish()),
            ],
        )
        .expect("synthetic batch matches its schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_shaped() {
        let cfg = SynthConfig {
            keys: 1000,
            ..Default::default()
        };
        let a = Synth::new(cfg.clone()).next_batch(5000);
        let b = Synth::new(cfg).next_batch(5000);
        assert_eq!(a, b);
        assert_eq!(a.num_rows(), 5000);
        assert!(a.column(2).null_count() > 0);
    }
}

//! A view's two replicas of its core and the writer's protocol that keeps them equal
//! (see [`Engine`](super::Engine) for why reads never wait for folds).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use arrow_array::RecordBatch;
use panes_kernels::Backend;

use super::engine::EngineOptions;
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::ingest::strings::StringValues;
use crate::ingest::{Delta, ViewCore};
use crate::ingest::{KeyCap, PushReport, RejectReason, StateBudget, string_charge};
use crate::spec::CompiledView;

/// One view: its definition, two replicas of its core, and the writer's log.
///
/// See [`Engine`] for the protocol.
#[derive(Debug)]
pub(super) struct View {
    pub(super) compiled: CompiledView,
    /// Held by the one writer (push, fold, publish); guards the back replica's use.
    pub(super) writer: Mutex<Writer>,
    pub(super) replicas: [RwLock<ViewCore>; 2],
    /// Index of the replica readers use.
    pub(super) front: AtomicUsize,
    /// Publishes so far: a read reports the version it saw.
    pub(super) version: AtomicU64,
    /// Durations of this view's folds (both replicas).
    pub(super) fold_time: Arc<Histogram>,
    /// Per accepted event, the time from its push's arrival to the publish that made
    /// it visible to reads.
    pub(super) freshness: Histogram,
}

/// The writer's side of a view: what the back replica has taken since the last
/// publish, for the other replica to catch up with.
#[derive(Debug, Default)]
pub(super) struct Writer {
    /// Whether anything was pushed since the last publish.
    pub(super) pushed: bool,
    /// The keys the back replica created and the micro-batches it folded since the
    /// last publish (see [`ViewCore::catch_up`]).
    pub(super) delta: Delta,
    /// Keys this view charged to the engine's state budget.
    pub(super) charged: u64,
    /// Bytes its string table charged to the budget (see `ingest::string_charge`).
    pub(super) charged_strings: u64,
    /// Set when a replay failed and the replicas may differ: the view refuses writes.
    pub(super) broken: Option<String>,
    /// The pushes since the last publish: when each arrived and the events it accepted.
    pub(super) arrivals: Vec<(std::time::Instant, u64)>,
}

/// A consistent, published state of a view, held for one read.
pub(super) struct Snapshot<'a> {
    pub(super) core: RwLockReadGuard<'a, ViewCore>,
    pub(super) version: u64,
}

/// Makes `core` a replica of this engine's view: the engine's read-copy setting and
/// the view's fold-time histogram (for new replicas and for restored ones alike).
pub(super) fn adopt(core: &mut ViewCore, options: &EngineOptions, fold_time: &Arc<Histogram>) {
    core.state.keep_read_copy(options.read_copy);
    core.fold_time = Some(fold_time.clone());
    core.keep_delta();
}

pub(super) fn poisoned(view: &str) -> PanesError {
    PanesError::Internal(format!("view {view:?}: a fold panicked"))
}

/// Ingests `batch` (rows from `first_row` of the pushed stream) into `core` in slices
/// of `batch_rows`, folding whenever the pending micro-batch is due (by size; by age
/// too when `by_age`).
pub(super) fn push_into(
    core: &mut ViewCore,
    compiled: &CompiledView,
    batch: &RecordBatch,
    first_row: usize,
    options: &EngineOptions,
    backend: &dyn Backend,
    by_age: bool,
    cap: &mut KeyCap<'_>,
) -> Result<PushReport> {
    let rows = batch.num_rows();
    let step = options.batch_rows.max(1);
    let mut report = PushReport::default();
    let mut offset = 0;
    loop {
        let len = step.min(rows - offset);
        let part = batch.slice(offset, len);
        match core.ingest(compiled, &part, first_row + offset, cap) {
            Ok(r) => report.append(r),
            Err(e) => {
                // Every slice has the batch's schema, so a schema error comes from
                // the first one; the rest of the batch is rejected with it.
                if matches!(e, PanesError::Schema { .. }) {
                    core.counters.rejected[RejectReason::Schema as usize] +=
                        (rows - offset - len) as u64;
                }
                return Err(e);
            }
        }
        let due = core.pending.len() >= options.batch_rows
            || (by_age
                && core
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= options.batch_age));
        if due {
            core.fold_pending(backend)?;
        }
        offset += len;
        if offset >= rows {
            return Ok(report);
        }
    }
}

impl View {
    pub(super) fn name(&self) -> &str {
        &self.compiled.spec.name
    }

    /// What one more key costs the state budget: its panes in both replicas, and in
    /// their read copies when kept.
    pub(super) fn key_charge(&self, options: &EngineOptions) -> u64 {
        let copies = 2 * (1 + options.read_copy as u64);
        self.compiled.bytes_per_key() as u64 * copies
    }

    /// The cap of one push: the view's `max_keys` (else the engine's default), and
    /// the engine's state budget.
    pub(super) fn cap<'a>(&self, options: &'a EngineOptions) -> KeyCap<'a> {
        KeyCap::keys(self.compiled.spec.max_keys.or(options.max_keys))
            .with_budget(options.state_budget.as_deref(), self.key_charge(options))
    }

    /// Sets what the view charges the budget to `keys` keys and the strings of
    /// `strings` (after a restore).
    pub(super) fn recharge(
        &self,
        writer: &mut Writer,
        options: &EngineOptions,
        keys: usize,
        strings: &StringValues,
    ) {
        if let Some(budget) = options.state_budget.as_deref() {
            let per_key = self.key_charge(options);
            budget.release(writer.charged * per_key + writer.charged_strings);
            writer.charged = keys as u64;
            writer.charged_strings = string_charge(strings.string_bytes(), strings.len());
            budget.charge(writer.charged * per_key + writer.charged_strings);
        }
    }

    /// Gives what the view charged to the budget back (the engine is dropped).
    pub(super) fn release(&self, options: &EngineOptions, budget: &StateBudget) {
        if let Ok(writer) = self.writer.lock() {
            budget.release(writer.charged * self.key_charge(options) + writer.charged_strings);
        }
    }

    pub(super) fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        let w = self.writer.lock().map_err(|_| poisoned(self.name()))?;
        if let Some(why) = &w.broken {
            return Err(PanesError::Internal(format!(
                "view {:?} stopped taking writes: {why}",
                self.name()
            )));
        }
        Ok(w)
    }

    /// The back replica; only the holder of the writer lock may call this.
    pub(super) fn back(
        &self,
        _writer: &MutexGuard<'_, Writer>,
    ) -> Result<RwLockWriteGuard<'_, ViewCore>> {
        let back = 1 - self.front.load(Ordering::Acquire);
        self.replicas[back]
            .write()
            .map_err(|_| poisoned(self.name()))
    }

    /// A published replica, for one read. Never waits for the writer.
    pub(super) fn snapshot(&self) -> Result<Snapshot<'_>> {
        loop {
            let version = self.version.load(Ordering::Acquire);
            let i = self.front.load(Ordering::Acquire);
            match self.replicas[i].try_read() {
                Ok(core) => return Ok(Snapshot { core, version }),
                // The writer holds it: the front moved after our load. Retry on the new one.
                Err(TryLockError::WouldBlock) => std::thread::yield_now(),
                Err(TryLockError::Poisoned(_)) => return Err(poisoned(self.name())),
            }
        }
    }

    /// Folds the back replica's pending events and, if it took anything since the last
    /// publish, publishes it and brings the other replica up to date from what the
    /// back one took (its new keys and decoded micro-batches: nothing is decoded twice).
    pub(super) fn publish(
        &self,
        writer: &mut MutexGuard<'_, Writer>,
        backend: &dyn Backend,
    ) -> Result<()> {
        {
            let mut back = self.back(writer)?;
            let folded = back.fold_pending(backend);
            back.take_delta(&mut writer.delta);
            folded?;
        }
        if !writer.pushed {
            return Ok(());
        }
        let old = self.front.load(Ordering::Acquire);
        self.front.store(1 - old, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
        for (arrived, events) in writer.arrivals.drain(..) {
            self.freshness.record_n(arrived.elapsed(), events);
        }
        // Waits for the reads already inside the old front; new reads use the new one.
        let mut core = self.replicas[old]
            .write()
            .map_err(|_| poisoned(self.name()))?;
        let front = self.replicas[1 - old]
            .read()
            .map_err(|_| poisoned(self.name()))?;
        let caught_up = core.catch_up(&front, &mut writer.delta, backend);
        writer.pushed = false;
        writer.delta = Delta::default();
        if let Err(e) = &caught_up {
            writer.broken = Some(format!(
                "bringing the second replica up to date failed: {e}"
            ));
        }
        caught_up
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use panes_kernels::BackendKind;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::checkpoint::format::encode_at;
    use crate::{Engine, EngineOptions, FeatureFile};

    const FEATURES: &str = include_str!("../../tests/data/fold_paths.toml");

    /// Both replicas' checkpoint bytes (keys, panes, counters, watermark), after a
    /// settle.
    fn replica_bytes(engine: &Engine) -> [Vec<u8>; 2] {
        let v = engine.view("v").unwrap();
        let _writer = v.writer().unwrap();
        let bytes =
            |i: usize| encode_at(&v.compiled, &v.replicas[i].read().unwrap(), &[], 0).unwrap();
        [bytes(0), bytes(1)]
    }

    fn batch(rng: &mut StdRng, clock: &mut i64) -> RecordBatch {
        let n = rng.random_range(1..3000);
        let mut keys = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut xs = Vec::with_capacity(n);
        for _ in 0..n {
            *clock += rng.random_range(0..3);
            keys.push(rng.random_bool(0.99).then(|| rng.random_range(0..400i64)));
            // Late events, within the lateness and beyond it.
            ts.push(if rng.random_bool(0.1) {
                *clock - rng.random_range(0..100)
            } else {
                *clock
            });
            xs.push(match rng.random_range(0..20) {
                0 => None,
                1 => Some(f64::NAN),
                2 => Some(-0.0),
                3 => Some(0.0),
                _ => Some(rng.random_range(-1.0e3..1.0e3)),
            });
        }
        let schema = Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("ts", DataType::Int64, false),
            Field::new("x", DataType::Float64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(keys)),
                Arc::new(Int64Array::from(ts)),
                Arc::new(Float64Array::from(xs)),
            ],
        )
        .unwrap()
    }

    /// The second replica catches up from the first one's keys, decoded micro-batches
    /// and fold logs: after random pushes with late, null and NaN rows, in micro-batches
    /// of random sizes, published at random, both replicas hold the same bytes.
    #[test]
    fn r18_replicas_are_bitwise_equal_after_random_pushes() {
        let file = FeatureFile::parse(FEATURES, "replicas.toml").unwrap();
        let mut caught_up = (0, 0);
        for (seed, backend) in
            (0..12).zip([BackendKind::Cpu, BackendKind::Scalar].into_iter().cycle())
        {
            let mut rng = StdRng::seed_from_u64(seed);
            let options = EngineOptions {
                backend: Some(backend),
                batch_rows: rng.random_range(16..5000),
                shards: [1, 4, 64][rng.random_range(0..3)],
                ..Default::default()
            };
            let engine = Engine::new(&file, options).unwrap();
            let mut clock = 1_000_000;
            for _ in 0..rng.random_range(1..12) {
                engine.push("v", &batch(&mut rng, &mut clock)).unwrap();
                if rng.random_bool(0.4) {
                    engine.flush().unwrap();
                    let [a, b] = replica_bytes(&engine);
                    assert!(
                        a == b,
                        "seed {seed} ({backend}): replicas differ after a publish"
                    );
                }
            }
            engine.flush().unwrap();
            let [a, b] = replica_bytes(&engine);
            assert!(
                a == b,
                "seed {seed} ({backend}): replicas differ at the end"
            );
            let v = engine.view("v").unwrap();
            for r in &v.replicas {
                let (replayed, refolded) = r.read().unwrap().caught_up;
                caught_up.0 += replayed;
                caught_up.1 += refolded;
            }
        }
        // Both ways of catching up were taken: fold logs replayed, and micro-batches
        // folded again (small ones, the Scalar backend's, those past the log budget).
        assert!(
            caught_up.0 > 10 && caught_up.1 > 10,
            "replayed, folded again: {caught_up:?}"
        );
    }
}

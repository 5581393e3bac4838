//! A view's two replicas of its core and the writer's protocol that keeps them equal
//! (see [`Engine`](super::Engine) for why reads never wait for folds).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use arrow_array::RecordBatch;
use panes_kernels::Backend;

use super::engine::EngineOptions;
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::ingest::ViewCore;
use crate::ingest::{KeyCap, PushReport, RejectReason, StateBudget};
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
}

/// The writer's side of a view: what the back replica has taken since the last
/// publish, for the other replica to replay.
#[derive(Debug, Default)]
pub(super) struct Writer {
    /// Each push since the last publish: the batch, its first row's number, and the
    /// key count the back replica had after it (the cap of its replay).
    pub(super) log: Vec<(RecordBatch, usize, usize)>,
    /// Keys this view charged to the engine's state budget.
    pub(super) charged: u64,
    /// Set when a replay failed and the replicas may differ: the view refuses writes.
    pub(super) broken: Option<String>,
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

    /// Sets the keys charged to the budget to `keys` (after a restore).
    pub(super) fn recharge(&self, writer: &mut Writer, options: &EngineOptions, keys: usize) {
        if let Some(budget) = options.state_budget.as_deref() {
            let per_key = self.key_charge(options);
            budget.release(writer.charged * per_key);
            budget.charge(keys as u64 * per_key);
            writer.charged = keys as u64;
        }
    }

    /// Gives the keys charged to the budget back (the engine is dropped).
    pub(super) fn release(&self, options: &EngineOptions, budget: &StateBudget) {
        if let Ok(writer) = self.writer.lock() {
            budget.release(writer.charged * self.key_charge(options));
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
    /// publish, publishes it and brings the other replica up to date.
    pub(super) fn publish(
        &self,
        writer: &mut MutexGuard<'_, Writer>,
        options: &EngineOptions,
        backend: &dyn Backend,
    ) -> Result<()> {
        {
            let mut back = self.back(writer)?;
            back.fold_pending(backend)?;
        }
        if writer.log.is_empty() {
            return Ok(());
        }
        let old = self.front.load(Ordering::Acquire);
        self.front.store(1 - old, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
        // Waits for the reads already inside the old front; new reads use the new one.
        let mut core = self.replicas[old]
            .write()
            .map_err(|_| poisoned(self.name()))?;
        let replay = (|| {
            for (batch, first_row, keys) in &writer.log {
                // The same rows in the same order make the same decisions (a push
                // creates the first n of its new keys; see `KeyCap`); the errors were
                // reported when the rows were first pushed.
                match push_into(
                    &mut core,
                    &self.compiled,
                    batch,
                    *first_row,
                    options,
                    backend,
                    false,
                    &mut KeyCap::keys(Some(*keys)),
                ) {
                    Ok(_) | Err(PanesError::Schema { .. } | PanesError::Invalid(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            core.fold_pending(backend)
        })();
        writer.log.clear();
        if let Err(e) = &replay {
            writer.broken = Some(format!("replaying a publish failed: {e}"));
        }
        replay
    }
}

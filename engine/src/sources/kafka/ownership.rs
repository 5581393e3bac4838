//! Partition ownership: taking partitions (up to [`RESTORE_THREADS`] restored at a
//! time; each claims the next ownership generation, which fences the previous owner
//! and tells other instances where to route reads, then restores its newest valid
//! checkpoint), checkpointing them and committing their offsets, and giving them up on
//! revocation or when fenced.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaView;
use super::consumer::SourceContext;
use crate::checkpoint::{CheckpointDir, SourcePosition};
use crate::error::{PanesError, Result};
use crate::online::Engine;

/// Restores at most this many partitions of one assignment at a time.
const RESTORE_THREADS: usize = 8;

/// One owned partition: its engine and where its source stands.
#[derive(Debug)]
pub(super) struct Partition {
    pub(super) engine: Engine,
    pub(super) dir: CheckpointDir,
    /// Offset of the next message to ingest.
    pub(super) next_offset: AtomicI64,
    /// `next_offset` of the newest durable checkpoint.
    pub(super) checkpointed: AtomicI64,
    /// Assignment this partition belongs to; buffered rows of older ones are dropped.
    pub(super) epoch: u64,
}

impl KafkaView {
    /// Takes `parts` ([`Self::assign`]), restoring up to [`RESTORE_THREADS`] at a
    /// time: the group waits for this callback, and a restore is mostly waiting on the
    /// checkpoint store. Returns each partition's offset to consume from; one that cannot
    /// be restored replays from the start.
    pub(super) fn assign_all(&self, parts: &[i32]) -> Vec<(i32, Offset)> {
        let assign = |p: i32| {
            let offset = self.assign(p).unwrap_or_else(|e| {
                tracing::warn!(
                    view = %self.spec.name,
                    partition = p,
                    error = %e,
                    "cannot restore the partition; replaying it from the start"
                );
                Offset::Beginning
            });
            (p, offset)
        };
        let per_thread = parts.len().div_ceil(RESTORE_THREADS).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .chunks(per_thread)
                .map(|chunk| {
                    let spawned = std::thread::Builder::new()
                        .name("panes-restore".into())
                        .spawn_scoped(scope, move || chunk.iter().map(|&p| assign(p)).collect());
                    (chunk, spawned.ok())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|(chunk, handle)| match handle.map(|h| h.join()) {
                    Some(Ok(done)) => done,
                    // No thread to be had, or it failed: this one restores the chunk itself.
                    _ => chunk.iter().map(|&p| assign(p)).collect::<Vec<_>>(),
                })
                .collect()
        })
    }

    /// Takes partition `p`: restores its newest valid checkpoint (skipping corrupt
    /// ones, each reported) and returns the offset to consume from.
    pub(super) fn assign(&self, p: i32) -> Result<Offset> {
        let started = std::time::Instant::now();
        let engine = Engine::with_backend(&self.file, self.options.clone(), self.backend.clone())?;
        let mut dir = CheckpointDir::new(self.partition_dir(p), 3);
        // Claimed first: a previous owner that still runs (paused past its session)
        // can no longer write over what this one restores and writes.
        let generation = dir.claim(&self.advertise)?;
        let view = self.spec.name.clone();
        let restored = dir.restore_newest(
            |bytes| engine.restore(&view, bytes).map_err(|e| e.to_string()),
            |path, why| {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    view = %view,
                    partition = p,
                    path = %path,
                    reason = %why,
                    "skipping checkpoint"
                );
            },
        )?;
        let next = match &restored {
            Some((info, path)) => {
                self.stats.restored.fetch_add(1, Ordering::Relaxed);
                let next = info
                    .positions
                    .iter()
                    .find(|s| s.partition == p)
                    .map_or(0, |s| s.next_offset);
                tracing::info!(
                    view = %view,
                    partition = p,
                    path = %path,
                    events = info.folded,
                    offset = next,
                    generation,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "restored from a checkpoint; resuming"
                );
                next
            }
            None => 0,
        };
        let part = Partition {
            engine,
            dir,
            next_offset: AtomicI64::new(next),
            checkpointed: AtomicI64::new(if restored.is_some() { next } else { -1 }),
            epoch: self.epoch.load(Ordering::Acquire),
        };
        self.owned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(p, Arc::new(part));
        Ok(if restored.is_some() {
            Offset::Offset(next)
        } else {
            Offset::Beginning
        })
    }

    /// Writes a checkpoint of partition `p` if it took events since the last one
    /// (or `force`), then returns its position for the offset commit.
    fn checkpoint(&self, p: i32, part: &Partition, force: bool) -> Option<SourcePosition> {
        let next = part.next_offset.load(Ordering::Acquire);
        if !force && next == part.checkpointed.load(Ordering::Acquire) {
            return None;
        }
        if let Some(producer) = &self.dead_letters {
            // Dead letters of the events before `next` are out before their offsets commit.
            let _ = producer.0.flush(Duration::from_secs(10));
        }
        let position = SourcePosition {
            partition: p,
            next_offset: next,
        };
        let started = std::time::Instant::now();
        let written = part
            .engine
            .checkpoint(&self.spec.name, &[position])
            .and_then(|bytes| part.dir.write(&bytes).map(|path| (path, bytes.len())));
        match written {
            Ok((path, bytes)) => {
                part.checkpointed.store(next, Ordering::Release);
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    view = %self.spec.name,
                    partition = p,
                    path = %path,
                    bytes,
                    offset = next,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "checkpoint written"
                );
                Some(position)
            }
            Err(e @ PanesError::Fenced(_)) => {
                // Another instance took the partition while this one was away (paused
                // past its session): its state is the one that counts from now on.
                self.stats.checkpoint_fenced.fetch_add(1, Ordering::Relaxed);
                self.owned
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&p);
                tracing::error!(
                    view = %self.spec.name,
                    partition = p,
                    error = %e,
                    "checkpoint refused: the partition was taken by another instance; giving it up"
                );
                None
            }
            Err(e) => {
                self.stats
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    view = %self.spec.name,
                    partition = p,
                    error = %e,
                    "checkpoint failed (the previous one stays in force)"
                );
                None
            }
        }
    }

    /// Checkpoints the partitions that took events, then commits their offsets.
    pub(super) fn checkpoint_all(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        mode: CommitMode,
        force: bool,
    ) {
        let owned: Vec<_> = self
            .owned_map()
            .iter()
            .map(|(&p, part)| (p, part.clone()))
            .collect();
        let done: Vec<_> = owned
            .iter()
            .filter_map(|(p, part)| self.checkpoint(*p, part, force))
            .collect();
        self.commit(consumer, &done, mode);
    }

    fn commit(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        positions: &[SourcePosition],
        mode: CommitMode,
    ) {
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for s in positions {
            let _ = tpl.add_partition_offset(
                &self.source.topic,
                s.partition,
                Offset::Offset(s.next_offset),
            );
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // Only monitoring reads committed offsets; recovery uses the checkpoints.
            tracing::warn!(view = %self.spec.name, error = %e, "offset commit failed");
        }
    }

    /// Gives up the partitions in `tpl`: a final checkpoint each, then their offsets.
    pub(super) fn revoke(&self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList) {
        let mut done = Vec::new();
        for e in tpl.elements() {
            let part = self
                .owned
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&e.partition());
            if let Some(part) = part
                && let Some(pos) = self.checkpoint(e.partition(), &part, false)
            {
                done.push(pos);
            }
        }
        self.commit(consumer, &done, CommitMode::Sync);
    }
}

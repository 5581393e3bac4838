//! The read and write thread pools: CPU work never runs on tokio's threads.

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::Status;

use crate::error::PanesError;

/// Runs `f` on `pool` and waits for its result without blocking the runtime.
pub(super) async fn run_on<T: Send + 'static>(
    pool: &Workers,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    run_weighted(pool, 0, f).await
}

/// Like [`run_on`], for a job holding about `bytes` of input: on a bounded pool it
/// first waits until the jobs queued and running hold less than the bound, so that a
/// flood of large messages pushes back on their senders (they are not read further
/// meanwhile, and HTTP/2 flow control stops them) instead of growing the queue.
pub(super) async fn run_weighted<T: Send + 'static>(
    pool: &Workers,
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let permit = match &pool.bound {
        Some((permits, capacity)) => {
            // Units of 64 KiB, at least one, at most the whole bound.
            let units = (bytes >> 16).clamp(1, *capacity as usize) as u32;
            Some(
                permits
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .map_err(|_| Status::unavailable("the server is shutting down"))?,
            )
        }
        None => None,
    };
    let (tx, rx) = oneshot::channel();
    pool.spawn(Box::new(move || {
        let out = f();
        // The room is given back before the result, so that a caller who has its
        // result never sees its own job still counted (a panic gives it back too).
        drop(permit);
        let _ = tx.send(out);
    }))?;
    rx.await
        .map_err(|_| Status::internal("a worker thread panicked (this is a bug in Panes)"))
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of plain threads taking jobs from one queue.
///
/// Not a rayon pool on purpose: a rayon worker that waits for its own parallel work
/// (the `Cpu` backend's fold) runs other queued jobs meanwhile, and a queued push that
/// blocks on the view's writer lock, held further up that same thread's stack, would
/// deadlock it. Jobs here call into rayon's global pool from outside, which only ever
/// runs the kernels' own sub-tasks.
#[derive(Debug)]
pub(super) struct Workers {
    queue: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    /// For a bounded pool: permits of 64 KiB of queued and running input, and their
    /// number.
    bound: Option<(Arc<tokio::sync::Semaphore>, u32)>,
}

impl Workers {
    /// `n` threads named `panes-{name}-{i}`, each calling `setup` first (to set its
    /// scheduling priority).
    pub(super) fn new(
        name: &'static str,
        n: usize,
        setup: impl Fn() + Clone + Send + 'static,
    ) -> crate::error::Result<Workers> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let setup = setup.clone();
            std::thread::Builder::new()
                .name(format!("panes-{name}-{i}"))
                .spawn(move || {
                    setup();
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = match rx.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job drops its oneshot sender: the caller gets
                            // INTERNAL, and the thread keeps serving.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| {
                    PanesError::Internal(format!("cannot start the {name} threads: {e}"))
                })?;
        }
        Ok(Workers {
            queue: std::sync::Mutex::new(Some(tx)),
            bound: None,
        })
    }

    /// Bounds the input that jobs queued and running may hold to `bytes` (see
    /// [`run_weighted`]).
    pub(super) fn bounded(mut self, bytes: usize) -> Self {
        let capacity = (bytes >> 16).clamp(1, u32::MAX as usize >> 4) as u32;
        self.bound = Some((
            Arc::new(tokio::sync::Semaphore::new(capacity as usize)),
            capacity,
        ));
        self
    }

    /// Bytes of input held by queued and running jobs now, with what writes waiting
    /// for room have reserved so far (0 for an unbounded pool).
    pub(super) fn queued_bytes(&self) -> usize {
        self.bound.as_ref().map_or(0, |(permits, capacity)| {
            (*capacity as usize - permits.available_permits()) << 16
        })
    }

    fn spawn(&self, job: Job) -> Result<(), Status> {
        let queue = self
            .queue
            .lock()
            .map_err(|_| Status::internal("worker queue poisoned (this is a bug in Panes)"))?;
        queue
            .as_ref()
            .and_then(|q| q.send(job).ok())
            .ok_or_else(|| Status::unavailable("the server is shutting down"))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the queue ends the threads once they finish their current job.
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn r17_a_bounded_pool_makes_large_writes_wait_instead_of_queueing() {
        let pool = Arc::new(Workers::new("test", 2, || {}).unwrap().bounded(256 << 10));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move {
                run_weighted(&pool, 192 << 10, move || hold.recv().unwrap()).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.queued_bytes(), 192 << 10);
        // A second write of 128 KiB does not fit beside the first: it waits, unqueued.
        let started = Arc::new(AtomicBool::new(false));
        let second = {
            let (pool, started) = (pool.clone(), started.clone());
            tokio::spawn(async move {
                run_weighted(&pool, 128 << 10, move || {
                    started.store(true, Ordering::SeqCst)
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!started.load(Ordering::SeqCst), "the second write waited");
        // (A waiting write reserves what is free as it waits: the bound is reached.)
        assert_eq!(pool.queued_bytes(), 256 << 10);
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert!(started.load(Ordering::SeqCst));
        assert_eq!(pool.queued_bytes(), 0);
        // A write larger than the whole bound still runs, alone.
        run_weighted(&pool, 10 << 20, || ()).await.unwrap();
    }
}

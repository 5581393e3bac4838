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
    let (tx, rx) = oneshot::channel();
    pool.spawn(Box::new(move || {
        let _ = tx.send(f());
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

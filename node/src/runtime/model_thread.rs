//! One long-lived thread for the model's own arithmetic: local training and
//! evaluation of heads.
//!
//! candle's matrix kernels keep a scratch buffer in each thread that runs
//! them (gemm's thread-local stack, about 0.5 MiB with these models and
//! more with larger ones). Run on tokio's blocking pool, model work left one
//! such buffer behind on every pool thread it ever touched, and under a
//! flood — when the pool grows to serve reads — the node's memory crept up
//! with the pool (a heap profile of the soak's flooded node found 24 MiB of
//! them over 46 threads). On one thread there is one buffer; jobs run one
//! at a time, in the order they were given.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tokio::sync::{mpsc, oneshot};

/// Jobs waiting for the model thread: one training and an evaluation or
/// two is all a node ever has in flight; an evaluation finding the queue
/// full is skipped (the next head is evaluated instead).
const MODEL_QUEUE: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on the model thread. Cloning shares the thread; the thread
/// ends once every handle is dropped.
#[derive(Clone)]
pub(super) struct ModelThread {
    jobs: mpsc::Sender<Job>,
}

impl ModelThread {
    /// Starts the thread.
    pub(super) fn start() -> std::io::Result<Self> {
        let (jobs, mut rx) = mpsc::channel::<Job>(MODEL_QUEUE);
        std::thread::Builder::new()
            .name("tapestry-model".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    // A job that panics loses its answer (its caller sees
                    // the thread's answer dropped), not the thread.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(ModelThread { jobs })
    }

    /// Runs `f` on the model thread, after the jobs before it. `None` if
    /// it panicked or the thread is gone.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (job, answer) = wrap(f);
        self.jobs.send(job).await.ok()?;
        wait(answer).await
    }

    /// Like [`ModelThread::run`], but gives up at once (`None`) if
    /// [`MODEL_QUEUE`] jobs are already waiting.
    pub(super) async fn try_run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (job, answer) = wrap(f);
        self.jobs.try_send(job).ok()?;
        wait(answer).await
    }
}

/// The answer of a job given to the model thread. The wait is itself a
/// blocking task: tokio counts it as work in flight, so a runtime on a
/// paused clock (the node's in-process tests) does not jump time forward to
/// the next timer while the model thread computes, as it would if nothing
/// ran. It holds a pool thread per job waiting (at most [`MODEL_QUEUE`] + 1,
/// of 16); a waiting thread runs no model code, so holds no scratch buffer.
async fn wait<T: Send + 'static>(answer: oneshot::Receiver<T>) -> Option<T> {
    tokio::task::spawn_blocking(move || answer.blocking_recv().ok())
        .await
        .ok()
        .flatten()
}

fn wrap<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (Job, oneshot::Receiver<T>) {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    (job, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_one_thread_and_a_panic_does_not_stop_it() {
        let t = ModelThread::start().unwrap();
        let name = || std::thread::current().name().map(str::to_owned);
        let first = t.run(name).await;
        assert_eq!(first.flatten().as_deref(), Some("tapestry-model"));
        let id = t.run(|| std::thread::current().id()).await;
        assert_eq!(t.run(|| std::thread::current().id()).await, id);
        assert_eq!(t.run(|| -> u8 { panic!("a job fails") }).await, None);
        assert_eq!(t.run(|| 7).await, Some(7));
    }

    #[tokio::test]
    async fn an_optional_job_is_skipped_when_the_queue_is_full() {
        let t = ModelThread::start().unwrap();
        // Hold the thread in a job until released, then fill the queue.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let busy = tokio::spawn({
            let t = t.clone();
            async move {
                t.run(move || {
                    let _ = started_tx.send(());
                    held.recv().is_ok()
                })
                .await
            }
        });
        started.await.unwrap();
        let queued: Vec<_> = (0..MODEL_QUEUE)
            .map(|k| {
                let t = t.clone();
                tokio::spawn(async move { t.run(move || k).await })
            })
            .collect();
        while t.jobs.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(t.try_run(|| 99).await, None, "a full queue skips it");
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Some(true));
        for (k, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap(), Some(k));
        }
        assert_eq!(t.try_run(|| 99).await, Some(99));
    }
}

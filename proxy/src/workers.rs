//! The data path's workers: threads that each run an event loop of their own (a tokio runtime of one
//! thread), as Envoy's workers do. A listener hands each accepted connection to the worker with the
//! fewest connections, and the connection lives there until it ends: its sockets are registered with
//! that worker's epoll, so their readiness wakes that one thread and no other.
//!
//! On the proxy's main (multi-thread) runtime a relayed connection's events woke whichever worker held
//! the event loop, and a woken task woke a second worker to look for work to steal. On a two-core
//! machine, with both ends of a transfer busy, that cost a single relayed stream: in paired runs against
//! HAProxy (`benches/relay.sh`'s peers, six rounds) one iperf3 stream went from 0.74x to 0.82x HAProxy's
//! throughput (and, in another run, the relay's CPU per GB from 0.67 to 0.57 core-seconds); eight
//! streams and requests per second did not move out of the noise.
//!
//! Only the listeners' connections move here. The tunnels' relays stay on the main runtime: moved too,
//! they left the tunnel benchmark's throughput and requests per second where they were (its p99 was
//! lower, in the one run), and each process kept about 0.4 MB more code resident under load, against
//! an RSS bar set by rathole's.
//!
//! The threads start with the first connection handed over (a proxy without listeners has none); their
//! number is `--concurrency`, the number of CPUs by default ([`set_count`]). A connection is handed over
//! as a future that registers its sockets when it first runs, on the worker (see the listener).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static COUNT: OnceLock<usize> = OnceLock::new();
static WORKERS: OnceLock<Workers> = OnceLock::new();

/// Sets how many workers start with the first connection; once, before any connection. Later calls,
/// and calls after the workers started, are ignored.
pub fn set_count(count: usize) {
    let _ = COUNT.set(count.max(1));
}

/// Runs `task` on the worker with the fewest tasks, to its end.
pub fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    WORKERS.get_or_init(|| Workers::start(*COUNT.get_or_init(default_count))).spawn(task);
}

fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |count| count.get())
}

/// The running workers.
struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    /// A runtime of one thread, which runs every task handed to it: tokio's multi-thread scheduler with
    /// one worker, so that the runtime owns its thread, a task is handed over with `Runtime::spawn` from
    /// any thread, and the data path runs the same scheduler code as the main runtime.
    runtime: tokio::runtime::Runtime,
    /// Tasks handed to this worker and not yet ended.
    load: Arc<AtomicUsize>,
}

impl Workers {
    fn start(count: usize) -> Self {
        let workers = (0..count)
            .map(|index| Worker {
                runtime: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("keel-worker-{index}"))
                    .enable_all()
                    .build()
                    .expect("cannot start a data-path worker"),
                load: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Self { workers }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // Fewest tasks first; among equals the first, so that connections fill the workers in turn.
        let worker = self
            .workers
            .iter()
            .min_by_key(|worker| worker.load.load(Ordering::Relaxed))
            .expect("at least one worker");
        worker.load.fetch_add(1, Ordering::Relaxed);
        let ended = Decrement(Arc::clone(&worker.load));
        worker.runtime.spawn(async move {
            let _ended = ended;
            task.await;
        });
    }
}

/// Takes a task off its worker's load when the task ends (or is dropped).
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;

    #[test]
    fn tasks_spread_over_the_workers_and_each_runs_on_one_thread_to_its_end() {
        let workers = Workers::start(2);
        let (done, mut finished) = mpsc::unbounded_channel();
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        for _ in 0..4 {
            let done = done.clone();
            let mut released = release.subscribe();
            workers.spawn(async move {
                let before = std::thread::current().id();
                let _ = released.recv().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = done.send((before, std::thread::current().id()));
            });
        }
        // Four tasks held open: two on each worker.
        let loads = || workers.workers.iter().map(|w| w.load.load(Ordering::Relaxed)).collect::<Vec<_>>();
        assert_eq!(loads(), [2, 2]);
        release.send(()).unwrap();
        let mut threads = HashSet::new();
        for _ in 0..4 {
            let (before, after) = finished.blocking_recv().unwrap();
            assert_eq!(before, after, "a task moved between threads");
            threads.insert(after);
        }
        assert_eq!(threads.len(), 2, "the tasks ran on one worker");
        // Ended tasks leave their worker's load.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while loads() != [0, 0] {
            assert!(std::time::Instant::now() < deadline, "loads stuck at {:?}", loads());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

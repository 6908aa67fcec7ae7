//! Micro-batching of concurrent calls (the text encoder's prompts, the MoVQ's decodes): one loop
//! thread owns the stage's model calls and runs them one at a time; calls that arrive while one
//! runs wait in a FIFO queue and the next model call takes, with the call at the head of the
//! queue, every later call of the same class (e.g. the same latent size) whose rows still fit
//! under the row limit. So a call waits for at most the calls that arrived before it, plus the
//! `wait` an idle loop gives a first call's companions to arrive.
//!
//! A call whose caller went away or whose deadline passed while it waited leaves without
//! running; a model call is told to stop (its `stop` check) only when every call in it wants to
//! stop. Each call holds its [`Cancel`] (and so its admission slot) until its batch ends. A batch
//! function that panics fails its own calls, not the loop.
//!
//! Without a policy (batching off) every call runs the same batch function alone, on the
//! blocking pool, as many at once as the stage admits.

use crate::{Cancel, Metrics, ServiceError};
use std::collections::VecDeque;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How calls are grouped.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Most rows (prompts, images) per model call; a call with more runs alone.
    pub max_rows: usize,
    /// How long an idle loop lets the first call's companions arrive before it runs.
    pub wait: Duration,
}

/// Which calls may share a model call: calls of one `Shared` class are computed together;
/// `Alone` calls always run by themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    Shared(String),
    Alone,
}

impl Class {
    fn label(&self) -> &str {
        match self {
            Self::Shared(s) => s,
            Self::Alone => "alone",
        }
    }
}

/// One call of a batch, as the batch function sees it.
pub struct Item<J> {
    pub job: J,
    /// Its rows (the batch function's share of the output for it).
    pub rows: usize,
    pub cancel: Cancel,
}

/// A batch function: every call's result, in order, one per item. `stop` turns true when every
/// call of the batch wants to stop.
pub type BatchFn<J, R> =
    Arc<dyn Fn(Vec<Item<J>>, &dyn Fn() -> bool) -> Vec<Result<R, ServiceError>> + Send + Sync>;

struct Entry<J, R> {
    item: Item<J>,
    class: Class,
    queued: Instant,
    done: oneshot::Sender<Result<R, ServiceError>>,
}

/// The handle of a micro-batching loop (or, batching off, of the batch function alone).
pub struct MicroBatcher<J, R> {
    tx: Option<mpsc::Sender<Entry<J, R>>>,
    run: BatchFn<J, R>,
    metrics: Metrics,
}

impl<J, R> Clone for MicroBatcher<J, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            run: self.run.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<J: Send + 'static, R: Send + 'static> MicroBatcher<J, R> {
    /// With a `policy`, starts the loop thread `name`; batches are recorded in `metrics`
    /// (`kd_batch_size` rows per call, `kd_batch_requests` calls per batch, `kd_step_seconds`
    /// per model call, `kd_batch_wait_seconds` by class). Without, calls run alone.
    pub fn start(name: &str, metrics: Metrics, policy: Option<Policy>, run: BatchFn<J, R>) -> Self {
        let tx = policy.map(|policy| {
            let (tx, rx) = mpsc::channel();
            let (m, r) = (metrics.clone(), run.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run_loop(rx, &m, policy, r))
                .expect("spawn the micro-batching thread");
            tx
        });
        Self { tx, run, metrics }
    }

    /// Queues `job` (of `rows` rows, in `class`) and resolves with its result; `cancel` is
    /// held until its batch ends.
    pub async fn submit(
        &self,
        job: J,
        class: Class,
        rows: usize,
        cancel: &Cancel,
    ) -> Result<R, ServiceError> {
        let Some(tx) = &self.tx else {
            let (run, metrics) = (self.run.clone(), self.metrics.clone());
            return cancel
                .run_blocking(move |c| {
                    metrics.batch(rows);
                    let item = Item {
                        job,
                        rows,
                        cancel: c.clone(),
                    };
                    let result = run(vec![item], &|| c.should_stop()).pop();
                    result.unwrap_or_else(|| {
                        Err(ServiceError::Internal("a call returned no result".into()))
                    })
                })
                .await;
        };
        let (done, rx) = oneshot::channel();
        tx.send(Entry {
            item: Item {
                job,
                rows,
                cancel: cancel.clone(),
            },
            class,
            queued: Instant::now(),
            done,
        })
        .map_err(|_| ServiceError::Unavailable("the batching loop has stopped".into()))?;
        rx.await
            .map_err(|_| ServiceError::Internal("the batching loop dropped a call".into()))?
    }
}

fn run_loop<J, R>(
    rx: mpsc::Receiver<Entry<J, R>>,
    metrics: &Metrics,
    policy: Policy,
    run: BatchFn<J, R>,
) {
    let max_rows = policy.max_rows.max(1);
    let mut queue: VecDeque<Entry<J, R>> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(e) => queue.push_back(e),
                Err(_) => return,
            }
            let until = Instant::now() + policy.wait;
            while !full(&queue, max_rows) {
                let left = until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(e) => queue.push_back(e),
                    Err(_) => break,
                }
            }
        }
        queue.extend(rx.try_iter());
        let batch = take_batch(&mut queue, max_rows);
        if !batch.is_empty() {
            run_batch(batch, metrics, &run);
        }
    }
}

/// Whether the head call's batch cannot take more rows.
fn full<J, R>(queue: &VecDeque<Entry<J, R>>, max_rows: usize) -> bool {
    let Some(head) = queue.front() else {
        return false;
    };
    if head.class == Class::Alone {
        return true;
    }
    let rows: usize = queue
        .iter()
        .filter(|e| e.class == head.class)
        .map(|e| e.item.rows)
        .sum();
    rows >= max_rows
}

/// The next batch: the head call and every later one of its class whose rows fit, in arrival
/// order. Calls that should stop leave the queue with their reason.
fn take_batch<J, R>(queue: &mut VecDeque<Entry<J, R>>, max_rows: usize) -> Vec<Entry<J, R>> {
    let mut batch: Vec<Entry<J, R>> = Vec::new();
    let mut used = 0usize;
    let mut rest = VecDeque::with_capacity(queue.len());
    for e in queue.drain(..) {
        if let Err(reason) = e.item.cancel.check_at("while waiting for a batch") {
            let _ = e.done.send(Err(reason));
            continue;
        }
        let joins = match batch.first() {
            None => true,
            Some(head) => {
                head.class != Class::Alone
                    && e.class == head.class
                    && used.saturating_add(e.item.rows) <= max_rows
            }
        };
        if joins {
            used = used.saturating_add(e.item.rows);
            batch.push(e);
        } else {
            rest.push_back(e);
        }
    }
    *queue = rest;
    batch
}

fn run_batch<J, R>(batch: Vec<Entry<J, R>>, metrics: &Metrics, run: &BatchFn<J, R>) {
    let mut items = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for e in batch {
        metrics.batch_wait(e.class.label(), e.queued.elapsed());
        replies.push((e.done, e.item.cancel.clone()));
        items.push(e.item);
    }
    let rows: usize = items.iter().map(|i| i.rows).sum();
    let cancels: Vec<Cancel> = items.iter().map(|i| i.cancel.clone()).collect();
    let stop = || cancels.iter().all(Cancel::should_stop);
    metrics.batch(rows);
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(items, &stop)));
    metrics.batched_step(replies.len(), started.elapsed());
    let results = match outcome {
        Ok(results) if results.len() == replies.len() => results,
        Ok(results) => {
            let e = ServiceError::Internal(format!(
                "a batch of {} calls returned {} results",
                replies.len(),
                results.len()
            ));
            replies.iter().map(|_| Err(e.clone())).collect()
        }
        Err(_) => {
            let e = ServiceError::Internal("the model call of this batch panicked".into());
            tracing::error!(calls = replies.len(), "{e}");
            replies.iter().map(|_| Err(e.clone())).collect()
        }
    };
    for ((done, _cancel), result) in replies.into_iter().zip(results) {
        let _ = done.send(result);
    }
}

/// The per-call error for a batch whose shared model call failed with `e`: a call that wanted
/// to stop gets its own reason (cancelled, deadline), the others `e`.
pub fn shared_failure(cancel: &Cancel, e: &ServiceError, when: &str) -> ServiceError {
    match cancel.check_at(when) {
        Err(reason) => reason,
        Ok(()) => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The jobs of every batch run, in order.
    type Log = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose batch function records each batch's jobs and answers each job doubled;
    /// job 0 holds its batch until the returned sender sends (so that calls queue up behind it),
    /// job 666 panics.
    fn recording(policy: Policy) -> (MicroBatcher<u32, u32>, Log, Metrics, mpsc::Sender<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let metrics = Metrics::new("test");
        let (open, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let run: BatchFn<u32, u32> =
            Arc::new(move |items: Vec<Item<u32>>, _: &dyn Fn() -> bool| {
                let jobs: Vec<u32> = items.iter().map(|i| i.job).collect();
                assert!(!jobs.contains(&666), "a job the batch function cannot take");
                if jobs.contains(&0) {
                    gate.lock()
                        .unwrap()
                        .recv()
                        .expect("the test opens the gate");
                }
                log.lock().unwrap().push(jobs);
                items.iter().map(|i| Ok(i.job * 2)).collect()
            });
        let b = MicroBatcher::start("test-batcher", metrics.clone(), Some(policy), run);
        (b, seen, metrics, open)
    }

    fn shared(c: &str) -> Class {
        Class::Shared(c.into())
    }

    #[tokio::test]
    async fn queued_calls_share_batches_in_arrival_order_within_the_row_limit() {
        let policy = Policy {
            max_rows: 4,
            wait: Duration::ZERO,
        };
        let (b, seen, metrics, open) = recording(policy);
        let (c, _guard) = Cancel::new(None);
        let submit = |job, class, rows| {
            let (b, c) = (b.clone(), c.clone());
            tokio::spawn(async move { b.submit(job, class, rows, &c).await })
        };
        // Job 0 holds the loop while the others queue, in this order: 1 (a, 2 rows), 2 (b, 1),
        // 3 (a, 2), 4 (a, 1), 5 (alone, 1), 6 (a, 3).
        let mut handles = vec![submit(0, Class::Alone, 1)];
        let queued = [
            (1, shared("a"), 2),
            (2, shared("b"), 1),
            (3, shared("a"), 2),
            (4, shared("a"), 1),
            (5, Class::Alone, 1),
            (6, shared("a"), 3),
        ];
        for (job, class, rows) in queued {
            handles.push(submit(job, class, rows));
            // Each task sends when first polled: let it run, in order.
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.send(()).unwrap();
        for (h, job) in handles.into_iter().zip(0u32..) {
            assert_eq!(h.await.unwrap().unwrap(), job * 2);
        }
        // The head and its class in order while rows fit (1 + 3 = 4 rows, 4 would be the
        // fifth); then 2 alone in its class; 4 and 6 (4 rows); 5 alone.
        assert_eq!(
            *seen.lock().unwrap(),
            vec![vec![0], vec![1, 3], vec![2], vec![4, 6], vec![5]]
        );
        let text = metrics.render();
        assert!(
            text.contains("kd_batch_requests_count{stage=\"test\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("kd_batch_size_sum{stage=\"test\"} 11"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_call_that_should_stop_leaves_without_running_and_a_panic_fails_only_its_batch() {
        let policy = Policy {
            max_rows: 8,
            wait: Duration::from_millis(100),
        };
        let (b, seen, _, _) = recording(policy);
        let (gone, _g1) = Cancel::new(None);
        gone.cancel();
        let (live, _g2) = Cancel::new(None);
        let (expired, _g3) = Cancel::new(Some(Instant::now()));
        let (r1, r2, r3) = tokio::join!(
            b.submit(1, shared("a"), 1, &gone),
            b.submit(2, shared("a"), 1, &live),
            b.submit(3, shared("a"), 1, &expired),
        );
        assert!(
            matches!(r1.unwrap_err(), ServiceError::Cancelled(_)),
            "cancelled call"
        );
        assert_eq!(r2.unwrap(), 4);
        assert!(
            matches!(r3.unwrap_err(), ServiceError::DeadlineExceeded(_)),
            "expired call"
        );
        assert_eq!(*seen.lock().unwrap(), vec![vec![2]]);
        let err = b.submit(666, Class::Alone, 1, &live).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        // The loop goes on after the panic.
        assert_eq!(b.submit(7, shared("a"), 1, &live).await.unwrap(), 14);
    }
}

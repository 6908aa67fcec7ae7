//! Micro-batching of concurrent calls (the text encoder's prompts, the prior's samples, the
//! MoVQ's decodes): one loop thread owns the stage's model calls and runs them one at a time;
//! calls that arrive while one runs wait in a FIFO queue and the next model call takes, with the
//! call at the head of the queue, every later call of the same class (e.g. the same latent size)
//! whose rows still fit under the row limit. So a call waits for at most the calls that arrived
//! before it, plus the `wait` an idle loop gives a first call's companions to arrive. Work that
//! never shares a call ([`MicroBatcher::alone`]: an encode, an image embedding) runs in the same
//! loop, in its turn, so the stage still computes one thing at a time.
//!
//! A batch function that loops (the prior's sampling steps) may take in calls that arrive while
//! it runs ([`BatchContext::join`]): only from the head of the queue, of its class, while their
//! rows fit, so nothing overtakes a call of another class and no call starves.
//!
//! A call whose caller went away or whose deadline passed while it waited leaves without
//! running; a model call is told to stop ([`BatchContext::should_stop`]) only when every call in
//! it wants to stop. Each call holds its [`Cancel`] (and so its admission slot) until its batch ends. A batch
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

/// One call of a batch, as the batch function sees it.
pub struct Item<J> {
    pub job: J,
    /// Its rows (the batch function's share of the output for it).
    pub rows: usize,
    pub cancel: Cancel,
}

/// What a batch function may ask of the loop while it runs.
pub trait BatchContext<J> {
    /// True when every call of the batch wants to stop.
    fn should_stop(&self) -> bool;
    /// Calls that arrived since the batch started and may join it now: from the head of the
    /// queue, of the batch's class, in arrival order while their rows fit beside `rows_in_use`
    /// (the first that does not fit, or of another class, ends the list). Their results follow
    /// the batch's own items, in the order joined.
    fn join(&mut self, rows_in_use: usize) -> Vec<Item<J>>;
}

/// A batch function: every call's result (the batch's items, then those joined), in order, one
/// per call.
pub type BatchFn<J, R> = Arc<
    dyn Fn(Vec<Item<J>>, &mut dyn BatchContext<J>) -> Vec<Result<R, ServiceError>> + Send + Sync,
>;

/// A context for driving a batch function by hand: nothing joins, nothing asks it to stop (each
/// item's own [`Cancel`] still does).
pub struct NoJoins;

impl<J> BatchContext<J> for NoJoins {
    fn should_stop(&self) -> bool {
        false
    }

    fn join(&mut self, _rows_in_use: usize) -> Vec<Item<J>> {
        Vec::new()
    }
}

/// The context of a call run alone (batching off): nothing joins.
struct Single<'a>(&'a Cancel);

impl<J> BatchContext<J> for Single<'_> {
    fn should_stop(&self) -> bool {
        self.0.should_stop()
    }

    fn join(&mut self, _rows_in_use: usize) -> Vec<Item<J>> {
        Vec::new()
    }
}

/// Work that runs by itself; it answers its caller itself.
type Task = Box<dyn FnOnce() + Send>;

/// What waits in the queue.
enum Work<J, R> {
    Call {
        item: Item<J>,
        /// Calls of one class may share a model call.
        class: String,
        done: oneshot::Sender<Result<R, ServiceError>>,
    },
    Alone(Task),
}

struct Entry<J, R> {
    work: Work<J, R>,
    cancel: Cancel,
    queued: Instant,
}

impl<J, R> Entry<J, R> {
    /// The class and rows of a call (`None` for work that runs alone).
    fn call(&self) -> Option<(&str, usize)> {
        match &self.work {
            Work::Call { item, class, .. } => Some((class, item.rows)),
            Work::Alone(_) => None,
        }
    }
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

fn stopped() -> ServiceError {
    ServiceError::Unavailable("the batching loop has stopped".into())
}

fn dropped() -> ServiceError {
    ServiceError::Internal("the batching loop dropped a call".into())
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
        class: String,
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
                    let result = run(vec![item], &mut Single(c)).pop();
                    result.unwrap_or_else(|| {
                        Err(ServiceError::Internal("a call returned no result".into()))
                    })
                })
                .await;
        };
        let (done, rx) = oneshot::channel();
        let item = Item {
            job,
            rows,
            cancel: cancel.clone(),
        };
        let work = Work::Call { item, class, done };
        tx.send(Entry {
            work,
            cancel: cancel.clone(),
            queued: Instant::now(),
        })
        .map_err(|_| stopped())?;
        rx.await.map_err(|_| dropped())?
    }

    /// Runs `f` by itself in the loop, in its turn (batching off: on the blocking pool); it does
    /// not run when `cancel` fires first.
    pub async fn alone<T, F>(&self, cancel: &Cancel, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Cancel) -> Result<T, ServiceError> + Send + 'static,
    {
        let Some(tx) = &self.tx else {
            return cancel.run_blocking(f).await;
        };
        let (done, rx) = oneshot::channel();
        let c = cancel.clone();
        let task: Task = Box::new(move || {
            let result = c.check_at("while waiting for its turn").and_then(|()| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&c))).unwrap_or_else(
                    |_| Err(ServiceError::Internal("the model call panicked".into())),
                )
            });
            let _ = done.send(result);
        });
        tx.send(Entry {
            work: Work::Alone(task),
            cancel: cancel.clone(),
            queued: Instant::now(),
        })
        .map_err(|_| stopped())?;
        rx.await.map_err(|_| dropped())?
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
        match take_batch(&mut queue, max_rows) {
            Next::Alone(task) => task(),
            Next::Batch(batch) if !batch.is_empty() => {
                let mut joins = Joins {
                    queue: &mut queue,
                    rx: &rx,
                    metrics,
                    max_rows,
                    class: batch[0].1.clone(),
                    replies: Vec::new(),
                    cancels: Vec::new(),
                };
                run_batch(batch, &mut joins, &run);
            }
            Next::Batch(_) => {}
        }
    }
}

/// Whether the head's batch cannot take more rows.
fn full<J, R>(queue: &VecDeque<Entry<J, R>>, max_rows: usize) -> bool {
    let Some(head) = queue.front() else {
        return false;
    };
    let Some((class, _)) = head.call() else {
        return true;
    };
    let rows: usize = queue
        .iter()
        .filter_map(Entry::call)
        .filter(|(c, _)| *c == class)
        .map(|(_, r)| r)
        .sum();
    rows >= max_rows
}

/// Calls sharing one model call, each with its class, reply channel and arrival time.
type Calls<J, R> = Vec<(
    Item<J>,
    String,
    oneshot::Sender<Result<R, ServiceError>>,
    Instant,
)>;

/// What runs next.
enum Next<J, R> {
    Alone(Task),
    Batch(Calls<J, R>),
}

/// The next work: the head, and when it is a call every later call of its class whose rows fit,
/// in arrival order. Calls that should stop leave the queue with their reason (work that runs
/// alone checks for itself).
fn take_batch<J, R>(queue: &mut VecDeque<Entry<J, R>>, max_rows: usize) -> Next<J, R> {
    let mut batch: Calls<J, R> = Vec::new();
    let mut used = 0usize;
    let mut entries = std::mem::take(queue).into_iter();
    while let Some(e) = entries.next() {
        let (cancel, queued) = (e.cancel, e.queued);
        match e.work {
            Work::Alone(task) if batch.is_empty() => {
                queue.extend(entries);
                return Next::Alone(task);
            }
            Work::Alone(task) => queue.push_back(Entry {
                work: Work::Alone(task),
                cancel,
                queued,
            }),
            Work::Call { item, class, done } => {
                if let Err(reason) = cancel.check_at("while waiting for a batch") {
                    let _ = done.send(Err(reason));
                    continue;
                }
                let joins = batch.first().is_none_or(|(_, head, _, _)| {
                    *head == class && used.saturating_add(item.rows) <= max_rows
                });
                if joins {
                    used = used.saturating_add(item.rows);
                    batch.push((item, class, done, queued));
                } else {
                    let work = Work::Call { item, class, done };
                    queue.push_back(Entry {
                        work,
                        cancel,
                        queued,
                    });
                }
            }
        }
    }
    Next::Batch(batch)
}

/// The loop's side of a running batch: its queue (for joins), the replies and cancellation
/// tokens of every call in the batch.
struct Joins<'a, J, R> {
    queue: &'a mut VecDeque<Entry<J, R>>,
    rx: &'a mpsc::Receiver<Entry<J, R>>,
    metrics: &'a Metrics,
    max_rows: usize,
    class: String,
    replies: Vec<oneshot::Sender<Result<R, ServiceError>>>,
    cancels: Vec<Cancel>,
}

impl<J, R> BatchContext<J> for Joins<'_, J, R> {
    fn should_stop(&self) -> bool {
        self.cancels.iter().all(Cancel::should_stop)
    }

    fn join(&mut self, rows_in_use: usize) -> Vec<Item<J>> {
        self.queue.extend(self.rx.try_iter());
        let mut used = rows_in_use;
        let mut joined = Vec::new();
        while let Some(e) = self.queue.front() {
            let fits = e
                .call()
                .is_some_and(|(c, r)| c == self.class && used.saturating_add(r) <= self.max_rows);
            if !fits {
                break;
            }
            let e = self.queue.pop_front().expect("front exists");
            let Work::Call { item, class, done } = e.work else {
                unreachable!("a call by the check above")
            };
            if let Err(reason) = e.cancel.check_at("while waiting for a batch") {
                let _ = done.send(Err(reason));
                continue;
            }
            used = used.saturating_add(item.rows);
            self.metrics.batch_wait(&class, e.queued.elapsed());
            self.replies.push(done);
            self.cancels.push(item.cancel.clone());
            joined.push(item);
        }
        joined
    }
}

fn run_batch<J, R>(batch: Calls<J, R>, joins: &mut Joins<'_, J, R>, run: &BatchFn<J, R>) {
    let mut items = Vec::with_capacity(batch.len());
    for (item, class, done, queued) in batch {
        joins.metrics.batch_wait(&class, queued.elapsed());
        joins.replies.push(done);
        joins.cancels.push(item.cancel.clone());
        items.push(item);
    }
    let (rows, calls): (usize, usize) = (items.iter().map(|i| i.rows).sum(), items.len());
    joins.metrics.batch(rows);
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(items, &mut *joins as &mut dyn BatchContext<J>)
    }));
    let replies = std::mem::take(&mut joins.replies);
    joins.metrics.batched_step(calls, started.elapsed());
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
    for (done, result) in replies.into_iter().zip(results) {
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
    /// a batch holding job 100 waits for the returned gate, then takes in what may join; job
    /// 666 panics.
    fn recording(policy: Policy) -> (MicroBatcher<u32, u32>, Log, Metrics, mpsc::Sender<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let metrics = Metrics::new("test");
        let (open, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let run: BatchFn<u32, u32> = Arc::new(
            move |mut items: Vec<Item<u32>>, ctx: &mut dyn BatchContext<u32>| {
                if items.iter().any(|i| i.job == 100) {
                    gate.lock()
                        .unwrap()
                        .recv()
                        .expect("the test opens the gate");
                    let in_use = items.iter().map(|i| i.rows).sum();
                    items.extend(ctx.join(in_use));
                }
                let jobs: Vec<u32> = items.iter().map(|i| i.job).collect();
                assert!(!jobs.contains(&666), "a job the batch function cannot take");
                log.lock().unwrap().push(jobs);
                items.iter().map(|i| Ok(i.job * 2)).collect()
            },
        );
        let b = MicroBatcher::start("test-batcher", metrics.clone(), Some(policy), run);
        (b, seen, metrics, open)
    }

    /// Spawns `b.submit(job, class, rows)` and lets it reach the queue.
    async fn queue(
        b: &MicroBatcher<u32, u32>,
        c: &Cancel,
        job: u32,
        class: &str,
        rows: usize,
    ) -> tokio::task::JoinHandle<Result<u32, ServiceError>> {
        let (b, c, class) = (b.clone(), c.clone(), class.to_string());
        let h = tokio::spawn(async move { b.submit(job, class, rows, &c).await });
        // The task sends when first polled: let it run.
        tokio::task::yield_now().await;
        h
    }

    #[tokio::test]
    async fn a_running_batch_takes_in_calls_from_the_head_of_the_queue_only() {
        let policy = Policy {
            max_rows: 4,
            wait: Duration::ZERO,
        };
        let (b, seen, metrics, open) = recording(policy);
        let (c, _guard) = Cancel::new(None);
        let looping = queue(&b, &c, 100, "a", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // While 100 runs: 1 (a, 2 rows) may join; 2 (b) ends the joins, so 3 (a) waits.
        let calls = [
            queue(&b, &c, 1, "a", 2).await,
            queue(&b, &c, 2, "b", 1).await,
            queue(&b, &c, 3, "a", 1).await,
        ];
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.send(()).unwrap();
        assert_eq!(looping.await.unwrap().unwrap(), 200);
        for (h, job) in calls.into_iter().zip([1, 2, 3]) {
            assert_eq!(h.await.unwrap().unwrap(), job * 2);
        }
        assert_eq!(*seen.lock().unwrap(), vec![vec![100, 1], vec![2], vec![3]]);
        let text = metrics.render();
        // Three batches; every call's wait recorded, the joined one's too.
        assert!(
            text.contains("kd_batch_requests_count{stage=\"test\"} 3"),
            "{text}"
        );
        let waits: f64 = text
            .lines()
            .filter(|l| l.starts_with("kd_batch_wait_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(waits, 4.0, "{text}");
    }

    #[tokio::test]
    async fn queued_calls_share_batches_in_arrival_order_within_the_row_limit() {
        let policy = Policy {
            max_rows: 4,
            wait: Duration::ZERO,
        };
        let (b, seen, metrics, _) = recording(policy);
        let (c, _guard) = Cancel::new(None);
        // Work run alone holds the loop (until the gate opens) while the others queue.
        let (open, gate) = mpsc::channel::<()>();
        let (hold, log) = (b.clone(), seen.clone());
        let holder = tokio::spawn(async move {
            let (c, _guard) = Cancel::new(None);
            hold.alone(&c, move |_| {
                gate.recv().expect("the test opens the gate");
                log.lock().unwrap().push(vec![0]);
                Ok(0u32)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // In this order: 1 (a, 2 rows), 2 (b, 1), 3 (a, 2), 4 (a, 1), 5 (alone), 6 (a, 3).
        let mut calls = Vec::new();
        for (job, class, rows) in [(1, "a", 2), (2, "b", 1), (3, "a", 2), (4, "a", 1)] {
            let (b, c) = (b.clone(), c.clone());
            let class = class.to_string();
            calls.push(tokio::spawn(
                async move { b.submit(job, class, rows, &c).await },
            ));
            // Each task sends when first polled: let it run, in order.
            tokio::task::yield_now().await;
        }
        let (b5, c5, log) = (b.clone(), c.clone(), seen.clone());
        let fifth = tokio::spawn(async move {
            b5.alone(&c5, move |_| {
                log.lock().unwrap().push(vec![5]);
                Ok(10u32)
            })
            .await
        });
        tokio::task::yield_now().await;
        let (b6, c6) = (b.clone(), c.clone());
        calls.push(tokio::spawn(async move {
            b6.submit(6, "a".into(), 3, &c6).await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        open.send(()).unwrap();
        assert_eq!(holder.await.unwrap().unwrap(), 0);
        for (h, job) in calls.into_iter().zip([1, 2, 3, 4, 6]) {
            assert_eq!(h.await.unwrap().unwrap(), job * 2);
        }
        assert_eq!(fifth.await.unwrap().unwrap(), 10);
        // The head and its class in order while rows fit (1 + 3 = 4 rows; 4 would be the fifth);
        // then 2 alone in its class; 4 and 6 (4 rows), past the work queued between them; that
        // work last.
        assert_eq!(
            *seen.lock().unwrap(),
            vec![vec![0], vec![1, 3], vec![2], vec![4, 6], vec![5]]
        );
        let text = metrics.render();
        assert!(
            text.contains("kd_batch_requests_count{stage=\"test\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("kd_batch_size_sum{stage=\"test\"} 9"),
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
        let a = || "a".to_string();
        let (r1, r2, r3) = tokio::join!(
            b.submit(1, a(), 1, &gone),
            b.submit(2, a(), 1, &live),
            b.submit(3, a(), 1, &expired),
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
        let never = b.alone(&gone, |_| -> Result<u32, _> { panic!("must not run") });
        assert!(matches!(
            never.await.unwrap_err(),
            ServiceError::Cancelled(_)
        ));
        let err = b.submit(666, a(), 1, &live).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        let err = b.alone(&live, |_| -> Result<u32, _> { panic!("a bug") });
        assert!(err.await.unwrap_err().to_string().contains("panicked"));
        // The loop goes on after the panics.
        assert_eq!(b.submit(7, a(), 1, &live).await.unwrap(), 14);
    }
}

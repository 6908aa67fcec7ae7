//! Soak and fault test (`make soak`; not in CI): the five services as real release processes on
//! loopback (two replicas of the denoiser and of movq, Redis as the cache), clients at 4× the
//! gateway's admission capacity for a fixed number of requests, while a fault schedule kills
//! and restarts a denoiser replica, a movq replica, the text encoder and Redis.
//!
//! It checks that every request ends (a deadline bounds each), with OK or a documented code
//! (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; never INTERNAL or UNKNOWN), that every
//! request sent is answered, that no process grows past `SOAK_RSS_MB`, and that the gateway's
//! calls reach each restarted process again within 2 s of it reporting SERVING (Redis: the text
//! encoder uses the cache again within 2 s). While the single text encoder is down, requests
//! fail fast with UNAVAILABLE naming it: that is the documented answer, not a failure of the
//! test. It prints a summary table; the last line is machine-readable.
//!
//! Settings: `SOAK_REQUESTS` (default 400), `SOAK_RSS_MB` (default 2048), `SOAK_BIN_DIR`
//! (default `target/release`).

use kd_e2e::quick_request;
use kd_proto::v1::gateway_client::GatewayClient;
use kd_testkit::{free_port, http_get, metric_at, RedisServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// Requests generating at once in the gateway; the clients are four times as many.
const GATEWAY_CONCURRENCY: usize = 4;
/// How long a restarted process's SERVING may precede the gateway serving again.
const RECOVERY_BOUND: Duration = Duration::from_secs(2);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One service process, restartable on the same ports.
struct Proc {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    grpc: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &str, binary: &str, model_dir: Option<&str>, extra: &[String]) -> Self {
        let bin_dir = std::env::var("SOAK_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root().join("target/release"));
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            format!("--listen={grpc}"),
            format!("--metrics-listen={metrics}"),
        ];
        if let Some(dir) = model_dir {
            let dir = root().join("tests/fixtures").join(dir);
            args.push(format!("--model-dir={}", dir.display()));
            args.push("--device=cpu".into());
        }
        args.extend(extra.iter().cloned());
        let mut p = Self {
            name: name.into(),
            binary: bin_dir.join(binary),
            args,
            grpc,
            metrics,
            child: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run `make soak`, which builds it)",
                    self.binary.display()
                )
            });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Waits until `/healthz` says SERVING.
    async fn serving(&self, limit: Duration) {
        serving(&self.name, self.metrics, limit).await
    }
}

/// Waits until `/healthz` at `metrics` says SERVING.
async fn serving(name: &str, metrics: SocketAddr, limit: Duration) {
    let t = Instant::now();
    loop {
        let ok = tokio::net::TcpStream::connect(metrics).await.is_ok()
            && http_get(metrics, "/healthz")
                .await
                .starts_with("HTTP/1.1 200");
        if ok {
            return;
        }
        assert!(t.elapsed() < limit, "{name} not SERVING after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of `pid` in MiB (Linux `/proc`).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

type Procs = Arc<Mutex<Vec<Proc>>>;

/// Samples every process's RSS every 200 ms into `peaks` until `stop`.
async fn watch_rss(procs: Procs, peaks: Arc<Mutex<BTreeMap<String, f64>>>, stop: Arc<Mutex<bool>>) {
    while !*stop.lock().unwrap() {
        for p in procs.lock().unwrap().iter() {
            if let Some(mb) = p.pid().and_then(rss_mb) {
                let mut peaks = peaks.lock().unwrap();
                let e = peaks.entry(p.name.clone()).or_insert(0.0);
                *e = e.max(mb);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One request through the gateway with a deadline: its code and latency.
async fn one(gateway: SocketAddr, seed: u64) -> (Code, f64) {
    let (code, secs, _) = one_with_message(gateway, seed).await;
    (code, secs)
}

/// [`one`] with the status message of a failure.
async fn one_with_message(gateway: SocketAddr, seed: u64) -> (Code, f64, String) {
    let t = Instant::now();
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{gateway}"))
        .unwrap()
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => return (Code::Unavailable, t.elapsed().as_secs_f64(), e.to_string()),
    };
    let mut c = GatewayClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = tonic::Request::new(quick_request("a red cat", seed));
    req.set_timeout(Duration::from_secs(30));
    let (code, message) = match tokio::time::timeout(Duration::from_secs(40), c.generate(req)).await
    {
        Ok(Ok(_)) => (Code::Ok, String::new()),
        Ok(Err(s)) => (s.code(), s.message().to_string()),
        Err(_) => panic!("request {seed} hung past its deadline"),
    };
    (code, t.elapsed().as_secs_f64(), message)
}

/// Calls a process has served (`kd_requests_total`, every method).
async fn served(metrics: SocketAddr) -> f64 {
    metric_at(metrics, "kd_requests_total", &[]).await
}

/// Waits until `counter()` grows past its value now, while a prober keeps one request at a
/// time going through `gateway` (the clients may have finished): how long that took.
async fn until_grows<F, Fut>(what: &str, gateway: SocketAddr, counter: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let prober = tokio::spawn(async move {
        for seed in 50_000.. {
            one(gateway, seed).await;
        }
    });
    let (start, t) = (counter().await, Instant::now());
    while counter().await <= start {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: never served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prober.abort();
    t.elapsed().as_secs_f64()
}

/// Kills process `index`, waits 2 s, restarts it and returns how long after it reported
/// SERVING the gateway's traffic reached it again.
async fn fault(procs: &Procs, index: usize, gateway: SocketAddr) -> (String, f64) {
    let name = {
        let mut list = procs.lock().unwrap();
        list[index].kill();
        list[index].name.clone()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = {
        let mut list = procs.lock().unwrap();
        list[index].start();
        list[index].metrics
    };
    serving(&name, metrics, Duration::from_secs(120)).await;
    let s = until_grows(&name, gateway, || served(metrics)).await;
    (name, s)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let (total, rss_bound) = (env("SOAK_REQUESTS", 400), env("SOAK_RSS_MB", 2048) as f64);
    let mut redis = RedisServer::start();
    let cache = [format!("--redis-url={}", redis.url())];
    let decoder = "tiny/kandinsky-2-2-decoder";
    let te_extra = [
        cache[0].clone(),
        format!(
            "--decoder-model-dir={}",
            root().join("tests/fixtures").join(decoder).display()
        ),
    ];
    let stages = vec![
        Proc::new(
            "text-encoder",
            "kd-text-encoder",
            Some("tiny/kandinsky-2-2-prior"),
            &te_extra,
        ),
        Proc::new(
            "prior",
            "kd-prior",
            Some("tiny/kandinsky-2-2-prior"),
            &cache,
        ),
        Proc::new("denoiser-a", "kd-denoiser", Some(decoder), &[]),
        Proc::new("denoiser-b", "kd-denoiser", Some(decoder), &[]),
        Proc::new("movq-a", "kd-movq", Some(decoder), &[]),
        Proc::new("movq-b", "kd-movq", Some(decoder), &[]),
    ];
    let gw_extra = vec![
        format!("--text-encoder-url={}", stages[0].url()),
        format!("--prior-url={}", stages[1].url()),
        format!("--denoiser-url={},{}", stages[2].url(), stages[3].url()),
        format!("--movq-url={},{}", stages[4].url(), stages[5].url()),
        format!("--max-concurrency={GATEWAY_CONCURRENCY}"),
        "--resolve-interval-secs=1".into(),
    ];
    let gateway = Proc::new("gateway", "kd-gateway", None, &gw_extra);
    let gateway_addr = gateway.grpc;
    for p in stages.iter().chain([&gateway]) {
        p.serving(Duration::from_secs(120)).await;
    }
    let procs: Procs = Arc::new(Mutex::new(stages));
    procs.lock().unwrap().push(gateway);
    let peaks = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(Mutex::new(false));
    let watcher = tokio::spawn(watch_rss(procs.clone(), peaks.clone(), stop.clone()));

    // Clients: 4× the gateway's capacity, each taking the next request number until `total`.
    let next = Arc::new(Mutex::new(0usize));
    let results = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4 * GATEWAY_CONCURRENCY)
        .map(|_| {
            let (next, results) = (next.clone(), results.clone());
            tokio::spawn(async move {
                loop {
                    let n = {
                        let mut n = next.lock().unwrap();
                        if *n >= total {
                            return;
                        }
                        *n += 1;
                        *n
                    };
                    let (code, secs, message) = one_with_message(gateway_addr, n as u64).await;
                    results.lock().unwrap().push((code, secs, message));
                }
            })
        })
        .collect();

    // The fault schedule: one fault every few seconds while the clients run.
    let t0 = Instant::now();
    let mut recoveries = Vec::new();
    for index in [2, 4, 0] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        recoveries.push(fault(&procs, index, gateway_addr).await);
    }
    // Redis: the text encoder serves uncached while it is down, and uses it again after.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    let te_metrics = procs.lock().unwrap()[0].metrics;
    let cache_used = || async move {
        let hits = metric_at(te_metrics, "kd_cache_requests_total", &[("result", "hit")]).await;
        hits + metric_at(te_metrics, "kd_cache_requests_total", &[("result", "miss")]).await
    };
    recoveries.push((
        "redis".into(),
        until_grows("redis", gateway_addr, cache_used).await,
    ));
    for c in clients {
        c.await.unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    *stop.lock().unwrap() = true;
    watcher.await.unwrap();

    // Summary.
    let results = results.lock().unwrap().clone();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
    for (code, _, message) in &results {
        *by_code.entry(format!("{code:?}")).or_default() += 1;
        if *code != Code::Ok {
            let head: String = message.chars().take(90).collect();
            *messages.entry(head).or_default() += 1;
        }
    }
    let mut ok_lat: Vec<f64> = results
        .iter()
        .filter(|(c, _, _)| *c == Code::Ok)
        .map(|(_, s, _)| *s)
        .collect();
    ok_lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&ok_lat, 0.5), percentile(&ok_lat, 0.99));
    println!(
        "soak: {total} requests from {} clients in {wall:.1} s",
        4 * GATEWAY_CONCURRENCY
    );
    println!("  outcome              count");
    for (code, n) in &by_code {
        println!("  {code:<20} {n:>5}");
    }
    for (m, n) in &messages {
        println!("    {n:>5} × {m}");
    }
    println!("  latency of OK: p50 {p50:.3} s, p99 {p99:.3} s");
    println!("  recovery after restart (SERVING → the gateway's calls reach it again):");
    for (name, s) in &recoveries {
        println!("    {name:<14} {s:.3} s");
    }
    println!("  peak RSS:");
    let peaks = peaks.lock().unwrap().clone();
    for (name, mb) in &peaks {
        println!("    {name:<14} {mb:8.1} MiB");
    }

    let allowed = [
        Code::Ok,
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::ResourceExhausted,
    ];
    let bad: Vec<_> = results
        .iter()
        .filter(|(c, _, _)| !allowed.contains(c))
        .collect();
    assert_eq!(results.len(), total, "requests answered != sent");
    assert!(bad.is_empty(), "undocumented outcomes: {bad:?}");
    assert!(
        by_code.contains_key("Ok"),
        "no request succeeded: {by_code:?}"
    );
    for (name, s) in &recoveries {
        assert!(
            *s <= RECOVERY_BOUND.as_secs_f64(),
            "{name}: recovered after {s:.3} s"
        );
    }
    for (name, mb) in &peaks {
        assert!(*mb <= rss_bound, "{name}: {mb:.0} MiB > {rss_bound} MiB");
    }
    let max_recovery = recoveries.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    let max_rss = peaks.values().copied().fold(0.0, f64::max);
    println!(
        "soak requests={total} ok={} unavailable={} deadline={} exhausted={} p50_s={p50:.3} p99_s={p99:.3} max_recovery_s={max_recovery:.3} peak_rss_mb={max_rss:.0}",
        by_code.get("Ok").unwrap_or(&0),
        by_code.get("Unavailable").unwrap_or(&0),
        by_code.get("DeadlineExceeded").unwrap_or(&0),
        by_code.get("ResourceExhausted").unwrap_or(&0),
    );
}

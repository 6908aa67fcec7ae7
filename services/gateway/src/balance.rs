//! Client-side balancing over every replica of a stage.
//!
//! Each configured URL (`http://host:port`, several comma-separated) is resolved to all its
//! addresses — a Kubernetes headless Service name resolves to one address per ready pod — and
//! re-resolved periodically, so replicas the autoscaler adds or removes are picked up. Calls go
//! round-robin over the replicas that are up; a replica that answers UNAVAILABLE (gone, or still
//! loading its model) is ejected for a short cooldown and the call is retried once on another.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// How long a replica that answered UNAVAILABLE is skipped: also the longest a restarted
/// replica waits for traffic (the soak test holds recovery under 2 s).
const COOLDOWN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
}

fn parse(url: &str, stage: &str, tls: bool) -> anyhow::Result<Target> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("--{stage}-url `{url}`: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") if tls => {}
        Some("https") => anyhow::bail!(
            "--{stage}-url `{url}`: https:// needs --stage-tls-ca (the CA the stages' certificates \
             are signed by)"
        ),
        _ => anyhow::bail!("--{stage}-url `{url}`: allowed schemes: http://, https://"),
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("--{stage}-url `{url}`: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    Ok(Target {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    })
}

/// Every address of `targets`, each with the host name it was resolved from (the name a TLS
/// certificate must hold).
async fn resolve(targets: &[Target]) -> Vec<(SocketAddr, String)> {
    let mut out: Vec<(SocketAddr, String)> = Vec::new();
    for t in targets {
        match tokio::net::lookup_host((t.host.as_str(), t.port)).await {
            Ok(addrs) => out.extend(addrs.map(|a| (a, t.host.clone()))),
            Err(e) => tracing::warn!(host = %t.host, error = %e, "cannot resolve stage address"),
        }
    }
    out.sort();
    out.dedup_by_key(|(a, _)| *a);
    out
}

#[derive(Debug, Clone)]
struct Replica {
    addr: SocketAddr,
    channel: Channel,
    down_until: Option<Instant>,
}

/// A lazily connected replica at `addr`: plaintext, or TLS with `tls` naming the server `host`.
fn replica(addr: SocketAddr, host: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Replica {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = match tls {
        // The host name was checked as a TLS server name when the URL was parsed.
        Some(config) => match kd_runtime::tls::Connector::new(config.clone(), host) {
            Ok(c) => endpoint.connect_with_connector_lazy(c),
            Err(e) => {
                tracing::error!(%addr, error = %e, "stage replica has no valid TLS name");
                endpoint.connect_lazy()
            }
        },
        None => endpoint.connect_lazy(),
    };
    Replica {
        addr,
        channel,
        down_until: None,
    }
}

/// The replicas of one stage.
#[derive(Debug, Clone)]
pub struct Pool {
    stage: &'static str,
    replicas: Arc<RwLock<Vec<Replica>>>,
    next: Arc<AtomicUsize>,
}

impl Pool {
    /// Resolves `urls` now and every `refresh` after; with `tls`, every replica is called over
    /// (mutual) TLS.
    pub async fn new(
        urls: &[String],
        stage: &'static str,
        refresh: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !urls.is_empty(),
            "--{stage}-url: at least one address is required"
        );
        let targets = urls
            .iter()
            .map(|u| parse(u.trim(), stage, tls.is_some()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(config) = &tls {
            for t in &targets {
                kd_runtime::tls::Connector::new(config.clone(), &t.host)
                    .map_err(|e| anyhow::anyhow!("--{stage}-url: {e}"))?;
            }
        }
        let make = {
            let tls = tls.clone();
            move |(a, host): (SocketAddr, String)| replica(a, &host, tls.as_ref())
        };
        let pool = Self {
            stage,
            replicas: Arc::new(RwLock::new(
                resolve(&targets).await.into_iter().map(&make).collect(),
            )),
            next: Arc::new(AtomicUsize::new(0)),
        };
        let weak = Arc::downgrade(&pool.replicas);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(refresh).await;
                let addrs = resolve(&targets).await;
                let Some(replicas) = weak.upgrade() else {
                    return;
                };
                if addrs.is_empty() {
                    continue; // keep the last known replicas while DNS is failing
                }
                let mut list = replicas.write().expect("pool lock");
                list.retain(|r| addrs.iter().any(|(a, _)| *a == r.addr));
                for (a, host) in addrs {
                    if !list.iter().any(|r| r.addr == a) {
                        tracing::info!(stage, addr = %a, "stage replica added");
                        list.push(make((a, host)));
                    }
                }
            }
        });
        Ok(pool)
    }

    /// The stage name (for errors and logs).
    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// The next replica that is up (round-robin); when all are cooling down, the one whose
    /// cooldown ends first.
    pub fn pick(&self) -> Option<(SocketAddr, Channel)> {
        let list = self.replicas.read().expect("pool lock");
        if list.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let up = (0..list.len())
            .map(|i| &list[(start + i) % list.len()])
            .find(|r| r.down_until.is_none_or(|t| t <= now));
        let r = up.or_else(|| list.iter().min_by_key(|r| r.down_until))?;
        Some((r.addr, r.channel.clone()))
    }

    /// Skips `addr` for the cooldown.
    pub fn mark_down(&self, addr: SocketAddr) {
        let mut list = self.replicas.write().expect("pool lock");
        if let Some(r) = list.iter_mut().find(|r| r.addr == addr) {
            r.down_until = Some(Instant::now() + COOLDOWN);
        }
    }

    /// Runs `f` on a replica; when the replica answers UNAVAILABLE it is ejected for the cooldown
    /// and `f` is retried once on another replica.
    pub async fn call<R, F, Fut>(&self, f: F) -> Result<R, tonic::Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let mut last = None;
        for attempt in 0..2 {
            let (addr, channel) = self.pick().ok_or_else(|| {
                tonic::Status::unavailable(format!(
                    "stage {} has no replicas (DNS resolved no address)",
                    self.stage
                ))
            })?;
            match f(channel).await {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tracing::warn!(stage = self.stage, %addr, attempt, error = %s.message(), "stage replica unavailable");
                    self.mark_down(addr);
                    last = Some(s);
                }
                other => return other,
            }
        }
        Err(last.expect("two attempts failed"))
    }

    /// Number of known replicas.
    pub fn len(&self) -> usize {
        self.replicas.read().expect("pool lock").len()
    }

    /// Whether no replica is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_clear_errors() {
        let t = parse("http://kd-prior.default.svc:50051", "prior", false).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("kd-prior.default.svc", 50051));
        let e = parse("https://x:1", "prior", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--prior-url") && e.contains("--stage-tls-ca"),
            "{e}"
        );
        parse("https://x:1", "prior", true).unwrap();
        let e = parse("ftp://x:1", "prior", true).unwrap_err().to_string();
        assert!(e.contains("allowed schemes"), "{e}");
        assert!(parse("not a url", "movq", false)
            .unwrap_err()
            .to_string()
            .contains("--movq-url"));
    }

    #[tokio::test]
    async fn round_robin_skips_replicas_cooling_down() {
        let pool = Pool::new(
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            "x",
            Duration::from_secs(60),
            None,
        )
        .await
        .unwrap();
        assert_eq!(pool.len(), 2);
        let a = pool.pick().unwrap().0;
        let b = pool.pick().unwrap().0;
        assert_ne!(a, b, "round-robin");
        pool.mark_down(a);
        for _ in 0..4 {
            assert_eq!(pool.pick().unwrap().0, b);
        }
        pool.mark_down(b);
        assert!(
            pool.pick().is_some(),
            "all down: still try the one that recovers first"
        );
    }

    #[tokio::test]
    async fn localhost_resolves_to_its_addresses() {
        let set = resolve(&[parse("http://localhost:1234", "x", false).unwrap()]).await;
        assert!(
            set.iter()
                .any(|(a, host)| a.ip().is_loopback() && a.port() == 1234 && host == "localhost"),
            "{set:?}"
        );
    }
}

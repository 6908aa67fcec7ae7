//! The embedding cache: Redis when a URL is configured, an in-process LRU otherwise.
//!
//! Keys hash the model revision, the stage and the canonical request fields (a deterministic
//! stage such as the text encoder keys on the prompt; a sampling stage such as the prior must
//! put its seed, steps and guidance in the key). Values are opaque bytes (encoded wire tensors)
//! with a TTL and a size cap. The cache never fails a request: when Redis is unreachable or
//! errors, look-ups miss, a metric counts it, one warning is logged per outage, and the
//! connection manager reconnects by itself.

use crate::error::ServiceError;
use crate::metrics::Metrics;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A cache key: `kd:<stage>:<sha256 of revision and fields>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// Hashes the model revision, the stage and each field (length-prefixed, so field
    /// boundaries cannot collide).
    pub fn new(revision: &str, stage: &str, fields: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for part in std::iter::once(revision.as_bytes())
            .chain(std::iter::once(stage.as_bytes()))
            .chain(fields.iter().copied())
        {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let digest = h.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("kd:{stage}:{hex}"))
    }

    /// The key string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Cache limits.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Time to live of each entry.
    pub ttl: Duration,
    /// Values larger than this are not cached.
    pub max_value_bytes: usize,
    /// Total bytes the in-process LRU holds: keys, values and [`ENTRY_OVERHEAD`] per entry.
    pub memory_capacity_bytes: usize,
    /// Per-operation timeout against Redis (a slow Redis must not slow requests down).
    pub redis_timeout: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            max_value_bytes: 4 << 20,
            memory_capacity_bytes: 256 << 20,
            redis_timeout: Duration::from_millis(500),
        }
    }
}

/// Bytes of bookkeeping counted per in-process entry beside its key and value (the LRU node,
/// two heap allocations, the insertion time).
pub const ENTRY_OVERHEAD: usize = 96;

/// What one in-process entry costs against [`CacheOptions::memory_capacity_bytes`].
pub fn entry_bytes(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

struct Memory {
    lru: lru::LruCache<String, (Vec<u8>, Instant)>,
    bytes: usize,
}

enum Backend {
    Redis(ConnectionManager),
    Memory(Mutex<Memory>),
}

/// The cache of one stage.
pub struct EmbeddingCache {
    backend: Backend,
    options: CacheOptions,
    metrics: Metrics,
    outage: AtomicBool,
}

impl std::fmt::Debug for EmbeddingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        };
        f.debug_struct("EmbeddingCache")
            .field("backend", &kind)
            .finish()
    }
}

impl EmbeddingCache {
    /// Redis at `url` (connects lazily, so a Redis that is down at start-up is not fatal).
    pub fn redis(
        url: &str,
        options: CacheOptions,
        metrics: Metrics,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.redis_timeout))
            .set_response_timeout(Some(options.redis_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            backend: Backend::Redis(manager),
            options,
            metrics,
            outage: AtomicBool::new(false),
        })
    }

    /// The in-process LRU.
    pub fn memory(options: CacheOptions, metrics: Metrics) -> Self {
        let mem = Memory {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
        };
        Self {
            backend: Backend::Memory(Mutex::new(mem)),
            options,
            metrics,
            outage: AtomicBool::new(false),
        }
    }

    /// Redis when `url` is given, else the in-process LRU.
    pub fn from_url(
        url: Option<&str>,
        options: CacheOptions,
        metrics: Metrics,
    ) -> Result<Self, redis::RedisError> {
        match url {
            Some(u) => Self::redis(u, options, metrics),
            None => Ok(Self::memory(options, metrics)),
        }
    }

    /// The cache a stage's `--redis-url` asks for (Redis, or the in-process LRU when unset).
    #[cfg(feature = "models")]
    pub fn for_stage(
        args: &crate::config::StageArgs,
        metrics: Metrics,
    ) -> Result<Self, crate::ServiceError> {
        let options = CacheOptions {
            memory_capacity_bytes: args.cache_memory_bytes,
            ..CacheOptions::default()
        };
        Self::from_url(args.redis_url.as_deref(), options, metrics)
            .map_err(|e| crate::ServiceError::Unavailable(format!("--redis-url: {e}")))
    }

    fn redis_ok(&self) {
        if self.outage.swap(false, Ordering::Relaxed) {
            tracing::info!(stage = self.metrics.stage(), "redis cache reachable again");
        }
    }

    fn redis_failed(&self, e: &dyn std::fmt::Display) {
        self.metrics.cache("error");
        if !self.outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(stage = self.metrics.stage(), error = %e, "redis cache unreachable; serving uncached until it returns");
        }
    }

    /// The answer cached under `key`, else `compute()`'s, which is then stored for the next
    /// caller (only for pure functions of the key: the key must hold every input). A stored
    /// value that no longer decodes is recomputed. Look-up and store are spans of the call.
    pub async fn get_or_compute<T, F, Fut>(
        &self,
        key: &CacheKey,
        compute: F,
    ) -> Result<T, ServiceError>
    where
        T: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, ServiceError>>,
    {
        use tracing::Instrument;
        let cached = self
            .get(key)
            .instrument(tracing::info_span!("cache.get"))
            .await
            .and_then(|bytes| T::decode(bytes.as_slice()).ok());
        if let Some(hit) = cached {
            return Ok(hit);
        }
        let value = compute().await?;
        self.put(key, &value.encode_to_vec())
            .instrument(tracing::info_span!("cache.put"))
            .await;
        Ok(value)
    }

    /// Looks `key` up (hit/miss/error counted in `kd_cache_requests_total`).
    pub async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        match &self.backend {
            Backend::Redis(m) => {
                let mut conn = m.clone();
                let r: Result<Option<Vec<u8>>, _> =
                    match tokio::time::timeout(self.options.redis_timeout, conn.get(key.as_str()))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
                    };
                match r {
                    Ok(v) => {
                        self.redis_ok();
                        self.metrics.cache(if v.is_some() { "hit" } else { "miss" });
                        v
                    }
                    Err(e) => {
                        self.redis_failed(&e);
                        None
                    }
                }
            }
            Backend::Memory(mem) => {
                let mut mem = mem.lock().expect("cache lock");
                let hit = match mem.lru.get(key.as_str()) {
                    Some((v, at)) if at.elapsed() < self.options.ttl => Some(v.clone()),
                    _ => None,
                };
                if hit.is_none() {
                    if let Some((v, _)) = mem.lru.pop(key.as_str()) {
                        mem.bytes -= entry_bytes(key.as_str(), &v);
                    }
                }
                self.metrics
                    .cache(if hit.is_some() { "hit" } else { "miss" });
                hit
            }
        }
    }

    /// Stores `value` under `key` (skipped when over the size cap; errors only counted).
    pub async fn put(&self, key: &CacheKey, value: &[u8]) {
        if value.len() > self.options.max_value_bytes {
            return;
        }
        match &self.backend {
            Backend::Redis(m) => {
                let mut conn = m.clone();
                let ttl = self.options.ttl.as_secs().max(1);
                let r: Result<(), _> = match tokio::time::timeout(
                    self.options.redis_timeout,
                    conn.set_ex(key.as_str(), value, ttl),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
                };
                match r {
                    Ok(()) => self.redis_ok(),
                    Err(e) => self.redis_failed(&e),
                }
            }
            Backend::Memory(mem) => {
                let size = entry_bytes(key.as_str(), value);
                if size > self.options.memory_capacity_bytes {
                    return;
                }
                let mut mem = mem.lock().expect("cache lock");
                if let Some((old, _)) = mem
                    .lru
                    .put(key.as_str().to_string(), (value.to_vec(), Instant::now()))
                {
                    mem.bytes -= entry_bytes(key.as_str(), &old);
                }
                mem.bytes += size;
                while mem.bytes > self.options.memory_capacity_bytes {
                    match mem.lru.pop_lru() {
                        Some((k, (v, _))) => mem.bytes -= entry_bytes(&k, &v),
                        None => break,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_fields_revision_and_stage() {
        let a = CacheKey::new("rev1", "text_encoder", &[b"ab", b"c"]);
        assert_ne!(a, CacheKey::new("rev1", "text_encoder", &[b"a", b"bc"]));
        assert_ne!(a, CacheKey::new("rev2", "text_encoder", &[b"ab", b"c"]));
        assert_ne!(a, CacheKey::new("rev1", "prior", &[b"ab", b"c"]));
        assert_eq!(a, CacheKey::new("rev1", "text_encoder", &[b"ab", b"c"]));
        assert!(a.as_str().starts_with("kd:text_encoder:"));
    }

    #[tokio::test]
    async fn memory_lru_hits_evicts_by_bytes_and_expires() {
        let m = Metrics::new("t");
        let (k1, k2, k3) = (
            CacheKey::new("r", "s", &[b"1"]),
            CacheKey::new("r", "s", &[b"2"]),
            CacheKey::new("r", "s", &[b"3"]),
        );
        // Room for two entries (keys and bookkeeping counted), not three.
        let entry = entry_bytes(k1.as_str(), b"aaaa");
        let opts = CacheOptions {
            memory_capacity_bytes: 2 * entry + entry / 2,
            max_value_bytes: 8,
            ttl: Duration::from_millis(200),
            ..Default::default()
        };
        let c = EmbeddingCache::memory(opts, m.clone());
        c.put(&k1, b"aaaa").await;
        c.put(&k2, b"bbbb").await;
        assert_eq!(c.get(&k1).await.as_deref(), Some(&b"aaaa"[..]));
        c.put(&k3, b"cccc").await; // a third entry: evicts the least recently used (k2)
        assert_eq!(c.get(&k2).await, None);
        assert!(c.get(&k1).await.is_some() && c.get(&k3).await.is_some());
        c.put(&CacheKey::new("r", "s", &[b"big"]), b"123456789")
            .await; // over the value cap
        assert_eq!(c.get(&CacheKey::new("r", "s", &[b"big"])).await, None);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.get(&k1).await, None, "expired");
        let text = m.render();
        assert!(
            text.contains("kd_cache_requests_total{result=\"hit\",stage=\"t\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("kd_cache_requests_total{result=\"miss\",stage=\"t\"} 3"),
            "{text}"
        );
    }
}

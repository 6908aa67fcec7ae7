//! The embedding cache against a real redis-server: hits, outage (requests still succeed,
//! counted as errors), automatic reconnection.

use kd_runtime::cache::{CacheKey, CacheOptions, EmbeddingCache};
use kd_runtime::Metrics;
use kd_testkit::RedisServer;
use std::time::{Duration, Instant};

fn series(m: &Metrics, result: &str) -> u64 {
    let needle = format!("kd_cache_requests_total{{result=\"{result}\",stage=\"text_encoder\"}} ");
    m.render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|v| v.parse().unwrap()))
        .unwrap_or(0)
}

#[tokio::test]
async fn redis_hits_survives_an_outage_and_reconnects() {
    let mut redis = RedisServer::start();
    let metrics = Metrics::new("text_encoder");
    let opts = CacheOptions {
        redis_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let cache = EmbeddingCache::redis(&redis.url(), opts, metrics.clone()).unwrap();
    let key = CacheKey::new("rev", "text_encoder", &[b"a red cat"]);

    assert_eq!(cache.get(&key).await, None);
    cache.put(&key, b"tensor-bytes").await;
    assert_eq!(cache.get(&key).await.as_deref(), Some(&b"tensor-bytes"[..]));
    assert_eq!((series(&metrics, "hit"), series(&metrics, "miss")), (1, 1));

    // Outage: look-ups miss quickly and are counted as errors; puts do not fail.
    redis.kill();
    let t = Instant::now();
    assert_eq!(cache.get(&key).await, None);
    cache.put(&key, b"x").await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a dead Redis must not stall requests: {:?}",
        t.elapsed()
    );
    assert!(series(&metrics, "error") >= 1);

    // Redis returns (empty): the manager reconnects by itself and caching works again.
    redis.restart();
    let start = Instant::now();
    loop {
        cache.put(&key, b"again").await;
        if cache.get(&key).await.as_deref() == Some(&b"again"[..]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "cache did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(series(&metrics, "hit") >= 2);
}

#[tokio::test]
async fn ttl_is_applied_in_redis() {
    let redis = RedisServer::start();
    let opts = CacheOptions {
        ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let cache = EmbeddingCache::redis(&redis.url(), opts, Metrics::new("text_encoder")).unwrap();
    let key = CacheKey::new("rev", "text_encoder", &[b"short-lived"]);
    cache.put(&key, b"v").await;
    assert!(cache.get(&key).await.is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(cache.get(&key).await, None, "expired after the TTL");
}

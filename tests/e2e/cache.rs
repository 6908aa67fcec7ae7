//! The embedding cache in the running system: Redis started by the test on a free port.

use kd_e2e::{quick_request, Stack};
use kd_proto::v1;
use kd_testkit::metric_at;
use kd_testkit::RedisServer;
use std::net::SocketAddr;

fn request(prompt: &str) -> v1::GenerateRequest {
    quick_request(prompt, 1)
}

async fn cache(addr: SocketAddr, result: &str) -> f64 {
    let labels = [("result", result), ("stage", "text_encoder")];
    metric_at(addr, "kd_cache_requests_total", &labels).await
}

/// Text-tower runs: every uncached Encode records one batch.
async fn encodes(addr: SocketAddr) -> f64 {
    metric_at(addr, "kd_batch_size_count", &[("stage", "text_encoder")]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_prompts_skip_the_text_encoder_and_redis_outages_are_survived() {
    let mut redis = RedisServer::start();
    let url = format!("--redis-url={}", redis.url());
    let stack = Stack::start_with(&[&url], &[]).await;
    let te = stack.text_encoder.metrics;
    let mut c = stack.client().await;

    let first = c.generate(request("a red cat")).await.unwrap().into_inner();
    assert_eq!(
        (
            cache(te, "miss").await,
            cache(te, "hit").await,
            encodes(te).await
        ),
        (1.0, 0.0, 1.0)
    );
    let second = c.generate(request("a red cat")).await.unwrap().into_inner();
    assert_eq!(
        (cache(te, "hit").await, encodes(te).await),
        (1.0, 1.0),
        "the second request skipped the text tower"
    );
    assert_eq!(
        first.images[0].image, second.images[0].image,
        "a cached encoding gives the same image"
    );

    // Redis goes away: requests still succeed, uncached, and the errors are counted.
    redis.kill();
    c.generate(request("a blue dog")).await.unwrap();
    c.generate(request("a blue dog")).await.unwrap();
    assert!(cache(te, "error").await >= 1.0);
    assert_eq!(
        encodes(te).await,
        3.0,
        "without Redis both requests ran the text tower"
    );

    // Redis returns (empty): the cache reconnects and serves hits again.
    redis.restart();
    let start = std::time::Instant::now();
    loop {
        c.generate(request("a green bird")).await.unwrap();
        let hits = cache(te, "hit").await;
        c.generate(request("a green bird")).await.unwrap();
        if cache(te, "hit").await > hits {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no cache hit after Redis came back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_an_in_process_cache_serves_and_prior_samples_are_reused_only_for_the_same_seed(
) {
    let stack = Stack::start(&[]).await;
    let (te, prior) = (stack.text_encoder.metrics, stack.prior.metrics);
    let prior_cache = |result: &'static str| async move {
        let labels = [("result", result), ("stage", "prior")];
        metric_at(prior, "kd_cache_requests_total", &labels).await
    };
    let mut c = stack.client().await;
    let a = c.generate(request("an owl")).await.unwrap().into_inner();
    let b = c.generate(request("an owl")).await.unwrap().into_inner();
    assert_eq!((cache(te, "hit").await, encodes(te).await), (1.0, 1.0));
    assert_eq!(
        (prior_cache("miss").await, prior_cache("hit").await),
        (1.0, 1.0),
        "same prompt and seed: the prior sample is reused"
    );
    assert_eq!(a.images[0].image, b.images[0].image);
    let mut other_seed = request("an owl");
    other_seed.seeds = vec![2];
    c.generate(other_seed).await.unwrap();
    assert_eq!(
        (prior_cache("miss").await, prior_cache("hit").await),
        (2.0, 1.0),
        "another seed is sampled anew"
    );
    assert_eq!(
        cache(te, "hit").await,
        2.0,
        "the text encoding is reused whatever the seed"
    );
}

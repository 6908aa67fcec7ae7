//! Reading a service's Prometheus `/metrics`.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET <path>` over a plain TCP connection (HTTP/1.1): the whole response, headers included.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("no HTTP endpoint at {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("writing to {addr}: {e}"));
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .await
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    buf
}

/// `GET /metrics` (see [`http_get`]); panics unless the status is 200.
pub async fn scrape(addr: SocketAddr) -> String {
    let buf = http_get(addr, "/metrics").await;
    assert!(
        buf.starts_with("HTTP/1.1 200"),
        "GET /metrics at {addr}: {buf}"
    );
    buf
}

/// [`metric`] of a fresh [`scrape`] of `addr`, 0 when no sample matches (a labelled counter that
/// was never incremented has none).
pub async fn metric_at(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape(addr).await, name, labels).unwrap_or(0.0)
}

/// The sum of the samples of metric `name` whose labels include every `(label, value)` of
/// `labels`; `None` when no sample matches. With all of a series' labels this is that series'
/// value; with fewer it adds up the series (e.g. every `reason` of a counter).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
            None => (series, Vec::new()),
        };
        if series_name != name
            || !labels
                .iter()
                .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v))
        {
            continue;
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("metric line {line:?}: value: {e}"));
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// `a="x",b="y\"z"` → `[(a, x), (b, y"z)]`.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',').trim().to_string();
        if key.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => {}
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::metric;

    const TEXT: &str = r#"# HELP kd_failures_total Failed calls.
# TYPE kd_failures_total counter
kd_failures_total{method="Denoise",reason="cancelled",stage="denoiser"} 2
kd_failures_total{method="Denoise",reason="invalid_argument",stage="denoiser"} 3
kd_failures_total{method="Info",reason="a \"quoted\", comma",stage="denoiser"} 1
kd_in_flight 0
"#;

    #[test]
    fn a_full_label_set_is_one_series_and_a_partial_one_sums() {
        let m = |name, labels: &[(&str, &str)]| metric(TEXT, name, labels);
        assert_eq!(
            m(
                "kd_failures_total",
                &[("reason", "cancelled"), ("method", "Denoise")]
            ),
            Some(2.0)
        );
        assert_eq!(m("kd_failures_total", &[("method", "Denoise")]), Some(5.0));
        assert_eq!(m("kd_failures_total", &[]), Some(6.0));
        assert_eq!(
            m("kd_failures_total", &[("reason", "a \"quoted\", comma")]),
            Some(1.0)
        );
        assert_eq!(m("kd_in_flight", &[]), Some(0.0));
        assert_eq!(m("kd_failures_total", &[("reason", "overloaded")]), None);
        assert_eq!(m("kd_failures", &[]), None);
    }
}

//! One request is one trace: an in-test OTLP/gRPC receiver collects the spans that the gateway
//! and the four stages export for one Generate call. (Its own test binary: the trace exporter is
//! process-global.)

use kd_e2e::{quick_request, Stack};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: kd_runtime::config::CommonArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_gateway_and_stages() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(incoming),
    );
    let args = <Args as clap::Parser>::parse_from(["kd-e2e", "--otlp-endpoint", &endpoint]);
    let telemetry = kd_runtime::telemetry::init_tracing(&args.common, "kd-e2e");

    let stack = Stack::start(&[]).await;
    let mut c = stack.client().await;
    let req = quick_request("a red cat", 3);
    c.generate(req.clone()).await.unwrap();
    // A streaming call: its server span must last until the stream ends.
    let mut events = c.generate_stream(req).await.unwrap().into_inner();
    while events.message().await.unwrap().is_some() {}
    drop(stack);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .unwrap(); // flushes the exporter

    let spans = receiver.0.lock().unwrap().clone();
    let server_span = |path: &str| {
        spans.iter().find(|s| s.name == path).unwrap_or_else(|| {
            let names: Vec<_> = spans.iter().map(|s| s.name.as_str()).collect();
            panic!("no span `{path}` among {names:?}")
        })
    };
    let root = server_span("/kandinsky.v1.Gateway/Generate");
    assert!(
        root.parent_span_id.is_empty(),
        "the gateway's span is the root of the trace"
    );
    let in_trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    let ids: Vec<&Vec<u8>> = in_trace.iter().map(|s| &s.span_id).collect();
    for path in [
        "/kandinsky.v1.TextEncoder/EncodeText",
        "/kandinsky.v1.Prior/Sample",
        "/kandinsky.v1.Prior/ZeroImageEmbedding",
        "/kandinsky.v1.Denoiser/Denoise",
        "/kandinsky.v1.Movq/DecodeLatents",
    ] {
        let s = server_span(path);
        assert_eq!(
            s.trace_id, root.trace_id,
            "{path} is in the request's trace"
        );
        assert!(
            ids.contains(&&s.parent_span_id),
            "{path}'s parent is a span of the gateway's request"
        );
    }

    // The gateway makes one client span per stage call, parent of the stage's server span.
    for (client, server) in [
        (
            "text_encoder.EncodeText",
            "/kandinsky.v1.TextEncoder/EncodeText",
        ),
        ("prior.Sample", "/kandinsky.v1.Prior/Sample"),
        (
            "prior.ZeroImageEmbedding",
            "/kandinsky.v1.Prior/ZeroImageEmbedding",
        ),
        ("denoiser.Denoise", "/kandinsky.v1.Denoiser/Denoise"),
        ("movq.DecodeLatents", "/kandinsky.v1.Movq/DecodeLatents"),
    ] {
        let s = server_span(server);
        let parent = in_trace
            .iter()
            .find(|p| p.span_id == s.parent_span_id)
            .expect("the server span's parent is in the trace");
        assert_eq!(parent.name, client, "{server}'s parent");
        assert_eq!(
            parent.kind, 3,
            "{client} is a client span (SPAN_KIND_CLIENT)"
        );
    }

    // Probes are not traced: the harness polled Health/Check on every service.
    assert!(
        !spans
            .iter()
            .any(|s| s.name.starts_with("/grpc.health.v1.Health/")),
        "health checks make no spans"
    );
    // A streaming RPC's server span covers the work under it, not just the handler's return.
    let stream_root = server_span("/kandinsky.v1.Gateway/GenerateStream");
    let in_stream: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == stream_root.trace_id)
        .collect();
    let denoise_server = in_stream
        .iter()
        .find(|s| s.name == "/kandinsky.v1.Denoiser/Denoise")
        .expect("the stream's Denoise call is in its trace");
    let denoise_work = in_stream
        .iter()
        .find(|s| s.name == "denoise" && s.parent_span_id == denoise_server.span_id)
        .expect("the denoising loop's span is a child of the Denoise server span");
    assert!(
        denoise_server.end_time_unix_nano >= denoise_work.end_time_unix_nano,
        "the Denoise server span ends after the loop it serves ({} < {})",
        denoise_server.end_time_unix_nano,
        denoise_work.end_time_unix_nano
    );
    assert!(
        stream_root.end_time_unix_nano >= denoise_server.end_time_unix_nano,
        "the GenerateStream span lasts until its stream ended"
    );
}

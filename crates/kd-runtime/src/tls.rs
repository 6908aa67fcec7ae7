//! TLS on every gRPC port, and mutual TLS between the gateway and the stages (rustls, ring).
//!
//! A server given `--tls-cert`/`--tls-key` speaks TLS only: a plaintext call fails its
//! handshake. With `--tls-client-ca` it also requires a client certificate signed by that CA
//! (mutual TLS), so a stage serves only callers holding a certificate the platform issued. The
//! certificate and key files are watched: when either changes (a Kubernetes Secret rotation
//! swaps them), the next handshake uses the new pair; a pair that does not load (half-written,
//! mismatched) keeps the previous one and says why in the log. The gateway's client side
//! ([`client_config`]) reloads its own certificate the same way.

use rustls::client::ResolvesClientCert;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How often the certificate files are looked at (at most once per handshake).
pub const RECHECK: Duration = Duration::from_secs(1);
/// A TLS handshake that takes longer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--tls-cert`, `--tls-key`, `--tls-client-ca` of every service's gRPC port.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain of this server. With --tls-key the gRPC port speaks TLS only
    /// (plaintext calls are refused); the files are re-read when they change.
    #[arg(long, env = "KD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: callers must present a client certificate one of them signed
    /// (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "KD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The modification time and length of each file: what "changed" means.
type Stamp = Vec<(Option<SystemTime>, u64)>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => (m.modified().ok(), m.len()),
            Err(_) => (None, 0),
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs = read_certs(cert)?;
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    CertifiedKey::from_der(certs, key_der, &provider()).map_err(|e| {
        format!(
            "{} with {}: {e} (allowed: a certificate chain and its own private key)",
            cert.display(),
            key.display()
        )
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in read_certs(ca)? {
        store.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    Ok(store)
}

/// A certificate and key from files, re-read when they change.
#[derive(Debug)]
pub struct KeyPairFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<PairState>,
}

#[derive(Debug)]
struct PairState {
    stamp: Stamp,
    pair: Arc<CertifiedKey>,
    checked: Instant,
}

impl KeyPairFiles {
    /// Loads the pair now (an error names the file).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let pair = Arc::new(read_pair(cert, key)?);
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(PairState {
                stamp: stamp(&[cert, key]),
                pair,
                checked: Instant::now(),
            }),
        })
    }

    /// The current pair, re-read first when the files changed (checked at most every
    /// [`RECHECK`]).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= RECHECK {
            st.checked = Instant::now();
            let now = stamp(&[&self.cert, &self.key]);
            if now != st.stamp {
                match read_pair(&self.cert, &self.key) {
                    Ok(pair) => {
                        st.pair = Arc::new(pair);
                        st.stamp = now;
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    // Keep serving with the previous pair; try again at the next check.
                    Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded"),
                }
            }
        }
        st.pair.clone()
    }
}

impl ResolvesServerCert for KeyPairFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for KeyPairFiles {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server side of `args`: `None` when TLS is off; an error names the flag and file.
pub fn server_config(args: &TlsArgs) -> Result<Option<Arc<ServerConfig>>, String> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let pair = KeyPairFiles::load(cert, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &args.tls_client_ca {
        Some(ca) => {
            let roots = roots(ca).map_err(|e| format!("--tls-client-ca: {e}"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(pair));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection is a full handshake: a rotated certificate, or a client certificate the
    // CA no longer covers, takes effect on the next connection, never skipped by resumption
    // (gRPC connections are long-lived, so this costs little).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Some(Arc::new(config)))
}

/// A client side that trusts the CA certificates in `ca` and, with `identity` (certificate,
/// key), presents that client certificate (re-read when the files change).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some((cert, key)) => {
            builder.with_client_cert_resolver(Arc::new(KeyPairFiles::load(cert, key)?))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// One accepted TLS connection, as tonic's server takes it.
pub struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The connections of `listener` after their TLS handshakes (each in its own task, so a slow
/// or hostile client never holds up the others; a failed handshake is logged and dropped).
/// Accepting stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A tonic connector that dials TCP and runs a TLS handshake, naming the server by the host
/// of its stage URL (which the server's certificate must hold).
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
}

/// A TLS connection to a stage, as tonic's client takes it.
pub type ClientIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl Connector {
    /// A connector with `config` for the server named `server_name` (a DNS name or an IP).
    pub fn new(config: Arc<ClientConfig>, server_name: &str) -> Result<Self, String> {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name `{server_name}`: {e}"))?;
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(config),
            server_name,
        })
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = ClientIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<ClientIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.server_name.clone());
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: no host"))
            })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(443))).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

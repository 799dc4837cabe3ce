//! A bare hyper-over-TLS "hello" server: the baseline `benches/run.sh`
//! measures hsmgate against.
//!
//! It mirrors the gateway's transport exactly (see `src/gateway/listener.rs`
//! and `src/gateway/tls.rs`): a multi-thread tokio runtime with default
//! workers, `TCP_NODELAY`, tokio-rustls with the rustls aws-lc-rs provider and
//! safe default protocol versions, ALPN h2 + http/1.1, the hyper-util `auto`
//! builder with the same HTTP/1 and HTTP/2 settings, a handshake timeout and a
//! graceful-shutdown watcher per connection. What it leaves out is everything
//! hsmgate does per request (network re-check, routing, auth, JSON, engine,
//! access log), so the ratio of the two is the cost of that work.
//!
//! The file lives in a subdirectory so Cargo does not also infer it as a
//! `[[bench]]` target; it is built as `--example hello_tls`.
//!
//! A request with a body (`BENCH=ops ECHO=1 benches/run.sh` sends it the
//! exact Transit encrypt request wrk sends hsmgate) is answered with that
//! body: the same bytes each way as an encrypt, through the same transport,
//! with none of the work — the I/O-equivalent ceiling. A request without a
//! body gets `hello`.
//!
//! Usage: `hello_tls [ADDR]` (default `127.0.0.1:8443`). The certificate is a
//! fresh self-signed one for localhost/127.0.0.1, kept only in memory.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::crypto::aws_lc_rs;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

// The gateway's defaults (config/hsmgate.toml [limits]).
const MAX_HEADER_BYTES: usize = 16384;
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(10_000);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(10_000);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8443".to_string())
        .parse()?;
    // Same runtime as `hsmgate serve`: multi-thread, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(addr))
}

fn tls_config() -> Result<Arc<ServerConfig>, BoxError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

async fn hello(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // The gateway's default body limit (config/hsmgate.toml [limits]).
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if body.is_empty() {
        return Ok(Response::new(Full::new(Bytes::from_static(b"hello"))));
    }
    let mut answer = Response::new(Full::new(body));
    answer.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(answer)
}

async fn serve(addr: SocketAddr) -> Result<(), BoxError> {
    let acceptor = TlsAcceptor::from(tls_config()?);
    let socket = TcpListener::bind(addr).await?;
    // A stable line on stdout that run.sh waits for, like hsmgate's.
    println!("hello_tls: listening https://{}", socket.local_addr()?);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = match socket.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32);
            let conn = builder.serve_connection(TokioIo::new(tls), service_fn(hello));
            let _ = watcher.watch(conn).await;
        });
    }
}

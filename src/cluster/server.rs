//! The cluster port: HTTP/2 over mutual TLS 1.3, for members only.
//!
//! Phases, in order: the peer's address against the cluster's security
//! groups (dropped at accept, no TLS byte); the TLS handshake (timeout)
//! with a certificate from the cluster CA required; the certificate's role
//! must be a node (`urn:hsmgate:node:<id>`): a gateway's or any other
//! certificate is closed before HTTP. Then the routes:
//!
//! | route | what |
//! |---|---|
//! | `POST /cluster/v1/raft/{append,vote,snapshot}` | Raft RPCs |
//! | `POST /cluster/v1/write` | a member's write, committed by this leader |
//! | `POST /cluster/v1/read-index` | the leader's commit point (linearizable reads) |
//! | `POST /cluster/v1/join` | this uninitialized/zeroized node receives the cluster key |
//! | `POST /cluster/v1/status` | this node's view (also the pool's health check) |
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::certs::{role_of, Role};
use super::{Cluster, Done, IndexAnswer, JoinRequest, WriteAnswer};
use crate::netfilter::CidrSet;

/// Raft snapshots travel in chunks of openraft's default size (3 MiB),
/// JSON-encoded: a request body above this is refused.
const MAX_BODY: usize = 64 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the cluster port until `stop` fires.
pub async fn serve(
    cluster: Arc<Cluster>,
    socket: TcpListener,
    allowed: CidrSet,
    mut stop: watch::Receiver<bool>,
) {
    let allowed = Arc::new(allowed);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.changed() => break,
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !allowed.contains(crate::netfilter::canonical(peer.ip())) {
            tracing::warn!(%peer, "cluster port: peer outside the cluster's security groups; dropped");
            continue;
        }
        let cluster = cluster.clone();
        let stop = stop.clone();
        tokio::spawn(async move { connection(cluster, tcp, peer, stop).await });
    }
}

async fn connection(
    cluster: Arc<Cluster>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(cluster.server_tls());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "cluster port: TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "cluster port: TLS handshake timed out");
            return;
        }
    };
    let role = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| role_of(c));
    let node = match role {
        Some(Role::Node(id)) => id,
        other => {
            tracing::warn!(%peer, role = ?other, "cluster port: not a node certificate; closed");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let cluster = cluster.clone();
        async move { Ok::<_, std::convert::Infallible>(route(cluster, node, req).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(msg.into())));
    *resp.status_mut() = status;
    resp
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| text(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| text(StatusCode::BAD_REQUEST, e.to_string()))
}

macro_rules! try_body {
    ($req:expr) => {
        match body($req).await {
            Ok(b) => b,
            Err(resp) => return resp,
        }
    };
}

async fn route(cluster: Arc<Cluster>, from: u64, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    let path = req.uri().path().to_string();
    let raft = cluster.raft();
    match (path.as_str(), raft) {
        ("/cluster/v1/status", _) => json(StatusCode::OK, &cluster.status()),
        ("/cluster/v1/join", _) => {
            let join: JoinRequest = try_body!(req);
            let c = cluster.clone();
            let done = tokio::task::spawn_blocking(move || c.accept_join(join)).await;
            let answer = match done {
                Ok(Ok(())) => {
                    tracing::warn!(by = from, "cluster: joined at the request of node {from}");
                    Done::Ok
                }
                Ok(Err(e)) => Done::Failed(e.to_string()),
                Err(e) => Done::Failed(e.to_string()),
            };
            json(StatusCode::OK, &answer)
        }
        (_, None) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no Raft (not initialized, or zeroized)",
        ),
        ("/cluster/v1/raft/append", Some(raft)) => {
            let rpc = try_body!(req);
            json(StatusCode::OK, &raft.append_entries(rpc).await)
        }
        ("/cluster/v1/raft/vote", Some(raft)) => {
            let rpc = try_body!(req);
            json(StatusCode::OK, &raft.vote(rpc).await)
        }
        ("/cluster/v1/raft/snapshot", Some(raft)) => {
            let rpc = try_body!(req);
            json(StatusCode::OK, &raft.install_snapshot(rpc).await)
        }
        ("/cluster/v1/write", Some(raft)) => {
            let write: super::types::Request = try_body!(req);
            if write.rotate.is_some() {
                // Rotations start on the leader only (`Cluster::rotate_key`).
                return text(StatusCode::FORBIDDEN, "a key rotation is never forwarded");
            }
            use openraft::error::{ClientWriteError, RaftError};
            let answer = match raft.client_write(write).await {
                Ok(resp) => WriteAnswer::Applied {
                    index: resp.log_id.index,
                    conflict: resp.data.conflict,
                },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    WriteAnswer::NotLeader {
                        leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                    }
                }
                Err(e) => WriteAnswer::Failed(e.to_string()),
            };
            json(StatusCode::OK, &answer)
        }
        ("/cluster/v1/read-index", Some(raft)) => {
            use openraft::error::{CheckIsLeaderError, RaftError};
            let answer = match raft.ensure_linearizable().await {
                Ok(log_id) => IndexAnswer::Index(log_id.map(|l| l.index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    IndexAnswer::NotLeader {
                        leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                    }
                }
                Err(e) => IndexAnswer::Failed(e.to_string()),
            };
            json(StatusCode::OK, &answer)
        }
        _ => text(StatusCode::NOT_FOUND, "no such cluster route"),
    }
}

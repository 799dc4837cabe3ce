//! Talking to other members: HTTP/2 over mutual TLS 1.3 on their cluster
//! ports, JSON bodies. One multiplexed connection per peer, re-dialled on
//! failure. The server is checked by the DNS name of the node id we mean to
//! reach (`node-<id>.cluster.hsmgate`, see [`super::certs`]), so an address
//! that answers with another member's — or a gateway's — certificate is
//! refused during the handshake.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

use super::certs::node_server_name;
use super::types::{NodeId, TypeConfig};

/// The largest response body read from a peer (a snapshot chunk's reply is
/// small; a status or a forwarded write's answer smaller still).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("node {node} at {addr} unreachable: {detail}")]
    Unreachable {
        node: NodeId,
        addr: String,
        detail: String,
    },
    /// Sent, but no (readable) answer: the request may have taken effect.
    #[error("node {node} at {addr} did not answer: {detail}")]
    Lost {
        node: NodeId,
        addr: String,
        detail: String,
    },
    #[error("node {node} answered {status}: {detail}")]
    Refused {
        node: NodeId,
        status: u16,
        detail: String,
    },
}

/// One open HTTP/2 connection per (node id, address).
type Connections = HashMap<(NodeId, String), SendRequest<Full<Bytes>>>;

/// Connections to the other members.
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    conns: Mutex<Connections>,
    /// The cluster port's own IP, used as the source of outgoing
    /// connections (so peers' security groups, firewalls and the tests'
    /// partitions see one address per member); `None` when it listens on
    /// the unspecified address.
    source: Option<IpAddr>,
}

impl Peers {
    pub fn new(tls: Arc<rustls::ClientConfig>, source: Option<IpAddr>) -> Peers {
        Peers {
            tls,
            conns: Mutex::new(HashMap::new()),
            source,
        }
    }

    async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        let mut last = None;
        for target in tokio::net::lookup_host(addr).await? {
            let socket = match target {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if let Some(ip) = self.source.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            match socket.connect(target).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    }

    async fn dial(&self, node: NodeId, addr: &str) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = self.connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(node_server_name(node))
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// POSTs `body` as JSON to `path` on node `node` at `addr`; the answer's
    /// JSON as `R`. Any status but 200 is [`NetError::Refused`].
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        node: NodeId,
        addr: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, NetError> {
        let unreachable = |detail: String| NetError::Unreachable {
            node,
            addr: addr.to_string(),
            detail,
        };
        let lost = |detail: String| NetError::Lost {
            node,
            addr: addr.to_string(),
            detail,
        };
        let bytes = serde_json::to_vec(body).map_err(|e| unreachable(e.to_string()))?;
        let sent = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let key = (node, addr.to_string());
            let cached = self.conns.lock().await.get(&key).cloned();
            let mut sender = match cached {
                Some(s) if !s.is_closed() => s,
                _ => {
                    let s = self.dial(node, addr).await.map_err(&unreachable)?;
                    self.conns.lock().await.insert(key.clone(), s.clone());
                    s
                }
            };
            sender
                .ready()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let req = hyper::Request::post(format!("https://{}{path}", node_server_name(node)))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| unreachable(e.to_string()))?;
            sent.store(true, std::sync::atomic::Ordering::Release);
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    self.conns.lock().await.remove(&key);
                    return Err(lost(e.to_string()));
                }
            };
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| lost(e.to_string()))?
                .to_bytes();
            if status != 200 {
                return Err(NetError::Refused {
                    node,
                    status,
                    detail: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            serde_json::from_slice(&body).map_err(|e| NetError::Refused {
                node,
                status,
                detail: format!("unreadable answer: {e}"),
            })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) if sent.load(std::sync::atomic::Ordering::Acquire) => {
                Err(lost(format!("no answer within {timeout:?}")))
            }
            Err(_) => Err(unreachable(format!("not reached within {timeout:?}"))),
        }
    }
}

/// openraft's network: one [`PeerConn`] per target.
pub struct Network {
    pub peers: Arc<Peers>,
}

pub struct PeerConn {
    peers: Arc<Peers>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConn {
        PeerConn {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl PeerConn {
    async fn rpc<B, R, E>(
        &self,
        path: &str,
        body: &B,
        option: &RPCOption,
    ) -> Result<R, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        B: Serialize,
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Result<R, RaftError<NodeId, E>>, NetError> = self
            .peers
            .call(self.target, &self.addr, path, body, option.hard_ttl())
            .await;
        match answer {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc("/cluster/v1/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc("/cluster/v1/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc("/cluster/v1/raft/vote", &rpc, &option).await
    }
}

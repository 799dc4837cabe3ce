//! `/v1/hsm/cluster`: the crypto officer's view and control of this
//! node's cluster (admin class, crypto officer only). Membership changes
//! run on the leader; any member forwards them there over the cluster port.
//!
//! - `GET /v1/hsm/cluster`: this node's view (leader, members, applied index).
//! - `POST /v1/hsm/cluster/nodes` `{node_id, address, init_token}`: add (or
//!   re-add, after a zeroization) a node; `init_token` is the joining
//!   node's own, from its data dir: proof the officer controls that machine.
//! - `DELETE /v1/hsm/cluster/nodes/{node_id}`: remove a node (then the
//!   cluster key is rotated).
//! - `POST /v1/hsm/cluster/rotate-key`: rotate the cluster key now (every
//!   session ends).
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde::Deserialize;

use super::Call;
use crate::engine::secret::SecretString;
use crate::engine::Role;
use crate::gateway::rescue::ApiError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeBody {
    node_id: u64,
    address: String,
    init_token: SecretString,
}

fn officer(call: &Call<'_>) -> Result<std::sync::Arc<crate::cluster::Cluster>, ApiError> {
    let by = call.principal()?;
    if by.role != Role::CryptoOfficer || !by.app_policies.is_empty() {
        return Err(ApiError::PermissionDenied);
    }
    call.state.cluster.clone().ok_or_else(|| {
        ApiError::BadRequest(
            "this node is not a cluster member ([cluster] is not configured)".into(),
        )
    })
}

fn status_response(
    call: &Call<'_>,
    status: &crate::cluster::ClusterStatus,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let data = serde_json::to_value(status).map_err(|e| ApiError::Internal(e.to_string()))?;
    call.ok(data)
}

pub async fn status(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let cluster = officer(call)?;
    status_response(call, &cluster.status())
}

pub async fn add_node(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let cluster = officer(call)?;
    let body: AddNodeBody = call.json()?;
    if body
        .address
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(ApiError::BadRequest(format!(
            "address {:?} is not host:port (the node's cluster port)",
            body.address
        )));
    }
    let status = cluster
        .add_node(body.node_id, &body.address, &body.init_token)
        .await?;
    status_response(call, &status)
}

pub async fn remove_node(call: &Call<'_>, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let cluster = officer(call)?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a node id")))?;
    let status = cluster.remove_node(id).await?;
    status_response(call, &status)
}

pub async fn rotate_key(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let cluster = officer(call)?;
    let status = cluster.rotate_key().await?;
    status_response(call, &status)
}

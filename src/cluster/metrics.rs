//! The cluster's Prometheus metrics (registered only with `[cluster]`),
//! refreshed by a task every [`INTERVAL`] from [`Cluster::status`] (no
//! openraft type leaves this module).
//!
//! Every member exports its own view: `node_info`, `is_leader`, `term`,
//! `last_applied_index`, `voters`. Only the leader exports
//! `members_holding_keys` and `replication_lag_entries{peer}` (a follower
//! does not know the others' state; a 0 it made up would raise the
//! fewer-than-two alert on every follower). A voter holds the keys, as the
//! leader sees it, when it answers a status probe on the cluster port
//! (mutual TLS, its node certificate) within [`PROBE_TIMEOUT`] with an
//! active engine and running Raft, and its matched log index is within
//! [`HOLDING_LAG_ENTRIES`] of the leader's last log index. The probe is
//! needed: with no writes, a dead follower's matched index never falls
//! behind, and a zeroized one keeps its last index.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntGauge, IntGaugeVec, Registry};
use tokio::sync::watch;

use super::{Cluster, ClusterStatus};
use crate::engine::EngineState;
use crate::metrics::{gauge, gauge_vec};

/// How often the gauges are refreshed (and peers probed, on the leader).
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How long the leader waits for a member's status answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A voter more entries behind than this does not count as holding the keys.
pub const HOLDING_LAG_ENTRIES: u64 = 100;

/// The `hsmgate_cluster_*` gauges.
#[derive(Clone)]
pub struct ClusterMetrics {
    node_info: IntGaugeVec,
    is_leader: IntGauge,
    term: IntGauge,
    last_applied: IntGauge,
    voters: IntGauge,
    /// No labels; a child exists only while this node is the leader.
    holding: IntGaugeVec,
    lag: IntGaugeVec,
}

impl ClusterMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<ClusterMetrics> {
        Ok(ClusterMetrics {
            node_info: gauge_vec(
                r,
                "hsmgate_cluster_node_info",
                "Always 1; node_id is this member's cluster node id.",
                &["node_id"],
            )?,
            is_leader: gauge(
                r,
                "hsmgate_cluster_is_leader",
                "1 if this member is the cluster's Raft leader, else 0.",
            )?,
            term: gauge(
                r,
                "hsmgate_cluster_term",
                "This member's current Raft term (0 while its Raft is stopped).",
            )?,
            last_applied: gauge(
                r,
                "hsmgate_cluster_last_applied_index",
                "Index of the last Raft log entry this member applied to its store (0 before any).",
            )?,
            voters: gauge(
                r,
                "hsmgate_cluster_voters",
                "Voting members in the membership this member knows (0 while its Raft is stopped).",
            )?,
            holding: gauge_vec(
                r,
                "hsmgate_cluster_members_holding_keys",
                "Leader only: voters holding the keys (itself, and each that answers a status probe \
                 with an active engine and is at most 100 entries behind).",
                &[],
            )?,
            lag: gauge_vec(
                r,
                "hsmgate_cluster_replication_lag_entries",
                "Leader only: log entries each other member is behind the leader's last log index.",
                &["peer"],
            )?,
        })
    }

    /// Sets the gauges from `status` and, on the leader, the probes'
    /// answers (`probed`: peer → holds an active engine with Raft running).
    fn set(&self, s: &ClusterStatus, probed: &BTreeMap<u64, bool>) {
        self.node_info.reset();
        self.node_info
            .with_label_values(&[&s.node_id.to_string()])
            .set(1);
        let leading = is_leading(s);
        self.is_leader.set(i64::from(leading));
        self.term.set(clamp(s.term));
        self.last_applied.set(s.last_applied.map_or(0, clamp));
        self.voters.set(clamp(s.voters.len() as u64));
        self.lag.reset();
        self.holding.reset();
        if !leading {
            return;
        }
        let lags = lags(s);
        for (peer, lag) in &lags {
            self.lag
                .with_label_values(&[&peer.to_string()])
                .set(clamp(*lag));
        }
        let holding = holding(s, &lags, probed);
        self.holding
            .with_label_values::<&str>(&[])
            .set(clamp(holding));
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn is_leading(s: &ClusterStatus) -> bool {
    s.raft_state == "leader" && s.leader == Some(s.node_id)
}

/// Entries each other member (voter or learner) is behind the leader's
/// last log index; a member with nothing matched yet is behind by all of it.
fn lags(s: &ClusterStatus) -> BTreeMap<u64, u64> {
    // Log indices start at 0: index i means i + 1 entries.
    let count = |i: Option<u64>| i.map_or(0, |i| i.saturating_add(1));
    let last = count(s.last_log_index);
    s.replication
        .iter()
        .filter(|(id, _)| **id != s.node_id)
        .map(|(id, matched)| (*id, last.saturating_sub(count(*matched))))
        .collect()
}

/// Voters holding the keys as the leader sees them: itself (its engine
/// active) and each other voter that answered the probe as active and is
/// within [`HOLDING_LAG_ENTRIES`].
fn holding(s: &ClusterStatus, lags: &BTreeMap<u64, u64>, probed: &BTreeMap<u64, bool>) -> u64 {
    s.voters
        .iter()
        .filter(|id| {
            if **id == s.node_id {
                return s.engine_state == EngineState::Active.as_str();
            }
            probed.get(id).copied().unwrap_or(false)
                && lags.get(id).is_some_and(|l| *l <= HOLDING_LAG_ENTRIES)
        })
        .count() as u64
}

/// Asks every other voter for its status, concurrently; `true` for each
/// that answered with an active engine and running Raft.
async fn probe(cluster: &Arc<Cluster>, s: &ClusterStatus) -> BTreeMap<u64, bool> {
    let mut probes = tokio::task::JoinSet::new();
    for id in s.voters.iter().copied().filter(|id| *id != s.node_id) {
        let Some(addr) = s.nodes.get(&id).cloned() else {
            continue;
        };
        let peers = cluster.peers.clone();
        probes.spawn(async move {
            let answer: Result<ClusterStatus, _> = peers
                .call(id, &addr, "/cluster/v1/status", &(), PROBE_TIMEOUT)
                .await;
            let ok = answer.is_ok_and(|a| {
                a.node_id == id
                    && a.engine_state == EngineState::Active.as_str()
                    && a.raft_state != "stopped"
                    && a.raft_state != "shutdown"
            });
            (id, ok)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(done) = probes.join_next().await {
        if let Ok((id, ok)) = done {
            out.insert(id, ok);
        }
    }
    out
}

/// Refreshes `m` every [`INTERVAL`] until `stop` fires.
pub async fn run(cluster: Arc<Cluster>, m: ClusterMetrics, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let s = cluster.status();
        let probed = if is_leading(&s) {
            tokio::select! {
                _ = stop.changed() => break,
                p = probe(&cluster, &s) => p,
            }
        } else {
            BTreeMap::new()
        };
        m.set(&s, &probed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader_status() -> ClusterStatus {
        ClusterStatus {
            node_id: 1,
            advertise: "127.0.0.1:8201".into(),
            raft_state: "leader".into(),
            engine_state: "active".into(),
            leader: Some(1),
            term: 3,
            last_log_index: Some(500),
            last_applied: Some(500),
            voters: vec![1, 2, 3],
            learners: vec![],
            nodes: BTreeMap::new(),
            replication: BTreeMap::from([(1, Some(500)), (2, Some(500)), (3, Some(350))]),
            cluster_key_id: None,
        }
    }

    fn scrape(r: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lag_counts_entries_behind_and_unmatched_members() {
        let mut s = leader_status();
        s.replication.insert(4, None);
        let l = lags(&s);
        assert_eq!(l, BTreeMap::from([(2, 0), (3, 150), (4, 501)]));
    }

    #[test]
    fn a_voter_holds_keys_only_if_it_answers_active_and_is_caught_up() {
        let s = leader_status();
        let l = lags(&s);
        // Both answer, but 3 is 150 entries behind: the leader and 2.
        let probed = BTreeMap::from([(2, true), (3, true)]);
        assert_eq!(holding(&s, &l, &probed), 2);
        // 2 caught up but not answering (killed, zeroized): the leader only.
        let probed = BTreeMap::from([(2, false), (3, true)]);
        assert_eq!(holding(&s, &l, &probed), 1);
        // Everyone caught up and answering: 3.
        let mut s = leader_status();
        s.replication.insert(3, Some(450));
        let l = lags(&s);
        let probed = BTreeMap::from([(2, true), (3, true)]);
        assert_eq!(holding(&s, &l, &probed), 3);
    }

    #[test]
    fn followers_omit_what_only_the_leader_knows() {
        let r = Registry::new();
        let m = ClusterMetrics::register(&r).unwrap();
        m.set(&leader_status(), &BTreeMap::from([(2, true), (3, true)]));
        let text = scrape(&r);
        assert!(text.contains("hsmgate_cluster_is_leader 1"), "{text}");
        assert!(
            text.contains("hsmgate_cluster_members_holding_keys 2"),
            "{text}"
        );
        assert!(
            text.contains("hsmgate_cluster_replication_lag_entries{peer=\"3\"} 150"),
            "{text}"
        );
        assert!(text.contains("hsmgate_cluster_node_info{node_id=\"1\"} 1"));
        let mut follower = leader_status();
        follower.raft_state = "follower".into();
        follower.leader = Some(2);
        m.set(&follower, &BTreeMap::new());
        let text = scrape(&r);
        assert!(text.contains("hsmgate_cluster_is_leader 0"), "{text}");
        assert!(text.contains("hsmgate_cluster_voters 3"), "{text}");
        assert!(
            !text.contains("hsmgate_cluster_members_holding_keys"),
            "{text}"
        );
        assert!(
            !text.contains("hsmgate_cluster_replication_lag_entries"),
            "{text}"
        );
    }
}

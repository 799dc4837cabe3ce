//! hsmgate: a network access-control gateway in front of HSMs, with a
//! built-in software HSM engine.
//!
//! Module map (each module is named for the decision it owns):
//!
//! - [`cli`]: the command line (`serve`, `check`, `audit verify`, ...); parses, then calls in here.
//! - [`config`]: parses and validates `config/` and `policies/` into one immutable
//!   [`config::Config`]; every error carries its file and line.
//! - [`netfilter`]: decides whether a peer address may connect to a listener, or use
//!   an admin route (longest-prefix CIDR tables).
//! - [`ratelimit`]: decides whether a peer or principal may go on now (GCRA limits,
//!   the password-hashing cap, connection caps).
//! - [`auth`]: decides who an app is from its JWT (issuers, keys, roles) or its
//!   verified client certificate (`[[cert_principal]]`).
//! - [`acl`]: decides what an authenticated principal may do on Transit (Vault-style
//!   path/capability policies from `policies/`).
//! - [`gateway`]: listeners, TLS, HTTP, the request phases, [`gateway::rescue`],
//!   the one place where errors become HTTP responses; [`gateway::forwarded`]
//!   decides the effective client behind a trusted proxy; [`gateway::reload`]
//!   is the config reload (SIGHUP, file changes) and its one snapshot swap.
//! - [`api`]: the HTTP surface: Vault-Transit-compatible [`api::transit`] and the
//!   HSM administration API [`api::hsm`].
//! - [`engine`]: the software HSM: state machine, users and the login counters,
//!   the sealed crash-safe store, the cryptography, zeroization.
//! - [`cluster`]: many HSMs: engine nodes replicating the store with Raft
//!   (openraft, used only there), the cluster port, joining and zeroization.
//! - [`upstream`]: a gateway without an engine (`[upstream]`): decides which
//!   remote engine node gets a request, health checks and ejects nodes.
//! - [`audit`]: the hash-chained audit log (append, sync, offline verify).
//! - [`metrics`]: Prometheus metrics and the metrics listener.
//!
//! See `docs/ARCHITECTURE.md` for the request phases and where each decision lives.
#![forbid(unsafe_code)]

pub mod acl;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod metrics;
pub mod netfilter;
pub mod ratelimit;
pub mod upstream;

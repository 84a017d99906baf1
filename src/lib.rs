//! meshid: a certificate authority and identity issuer for service meshes.
//!
//! It validates Kubernetes service-account tokens and issues short-lived SPIFFE X.509-SVIDs.
//!
//! Module map, lowest layer first (a module imports only from layers above it in this list;
//! docs/ARCHITECTURE.md has the wire contracts):
//! - foundations: `clock` (injected time), `duration` (parsing, printing, serde), `backoff` (the
//!   one retry schedule), `shutdown` (the stop signal), `deadline`, `fswatch` (file changes),
//!   `net` (listeners, the accept loop, connection adapters), `http_client` (the one HTTP GET),
//!   `kube_client` (the one way a Kubernetes client is built), `leader` (leader election on a
//!   Lease; the schedules run on the leader only)
//! - `spiffe` (SPIFFE IDs and trust domains), `ca` (the authority: keys, templates, signing,
//!   validation, CRLs), `state` (the state document, its journal, atomic writes; a directory or a
//!   Kubernetes Secret)
//! - `identity` (Kubernetes token validation: TokenReview, JWKS, caches, cluster routing)
//! - `trust` (the live CA snapshot, trust bundles, federation and the bundle endpoint, ConfigMaps),
//!   `rotation` (root transitions, the activation gate, propagation, renewal, schedules)
//! - `discovery` (which endpoints have a sidecar: auto mTLS as istiod decides it)
//! - `tls` (rustls configurations), `telemetry` (metrics, logs, the HTTP surface), `api` (the wire:
//!   SDS, EDS, the Istio CSR API, gRPC status mapping)
//! - `config` (the server configuration), `server` (composition: builds every part and runs it),
//!   `agent` (the node agent: keys made on the node, SDS and the SPIFFE Workload API on Unix sockets)
//! - `cli` (the commands), `demo` (the mission's story on one machine)
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backoff;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod discovery;
pub mod duration;
pub mod fswatch;
#[doc(hidden)]
pub mod fuzzing;
pub mod h2_authority;
pub mod http_client;
pub mod identity;
pub mod kube_client;
pub mod leader;
pub mod net;
pub mod rotation;
pub mod server;
pub mod shutdown;
pub mod spiffe;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod trust;

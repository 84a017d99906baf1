//! `meshid demo`: the mission's mixed-traffic story, for real, on one machine. A fresh CA, a dev
//! token issuer, `meshid server` on loopback, and three workloads — product-service and
//! inventory-service with a small sidecar each, legacy-db with none — whose sidecars do what
//! Envoy does: EDS for the destination's endpoints, SDS for their certificate and roots, then a
//! real TCP connection, mTLS or plaintext by the endpoint's tlsMode.

mod apps;
mod cluster;
mod control;
mod error;
mod outcome;
mod report;
mod rotation;
mod sidecar;
mod snapshot;
mod steps;
mod world;

pub use apps::{EchoApp, Received};
pub use cluster::{ClusterConfig, ClusterTls, EndpointDecision};
pub use control::{ProxyState, Secrets, XdsEndpoint};
pub use error::DemoError;
pub use outcome::RotationCheck;
pub use outcome::{MtlsCheck, PlainCheck, StepOutcome, StepResult, TroubleshootCheck};
pub use sidecar::{anchor_id, Call, Inbound, Sidecar, Transport};
pub use steps::run_steps;
pub use world::{DemoOptions, Progress, World};

/// Sets up the world and runs every step. The world stays up until `World::shutdown`.
pub async fn run(
    opts: DemoOptions,
    progress: Progress,
) -> Result<(World, Vec<StepResult>), DemoError> {
    let world = World::start(opts, progress).await?;
    let results = run_steps(&world).await;
    Ok((world, results))
}

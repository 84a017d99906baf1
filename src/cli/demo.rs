//! `meshid demo`: the mixed-traffic story end to end on this machine (see `crate::demo`).

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Args;

use crate::demo::{DemoOptions, Progress};

#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Work directory (new or empty): the CA's state goes in DIR/state, the dev issuer in
    /// DIR/issuer, the snapshot in DIR/mixed-traffic.yaml. Unlike other commands' --state-dir,
    /// this is not the CA state itself. Default: a new directory under the system temp dir,
    /// kept after the demo. (`--state-dir` is accepted as its old name.)
    #[arg(long, value_name = "DIR", alias = "state-dir")]
    work_dir: Option<PathBuf>,
    /// Leave the server, sidecars and apps running after the steps, until Ctrl-C or SIGTERM.
    #[arg(long)]
    keep_running: bool,
}

impl DemoArgs {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        crate::telemetry::init_logging(crate::telemetry::LogFormat::Text, "warn");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let progress: Progress = Arc::new(|line: &str| outln!("{line}"));
            let opts = DemoOptions {
                dir: self.work_dir,
            };
            let (world, results) = crate::demo::run(opts, progress).await?;
            let failed: Vec<u8> = results
                .iter()
                .filter(|r| !r.passed())
                .map(|r| r.number)
                .collect();
            if failed.is_empty() {
                outln!("\nmeshid demo: every step passed");
            } else {
                outln!("\nmeshid demo: step(s) {failed:?} FAILED (see above: expected vs seen)");
            }
            if self.keep_running {
                // Handlers first: a SIGTERM right after the line below must stop cleanly.
                let signal = super::server::shutdown_signal()?;
                outln!(
                    "still running (gRPC {}, metrics http://{}/metrics); Ctrl-C or SIGTERM stops it",
                    world.grpc_addr, world.http_addr
                );
                outln!(
                    "status page: http://{}/ui (live; try `meshid root prepare --state-dir {}` and watch it)",
                    world.http_addr,
                    world.state_dir().display()
                );
                let signal = signal.await?;
                outln!("{signal} received; stopping");
            }
            world.shutdown().await;
            Ok(if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        })
    }
}

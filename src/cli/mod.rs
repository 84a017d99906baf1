//! Commands: one file per subcommand; each parses, calls the library, prints.

/// `println!` for a command's output. Into a closed pipe (`meshid … | head -1`, `| grep -q`)
/// the command ends quietly with status 0, as ripgrep does, instead of panicking.
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output; see `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod agent;
mod bundle;
mod ca;
mod cert;
mod client;
mod config;
mod demo;
mod describe;
mod dev;
mod inspect;
mod root;
mod server;
mod state;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// meshid: a certificate authority and identity issuer for service meshes.
#[derive(Debug, Parser)]
#[command(name = "meshid", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and manage the certificate authority (roots, intermediates).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Rotate roots: status, prepare, activate, taint, revoke.
    #[command(subcommand)]
    Root(root::RootCommand),
    /// SPIFFE federation: export, show and set trust bundles; ask for a peer's bundle now.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Issue and inspect certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Move the CA state between a directory and a Kubernetes Secret.
    #[command(subcommand)]
    State(state::StateCommand),
    /// Check service-account tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Explain auto mTLS: why a connection to a service or pod is mTLS, plaintext, or will fail.
    #[command(subcommand)]
    Describe(describe::DescribeCommand),
    /// Talk to a running server's SDS.
    #[command(subcommand)]
    Sds(SdsCommand),
    /// Run the CA service: Envoy SDS and Istio's CSR API over gRPC+TLS, plus /metrics and health.
    Server(server::ServerArgs),
    /// Run the node agent: make the key here, get the certificate over the CSR API, serve it over
    /// SDS and the SPIFFE Workload API on Unix sockets, follow the trust bundle as it changes.
    Agent(agent::AgentArgs),
    /// Run the mixed-traffic example end to end on this machine: CA, server, sidecars, rotation.
    Demo(demo::DemoArgs),
    /// Check a server config without starting anything.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script: `meshid completions bash > /etc/bash_completion.d/meshid`,
    /// `meshid completions zsh > "${fpath[1]}/_meshid"`, `meshid completions fish > ~/.config/fish/completions/meshid.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Local stand-ins for cluster parts, for development and tests.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

#[derive(Debug, Subcommand)]
enum SdsCommand {
    /// Fetch secrets (FetchSecrets) as a proxy would, and print or write them.
    Get(client::SdsGetArgs),
}

/// Output format of commands that print a report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// `--key-type` values: the CA's own names (`KeyType::name`), so the CA needs no clap.
impl ValueEnum for crate::ca::KeyType {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// Parses the command line, runs the command, and maps failure to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca(c) => c.run(),
        Command::State(c) => c.run(),
        Command::Root(c) => c.run(),
        Command::Bundle(c) => c.run(),
        Command::Cert(c) => c.run(),
        Command::Token(c) => c.run(),
        Command::Dev(c) => c.run(),
        Command::Server(c) => c.run(),
        Command::Agent(c) => c.run(),
        Command::Sds(SdsCommand::Get(a)) => a.run(),
        Command::Describe(c) => c.run(),
        Command::Demo(c) => c.run(),
        Command::Config(c) => c.run(),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshid", &mut out);
            write_stdout(&out).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// Writes command output to stdout. A closed pipe ends the process quietly with status 0
/// (whatever the command did is done; only the rest of its output has no reader); any other
/// write error ends it with status 1, saying so.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// Writes bytes to stdout, as [`write_out`].
pub(crate) fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

/// An error and its causes on one line, each cause once: many errors already name their
/// source in their own message, and printing the chain as well would say it twice.
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Parses a duration flag (`1h`, `30m`, `10y`).
fn duration_arg(s: &str) -> Result<std::time::Duration, crate::duration::DurationError> {
    crate::duration::parse_duration(s)
}

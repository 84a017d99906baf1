//! Tests on a real kube-apiserver and etcd (built by tools/kube-bins.sh): identity, discovery's
//! live watch and RBAC, against meshid's in-process server. Ignored under a plain `cargo test`
//! (they name the command that runs them: tools/kube-tests.sh); with `--include-ignored` and no
//! binaries they fail saying why.

mod cluster;
mod deploy_rbac;
mod discovery;
mod identity;
mod impersonation;
mod istio_crds;
mod istio_import;
mod leader;
mod mesh;
mod process;
mod proofs;
mod proxy;
mod rbac;
mod state;
mod support;

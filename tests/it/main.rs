//! Integration tests: one crate (one link) with a module per area.

mod agent;
mod automtls;
mod cacerts_istio;
mod cli;
mod csr_refusals;
mod demo;
mod deploy;
mod discovery;
mod fake_apiserver;
mod federation;
mod federation_trust;
mod hardening;
mod identity;
mod identity_hardening;
mod kube_real;
mod openssl;
mod plugin_import;
mod profiles;
mod root_configmap;
mod roots;
mod rotation_server;
mod server;
mod server_support;
mod storm_limits;
mod support;
mod xds_conformance;

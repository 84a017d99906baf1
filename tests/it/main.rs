//! Integration tests: one crate (one link) with a module per area.

mod cli;
mod csr_refusals;
mod discovery;
mod fake_apiserver;
mod identity;
mod identity_hardening;
mod openssl;
mod plugin_import;
mod profiles;
mod server;
mod server_support;
mod support;

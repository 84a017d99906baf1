//! Integration tests: one crate (one link) with a module per area.

mod cli;
mod csr_refusals;
mod openssl;
mod plugin_import;
mod profiles;
mod support;

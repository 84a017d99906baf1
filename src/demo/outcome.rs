//! What the demo's steps establish, and the checks they share: the outcome types every step,
//! the rotation and the report speak, `expect`, and the active root read from the state.

use std::collections::BTreeMap;

use super::{
    sidecar::{Call, Inbound},
    world::World,
    DemoError,
};
use crate::state::{DirStore, StateStore};

/// The service every mTLS check calls: inventory-service, port 8080.
pub(super) const INVENTORY: (&str, u16) = ("inventory-service.shop", 8080);

/// product → inventory over mTLS, as both sidecars saw it.
#[derive(Clone, Debug)]
pub struct MtlsCheck {
    pub call: Call,
    pub inbound: Inbound,
}

/// A plaintext connection and what the receiving app saw.
#[derive(Clone, Debug)]
pub struct PlainCheck {
    pub call: Call,
    pub app_saw_tls: bool,
}

/// The DestinationRule DISABLE case and its undoing.
#[derive(Clone, Debug)]
pub struct TroubleshootCheck {
    pub disabled: Call,
    /// The inventory sidecar accepted the plaintext connection (PERMISSIVE).
    pub disabled_inbound: Inbound,
    pub restored: MtlsCheck,
}

/// What a step established.
#[derive(Clone, Debug)]
pub enum StepOutcome {
    Mtls(MtlsCheck),
    Plaintext(PlainCheck),
    Troubleshoot(Box<TroubleshootCheck>),
    Rotation(RotationCheck),
    Summary { metrics_lines: Vec<String> },
}

/// One step: its number, title, and outcome.
#[derive(Debug)]
pub struct StepResult {
    pub number: u8,
    pub title: &'static str,
    pub outcome: Result<StepOutcome, DemoError>,
}

impl StepResult {
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }
}

pub(super) fn expect(
    ok: bool,
    expected: impl Into<String>,
    seen: impl Into<String>,
) -> Result<(), DemoError> {
    if ok {
        Ok(())
    } else {
        Err(DemoError::unexpected(expected, seen))
    }
}

pub(super) fn show<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("none".into(), ToString::to_string)
}

/// The rotation under traffic.
#[derive(Clone, Debug, Default)]
pub struct RotationCheck {
    pub old_root: String,
    pub new_root: String,
    /// mTLS handshakes completed (and echoed) per phase, in order.
    pub phases: Vec<(String, u64)>,
    pub handshakes: u64,
    pub failures: Vec<String>,
    /// Handshakes by (client leaf root, server leaf root).
    pub by_roots: BTreeMap<(String, String), u64>,
    pub forced_revoke_note: Vec<String>,
}

pub(super) fn active_root(w: &World) -> Result<String, DemoError> {
    let v = DirStore::new(w.state_dir())
        .load_existing()
        .map_err(|e| DemoError::conn("reading the CA state", e))?;
    Ok(v.state
        .signing_root()
        .map_err(|e| DemoError::conn("the CA state", e))?
        .id
        .clone())
}

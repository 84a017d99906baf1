//! The stored form of the state, the same in every store: a JSON envelope whose checksum
//! covers format, generation and the exact state text, so a torn or bit-rotted document is
//! detected rather than half-read.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{document::CaState, error::StateError, generation::Generation, store::Versioned};

/// The one format this meshid reads and writes.
pub(crate) const FORMAT: &str = "meshid-ca-state/v1";

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    format: String,
    generation: u64,
    checksum: String,
    #[serde(borrow)]
    state: &'a RawValue,
}

fn checksum(format: &str, generation: u64, body: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(format!("{format}\n{generation}\n").as_bytes());
    ctx.update(body.as_bytes());
    format!("sha256:{}", crate::ca::cert::hex(ctx.finish().as_ref()))
}

/// `raw` (any JSON) as the state of an envelope with a valid checksum (for fuzzing the state's
/// own checks); `None` when `raw` is not JSON.
pub(crate) fn wrap_raw(raw: &[u8], generation: u64) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(raw).ok()?;
    let raw = RawValue::from_string(text.to_owned()).ok()?;
    let env = Envelope {
        format: FORMAT.into(),
        generation,
        checksum: checksum(FORMAT, generation, raw.get()),
        state: &raw,
    };
    serde_json::to_vec(&env).ok()
}

/// `state` as generation `generation`, validated first.
pub(crate) fn encode(state: &CaState, generation: u64) -> Result<Vec<u8>, StateError> {
    state.validate()?;
    let body =
        serde_json::to_string_pretty(state).map_err(|e| StateError::Invalid(e.to_string()))?;
    let raw = RawValue::from_string(body).map_err(|e| StateError::Invalid(e.to_string()))?;
    let env = Envelope {
        format: FORMAT.into(),
        generation,
        checksum: checksum(FORMAT, generation, raw.get()),
        state: &raw,
    };
    serde_json::to_vec(&env).map_err(|e| StateError::Invalid(e.to_string()))
}

/// The state in `bytes`, read from `location` (named in errors): refused when corrupted, of
/// another format, or invalid.
pub(crate) fn decode(bytes: &[u8], location: &Path) -> Result<Versioned, StateError> {
    let corrupted = |why: String| StateError::Corrupted {
        path: location.to_owned(),
        why,
    };
    let env: Envelope<'_> = serde_json::from_slice(bytes)
        .map_err(|e| corrupted(format!("not a state document: {e}")))?;
    if env.format != FORMAT {
        return Err(StateError::UnsupportedFormat {
            path: location.to_owned(),
            found: env.format,
            expected: FORMAT,
        });
    }
    if checksum(&env.format, env.generation, env.state.get()) != env.checksum {
        return Err(corrupted("checksum mismatch".into()));
    }
    let state: CaState = serde_json::from_str(env.state.get())
        .map_err(|e| corrupted(format!("bad state body: {e}")))?;
    state.validate()?;
    Ok(Versioned {
        generation: Generation(env.generation),
        state,
    })
}

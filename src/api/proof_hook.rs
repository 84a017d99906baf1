//! The SDS side of "sidecars proven by their proxies": a stream whose token names a pod
//! registers it for as long as the response stream lives.

use std::sync::Arc;

use futures::StreamExt;

use super::xds::Out;
use crate::{
    discovery::{ProxyRegistry, StreamGuard},
    identity::Identity,
};

/// Registers the stream's pod, if there is a registry and the token names a pod.
pub(crate) fn opened(registry: Option<&Arc<ProxyRegistry>>, id: &Identity) -> Option<StreamGuard> {
    registry?.stream_opened(id)
}

/// Keeps `guard` alive exactly as long as the response stream.
pub(crate) fn hold<T: Send + 'static>(out: Out<T>, guard: Option<StreamGuard>) -> Out<T> {
    match guard {
        None => out,
        Some(g) => Box::pin(out.map(move |item| {
            let _held = &g;
            item
        })),
    }
}

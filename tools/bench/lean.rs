#![allow(dead_code)]
//! An SDS client as lean as Envoy's per connection: TLS and HTTP/2 straight from rustls and h2,
//! gRPC framing by hand, no tonic channel (whose buffer and reconnect tasks would make the load
//! generator, not the server, the slowest part of a 10,000-proxy fan-out).

use std::{net::SocketAddr, sync::Arc};

use bytes::{Buf, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use meshid::api::SECRET_TYPE_URL;
use prost::Message;

use super::common::{grpc_frame, grpc_request, h2_connect};

pub struct SdsStream {
    names: Vec<String>,
    send: h2::SendStream<Bytes>,
    body: h2::RecvStream,
    buf: BytesMut,
}

impl SdsStream {
    /// Connects (TCP, TLS, HTTP/2) and opens StreamSecrets for `names`.
    pub async fn open(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: &str,
        names: &[&str],
    ) -> Result<Self, String> {
        let mut h2 = h2_connect(addr, None, tls).await?;
        let req = grpc_request(
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
            token,
        );
        let (resp, mut send) = h2.send_request(req, false).map_err(|e| e.to_string())?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let first = DiscoveryRequest {
            resource_names: names.clone(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        };
        send.send_data(grpc_frame(&first), false)
            .map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("HTTP {}", resp.status()));
        }
        Ok(Self {
            names,
            send,
            body: resp.into_body(),
            buf: BytesMut::new(),
        })
    }

    /// The next response; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<DiscoveryResponse> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len);
                    return DiscoveryResponse::decode(msg.freeze()).ok();
                }
            }
            let chunk = self.body.data().await?.ok()?;
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// ACKs `resp` as Envoy does: same names, its version and nonce.
    pub fn ack(&mut self, resp: &DiscoveryResponse) {
        let ack = DiscoveryRequest {
            resource_names: self.names.clone(),
            type_url: SECRET_TYPE_URL.into(),
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        let _ = self.send.send_data(grpc_frame(&ack), false);
    }
}

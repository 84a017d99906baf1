//! Unix-socket gRPC for clients on grpc's C core (py-spiffe, grpc-python, grpc-c++): since
//! grpc/grpc#33571 they send the percent-encoded socket path as the HTTP/2 `:authority`
//! (`%2Frun%2Fspiffe%2Fworkload.sock`), which hyperium/h2 refuses as a malformed authority and
//! resets the stream (hyperium/h2#442; grpc-go sends `localhost`). On a Unix socket the
//! authority names nothing (the socket is the address), so [`AuthorityFix`] rewrites an
//! `:authority` that is not a valid URI authority to `localhost` on the client's side of the
//! connection before h2 reads it: it passes every frame through unchanged except header blocks,
//! which it decodes with HPACK and encodes again (one decoder following the client's encoder,
//! one encoder the server's decoder follows, so both dynamic tables stay in step).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE (h2's default, which meshid keeps): frames written
/// toward it are at most this long.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (h2's own default limit is 16 KiB of headers).
const MAX_BLOCK: usize = 1 << 20;

/// A header block being collected from HEADERS + CONTINUATION frames.
struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The rewriting connection (see the module documentation).
pub struct AuthorityFix<IO> {
    io: IO,
    /// Bytes read from the client, not yet processed.
    input: Vec<u8>,
    /// Processed bytes, ready for h2.
    output: Vec<u8>,
    /// How much of the client preface has passed.
    preface_seen: usize,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    eof: bool,
}

impl<IO> AuthorityFix<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            input: Vec::new(),
            output: Vec::new(),
            preface_seen: 0,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            eof: false,
        }
    }

    /// Moves what can be processed from `input` to `output`.
    fn process(&mut self) -> std::io::Result<()> {
        if self.preface_seen < PREFACE_LEN {
            let n = (PREFACE_LEN - self.preface_seen).min(self.input.len());
            self.output.extend(self.input.drain(..n));
            self.preface_seen += n;
        }
        if self.preface_seen < PREFACE_LEN {
            return Ok(());
        }
        while self.input.len() >= FRAME_HEADER_LEN {
            let len = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            // HTTP/2's rule (RFC 9113 4.2): no frame above the receiver's SETTINGS_MAX_FRAME_SIZE,
            // 16 KiB until it says otherwise (meshid's servers never raise it). Refused here,
            // before a 16 MiB frame could be buffered.
            if len > MAX_FRAME {
                return Err(protocol(&format!(
                    "a {len}-byte frame; the largest allowed is {MAX_FRAME} (FRAME_SIZE_ERROR)"
                )));
            }
            if self.input.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER_LEN + len).collect();
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER_LEN..];
            match (kind, self.pending.is_some()) {
                (HEADERS, false) => {
                    let (priority, fragment) = headers_payload(flags, payload)?;
                    self.pending = Some(Pending {
                        stream,
                        flags,
                        priority,
                        block: fragment.to_vec(),
                    });
                    if flags & END_HEADERS != 0 {
                        self.finish()?;
                    }
                }
                (CONTINUATION, true) => {
                    let p = self.pending.as_mut().expect("checked");
                    if p.stream != stream || p.block.len() + payload.len() > MAX_BLOCK {
                        return Err(protocol("CONTINUATION out of sequence or too large"));
                    }
                    p.block.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        self.finish()?;
                    }
                }
                (_, true) => return Err(protocol("a frame inside a header block")),
                _ => self.output.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    /// Re-encodes the collected header block, its `:authority` fixed, as HEADERS (+
    /// CONTINUATION) frames.
    fn finish(&mut self) -> std::io::Result<()> {
        let p = self.pending.take().expect("a block is pending");
        let mut headers = self
            .decoder
            .decode(&p.block)
            .map_err(|e| protocol(&format!("HPACK: {e}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut first = Vec::new();
        let mut flags = p.flags & (END_STREAM | PRIORITY);
        if let Some(prio) = p.priority {
            first.extend_from_slice(&prio);
        }
        let room = MAX_FRAME - first.len();
        let (head, mut rest) = block.split_at(block.len().min(room));
        first.extend_from_slice(head);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        write_frame(&mut self.output, HEADERS, flags, p.stream, &first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            let f = if tail.is_empty() { END_HEADERS } else { 0 };
            write_frame(&mut self.output, CONTINUATION, f, p.stream, chunk);
            rest = tail;
        }
        Ok(())
    }
}

/// The priority fields and the header block fragment of a HEADERS payload (padding removed).
fn headers_payload(flags: u8, payload: &[u8]) -> std::io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p
            .split_first()
            .ok_or_else(|| protocol("empty padded HEADERS"))?;
        pad = usize::from(n);
        p = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if p.len() < 5 {
            return Err(protocol("short HEADERS priority"));
        }
        priority = Some([p[0], p[1], p[2], p[3], p[4]]);
        p = &p[5..];
    }
    if pad > p.len() {
        return Err(protocol("HEADERS padding longer than its payload"));
    }
    Ok((priority, &p[..p.len() - pad]))
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn protocol(why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("HTTP/2 from the client: {why}"),
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        // The client closed: what is left unprocessed is an incomplete frame.
                        this.eof = true;
                        let rest = std::mem::take(&mut this.input);
                        this.output.extend(rest);
                        continue;
                    }
                    // `process` refuses a frame above MAX_FRAME as soon as its header arrives,
                    // so `input` never holds more than one frame.
                    this.input.extend_from_slice(got);
                    if let Err(e) = this.process() {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for AuthorityFix<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Fuzzing (`crate::fuzzing::h2_authority`): `data` as a client's bytes, arriving in reads of
/// varying size, through the frame and HPACK rewriting. What passes is the preface and whole,
/// well-formed frames, never more than the limits allow.
#[doc(hidden)]
pub fn fuzz_read(data: &[u8]) {
    let mut f = AuthorityFix::new(());
    let mut sizes = data.iter().map(|b| usize::from(*b % 61) + 1).cycle();
    let mut rest = data;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).min(rest.len());
        f.input.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if f.process().is_err() {
            return;
        }
    }
    // The output: the preface as sent, then complete frames only.
    let out = &f.output;
    let mut at = PREFACE_LEN.min(out.len());
    while at < out.len() {
        assert!(
            out.len() - at >= FRAME_HEADER_LEN,
            "a torn frame header was passed on"
        );
        let len =
            usize::from(out[at]) << 16 | usize::from(out[at + 1]) << 8 | usize::from(out[at + 2]);
        assert!(
            out.len() - at - FRAME_HEADER_LEN >= len,
            "a torn frame was passed on"
        );
        at += FRAME_HEADER_LEN + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, flags, stream, payload);
        v
    }

    /// What grpc's C core sends on a Unix socket: the authority is rewritten, every other
    /// header and frame passes unchanged, and a second request that refers to the first one's
    /// dynamic-table entries still decodes.
    #[test]
    fn a_percent_encoded_socket_path_becomes_localhost() {
        let mut client = loona_hpack::Encoder::new();
        let req = |path: &[u8]| {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":scheme".to_vec(), b"http".to_vec()),
                (b":path".to_vec(), path.to_vec()),
                (b":authority".to_vec(), b"tmp%2Fpyt%2Fwl.sock".to_vec()),
                (b"workload.spiffe.io".to_vec(), b"true".to_vec()),
            ]
        };
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (i, path) in [
            &b"/SpiffeWorkloadAPI/FetchX509SVID"[..],
            b"/SpiffeWorkloadAPI/FetchX509Bundles",
        ]
        .into_iter()
        .enumerate()
        {
            let h = req(path);
            let block = client.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            // Split across HEADERS + CONTINUATION, padded, as a client may.
            let (a, b) = block.split_at(block.len() / 2);
            let mut padded = vec![3u8];
            padded.extend_from_slice(a);
            padded.extend_from_slice(&[0, 0, 0]);
            let stream = 1 + 2 * i as u32;
            wire.extend(frame(HEADERS, PADDED, stream, &padded));
            wire.extend(frame(CONTINUATION, END_HEADERS, stream, b));
            wire.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        let mut fix = AuthorityFix::new(());
        // Byte by byte: frames split anywhere are reassembled.
        for b in &wire {
            fix.input.push(*b);
            fix.process().unwrap();
        }
        let out = fix.output;
        assert_eq!(&out[..PREFACE_LEN], &wire[..PREFACE_LEN]);
        let mut server = loona_hpack::Decoder::new();
        let mut rest = &out[PREFACE_LEN..];
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags, payload) = (rest[3], rest[4], &rest[9..9 + len]);
            if kind == HEADERS {
                assert_eq!(
                    flags & END_HEADERS,
                    END_HEADERS,
                    "one frame holds the block"
                );
                assert_eq!(flags & PADDED, 0);
                seen.push(server.decode(payload).unwrap());
            }
            rest = &rest[9 + len..];
        }
        assert_eq!(seen.len(), 2);
        for (h, path) in seen.iter().zip([
            "/SpiffeWorkloadAPI/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchX509Bundles",
        ]) {
            let get = |n: &str| {
                h.iter()
                    .find(|(k, _)| k.as_slice() == n.as_bytes())
                    .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
            };
            assert_eq!(get(":authority").as_deref(), Some("localhost"));
            assert_eq!(get(":path").as_deref(), Some(path));
            assert_eq!(get("workload.spiffe.io").as_deref(), Some("true"));
        }
    }

    /// A valid authority (grpc-go's `localhost`, tonic's) is kept as it is.
    #[test]
    fn a_valid_authority_is_kept() {
        let mut client = loona_hpack::Encoder::new();
        let block = client.encode([(&b":authority"[..], &b"localhost:15012"[..])]);
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut fix = AuthorityFix::new(());
        fix.input = wire;
        fix.process().unwrap();
        let h = loona_hpack::Decoder::new()
            .decode(&fix.output[PREFACE_LEN + 9..])
            .unwrap();
        assert_eq!(
            h,
            vec![(b":authority".to_vec(), b"localhost:15012".to_vec())]
        );
    }

    #[test]
    fn broken_framing_is_refused() {
        let mut fix = AuthorityFix::new(());
        fix.input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        fix.input.extend(frame(HEADERS, 0, 1, &[0x82]));
        fix.input.extend(frame(0x0, 0, 1, b"x"));
        assert!(fix.process().is_err(), "a DATA frame inside a header block");
    }
}

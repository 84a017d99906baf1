//! Prints, as one JSON line, what the `spiffe` crate's `X509Source` (found through
//! `SPIFFE_ENDPOINT_SOCKET`) holds: the SVID's SPIFFE ID and chain, and its trust domain's
//! bundle (DER, base64).

use base64::Engine;
use spiffe::{BundleSource, X509Source};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let source = X509Source::new().await?;
    let svid = source.svid()?;
    let td = svid.spiffe_id().trust_domain().clone();
    let bundle = source
        .bundle_for_trust_domain(&td)?
        .ok_or("no bundle for the SVID's trust domain")?;
    let b64 = |d: &[u8]| {
        format!(
            "\"{}\"",
            base64::engine::general_purpose::STANDARD.encode(d)
        )
    };
    let chain: Vec<String> = svid.cert_chain().iter().map(|c| b64(c.as_ref())).collect();
    let roots: Vec<String> = bundle
        .authorities()
        .iter()
        .map(|c| b64(c.as_ref()))
        .collect();
    println!(
        "{{\"spiffe_id\":\"{}\",\"chain_der\":[{}],\"bundle_der\":[{}]}}",
        svid.spiffe_id(),
        chain.join(","),
        roots.join(",")
    );
    Ok(())
}

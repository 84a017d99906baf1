//! `meshid cert inspect FILE [--root FILE] [--output text|json]`.
//!
//! JSON output (stable field names):
//! `{"file", "certificates": [{"index", "spiffe_id", "uri_sans", "dns_names", "serial", "subject",
//! "issuer", "not_before", "not_after", "key_type", "is_ca", "sha256"}], "verification": null |
//! {"root_file", "verified", "error"}}`. Times are RFC 3339, serials lowercase hex.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use x509_parser::extensions::GeneralName;

use super::Output;
use crate::{
    ca::{cert, chain, sig::PublicKeyKind, CertDer},
    clock::{Clock, SystemClock},
    spiffe::SpiffeId,
};

#[derive(Debug, Args)]
pub(super) struct InspectArgs {
    /// PEM file with one or more certificates (a chain: leaf first).
    file: PathBuf,
    /// Root certificate(s) to verify the chain against. Exit code 1 if it does not verify.
    #[arg(long, value_name = "FILE")]
    root: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// One certificate, as `inspect` reports it.
#[derive(Debug, Serialize)]
pub struct CertReport {
    pub index: usize,
    pub spiffe_id: Option<String>,
    pub uri_sans: Vec<String>,
    pub dns_names: Vec<String>,
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    pub key_type: String,
    pub is_ca: bool,
    pub sha256: String,
}

/// The result of verifying the file's chain against roots.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub root_file: String,
    pub verified: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    certificates: Vec<CertReport>,
    verification: Option<Verification>,
}

impl InspectArgs {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        let what = self.file.display().to_string();
        let pem = std::fs::read(&self.file).with_context(|| format!("reading {what}"))?;
        let certs = cert::certs_from_pem(&pem, &what)?;
        let certificates = certs
            .iter()
            .enumerate()
            .map(|(i, c)| report(i, c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let verification = match &self.root {
            Some(root_file) => Some(verify(&certs, root_file)?),
            None => None,
        };
        let ok = verification.as_ref().is_none_or(|v| v.verified);
        let report = Report {
            file: what,
            certificates,
            verification,
        };
        if self.output.is_json() {
            outln!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_text(&report);
        }
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

fn report(index: usize, der: &CertDer) -> anyhow::Result<CertReport> {
    let c = cert::parse(der, "certificate")?;
    let mut uri_sans = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                _ => {}
            }
        }
    }
    let rfc3339 = |t: x509_parser::time::ASN1Time| crate::clock::rfc3339(t.to_datetime());
    Ok(CertReport {
        index,
        spiffe_id: uri_sans
            .iter()
            .find(|u| SpiffeId::parse(u).is_ok())
            .cloned(),
        uri_sans,
        dns_names,
        serial: cert::hex(c.raw_serial().strip_prefix(&[0]).unwrap_or(c.raw_serial())),
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        not_before: rfc3339(c.validity().not_before),
        not_after: rfc3339(c.validity().not_after),
        key_type: PublicKeyKind::of(c.public_key()).name(c.public_key()),
        is_ca: c.is_ca(),
        sha256: cert::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
    })
}

fn verify(certs: &[CertDer], root_file: &std::path::Path) -> anyhow::Result<Verification> {
    let what = root_file.display().to_string();
    let pem = std::fs::read(root_file).with_context(|| format!("reading {what}"))?;
    let roots = cert::certs_from_pem(&pem, &what)?;
    let now = SystemClock.now();
    // A chain file often ends with the root; the roots given are what is trusted.
    let rest: Vec<CertDer> = certs[1..]
        .iter()
        .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
        .cloned()
        .collect();
    let first_is_ca = cert::parse(&certs[0], "certificate")?.is_ca();
    let result = if first_is_ca {
        let mut path = vec![certs[0].clone()];
        path.extend(rest);
        chain::verify_ca_chain(&path, &roots, now)
    } else {
        chain::verify_leaf(&certs[0], &rest, &roots, now)
    };
    Ok(Verification {
        root_file: what,
        verified: result.is_ok(),
        error: result.err().map(|e| e.to_string()),
    })
}

fn print_text(r: &Report) {
    for c in &r.certificates {
        outln!("certificate {} of {}", c.index, r.file);
        outln!(
            "  spiffe id:  {}",
            c.spiffe_id.as_deref().unwrap_or("(none)")
        );
        if c.uri_sans.len() > 1 || (c.spiffe_id.is_none() && !c.uri_sans.is_empty()) {
            outln!("  uri sans:   {}", c.uri_sans.join(", "));
        }
        if !c.dns_names.is_empty() {
            outln!("  dns names:  {}", c.dns_names.join(", "));
        }
        outln!(
            "  subject:    {}",
            if c.subject.is_empty() {
                "(empty)"
            } else {
                &c.subject
            }
        );
        outln!("  issuer:     {}", c.issuer);
        outln!("  serial:     {}", c.serial);
        outln!("  not before: {}", c.not_before);
        outln!("  not after:  {}", c.not_after);
        outln!("  key type:   {}", c.key_type);
        outln!("  is ca:      {}", c.is_ca);
    }
    if let Some(v) = &r.verification {
        match &v.error {
            None => outln!("chain: verifies against {}", v.root_file),
            Some(e) => outln!("chain: does NOT verify against {}: {e}", v.root_file),
        }
    }
}

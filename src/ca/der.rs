//! The few DER operations rcgen and x509-parser do not offer: wrapping PKCS#1 and SEC1
//! private keys into PKCS#8 (ring loads only PKCS#8), and reading the curve of a SEC1 key.

/// Writes one DER TLV with a definite length.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Reads one TLV, returning (tag, content, rest).
pub(crate) fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const NULL: u8 = 0x05;
const OID: u8 = 0x06;

/// rsaEncryption, 1.2.840.113549.1.1.1
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-ecPublicKey, 1.2.840.10045.2.1
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

fn pkcs8(algorithm: Vec<u8>, private_key: &[u8]) -> Vec<u8> {
    let mut body = tlv(INTEGER, &[0]);
    body.extend(tlv(SEQUENCE, &algorithm));
    body.extend(tlv(OCTET_STRING, private_key));
    tlv(SEQUENCE, &body)
}

/// Wraps a PKCS#1 `RSAPrivateKey` into a PKCS#8 `PrivateKeyInfo`.
pub(crate) fn pkcs8_from_pkcs1(rsa: &[u8]) -> Vec<u8> {
    let mut alg = tlv(OID, OID_RSA_ENCRYPTION);
    alg.extend(tlv(NULL, &[]));
    pkcs8(alg, rsa)
}

/// Wraps a SEC1 `ECPrivateKey` into PKCS#8, taking the curve from its `parameters` field.
pub(crate) fn pkcs8_from_sec1(sec1: &[u8]) -> Option<Vec<u8>> {
    let (tag, mut body, _) = read_tlv(sec1)?;
    if tag != SEQUENCE {
        return None;
    }
    for _ in 0..2 {
        body = read_tlv(body)?.2; // version, privateKey
    }
    let (tag, params, _) = read_tlv(body)?;
    if tag != 0xa0 {
        return None; // parameters absent: the curve is unknown
    }
    let (tag, curve, _) = read_tlv(params)?;
    if tag != OID {
        return None;
    }
    let mut alg = tlv(OID, OID_EC_PUBLIC_KEY);
    alg.extend(tlv(OID, curve));
    Some(pkcs8(alg, sec1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let content = vec![7u8; len];
            let enc = tlv(OCTET_STRING, &content);
            let (tag, got, rest) = read_tlv(&enc).unwrap();
            assert_eq!((tag, got.len(), rest.len()), (OCTET_STRING, len, 0));
        }
    }

    #[test]
    fn truncated_input_is_refused() {
        let enc = tlv(OCTET_STRING, &[1, 2, 3]);
        assert!(read_tlv(&enc[..enc.len() - 1]).is_none());
        assert!(read_tlv(&[]).is_none());
    }
}

//! The envelope every spore metadata format shares: magic, version, length,
//! payload, and a BLAKE3 checksum over all of it.
//!
//! ```text
//! offset  size  field
//!      0     8  magic        (identifies the format, e.g. "SPLAYER\0")
//!      8     2  version      (little endian; readers reject versions they do not know)
//!     10     2  flags        (0; reserved)
//!     12     4  reserved     (0)
//!     16     8  payload_len  (little endian)
//!     24     n  payload
//!   24+n    32  BLAKE3 of bytes [0, 24+n)
//! ```

pub const HEADER_LEN: usize = 24;
pub const CHECKSUM_LEN: usize = 32;
/// Bound on payloads so that a corrupt length cannot make a reader allocate
/// without limit.
pub const MAX_PAYLOAD: u64 = 1 << 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    #[error("wrong magic: expected {expected:?}")]
    BadMagic { expected: String },
    #[error("unsupported version {found} (this build reads up to {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("payload length {0} does not match the file")]
    BadLength(u64),
    #[error("checksum mismatch")]
    Checksum,
}

/// Wraps `payload` in an envelope.
pub fn seal(magic: &[u8; 8], version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks an envelope and returns (version, payload).
pub fn open<'a>(
    magic: &[u8; 8],
    supported: u16,
    bytes: &'a [u8],
) -> Result<(u16, &'a [u8]), EnvelopeError> {
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if &bytes[..8] != magic {
        return Err(EnvelopeError::BadMagic {
            expected: String::from_utf8_lossy(magic)
                .trim_end_matches('\0')
                .to_owned(),
        });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD || (HEADER_LEN as u64 + len + CHECKSUM_LEN as u64) != bytes.len() as u64 {
        return Err(EnvelopeError::BadLength(len));
    }
    let body_end = HEADER_LEN + len as usize;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(EnvelopeError::Checksum);
    }
    // Version is checked after the checksum so that a corrupt file is
    // reported as corrupt, not as "from the future".
    if version == 0 || version > supported {
        return Err(EnvelopeError::UnsupportedVersion {
            found: version,
            supported,
        });
    }
    Ok((version, &bytes[HEADER_LEN..body_end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    const M: &[u8; 8] = b"SPTEST\0\0";

    #[test]
    fn roundtrip() {
        let sealed = seal(M, 1, b"payload");
        assert_eq!(open(M, 1, &sealed).unwrap(), (1, &b"payload"[..]));
    }

    #[test]
    fn rejects_malformed() {
        let sealed = seal(M, 1, b"payload");
        assert_eq!(open(M, 1, &sealed[..20]), Err(EnvelopeError::Truncated(20)));
        assert!(matches!(
            open(b"SPOTHER\0", 1, &sealed),
            Err(EnvelopeError::BadMagic { .. })
        ));
        let mut flipped = sealed.clone();
        flipped[26] ^= 1;
        assert_eq!(open(M, 1, &flipped), Err(EnvelopeError::Checksum));
        let mut extended = sealed.clone();
        extended.push(0);
        assert!(matches!(
            open(M, 1, &extended),
            Err(EnvelopeError::BadLength(_))
        ));
        let future = seal(M, 7, b"payload");
        assert_eq!(
            open(M, 1, &future),
            Err(EnvelopeError::UnsupportedVersion {
                found: 7,
                supported: 1
            })
        );
        let mut huge = sealed.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            open(M, 1, &huge),
            Err(EnvelopeError::BadLength(_))
        ));
    }
}

//! Bundles: a few named byte sections and a JSON description in one
//! checked blob. A template travels as a bundle (its description, device
//! state, kernel and initrd) stored as an image, next to its RAM and disk
//! images, so pushing, pulling and resolving templates reuse images.
//!
//! Payload (envelope magic `SPBUNDLE`, version 1, little endian):
//!
//! ```text
//! u32 header_len | header (UTF-8 JSON) | section bytes, in header order
//! header = { "meta": <any JSON value>, "sections": [ { "name": S, "len": N }, ... ] }
//! ```
//!
//! The envelope's BLAKE3 covers everything. Bytes after the envelope (the
//! zero padding of the image holding it) are ignored.

use serde::{Deserialize, Serialize};

use crate::envelope::{self, EnvelopeError, CHECKSUM_LEN, HEADER_LEN};

pub const BUNDLE_MAGIC: &[u8; 8] = b"SPBUNDLE";
pub const BUNDLE_VERSION: u16 = 1;
/// Bound on the JSON header.
pub const MAX_HEADER: usize = 1 << 20;
pub const MAX_SECTIONS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle envelope")]
    Envelope(#[from] EnvelopeError),
    #[error("malformed bundle: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SectionHeader {
    name: String,
    len: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    meta: serde_json::Value,
    sections: Vec<SectionHeader>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub meta: serde_json::Value,
    pub sections: Vec<(String, Vec<u8>)>,
}

impl Bundle {
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            meta: self.meta.clone(),
            sections: self
                .sections
                .iter()
                .map(|(name, b)| SectionHeader {
                    name: name.clone(),
                    len: b.len() as u64,
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header).expect("JSON of plain values");
        let mut p = Vec::with_capacity(4 + json.len());
        p.extend_from_slice(&(json.len() as u32).to_le_bytes());
        p.extend_from_slice(&json);
        for (_, b) in &self.sections {
            p.extend_from_slice(b);
        }
        envelope::seal(BUNDLE_MAGIC, BUNDLE_VERSION, &p)
    }

    /// Decodes a bundle, ignoring bytes after its envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        let bad = |m: &str| BundleError::Malformed(m.to_owned());
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(EnvelopeError::Truncated(bytes.len()).into());
        }
        let payload_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let end = (HEADER_LEN as u64)
            .checked_add(payload_len)
            .and_then(|n| n.checked_add(CHECKSUM_LEN as u64))
            .filter(|&n| n <= bytes.len() as u64)
            .ok_or(EnvelopeError::BadLength(payload_len))?;
        let (_, p) = envelope::open(BUNDLE_MAGIC, BUNDLE_VERSION, &bytes[..end as usize])?;
        if p.len() < 4 {
            return Err(bad("no header length"));
        }
        let hlen = u32::from_le_bytes(p[0..4].try_into().expect("4 bytes")) as usize;
        if hlen > MAX_HEADER || hlen > p.len() - 4 {
            return Err(bad("header length out of bounds"));
        }
        let header: Header = serde_json::from_slice(&p[4..4 + hlen])
            .map_err(|e| BundleError::Malformed(format!("header: {e}")))?;
        if header.sections.len() > MAX_SECTIONS {
            return Err(bad("too many sections"));
        }
        let mut rest = &p[4 + hlen..];
        let mut sections = Vec::with_capacity(header.sections.len());
        for s in header.sections {
            if sections
                .iter()
                .any(|(n, _): &(String, Vec<u8>)| *n == s.name)
            {
                return Err(BundleError::Malformed(format!(
                    "section {:?} twice",
                    s.name
                )));
            }
            if s.len > rest.len() as u64 {
                return Err(BundleError::Malformed(format!(
                    "section {:?} runs past the end",
                    s.name
                )));
            }
            let (this, more) = rest.split_at(s.len as usize);
            sections.push((s.name, this.to_vec()));
            rest = more;
        }
        if !rest.is_empty() {
            return Err(bad("bytes after the last section"));
        }
        Ok(Bundle {
            meta: header.meta,
            sections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            meta: serde_json::json!({ "name": "t1", "memory_mib": 512 }),
            sections: vec![
                ("state".into(), vec![1, 2, 3]),
                ("kernel".into(), vec![9; 1000]),
                ("empty".into(), vec![]),
            ],
        }
    }

    #[test]
    fn round_trip_with_padding() {
        let b = sample();
        let mut bytes = b.encode();
        assert_eq!(Bundle::decode(&bytes).unwrap(), b);
        bytes.resize(bytes.len() + 65536, 0);
        let d = Bundle::decode(&bytes).unwrap();
        assert_eq!(d.section("kernel").unwrap().len(), 1000);
        assert_eq!(d.section("empty").unwrap(), b"");
        assert!(d.section("initrd").is_none());
    }

    #[test]
    fn malformed_bundles_are_refused() {
        let good = sample().encode();
        // Truncated anywhere.
        for n in [0, 10, 30, good.len() - 1] {
            assert!(Bundle::decode(&good[..n]).is_err(), "{n}");
        }
        // Any flipped byte fails the checksum (or the header checks).
        for i in [0, 9, 17, 30, good.len() / 2, good.len() - 1] {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(Bundle::decode(&b).is_err(), "byte {i}");
        }
        // Well-sealed but inconsistent payloads.
        let seal = |p: &[u8]| envelope::seal(BUNDLE_MAGIC, BUNDLE_VERSION, p);
        let with = |json: &str, data: &[u8]| {
            let mut p = (json.len() as u32).to_le_bytes().to_vec();
            p.extend_from_slice(json.as_bytes());
            p.extend_from_slice(data);
            seal(&p)
        };
        let cases = [
            seal(&[1, 2]),
            seal(&u32::MAX.to_le_bytes()),
            with("not json", b""),
            with(r#"{"meta":1,"sections":[{"name":"a","len":5}]}"#, b"abc"),
            with(r#"{"meta":1,"sections":[{"name":"a","len":1}]}"#, b"abc"),
            with(
                r#"{"meta":1,"sections":[{"name":"a","len":1},{"name":"a","len":1}]}"#,
                b"ab",
            ),
            with(
                r#"{"meta":1,"sections":[{"name":"a","len":18446744073709551615}]}"#,
                b"ab",
            ),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(
                matches!(Bundle::decode(c), Err(BundleError::Malformed(_))),
                "case {i}: {:?}",
                Bundle::decode(c)
            );
        }
        // Another format's envelope.
        let other = envelope::seal(b"SPPROFIL", 1, b"x");
        assert!(matches!(
            Bundle::decode(&other),
            Err(BundleError::Envelope(EnvelopeError::BadMagic { .. }))
        ));
        // A length field pointing past the end.
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Bundle::decode(&b).is_err());
    }
}

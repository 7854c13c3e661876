//! Image records: what an image name means in the origin store.
//!
//! Each name is one small JSON object at `images/<name>`:
//!
//! ```text
//! {"version": 1, "manifest": "<64 hex>", "profile": "<64 hex>"}
//! ```
//!
//! `profile` (the image's boot profile chunk) is left out when there is
//! none. A reader rejects a record without a version, with a version it does
//! not know, or with fields version 1 does not have: a writer that needs
//! more bumps the version.

use serde::{Deserialize, Serialize};
use spore_chunks::ChunkId;

/// The record format this code writes and reads.
pub const IMAGE_RECORD_VERSION: u64 = 1;
/// Larger objects under `images/` are not records; they are not parsed.
pub const MAX_RECORD_LEN: u64 = 4096;

/// What a name is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRecord {
    pub manifest: ChunkId,
    pub profile: Option<ChunkId>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not an image record")]
    Json(#[source] serde_json::Error),
    #[error("image record has no format version")]
    NoVersion,
    #[error("image record format version {0} is not supported (this spore reads version {IMAGE_RECORD_VERSION})")]
    UnknownVersion(u64),
    #[error("image record of {0} bytes is over the limit of {MAX_RECORD_LEN}")]
    TooLarge(u64),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct V1 {
    version: u64,
    manifest: ChunkId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<ChunkId>,
}

/// Only the version, read first so that a record of another version is
/// reported as such rather than as bad JSON of this one.
#[derive(Deserialize)]
struct Versioned {
    version: Option<serde_json::Value>,
}

impl ImageRecord {
    pub fn encode(&self) -> Vec<u8> {
        let v1 = V1 {
            version: IMAGE_RECORD_VERSION,
            manifest: self.manifest,
            profile: self.profile,
        };
        serde_json::to_vec(&v1).expect("a record always serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() as u64 > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge(bytes.len() as u64));
        }
        let v: Versioned = serde_json::from_slice(bytes).map_err(RecordError::Json)?;
        match v.version {
            None => return Err(RecordError::NoVersion),
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(IMAGE_RECORD_VERSION) => {}
            Some(serde_json::Value::Number(n)) => {
                return Err(RecordError::UnknownVersion(n.as_u64().unwrap_or(u64::MAX)))
            }
            Some(_) => return Err(RecordError::NoVersion),
        }
        let r: V1 = serde_json::from_slice(bytes).map_err(RecordError::Json)?;
        Ok(ImageRecord {
            manifest: r.manifest,
            profile: r.profile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_and_without_profile() {
        let m = ChunkId::of(b"manifest");
        let p = ChunkId::of(b"profile");
        for rec in [
            ImageRecord {
                manifest: m,
                profile: None,
            },
            ImageRecord {
                manifest: m,
                profile: Some(p),
            },
        ] {
            let enc = rec.encode();
            assert_eq!(ImageRecord::decode(&enc).unwrap(), rec);
        }
        let plain = String::from_utf8(
            ImageRecord {
                manifest: m,
                profile: None,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(plain, format!("{{\"version\":1,\"manifest\":\"{m}\"}}"));
    }

    #[test]
    fn malformed_and_unknown_records_are_rejected() {
        let m = ChunkId::of(b"manifest").to_hex();
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "not an image record"),
            ("{\"version\":1,".into(), "not an image record"),
            ("[1,2]".into(), "not an image record"),
            (format!("{{\"manifest\":\"{m}\"}}"), "no format version"),
            (
                format!("{{\"version\":\"1\",\"manifest\":\"{m}\"}}"),
                "no format version",
            ),
            (
                format!("{{\"version\":2,\"manifest\":\"{m}\"}}"),
                "format version 2 is not supported",
            ),
            ("{\"version\":1}".into(), "not an image record"),
            (
                "{\"version\":1,\"manifest\":\"abc\"}".into(),
                "not an image record",
            ),
            (
                format!("{{\"version\":1,\"manifest\":\"{m}\",\"profile\":7}}"),
                "not an image record",
            ),
            (
                format!("{{\"version\":1,\"manifest\":\"{m}\",\"owner\":\"x\"}}"),
                "not an image record",
            ),
            (" ".repeat(5000), "over the limit"),
        ];
        for (bytes, want) in cases {
            match ImageRecord::decode(bytes.as_bytes()) {
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{bytes:?}: {e} (wanted {want})"
                ),
                Ok(r) => panic!("{bytes:?} was accepted as {r:?}"),
            }
        }
    }
}

//! The agent's errors and how they map to HTTP.

use axum::http::StatusCode;

use crate::meta::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{kind} {name:?} is in use by {by}")]
    InUse {
        kind: &'static str,
        name: String,
        by: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    State(String),
    /// The caller's certificate does not allow this (a missing role, a
    /// revoked certificate).
    #[error("{0}")]
    Forbidden(String),
    /// A bound on concurrent work is reached; the same request may succeed
    /// later.
    #[error("{0}")]
    Busy(String),
    #[error("metadata")]
    Meta(#[from] MetaError),
    #[error("image")]
    Image(#[from] spore_image::ImageError),
    #[error("import/export")]
    Transfer(#[from] spore_image::TransferError),
    #[error("source file")]
    Source(#[from] spore_image::source::SourceError),
    #[error("disk overlay")]
    Overlay(#[from] spore_blockdev::OverlayError),
    #[error("chunk store")]
    Store(#[from] spore_chunks::Error),
    #[error(transparent)]
    OriginOpen(#[from] spore_origin::OpenError),
    #[error(transparent)]
    Origin(#[from] spore_origin::OriginError),
    #[error("QEMU")]
    Qmp(#[from] spore_qemu::QmpError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            AgentError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            AgentError::Exists { .. } => (StatusCode::CONFLICT, "conflict"),
            AgentError::InUse { .. } => (StatusCode::CONFLICT, "in_use"),
            AgentError::State(_) => (StatusCode::CONFLICT, "state"),
            AgentError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AgentError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            AgentError::Invalid(_) | AgentError::Source(_) => (StatusCode::BAD_REQUEST, "invalid"),
            AgentError::Transfer(spore_image::TransferError::Shrink { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            AgentError::Image(
                spore_image::ImageError::ParentBlockSize { .. }
                | spore_image::ImageError::Params(_),
            ) => (StatusCode::BAD_REQUEST, "invalid"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The error and its causes on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(e) = cur {
            let text = e.to_string();
            if !s.ends_with(&text) {
                s.push_str(": ");
                s.push_str(&text);
            }
            cur = e.source();
        }
        s
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Names of images, disks, VMs, templates and groups: spore's one rule
/// ([`spore_api::NAME_RULE`]).
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    spore_api::check_name(kind, name).map_err(AgentError::Invalid)
}

/// Checks values that reach QEMU's command line from another host or a
/// client: a MAC (`52:54:00:12:34:56`), a GUID (8-4-4-4-12 hex digits), a
/// hostname (RFC 1123 labels) and an instance id. A comma or an `=` in any
/// of them would add options to a `-device` argument (e.g. a `romfile=`
/// that maps a host file into the guest), so nothing but the expected
/// characters passes.
pub fn check_mac(mac: &str) -> Result<()> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(()).ok_or_else(|| {
        AgentError::Invalid(format!(
            "MAC {mac:?} is invalid: expected six hex pairs like 52:54:00:12:34:56"
        ))
    })
}

pub fn check_guid(guid: &str) -> Result<()> {
    let lens: Vec<usize> = guid.split('-').map(str::len).collect();
    let ok = lens == [8, 4, 4, 4, 12] && guid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(()).ok_or_else(|| {
        AgentError::Invalid(format!(
            "GUID {guid:?} is invalid: expected 8-4-4-4-12 hex digits"
        ))
    })
}

pub fn check_hostname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    ok.then_some(()).ok_or_else(|| {
        AgentError::Invalid(format!(
            "hostname {name:?} is invalid (RFC 1123: letters, digits, '-' and '.')"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_for_the_command_line_are_checked() {
        assert!(check_mac("52:54:00:ab:CD:0f").is_ok());
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f,romfile=/etc/shadow",
            "52-54-00-ab-cd-0f",
            "",
        ] {
            assert!(check_mac(bad).is_err(), "{bad}");
        }
        assert!(check_guid("a32f7f28-983f-4f6c-af96-7bc52f2d4293").is_ok());
        for bad in [
            "a32f7f28-983f-4f6c-af96-7bc52f2d4293,romfile=/x",
            "a32f7f28983f4f6caf967bc52f2d4293",
            "g32f7f28-983f-4f6c-af96-7bc52f2d4293",
        ] {
            assert!(check_guid(bad).is_err(), "{bad}");
        }
        assert!(check_hostname("web-1.example").is_ok());
        for bad in ["", "-web", "web,x=y", "a..b", "web_1"] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("image", "debian-12.1_base").is_ok());
        assert!(check_name("vm", &"x".repeat(128)).is_ok());
        for bad in ["", ".hidden", "-flag", "a/b", "a b", &"x".repeat(129), "ü"] {
            assert!(check_name("image", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chain_includes_causes_once() {
        let e = AgentError::Io {
            context: "reading x".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(e.chain(), "reading x: disk on fire");
    }
}

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

/// Names of images, disks and VMs: short, and safe as file and export names.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "{kind} name {name:?} is invalid: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("image", "debian-12.1_base").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65), "ü"] {
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

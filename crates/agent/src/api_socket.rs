//! The API socket (`DATA_DIR/api.sock`): the operator's interface to this
//! agent, which can do everything, so only the agent's own user and root
//! may use it.
//!
//! Two checks, each enough alone: the socket's mode, set after binding
//! whatever the umask (0600; 0660 with group `spore` when that group
//! exists, so that its members can reach the file), and the caller's
//! credentials as the kernel reports them (`SO_PEERCRED`) at every accept:
//! root, the agent's user, or a process whose group is `spore` when that
//! group exists. A refused caller's connection is closed before a byte is
//! read, with one line in the log and a count in
//! `spore_api_refused_total`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{unix::SocketAddr, UnixListener, UnixStream};

use crate::error::{AgentError, Result};

/// The group whose members may use the API when it exists.
pub const API_GROUP: &str = "spore";

/// The API's listening socket, which admits only the callers above.
#[derive(Debug)]
pub struct ApiListener {
    inner: UnixListener,
    owner: u32,
    group: Option<u32>,
    refused: Arc<AtomicU64>,
}

/// The id of group `name`, if it exists.
fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer
    // into static storage or null; only the id is read, at once.
    let g = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: non-null pointers from getgrnam point at a valid group.
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

impl ApiListener {
    /// Binds `path` (replacing a stale socket) and sets its mode and group.
    pub fn bind(path: &Path, refused: Arc<AtomicU64>) -> Result<Self> {
        Self::from_std(Self::bind_std(path)?, refused)
    }

    /// Binds `path` (replacing a stale socket) with its mode and group, as
    /// a plain listener (to be handed on, e.g. to the socket holder).
    pub fn bind_std(path: &Path) -> Result<std::os::unix::net::UnixListener> {
        let _ = std::fs::remove_file(path);
        let inner = std::os::unix::net::UnixListener::bind(path)
            .map_err(AgentError::io(format!("binding {}", path.display())))?;
        if let Some(gid) = group_id(API_GROUP) {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(AgentError::io(format!(
                "giving {} to group {API_GROUP}",
                path.display()
            )))?;
        }
        let mode = if group_id(API_GROUP).is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            AgentError::io(format!("setting the mode of {}", path.display())),
        )?;
        Ok(inner)
    }

    /// The API on a socket bound already (by [`ApiListener::bind_std`], in
    /// this process or a previous agent's). Call inside the runtime.
    pub fn from_std(
        listener: std::os::unix::net::UnixListener,
        refused: Arc<AtomicU64>,
    ) -> Result<Self> {
        listener
            .set_nonblocking(true)
            .map_err(AgentError::io("setting the API socket non-blocking"))?;
        let inner =
            UnixListener::from_std(listener).map_err(AgentError::io("serving the API socket"))?;
        let group = group_id(API_GROUP);
        // SAFETY: geteuid has no preconditions.
        let owner = unsafe { libc::geteuid() };
        Ok(ApiListener {
            inner,
            owner,
            group,
            refused,
        })
    }

    fn admits(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.owner || self.group == Some(gid)
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = UnixStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (UnixStream, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(c) if self.admits(c.uid(), c.gid()) => return (stream, addr),
                Ok(c) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        uid = c.uid(),
                        gid = c.gid(),
                        pid = c.pid(),
                        "API connection refused: only root, the agent's user (uid {}) and group {API_GROUP} may use the API",
                        self.owner
                    );
                }
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "API connection refused: the caller's credentials could not be read");
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

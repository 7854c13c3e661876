//! The agents' guest RAM directories: made private by `spawn_agent`,
//! removed by `down` once no process uses them.
//!
//! An agent's RAM dir defaults to `/dev/shm/spore-<hash of its data dir>`,
//! which nobody removes when the agent is killed before it stops its VMs:
//! gigabytes of RAM files stay in a tmpfs. So every agent of a cluster gets
//! `--ram-dir <root>/<host>` under one root that belongs to the cluster
//! (`spec::ram_root`), and `down` removes the root.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::ClusterError;

/// Creates `path` (not its parents) with mode 0700, or accepts it if it
/// exists as a directory of ours that only we can use: `/dev/shm` is
/// writable by everyone, and another user's directory or symlink of the
/// same name must not receive our guests' memory.
pub(crate) fn private_dir(path: &Path) -> Result<(), ClusterError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ClusterError::io(path, e)),
    }
    let meta = fs::symlink_metadata(path).map_err(|e| ClusterError::io(path, e))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid {
        return Err(ClusterError::io(
            path,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "exists, and is not a directory of this user",
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| ClusterError::io(path, e))?;
    }
    Ok(())
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(value) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Mount points at or under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape_mount_path)
        .filter(|m| m.starts_with(root))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Removes a RAM root and everything in it. Unmounts what is mounted
/// under it first (an agent with `--huge-pages` mounts a tmpfs on its RAM
/// dir), never lazily: a mount still in use is an error, as is anything
/// left afterwards. `Ok(false)` if there was nothing to remove.
pub(crate) fn remove_root(root: &Path) -> Result<bool, ClusterError> {
    match fs::symlink_metadata(root) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ClusterError::io(root, e)),
    }
    let canonical = fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    for mount in mounts_under(&canonical) {
        let c = std::ffi::CString::new(mount.as_os_str().as_bytes())
            .map_err(|e| ClusterError::io(&mount, io::Error::other(e)))?;
        // SAFETY: a valid NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            return Err(ClusterError::io(
                &mount,
                io::Error::other(format!("cannot unmount: {}", io::Error::last_os_error())),
            ));
        }
        tracing::info!(mount = %mount.display(), "unmounted");
    }
    let removed = match fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(root),
        Ok(_) => fs::remove_file(root),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(ClusterError::io(root, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths() {
        assert_eq!(
            unescape_mount_path(r"/dev/shm/a\040b\134c"),
            Path::new("/dev/shm/a b\\c")
        );
        assert_eq!(unescape_mount_path(r"/x\04"), Path::new(r"/x\04"));
        assert_eq!(unescape_mount_path("/plain"), Path::new("/plain"));
    }

    #[test]
    fn private_dirs_and_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        private_dir(&root).unwrap();
        let mode = fs::metadata(&root).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Accepted again, and made private again.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&root).unwrap();
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
        // No parents made on the way.
        assert!(private_dir(&tmp.path().join("a/b")).is_err());
        // A symlink is not ours to use.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(private_dir(&link).is_err());

        let host = root.join("node1");
        private_dir(&host).unwrap();
        fs::write(host.join("vm-a.ram"), b"ram").unwrap();
        assert!(remove_root(&root).unwrap());
        assert!(!root.exists());
        assert!(!remove_root(&root).unwrap());
    }
}

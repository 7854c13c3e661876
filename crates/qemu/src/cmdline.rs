//! The QEMU command line of a spore VM.

use std::path::PathBuf;

use crate::Accel;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// The agent's NBD unix socket and the export holding the VM's disk.
    pub nbd_socket: PathBuf,
    pub export: String,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
}

impl VmSpec {
    /// Arguments for `qemu-system-x86_64` (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("spore-{},debug-threads=on", self.name)]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&["-machine", "q35", "-accel", &self.accel.to_string()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&[
            "-m",
            &format!("{}M", self.memory_mib),
            "-smp",
            &self.cpus.to_string(),
        ]);
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.display().to_string()]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.display().to_string()]);
        }
        if let Some(ap) = &self.append {
            push(&["-append", ap]);
        }
        let blockdev = serde_json::json!({
            "driver": "nbd",
            "node-name": "disk0",
            "server": { "type": "unix", "path": self.nbd_socket.display().to_string() },
            "export": self.export,
            // If the agent restarts, QEMU retries instead of failing I/O at once.
            "reconnect-delay": 10,
        });
        push(&["-blockdev", &blockdev.to_string()]);
        push(&["-device", "virtio-blk-pci,drive=disk0,id=vda"]);
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", self.serial_log.display()),
        ]);
        push(&["-serial", "chardev:serial0"]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_disk_qmp_and_serial() {
        let spec = VmSpec {
            name: "t".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 2,
            kernel: Some("/k".into()),
            initrd: None,
            append: Some("console=ttyS0".into()),
            nbd_socket: "/d/nbd.sock".into(),
            export: "disk/t".into(),
            qmp_socket: "/d/qmp.sock".into(),
            serial_log: "/d/serial.log".into(),
        };
        let args = spec.args().join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(!args.contains("-cpu host"));
        assert!(args.contains("-m 512M -smp 2"));
        assert!(args.contains(r#""export":"disk/t""#));
        assert!(args.contains(r#""path":"/d/nbd.sock""#));
        assert!(args.contains("-qmp unix:/d/qmp.sock,server=on,wait=off"));
        assert!(args.contains("file,id=serial0,path=/d/serial.log"));
        assert!(!args.contains("-initrd"));
    }
}

//! The QEMU command line of a spore VM.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::Accel;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Hot-plug slots for memory (pc-dimm) on every VM.
pub const MEMORY_SLOTS: u32 = 8;

/// Boot RAM in KiB for a VM booted now on this host: exact, except under
/// TCG with a QEMU before 9.0 (see [`ram_kib_for`]).
pub fn ram_kib(mib: u64, accel: Accel) -> u64 {
    ram_kib_for(mib, accel, binary_version())
}

/// Boot RAM in KiB under a QEMU of `version` (`None`: unknown, or a VM
/// recorded before spore looked at the version).
///
/// Under TCG, QEMU before 9.0 syncs the dirty bitmap of a RAM block whose
/// size is a multiple of 256 KiB on a fast path that forgets to re-arm
/// TCG's dirty tracking in the vCPUs' TLBs, so a live migration loses
/// writes and corrupts the guest (fixed by "physmem: Fix migration dirty
/// bitmap coherency with TCG memory access", in 9.0). There the size is 8
/// KiB short (QEMU rounds `-m` up to 8 KiB), which takes the exact path.
/// From 9.0 on the size is exact: the exact path walks every vCPU's TLB
/// for each dirty page, and at a migration's first sync every page is
/// dirty, which held a 512 MiB guest for 0.26-0.39 s under the BQL (0.4 ms
/// on the fast path).
pub fn ram_kib_for(mib: u64, accel: Accel, version: Option<(u64, u64, u64)>) -> u64 {
    match accel {
        Accel::Tcg if !has_tcg_bitmap_fix(version) => mib * 1024 - 8,
        _ => mib * 1024,
    }
}

/// Whether a QEMU of `version` syncs TCG's dirty bitmap correctly on its
/// fast path (9.0 or later).
pub fn has_tcg_bitmap_fix(version: Option<(u64, u64, u64)>) -> bool {
    version.is_some_and(|v| v >= (9, 0, 0))
}

/// The version of [`QEMU_BINARY`] on this host, asked once (`--version`).
pub fn binary_version() -> Option<(u64, u64, u64)> {
    static VERSION: OnceLock<Option<(u64, u64, u64)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = std::process::Command::new(QEMU_BINARY)
            .arg("--version")
            .output()
            .ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    })
}

/// "QEMU emulator version 10.0.2 (Debian ...)" -> (10, 0, 2).
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let rest = text.split("version ").nth(1)?;
    let word = rest.split_whitespace().next()?;
    let mut n = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().ok()
    });
    Some((n.next()??, n.next()??, n.next().flatten().unwrap_or(0)))
}

/// Guest RAM backed by a file, so that it can become a template (shared)
/// or map a template copy-on-write (private).
#[derive(Debug, Clone)]
pub struct RamFile {
    pub path: PathBuf,
    /// `share=on`: the guest writes the file (a VM that may become a
    /// template). `share=off`: writes stay private to this QEMU (a clone).
    pub shared: bool,
    /// Open the file read-only (a FUSE file that pages a template in on
    /// demand); only with `shared: false`, whose writes stay in memory.
    pub readonly: bool,
}

/// How a QEMU that waits for a migration stream goes on once it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Stay paused (`-S`): a clone is grown and given its identity first.
    Paused,
    /// Run at once: a live migration's destination, where every
    /// millisecond between the source's stop and this start is downtime.
    Running,
}

/// Everything needed to start one VM.
///
/// Two specs are migration-compatible (a clone can load its template's
/// state) when they differ only in name, sockets, logs, `mac`, `vmgenid`,
/// `ram.shared` and `incoming`: the machine, memory layout and device list
/// must match.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u64,
    /// Boot RAM exactly, in KiB, where it must match another QEMU's (a
    /// migration's source, a clone's template). `None`: [`ram_kib`].
    pub ram_kib: Option<u64>,
    /// Upper bound for memory hot-plug (`-m ...,maxmem=`).
    pub max_memory_mib: u64,
    pub cpus: u32,
    /// Upper bound for CPU hot-plug (`-smp ...,maxcpus=`).
    pub max_cpus: u32,
    pub ram: Option<RamFile>,
    /// MAC address of the VM's NIC (a virtio-net device on an unconnected
    /// hub: a guest-visible identity, no traffic leaves the VM).
    pub mac: Option<String>,
    /// VM generation ID (a GUID); a new one tells a guest with a vmgenid
    /// driver that it was cloned.
    pub vmgenid: Option<String>,
    /// The spore guest channel: a virtio-serial port `org.spore.channel`
    /// backed by this unix socket (QEMU listens, the agent connects).
    pub channel_socket: Option<PathBuf>,
    /// Wait for `migrate-incoming` instead of booting.
    pub incoming: Option<Incoming>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// The agent's NBD unix socket and the export holding the VM's disk.
    pub nbd_socket: PathBuf,
    pub export: String,
    pub qmp_socket: PathBuf,
    /// The directory QEMU runs in (its current directory): sockets inside
    /// it are given to QEMU relative to it, so that a long data directory
    /// or VM name never exceeds a socket path's 108 bytes.
    pub run_dir: Option<PathBuf>,
    pub serial_log: PathBuf,
}

impl VmSpec {
    /// The boot RAM QEMU is given, in KiB.
    pub fn boot_ram_kib(&self) -> u64 {
        self.ram_kib
            .unwrap_or_else(|| ram_kib(self.memory_mib, self.accel))
    }

    /// Arguments for `qemu-system-x86_64` (without the binary).
    /// A socket's path as QEMU is given it: relative to [`VmSpec::run_dir`]
    /// when there is one (`./qmp.sock`, `../../nbd.sock`).
    fn socket_arg(&self, path: &Path) -> String {
        match &self.run_dir {
            Some(dir) => relative_to(path, dir).display().to_string(),
            None => path.display().to_string(),
        }
    }

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
        let machine = match &self.ram {
            Some(_) => "q35,memory-backend=ram0",
            None => "q35",
        };
        push(&["-machine", machine, "-accel", &self.accel.to_string()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        let ram_kib = self.boot_ram_kib();
        push(&[
            "-m",
            &format!(
                "{ram_kib}K,slots={MEMORY_SLOTS},maxmem={}M",
                self.max_memory_mib.max(self.memory_mib)
            ),
            "-smp",
            &format!("{},maxcpus={}", self.cpus, self.max_cpus.max(self.cpus)),
        ]);
        if let Some(ram) = &self.ram {
            push(&[
                "-object",
                &format!(
                    // Mapped at a 2 MiB boundary, so that a RAM file on a
                    // tmpfs with huge pages (agent --huge-pages) can be
                    // mapped in huge pages; costs nothing otherwise.
                    "memory-backend-file,id=ram0,size={ram_kib}K,mem-path={},share={}{},align=2M",
                    ram.path.display(),
                    if ram.shared { "on" } else { "off" },
                    if ram.readonly { ",readonly=on" } else { "" }
                ),
            ]);
        }
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
            "server": { "type": "unix", "path": self.socket_arg(&self.nbd_socket) },
            "export": self.export,
            // While the agent restarts (VMs outlive it), QEMU holds the
            // guest's requests and reconnects, and sends again those the
            // old agent had not answered; only past this many seconds
            // would they fail.
            "reconnect-delay": 30,
        });
        push(&["-blockdev", &blockdev.to_string()]);
        // A write the agent cannot complete (it needs a block no peer or
        // origin delivers in time) pauses the VM instead of failing in the
        // guest; the agent resumes it, and QEMU retries the write, once the
        // block is here. Reads keep QEMU's default (report): a VM stopped
        // for a read error during an incoming post-copy makes QEMU 10 fail
        // the migration when its link recovers ("loadvm failed: -5"), and
        // a post-copy's guest reads blocks exactly while links are bad.
        push(&["-device", "virtio-blk-pci,drive=disk0,id=vda,werror=stop"]);
        if let Some(mac) = &self.mac {
            push(&["-netdev", "hubport,id=net0,hubid=0"]);
            push(&[
                "-device",
                &format!("virtio-net-pci,netdev=net0,id=nic0,mac={mac}"),
            ]);
        }
        if let Some(guid) = &self.vmgenid {
            push(&["-device", &format!("vmgenid,id=vmgenid0,guid={guid}")]);
        }
        if let Some(sock) = &self.channel_socket {
            push(&["-device", "virtio-serial-pci,id=vser0,max_ports=2"]);
            push(&[
                "-chardev",
                &format!(
                    "socket,id=channel0,path={},server=on,wait=off",
                    self.socket_arg(sock)
                ),
            ]);
            push(&[
                "-device",
                "virtserialport,bus=vser0.0,chardev=channel0,name=org.spore.channel",
            ]);
        }
        push(&[
            "-chardev",
            &format!(
                "file,id=serial0,path={},append=on",
                self.serial_log.display()
            ),
        ]);
        push(&["-serial", "chardev:serial0"]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                self.socket_arg(&self.qmp_socket)
            ),
        ]);
        match self.incoming {
            // -S: stay paused after the state is loaded, so that memory and
            // CPUs can be added before the guest runs again.
            Some(Incoming::Paused) => push(&["-S", "-incoming", "defer"]),
            Some(Incoming::Running) => push(&["-incoming", "defer"]),
            None => {}
        }
        a
    }
}

/// `path` as seen from the directory `base` (both absolute): `./x` below
/// it, `../../x` beside it.
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::from(".");
    for _ in common..b.len() {
        rel.push("..");
    }
    rel.extend(&p[common..]);
    rel
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
            // As an older QEMU's VM (see ram_kib_for).
            ram_kib: Some(ram_kib_for(512, Accel::Tcg, Some((7, 2, 0)))),
            max_memory_mib: 4096,
            cpus: 2,
            max_cpus: 8,
            ram: None,
            mac: None,
            vmgenid: None,
            channel_socket: None,
            incoming: None,
            kernel: Some("/k".into()),
            initrd: None,
            append: Some("console=ttyS0".into()),
            nbd_socket: "/d/nbd.sock".into(),
            export: "disk/t".into(),
            qmp_socket: "/d/qmp.sock".into(),
            run_dir: None,
            serial_log: "/d/serial.log".into(),
        };
        let args = spec.args().join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(!args.contains("-cpu host"));
        // 8 KiB short under TCG before QEMU 9.0
        assert!(args.contains("-m 524280K,slots=8,maxmem=4096M -smp 2,maxcpus=8"));
        assert!(args.contains("-machine q35 "));
        assert!(args.contains(r#""export":"disk/t""#));
        assert!(args.contains(r#""path":"/d/nbd.sock""#));
        assert!(args.contains("-qmp unix:/d/qmp.sock,server=on,wait=off"));
        assert!(args.contains("file,id=serial0,path=/d/serial.log"));
        assert!(!args.contains("-initrd"));
        assert!(!args.contains("-incoming"));
        assert!(!args.contains("memory-backend"));
    }

    #[test]
    fn sockets_are_given_relative_to_the_run_dir() {
        let base = Path::new("/data/vms/web");
        assert_eq!(
            relative_to(Path::new("/data/vms/web/qmp.sock"), base),
            Path::new("./qmp.sock")
        );
        assert_eq!(
            relative_to(Path::new("/data/nbd.sock"), base),
            Path::new("./../../nbd.sock")
        );
        assert_eq!(
            relative_to(Path::new("/other/s"), base),
            Path::new("./../../../other/s")
        );
    }

    #[test]
    fn template_and_clone_differ_only_in_sharing_identity_and_incoming() {
        let template = VmSpec {
            name: "t".into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            ram_kib: Some(262_136),
            max_memory_mib: 2048,
            cpus: 1,
            max_cpus: 4,
            kernel: None,
            initrd: None,
            append: None,
            nbd_socket: "/d/nbd.sock".into(),
            export: "disk/t".into(),
            qmp_socket: "/d/qmp.sock".into(),
            run_dir: None,
            serial_log: "/d/serial.log".into(),
            ram: Some(RamFile {
                path: "/shm/t.ram".into(),
                shared: true,
                readonly: false,
            }),
            mac: Some("52:54:00:00:00:01".into()),
            vmgenid: Some("00000000-0000-4000-8000-000000000001".into()),
            channel_socket: Some("/d/channel.sock".into()),
            incoming: None,
        };
        let args = template.args().join(" ");
        assert!(args.contains("-machine q35,memory-backend=ram0"));
        assert!(
            args.contains("memory-backend-file,id=ram0,size=262136K,mem-path=/shm/t.ram,share=on")
        );
        assert!(args.contains("virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01"));
        assert!(args.contains("vmgenid,id=vmgenid0,guid=00000000-0000-4000-8000-000000000001"));
        assert!(args.contains("name=org.spore.channel"));
        let clone = VmSpec {
            ram: Some(RamFile {
                path: "/shm/t.ram".into(),
                shared: false,
                readonly: true,
            }),
            mac: Some("52:54:00:00:00:02".into()),
            vmgenid: Some("00000000-0000-4000-8000-000000000002".into()),
            incoming: Some(Incoming::Paused),
            ..template.clone()
        };
        let cargs = clone.args();
        assert!(cargs.join(" ").contains("share=off,readonly=on"));
        assert_eq!(&cargs[cargs.len() - 2..], ["-incoming", "defer"]);
        // Same devices in the same order: migration compatible.
        let devices = |a: &[String]| -> Vec<String> {
            a.windows(2)
                .filter(|w| w[0] == "-device")
                .map(|w| {
                    w[1].split(",mac=")
                        .next()
                        .unwrap()
                        .split(",guid=")
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        assert_eq!(devices(&template.args()), devices(&cargs));
    }

    #[test]
    fn tcg_ram_avoids_the_bitmap_fast_path_only_where_qemu_needs_it() {
        for mib in [64, 512, 4096] {
            for old in [None, Some((7, 2, 0)), Some((8, 2, 9))] {
                let kib = ram_kib_for(mib, Accel::Tcg, old);
                // not a multiple of 256 KiB (QEMU's fast path), a multiple of 8 KiB
                assert_ne!(kib % 256, 0);
                assert_eq!(kib % 8, 0);
            }
            for new in [Some((9, 0, 0)), Some((10, 0, 2))] {
                assert_eq!(ram_kib_for(mib, Accel::Tcg, new), mib * 1024);
            }
            assert_eq!(ram_kib_for(mib, Accel::Kvm, None), mib * 1024);
        }
    }

    #[test]
    fn versions_are_read_from_qemus_banner() {
        let banner = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(banner), Some((10, 0, 2)));
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_version("QEMU emulator version 9.1"), Some((9, 1, 0)));
        assert_eq!(
            parse_version("QEMU emulator version 8.2.0-rc1"),
            Some((8, 2, 0))
        );
        for bad in [
            "",
            "QEMU emulator",
            "version x.y",
            "version 9",
            "version .1.2",
        ] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
    }
}

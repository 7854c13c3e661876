//! Shared test harness: a real `spore agent` process on a temporary data
//! directory, the `spore` CLI against it, and the demo guest.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use spore_bench::procs::AgentProcess;

pub const SPORE: &str = env!("CARGO_BIN_EXE_spore");

pub struct TestAgent {
    pub dir: tempfile::TempDir,
    /// Guest RAM files (tmpfs), removed with the agent.
    pub ram: tempfile::TempDir,
    pub agent: Option<AgentProcess>,
    args: Vec<String>,
    /// A file system mounted for the data directory, unmounted on drop.
    mounted: Option<PathBuf>,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // The agent with its VMs, then whatever QEMU (or socket holder) of
        // the data directory outlived an agent the test killed.
        self.agent.take();
        spore_bench::procs::kill_leftover_qemus(&self.data_dir());
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

impl TestAgent {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// An agent with extra `spore agent` arguments (kept for restarts).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    /// An agent of another build of spore (e.g. [`previous_spore`]); its
    /// restarts are onto this tree's binary, as an upgrade is.
    pub fn start_binary(spore: &Path) -> Self {
        Self::start_binary_in(spore, tempfile::tempdir().expect("tempdir"), &[])
    }

    /// [`TestAgent::start_with`] with its data directory `DIR/data`
    /// (which may hold one already).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_binary_in(Path::new(SPORE), dir, extra)
    }

    fn start_binary_in(spore: &Path, dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let ram = tempfile::Builder::new()
            .prefix("spore-test-ram")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .expect("RAM tempdir");
        let mut args: Vec<String> = vec![
            "--cache-size".into(),
            "64M".into(),
            "--ram-dir".into(),
            ram.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let agent =
            AgentProcess::start(spore, &dir.path().join("data"), &refs).expect("agent starts");
        TestAgent {
            dir,
            ram,
            agent: Some(agent),
            args,
            mounted: None,
        }
    }

    /// An agent whose data directory is a tmpfs of its own of `mib` MiB
    /// (a disk that can be filled), unmounted when the agent is dropped.
    pub fn start_on_tmpfs(mib: u64, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        sh(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "spore-test",
            ])
            .arg(&data));
        let mut t = Self::start_in(dir, extra);
        t.mounted = Some(data);
        t
    }

    /// An agent with a peer listener on a loopback port it picks itself
    /// (`--listen 127.0.0.1:0`), and that port, read back from
    /// DATA/listen.addr: no port is picked free and then raced for.
    #[allow(dead_code)]
    pub fn start_listening(extra: &[&str]) -> (Self, u16) {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut t = Self::start_with(&args);
        let port = t.listen_port();
        // A restart listens on the same port again (other agents and the
        // test hold URLs with it).
        for a in t.args.iter_mut().filter(|a| a.as_str() == "127.0.0.1:0") {
            *a = format!("127.0.0.1:{port}");
        }
        (t, port)
    }

    /// The port of the peer listener, as the agent bound it.
    #[allow(dead_code)]
    pub fn listen_port(&self) -> u16 {
        let file = self.data_dir().join("listen.addr");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|a| a.trim().rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            {
                return port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {}",
                file.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The agent's TLS directory (its certificate of the local test CA).
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir().join("pki")
    }

    /// The agent's peer URL (with `start_listening`).
    pub fn peer_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.listen_port())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        spore_testkit::output(
            Command::new(SPORE)
                .env("SPORE_HOME", self.data_dir())
                .args(args),
        )
    }

    /// QEMU processes running on this agent's data directory.
    pub fn qemu_count(&self) -> usize {
        let out = Command::new("pgrep")
            .args([
                "-c",
                "-f",
                &format!("qemu-system.*{}", self.data_dir().display()),
            ])
            .output()
            .expect("pgrep runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Imports the demo guest's root disk as image `name`.
    pub fn import_guest(&self, name: &str) -> String {
        let rootfs = guest().rootfs.to_str().unwrap();
        self.ok(&["image", "import", rootfs, "--name", name])
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "spore {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "spore {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    /// The console log of `vm` once a whole line with `marker` is on it
    /// (the console may be read while the guest is still writing a line),
    /// waiting up to `secs`.
    #[allow(dead_code)]
    pub fn wait_console(&self, vm: &str, marker: &str, secs: u64) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let log = self.ok(&["vm", "log", vm]);
            if log.contains(marker) && log.rsplit(marker).next().is_some_and(|r| r.contains('\n')) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no whole {marker:?} line on {vm}'s console after {secs}s:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.data_dir().join("nbd.sock").display()
        )
    }

    /// Graceful restart (SIGTERM, then start again on the same directory).
    pub fn restart(&mut self) {
        let status = self
            .agent
            .as_mut()
            .expect("running")
            .stop()
            .expect("agent stops");
        assert!(status.success(), "agent exited with {status}");
        self.agent = None;
        self.start_again();
    }

    /// Crash: SIGKILL, then start again on the same directory.
    pub fn crash_and_restart(&mut self) {
        self.agent.as_mut().expect("running").kill();
        self.agent = None;
        self.start_again();
    }

    /// Starts the agent again after the test stopped it.
    #[allow(dead_code)]
    pub fn restart_stopped(&mut self) {
        assert!(self.agent.is_none(), "the agent still runs");
        self.start_again();
    }

    fn start_again(&mut self) {
        let refs: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        self.agent = Some(
            AgentProcess::start(Path::new(SPORE), &self.data_dir(), &refs).expect("agent restarts"),
        );
    }
}

/// spore built from an earlier commit of this repository
/// (scripts/previous-spore.sh, built once into target/previous/): the old
/// version an upgrade test starts from.
pub fn previous_spore() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new("bash")
            .arg(root.join("scripts/previous-spore.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running scripts/previous-spore.sh");
        assert!(
            out.status.success(),
            "scripts/previous-spore.sh failed ({})",
            out.status
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// curl arguments that trust the local test CA and present the
/// certificate in `tls_dir`.
pub fn curl_tls(tls_dir: &Path) -> Vec<String> {
    let f = |n: &str| tls_dir.join(n).display().to_string();
    vec![
        "--cacert".into(),
        f("ca.pem"),
        "--cert".into(),
        f("cert.pem"),
        "--key".into(),
        f("key.pem"),
    ]
}

/// Runs a command that must succeed; returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = spore_testkit::output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads an export of `t` whole, with nbdcopy.
pub fn nbd_copy(t: &TestAgent, export: &str) -> Vec<u8> {
    let out = t.path("copy.raw");
    let _ = std::fs::remove_file(&out);
    sh(Command::new("nbdcopy").arg(t.uri(export)).arg(&out));
    std::fs::read(&out).unwrap()
}

/// The chunk files in `t`'s own chunk store.
pub fn chunk_files(t: &TestAgent) -> Vec<PathBuf> {
    files_under(&t.data_dir().join("chunks"))
}

/// Every file in the directory tree at `dir` (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Writes a file of `size` bytes: pseudo-random data in some 64 KiB
/// regions, holes (never written) elsewhere.
pub fn sparse_random_file(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut w = std::io::BufWriter::new(&f);
    use std::io::Seek;
    let mut buf = vec![0u8; 65536];
    for region in 0..size / 65536 {
        // Two regions in three hold data.
        if region % 3 == 2 {
            continue;
        }
        for b in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        w.seek(std::io::SeekFrom::Start(region * 65536)).unwrap();
        w.write_all(&buf).unwrap();
    }
    w.flush().unwrap();
}

/// Fills the file system of `dir` with a file (`dir/filler`, returned)
/// until only `left` bytes are free, as df counts them.
#[allow(dead_code)]
pub fn fill_leaving(dir: &Path, left: u64) -> PathBuf {
    let out = sh(Command::new("df").args(["--output=avail", "-B1"]).arg(dir));
    let avail: u64 = out.lines().last().unwrap().trim().parse().unwrap();
    let filler = dir.join("filler");
    sh(Command::new("fallocate")
        .args(["-l", &avail.saturating_sub(left).to_string()])
        .arg(&filler));
    filler
}

pub struct Guest {
    pub kernel: PathBuf,
    /// The same kernel uncompressed, for QEMU's direct (PVH) boot.
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

/// The demo guest, built by guest/build.sh if it is not there yet (once
/// per test binary; only the VM tests use it).
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::var_os("SPORE_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".cache/guest"));
        let g = Guest {
            kernel: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
            rootfs: dir.join("rootfs.img"),
        };
        if !(g.kernel.exists() && g.initrd.exists() && g.rootfs.exists()) {
            sh(Command::new("bash")
                .arg(root.join("guest/build.sh"))
                .arg(&dir));
        }
        g
    })
}

/// `vm run` arguments for the demo guest with extra kernel options.
pub fn vm_run_args<'a>(
    g: &'a Guest,
    name: &'a str,
    image: &'a str,
    append: &'a str,
) -> Vec<String> {
    vec![
        "vm".into(),
        "run".into(),
        name.into(),
        "--image".into(),
        image.into(),
        "--kernel".into(),
        g.kernel.display().to_string(),
        "--initrd".into(),
        g.initrd.display().to_string(),
        "--append".into(),
        format!("console=ttyS0 root=/dev/vda {append}"),
        "--wait-for".into(),
        "SPORE-READY".into(),
        "--timeout".into(),
        "180".into(),
    ]
}

/// Runs the demo guest as `name` on the image `base` with `append` on its
/// kernel command line; returns its QEMU pid.
pub fn run_vm(t: &TestAgent, name: &str, append: &str) -> u64 {
    let args = vm_run_args(guest(), name, "base", append);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    vm_pid(t, name)
}

/// The QEMU pid of the running VM `name`.
pub fn vm_pid(t: &TestAgent, name: &str) -> u64 {
    let vms = t.json(&["vm", "ls", "--json"]);
    let v = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {vms}"));
    assert_eq!(v["state"], "running", "{v}");
    v["pid"].as_u64().unwrap()
}

/// What the agent's last start took over, rolled back or finished.
pub fn recovered(t: &TestAgent) -> String {
    t.json(&["status", "--json"])["recovered"].to_string()
}

/// `spore fsck` finds nothing wrong.
pub fn assert_fsck_clean(t: &TestAgent, when: &str) {
    let r = t.run(&["fsck", "--json"]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "fsck not clean {when}: {out}");
}

/// Sends `dataset VERB` (`write` 8 MiB, or `check`) to the demo guest `vm`
/// through `spore` (`run` runs it with these arguments and returns its
/// output) and returns the (memory, disk) checksums the guest printed.
pub fn dataset(run: impl Fn(&[&str]) -> String, vm: &str, verb: &str) -> (String, String) {
    let marker = if verb == "check" {
        "SPORE-DATASET-CHECK "
    } else {
        "SPORE-DATASET "
    };
    let log = || run(&["vm", "log", vm]);
    let before = log().matches(marker).count();
    let mut words = vec!["vm", "send", vm, "dataset", verb];
    if verb == "write" {
        words.push("8");
    }
    run(&words);
    // The channel is a best-effort line protocol: a line the guest got
    // garbled (it says so) is sent again, at most twice. The checksums
    // the caller compares stay strict.
    let refusals = |log: &str| {
        log.matches("SPORE-DATASET error").count() + log.matches("SPORE-CHANNEL-UNKNOWN").count()
    };
    let mut refused = refusals(&log());
    let mut resent = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let log = log();
        if refusals(&log) > refused && resent < 2 {
            refused = refusals(&log);
            resent += 1;
            eprintln!("the guest {vm} got `dataset {verb}` garbled; sending it again");
            run(&words);
        }
        // Only a whole line: the console may be read while the guest is
        // still writing it.
        let rest = log.rsplit(marker).next().unwrap();
        if log.matches(marker).count() > before && rest.contains('\n') {
            let line = rest.lines().next().unwrap();
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                    .to_owned()
            };
            return (field("mem="), field("disk="));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {marker} from {vm}: {}",
            &log[log.len().saturating_sub(2000)..]
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

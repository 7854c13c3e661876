//! Processes the benchmarks drive: a spore agent, qemu-nbd, fio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A `spore agent` child process, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    pub data_dir: PathBuf,
    /// The binary it runs (for `spore agent stop`).
    spore: PathBuf,
}

/// The fleet CA of the agents this process starts on this machine (tests
/// and benchmarks): made on first use in a temporary directory that is
/// removed when the process exits.
pub fn local_ca() -> &'static parking_lot::Mutex<spore_pki::Ca> {
    static CA: std::sync::OnceLock<parking_lot::Mutex<spore_pki::Ca>> = std::sync::OnceLock::new();
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove_ca_dir() {
        if let Some(d) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "spore-local-ca-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = DIR.set(dir.clone());
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(remove_ca_dir) };
        let ca = spore_pki::Ca::init(&dir.join("ca"), "local").expect("making the local CA");
        parking_lot::Mutex::new(ca)
    })
}

/// Gives the agent on `data_dir` a certificate of [`local_ca`] (roles host
/// and publisher, for 127.0.0.1 and localhost) in its default TLS
/// directory, unless it has one there.
pub fn ensure_certificate(data_dir: &Path) -> Result<()> {
    let tls = spore_pki::default_tls_dir(data_dir);
    if tls.join("cert.pem").exists() {
        return Ok(());
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    local_ca().lock().issue(
        &format!("agent-{}-{n}", std::process::id()),
        &[spore_pki::Role::Host, spore_pki::Role::Publisher],
        &["127.0.0.1".into(), "localhost".into()],
        &tls,
    )?;
    Ok(())
}

impl AgentProcess {
    /// Starts the agent of this very binary on `data_dir`. Unless told
    /// otherwise (`--tls-dir`, `--insecure-listen`) it gets a certificate
    /// of [`local_ca`], so that local agents talk to each other over TLS
    /// as a fleet's do.
    pub fn start(spore: &Path, data_dir: &Path, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        if !extra
            .iter()
            .any(|a| *a == "--tls-dir" || *a == "--insecure-listen")
        {
            ensure_certificate(data_dir)?;
        }
        let log = std::fs::File::create(data_dir.with_extension("agent.log"))?;
        let child = Command::new(spore)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("agent")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} agent", spore.display()))?;
        let mut agent = AgentProcess {
            child,
            data_dir: data_dir.to_owned(),
            spore: spore.to_owned(),
        };
        let sock = data_dir.join(spore_api::API_SOCKET);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Its lock taken and its API socket there (a socket holder keeps a
        // previous agent's open: the lock says this one runs).
        while spore_api::agent_running(data_dir) != Some(true)
            || std::os::unix::net::UnixStream::connect(&sock).is_err()
        {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited with {status} (see {})",
                    data_dir.with_extension("agent.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("agent did not come up in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // And serving: its peer listener bound, its recovery done (a
        // connection to a socket the holder kept waits in the backlog
        // until then).
        while !answers_status(&sock) {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited with {status} (see {})",
                    data_dir.with_extension("agent.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("agent did not answer on {} in 30 s", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// Waits for the agent to exit (after a stop asked over its API).
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("agent did not exit within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the agent and its VMs (`spore agent stop --vms`) and waits
    /// for it to exit; then no QEMU of its data directory is left.
    pub fn stop_all(&mut self) -> Result<std::process::ExitStatus> {
        let out = Command::new(&self.spore)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["agent", "stop", "--vms", "--timeout", "120"])
            .stdin(Stdio::null())
            .output()
            .context("running spore agent stop --vms")?;
        if !out.status.success() {
            bail!(
                "spore agent stop --vms failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let status = self.child.wait()?;
        kill_leftover_qemus(&self.data_dir);
        Ok(status)
    }

    /// Stops the agent with SIGTERM (its VMs keep running for the next
    /// agent) and waits for it to exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: kill sends a signal; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("agent did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> spore_api::Client {
        spore_api::Client::for_data_dir(&self.data_dir)
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.data_dir.join(spore_api::NBD_SOCKET).display()
        )
    }
}

/// True when the agent on `sock` answers `GET /v1/status` with 200 (within
/// 30 s).
fn answers_status(sock: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = "GET /v1/status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head == *b"HTTP/1.1 200"
}

impl Drop for AgentProcess {
    /// A running agent is stopped with its VMs (and whatever QEMU of its
    /// data directory is left then is killed). One that already exited
    /// (stopped or killed to be started again) leaves its VMs running for
    /// the next agent: whoever owns the data directory sweeps them at the
    /// end ([`kill_leftover_qemus`]).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) && self.stop_all().is_err() {
            self.kill();
            kill_leftover_qemus(&self.data_dir);
        }
    }
}

/// Kills (SIGKILL) every process running in a VM directory of
/// `data_dir` (QEMUs that outlived their agent, which they do by design)
/// and its socket holder, and waits up to 10 s for them to go.
pub fn kill_leftover_qemus(data_dir: &Path) {
    let vms = std::fs::canonicalize(data_dir.join("vms")).unwrap_or_else(|_| data_dir.join("vms"));
    let holder_of = |pid: i32| {
        let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
        args.contains(&spore_agent::holder::HOLD_COMMAND.as_bytes())
            && args.contains(&data_dir.as_os_str().as_encoded_bytes())
    };
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&vms))
                || holder_of(pid)
        })
        .collect();
    for pid in &pids {
        // SAFETY: kill sends a signal; no memory is involved.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd` serving one file read-only on a unix socket, killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn start(file: &Path, format: &str, socket: &Path) -> Result<Self> {
        Self::spawn(file, format, socket, true)
    }

    /// Serves `file` read-write, with qemu-nbd's default cache mode
    /// (writeback: NBD_CMD_FLUSH is an fdatasync of the file).
    pub fn start_writable(file: &Path, format: &str, socket: &Path) -> Result<Self> {
        Self::spawn(file, format, socket, false)
    }

    fn spawn(file: &Path, format: &str, socket: &Path, read_only: bool) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        if read_only {
            cmd.arg("--read-only");
        }
        let child = cmd
            .args(["--persistent", "--shared=8", "--export-name=x"])
            .arg(format!("--format={format}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(file)
            .stdin(Stdio::null())
            // It reports every client that hangs up without NBD_CMD_DISC (fio does).
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-nbd (apt-get install qemu-utils)")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if Instant::now() > deadline {
                bail!("qemu-nbd did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(QemuNbd {
            child,
            socket: socket.to_owned(),
        })
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///x?socket={}", self.socket.display())
    }

    /// How qemu-nbd ended, if it has: a client's error may be its crash.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        // A crashing process may still be dumping when the client sees EOF.
        std::thread::sleep(Duration::from_millis(100));
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One fio job's result.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
}

/// Runs fio's nbd engine against `uri` and returns its read figures.
pub fn fio_nbd(
    uri: &str,
    rw: &str,
    bs: &str,
    iodepth: u32,
    seconds: u32,
    size: u64,
) -> Result<FioResult> {
    let out = run(Command::new("fio")
        .args([
            "--name=job",
            "--ioengine=nbd",
            "--output-format=json",
            "--time_based",
            "--direct=1",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--size={size}"))
        .arg("--randseed=42"))?;
    // fio may print warnings before the JSON document.
    let start = out.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&out[start..]).context("parsing fio JSON")?;
    let read = &v["jobs"][0]["read"];
    let pct = |p: &str| read["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(FioResult {
        iops: read["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: read["bw_bytes"].as_f64().unwrap_or(0.0),
        lat_p50_us: pct("50.000000"),
        lat_p99_us: pct("99.000000"),
    })
}

/// Checks that the tools a benchmark needs are installed.
pub fn require(tools: &[&str]) -> Result<()> {
    for t in tools {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{t} is not installed (run scripts/install-deps.sh)");
        }
    }
    Ok(())
}

/// How agents talk to each other in a run: the fleet's mutual TLS, or
/// `--insecure-listen`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tls,
    Plaintext,
}

impl Mode {
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::Tls => &[],
            Mode::Plaintext => &["--insecure-listen"],
        }
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Mode::Tls => "https",
            Mode::Plaintext => "http",
        }
    }
}

//! An origin whose store is a bucket of a real S3-compatible server (moto's,
//! installed by scripts/install-deps.sh): pushes land in the bucket, cold
//! hosts read the image back byte for byte, a second origin agent with
//! nothing but the bucket serves it too, and bad pushes are refused.
//! Everything talks over loopback.
//!
//! This binary holds one test: it sets the AWS_* variables the agents read
//! before it starts any of them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{chunk_files, nbd_copy, sh, sparse_random_file, TestAgent, SPORE};

const MIB: u64 = 1 << 20;
const BUCKET: &str = "spore-origin";
const PREFIX: &str = "test/store";
/// The access key id: moto takes any.
const KEY: &str = "spore-test";
/// The secret, distinct so that a log or error that leaked it shows.
const SECRET: &str = "s3cr3t-Spore-NeverLogged-7f3a";

/// An agent's peer URL.
fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// A Python with moto in it: the venv scripts/install-deps.sh makes, or
/// wherever SPORE_MOTO_PYTHON points.
fn moto_python() -> PathBuf {
    if let Some(p) = std::env::var_os("SPORE_MOTO_PYTHON") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/moto/venv/bin/python");
    assert!(
        p.exists(),
        "no moto venv at {}: run `bash scripts/install-deps.sh` (it installs moto[server] \
         in a venv there), or point SPORE_MOTO_PYTHON at a Python that has moto",
        p.display()
    );
    p
}

/// moto's server on a port the kernel picks (port 0), which it prints
/// once it listens; it serves until its stdin closes.
const MOTO: &str = "
import sys
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
server = ThreadedMotoServer('127.0.0.1', 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
";

/// A moto S3 server on a loopback port it bound itself, killed on drop.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    fn start(dir: &Path) -> Self {
        use std::io::BufRead;
        let log = dir.join("moto.log");
        let mut child = Command::new(moto_python())
            .args(["-c", MOTO])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("moto's Python starts");
        // The first line is the port, written once the server listens; EOF
        // means it died. Read aside, so a server that hangs fails the test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| "(nothing in 60 s)".into());
        let mut moto = Moto {
            child,
            port: 0,
            log,
        };
        moto.port = line.trim().parse().unwrap_or_else(|_| {
            panic!("moto did not say its port ({line:?}): {}", moto.log_text())
        });
        moto
    }

    /// The S3 endpoint (moto serves plain HTTP on loopback).
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// curl with a SigV4-signed request to `path` on the server, as any S3
    /// client would make it (not through spore).
    fn curl(&self, path: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail", "--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{KEY}:{SECRET}")])
            .arg(format!("{}/{path}", self.url()));
        c
    }

    /// An object's bytes, read straight from the server.
    fn get(&self, key: &str) -> Vec<u8> {
        let out = self.curl(&format!("{BUCKET}/{key}")).output().unwrap();
        assert!(
            out.status.success(),
            "GET {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Keys under `prefix`, from one ListObjectsV2 page.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let xml = sh(&mut self.curl(&format!(
            "{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}"
        )));
        assert!(
            xml.contains("<IsTruncated>false</IsTruncated>"),
            "one page: {xml}"
        );
        xml.split("<Key>")
            .skip(1)
            .map(|s| s.split("</Key>").next().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spore agent` with `args` must exit by itself, failing; returns its output.
fn agent_fails_to_start(dir: &Path, args: &[&str]) -> String {
    let log = dir.join("failing.log");
    let mut child = Command::new(SPORE)
        .arg("--data-dir")
        .arg(dir.join("failing"))
        .arg("agent")
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("failing.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "agent {args:?} exited with {status}");
    std::fs::read_to_string(dir.join("failing.err")).unwrap()
}

/// `curl` against a peer listener: (HTTP status, body).
fn curl(
    tls: &Path,
    method: &str,
    url: &str,
    data: Option<&Path>,
    body: Option<&str>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(common::curl_tls(tls));
    c.args(["-sS", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(f) = data {
        c.arg("--data-binary").arg(format!("@{}", f.display()));
    }
    if let Some(b) = body {
        c.args(["-d", b]);
    }
    let out = sh(c.arg(url));
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

#[test]
fn an_origin_keeps_pushed_images_in_s3_and_cold_hosts_read_them_back() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start(tmp.path());
    sh(moto.curl(BUCKET).args(["-X", "PUT"]));
    // object_store's usual S3 settings, inherited by the agents started
    // below. Set before any of them starts, in this binary's only test.
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto.url().as_str()),
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(k, v);
    }
    let store = format!("s3://{BUCKET}/{PREFIX}");

    // A store that cannot be used stops the agent at start, saying why.
    let err = agent_fails_to_start(tmp.path(), &["--origin-store", "s3://no-such-bucket"]);
    assert!(err.contains("origin store"), "{err}");
    let err = agent_fails_to_start(tmp.path(), &["--origin-store", "gs://elsewhere"]);
    assert!(err.contains("expected a directory"), "{err}");

    let (origin, origin_port) =
        TestAgent::start_listening(&["--accept-push", "--origin-store", &store]);
    let builder = TestAgent::start();
    let src = builder.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 41);
    builder.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let out = builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    assert!(out.contains("pushed img"), "{out}");

    // The objects really are in the bucket: one per chunk the builder
    // holds (the image's data, layer and manifest), each the chunk file
    // byte for byte, and the name as a versioned record.
    let files = chunk_files(&builder);
    let keys = moto.keys(&format!("{PREFIX}/chunks/"));
    assert_eq!(keys.len(), files.len(), "{keys:?}");
    for f in files.iter().step_by(17) {
        let hex = f.file_name().unwrap().to_str().unwrap();
        let key = format!("{PREFIX}/chunks/{}/{hex}", &hex[..2]);
        assert!(keys.contains(&key), "{key}");
        assert_eq!(moto.get(&key), std::fs::read(f).unwrap(), "{key}");
    }
    let manifest = builder.json(&["image", "inspect", "img", "--json"])["manifest"]
        .as_str()
        .unwrap()
        .to_owned();
    let rec: serde_json::Value =
        serde_json::from_slice(&moto.get(&format!("{PREFIX}/images/img"))).unwrap();
    assert_eq!(rec["version"], 1, "{rec}");
    assert_eq!(rec["manifest"], manifest.as_str(), "{rec}");
    // None of it went to the origin agent's own store or names.
    assert!(chunk_files(&origin).is_empty());
    assert!(!origin.data_dir().join("origin").exists());
    assert_eq!(
        origin.json(&["image", "ls", "--json"]),
        serde_json::json!([])
    );
    // A second push sends nothing new.
    let out = builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    assert!(out.contains(", 0 sent"), "{out}");

    // Refused: a name for a manifest the bucket lacks, a name for an image
    // only partly pushed, a chunk that is not what its id says.
    let images = format!("{}/v1/images", url(origin_port));
    let bogus = format!("{{\"manifest\":\"{}\"}}", "ab".repeat(32));
    let (code, body) = curl(
        &origin.tls_dir(),
        "PUT",
        &format!("{images}/bogus"),
        None,
        Some(&bogus),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("is not here"), "{body}");
    let src2 = builder.path("img2.raw");
    sparse_random_file(&src2, 4 * MIB, 42);
    builder.ok(&["image", "import", src2.to_str().unwrap(), "--name", "img2"]);
    let manifest2 = builder.json(&["image", "inspect", "img2", "--json"])["manifest"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifest2_file = builder
        .data_dir()
        .join("chunks")
        .join(&manifest2[..2])
        .join(&manifest2);
    let chunks = format!("{}/v1/chunks", url(origin_port));
    let (code, body) = curl(
        &origin.tls_dir(),
        "PUT",
        &format!("{chunks}/{manifest}"),
        Some(&manifest2_file),
        None,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("rejected upload"), "{body}");
    let (code, body) = curl(
        &origin.tls_dir(),
        "PUT",
        &format!("{chunks}/{manifest2}"),
        Some(&manifest2_file),
        None,
    );
    assert_eq!(code, 204, "{body}");
    let partial = format!("{{\"manifest\":\"{manifest2}\"}}");
    let (code, body) = curl(
        &origin.tls_dir(),
        "PUT",
        &format!("{images}/img2"),
        None,
        Some(&partial),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("are missing; push them first"), "{body}");
    assert_eq!(
        curl(
            &origin.tls_dir(),
            "GET",
            &format!("{images}/img2"),
            None,
            None
        )
        .0,
        404
    );
    assert!(moto.keys(&format!("{PREFIX}/images/")) == [format!("{PREFIX}/images/img")]);

    // A cold host reads the image back through the origin, byte for byte.
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    cold.ok(&["disk", "create", "d", "--image", "img"]);
    let expect = std::fs::read(&src).unwrap();
    assert_eq!(nbd_copy(&cold, "disk/d"), expect);

    // A second origin agent that has nothing but the bucket serves the same
    // image, and takes no pushes.
    let (front, front_port) = TestAgent::start_listening(&["--origin-store", &store]);
    let err = builder.fails(&["image", "push", "img", "--to", &url(front_port)]);
    assert!(err.contains("does not accept pushes"), "{err}");
    let cold2 = TestAgent::start_with(&["--origin", &url(front_port)]);
    cold2.ok(&["disk", "create", "d", "--image", "img"]);
    assert_eq!(nbd_copy(&cold2, "image/img"), expect);

    // The origin's metrics name the store and count what went in.
    let metrics = sh(Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(origin.data_dir().join("api.sock"))
        .arg("http://agent/metrics"));
    let written = format!(
        "spore_origin_store_chunks_written_total{{store=\"{store}\"}} {}",
        files.len() + 1
    );
    assert!(metrics.contains(&written), "{written} in\n{metrics}");

    // The credentials never reach a log, an error or the API.
    assert!(!metrics.contains(SECRET));
    let status = origin.ok(&["status", "--json"]);
    assert!(!status.contains(SECRET), "{status}");
    for log in [
        origin.data_dir().with_extension("agent.log"),
        front.data_dir().with_extension("agent.log"),
        tmp.path().join("failing.err"),
        tmp.path().join("failing.log"),
    ] {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains(SECRET),
            "the S3 secret is in {}",
            log.display()
        );
    }
}

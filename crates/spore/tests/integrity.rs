//! Integrity with real processes (issue 23): nothing a name is about to
//! hold is collected while `rm` runs beside `import`, `commit` or a
//! resolve from the origin; every acknowledged write survives a crash of
//! the agent *and* the loss of whatever it had not synced; trims and zeroes
//! of never-written space stay unallocated, and `NO_HOLE` is honoured.
//!
//! `kill -9` alone cannot show a missing fsync: the page cache outlives the
//! process. The crash tests therefore run the agent under a small
//! `LD_PRELOAD` library (the [`POWERCUT_C`] source, built with `cc`) that
//! keeps an undo log of every write to the files under `DATA/disks/` and
//! notes every `fdatasync`/`fsync` of them; after the SIGKILL the test
//! rolls back every write that no later sync covered, which is what a power
//! cut does to data that was written but not synced (the technique of
//! RocksDB's `FaultInjectionTestFS` and SQLite's crash-test VFS, applied to
//! the real agent binary). What it does not model: the durability of file
//! creations, renames and unlinks (directory fsyncs), writes through
//! `mmap`, and anything outside `DATA/disks/` (the chunk store, meta.redb).
//!
//! Without a tool a test needs, it prints `SKIP:` and passes, unless
//! `CI=true`: then it fails naming the package to install.
//!
//! Randomness comes from a seed printed by every test; `SPORE_TEST_SEED=N`
//! repeats a run.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{sh, TestAgent, SPORE};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Size of the images whose import or commit races a removal: big enough
/// that the operation takes a good part of a second on a debug build. In
/// blocks of 1 MiB: removing an image costs about 3 ms per chunk, and
/// every iteration removes one.
const RACE_IMAGE: u64 = 128 * MIB;
const RACE_BLOCK: &str = "1M";
/// Upper bound of wall time per race test (the iteration count is each
/// test's; whichever ends first, and the test says how many ran).
const RACE_BUDGET: Duration = Duration::from_secs(40);
/// A capture race starts a VM each iteration (about 5 s each here, more
/// on a loaded CI machine): its own bound, for at least 5 iterations.
const CAPTURE_RACE_BUDGET: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------- helpers

/// xorshift64*: enough randomness for timings and offsets, and repeatable.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("SPORE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: seed {seed} (SPORE_TEST_SEED={seed} repeats it)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A file of `size` incompressible bytes (no block dedupes with another).
fn random_file(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let copied = std::io::copy(
        &mut std::fs::File::open("/dev/urandom").unwrap().take(size),
        &mut f,
    )
    .unwrap();
    assert_eq!(copied, size);
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `spore` CLI process against `t`, started now, not waited for.
fn spawn_cli(t: &TestAgent, args: &[&str]) -> Child {
    Command::new(SPORE)
        .env("SPORE_HOME", t.data_dir())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spore runs")
}

/// `image inspect` succeeds, every chunk of the image is here, and a whole
/// read of the export through NBD equals `src` byte for byte.
fn check_image(t: &TestAgent, name: &str, src: &Path) -> Result<(), String> {
    let out = t.run(&["image", "inspect", name, "--json"]);
    if !out.status.success() {
        return Err(format!(
            "image inspect {name} failed: {}",
            text(&out).trim()
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("image inspect {name}: bad JSON: {e}"))?;
    if info["local_chunks"] != info["chunks"] {
        return Err(format!(
            "image {name} has {} of its {} chunks here",
            info["local_chunks"], info["chunks"]
        ));
    }
    let copy = t.path(&format!("{name}.read"));
    let _ = std::fs::remove_file(&copy);
    let read = Command::new("nbdcopy")
        .arg(t.uri(&format!("image/{name}")))
        .arg(&copy)
        .output()
        .unwrap();
    if !read.status.success() {
        return Err(format!(
            "reading image/{name} through NBD failed: {}",
            text(&read).trim()
        ));
    }
    let same = std::fs::read(&copy).unwrap() == std::fs::read(src).unwrap();
    let _ = std::fs::remove_file(&copy);
    if !same {
        return Err(format!("image/{name} does not read back as its source"));
    }
    Ok(())
}

/// One race: `op` (which makes `made`) started, then after `delay` the
/// removal `rm`. Returns a description of what went wrong, or None.
struct Race<'a> {
    what: &'a str,
    op: Vec<String>,
    rm: Vec<String>,
    made: Made<'a>,
}

/// What the raced operation makes, and how it is checked.
enum Made<'a> {
    /// An image with the bytes of `src`.
    Image {
        name: &'a str,
        src: &'a Path,
        /// Fetch the image's missing chunks before the whole read (after a
        /// resolve only the manifest and layers are here).
        pull_first: bool,
    },
    /// A template: it inspects, and `spore fsck` (every chunk hashed,
    /// every reference followed) finds nothing missing.
    Template(&'a str),
}

fn run_race(t: &TestAgent, race: &Race<'_>, iteration: usize, delay: Duration) -> Option<String> {
    let op: Vec<&str> = race.op.iter().map(|s| s.as_str()).collect();
    let rm: Vec<&str> = race.rm.iter().map(|s| s.as_str()).collect();
    let start = Instant::now();
    let child = spawn_cli(t, &op);
    std::thread::sleep(delay);
    let rm_start = start.elapsed();
    let rm_out = t.run(&rm);
    let rm_end = start.elapsed();
    let op_out = child.wait_with_output().unwrap();
    let op_end = start.elapsed();
    let timing = format!(
        "{} iteration {iteration}: `spore {}` started at 0, `spore {}` ran {:.0}..{:.0} ms, \
         the first ended at {:.0} ms",
        race.what,
        op.join(" "),
        rm.join(" "),
        rm_start.as_secs_f64() * 1e3,
        rm_end.as_secs_f64() * 1e3,
        op_end.as_secs_f64() * 1e3,
    );
    println!("  {timing}");
    if !rm_out.status.success() {
        return Some(format!("{timing}: the removal failed: {}", text(&rm_out)));
    }
    if !op_out.status.success() {
        return Some(format!("{timing}: the operation failed: {}", text(&op_out)));
    }
    let (image, src, pull_first) = match race.made {
        Made::Image {
            name,
            src,
            pull_first,
        } => (name, src, pull_first),
        Made::Template(name) => {
            return check_template(t, name).err().map(|e| {
                format!(
                    "{timing}: both succeeded, then {e} (the removal printed: {})",
                    String::from_utf8_lossy(&rm_out.stdout).trim()
                )
            })
        }
    };
    let inspect = t.run(&["image", "inspect", image]);
    if !inspect.status.success() {
        return Some(format!(
            "{timing}: both succeeded, then image inspect {image} failed: {}",
            text(&inspect).trim()
        ));
    }
    if pull_first {
        let pull = t.run(&["image", "pull", image]);
        if !pull.status.success() {
            return Some(format!(
                "{timing}: both succeeded, then image pull {image} failed: {}",
                text(&pull).trim()
            ));
        }
    }
    check_image(t, image, src).err().map(|e| {
        format!(
            "{timing}: both succeeded, then {e} (the removal printed: {})",
            String::from_utf8_lossy(&rm_out.stdout).trim()
        )
    })
}

/// `template inspect` succeeds and `spore fsck` is clean: every chunk of
/// every name (the template's RAM and disk images among them) is here and
/// hashes to its id.
fn check_template(t: &TestAgent, name: &str) -> Result<(), String> {
    let inspect = t.run(&["template", "inspect", name]);
    if !inspect.status.success() {
        return Err(format!(
            "template inspect {name} failed: {}",
            text(&inspect).trim()
        ));
    }
    let fsck = t.run(&["fsck", "--json"]);
    if !fsck.status.success() {
        return Err(format!("spore fsck is not clean: {}", text(&fsck).trim()));
    }
    Ok(())
}

/// Runs `prepare` + race + `cleanup` until the iteration or time budget
/// ends; panics listing every iteration that lost data.
fn race_campaign(
    test: &str,
    iterations: usize,
    budget: Duration,
    rng: &mut Rng,
    window: Duration,
    mut iteration: impl FnMut(usize, Duration) -> Option<String>,
) {
    let window_ms = (window.as_millis() as u64).max(1);
    let started = Instant::now();
    let mut ran = 0;
    let mut failures = Vec::new();
    for i in 0..iterations {
        if started.elapsed() > budget {
            break;
        }
        let delay = Duration::from_millis(rng.below(window_ms));
        if let Some(f) = iteration(i, delay) {
            failures.push(f);
        }
        ran += 1;
    }
    println!(
        "{test}: {ran} iterations in {:.1} s, {} lost data",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(ran >= 5, "{test}: only {ran} iterations fit in the budget");
    assert!(
        failures.is_empty(),
        "{test}: {} of {ran} iterations lost an acknowledged image{}:\n{}",
        failures.len(),
        if failures.len() > 6 {
            " (the first 6)"
        } else {
            ""
        },
        failures[..failures.len().min(6)].join("\n")
    );
}

// ------------------------------------------------------ 1. GC races (rm)

/// `image rm` of another image, or `disk rm`, while `image import` runs:
/// the imported image keeps every chunk (issue 23, 1: the shared GC guard
/// was dropped before the name was bound).
#[test]
fn removals_during_image_import_never_free_the_new_images_chunks() {
    let test = "removals during image import";
    if !spore_testkit::tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let mut rng = Rng::new(test);
    let t = TestAgent::start();
    let src = t.path("big.raw");
    random_file(&src, RACE_IMAGE);
    let small = t.path("small.raw");
    random_file(&small, MIB);
    let (src_s, small_s) = (src.to_str().unwrap(), small.to_str().unwrap());
    t.ok(&["image", "import", small_s, "--name", "keep"]);

    // How long an import takes here, unraced: the window for the removals.
    let t0 = Instant::now();
    t.ok(&[
        "image",
        "import",
        src_s,
        "--name",
        "big",
        "--block-size",
        RACE_BLOCK,
    ]);
    let window = t0.elapsed();
    check_image(&t, "big", &src).expect("an import without a race");
    t.ok(&["image", "rm", "big"]);
    println!("{test}: an unraced import of {RACE_IMAGE} bytes takes {window:?}");

    race_campaign(
        test,
        50,
        RACE_BUDGET,
        &mut rng,
        window.mul_f64(1.1),
        |i, delay| {
            // Even iterations remove an image (which collects garbage), odd
            // ones a disk.
            let victim = format!("v{i}");
            let rm = if i % 2 == 0 {
                t.ok(&["image", "import", small_s, "--name", &victim]);
                vec!["image".into(), "rm".into(), victim]
            } else {
                t.ok(&["disk", "create", &victim, "--image", "keep"]);
                vec!["disk".into(), "rm".into(), victim]
            };
            let race = Race {
                what: if i % 2 == 0 {
                    "image rm during image import"
                } else {
                    "disk rm during image import"
                },
                op: [
                    "image",
                    "import",
                    src_s,
                    "--name",
                    "big",
                    "--block-size",
                    RACE_BLOCK,
                ]
                .map(String::from)
                .to_vec(),
                rm,
                made: Made::Image {
                    name: "big",
                    src: &src,
                    pull_first: false,
                },
            };
            let failure = run_race(&t, &race, i, delay);
            let _ = t.run(&["image", "rm", "big"]);
            failure
        },
    );
}

/// `image rm` of another image while `disk commit` publishes a new image:
/// the new image keeps its layer and chunks.
#[test]
fn image_rm_during_disk_commit_never_frees_the_new_layer() {
    let test = "image rm during disk commit";
    if !spore_testkit::tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let mut rng = Rng::new(test);
    let t = TestAgent::start();
    // An empty image the size of the data, and a disk over it that the
    // data is written into whole: every commit makes RACE_IMAGE of chunks.
    let empty = t.path("empty.raw");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(RACE_IMAGE)
        .unwrap();
    t.ok(&[
        "image",
        "import",
        empty.to_str().unwrap(),
        "--name",
        "empty",
        "--block-size",
        RACE_BLOCK,
    ]);
    t.ok(&["disk", "create", "work", "--image", "empty"]);
    let data = t.path("data.raw");
    random_file(&data, RACE_IMAGE);
    sh(Command::new("nbdcopy").arg(&data).arg(t.uri("disk/work")));
    let small = t.path("small.raw");
    random_file(&small, MIB);
    let small_s = small.to_str().unwrap();

    let t0 = Instant::now();
    t.ok(&["disk", "commit", "work", "--name", "c"]);
    let window = t0.elapsed();
    check_image(&t, "c", &data).expect("a commit without a race");
    t.ok(&["image", "rm", "c"]);
    println!("{test}: an unraced commit of {RACE_IMAGE} bytes takes {window:?}");

    race_campaign(
        test,
        50,
        RACE_BUDGET,
        &mut rng,
        window.mul_f64(1.1),
        |i, delay| {
            let victim = format!("v{i}");
            t.ok(&["image", "import", small_s, "--name", &victim]);
            let race = Race {
                what: "image rm during disk commit",
                op: ["disk", "commit", "work", "--name", "c"]
                    .map(String::from)
                    .to_vec(),
                rm: vec!["image".into(), "rm".into(), victim],
                made: Made::Image {
                    name: "c",
                    src: &data,
                    pull_first: false,
                },
            };
            let failure = run_race(&t, &race, i, delay);
            let _ = t.run(&["image", "rm", "c"]);
            failure
        },
    );
}

/// `image rm` of another image while a host resolves an image at its
/// origin (`image pull`, or `disk create` over a name only the origin
/// has): the manifest and layers just fetched are not collected before
/// the name is recorded (the resolve path took no guard at all).
#[test]
fn image_rm_during_a_resolve_from_the_origin_keeps_the_resolved_image() {
    let test = "image rm during a resolve from the origin";
    if !spore_testkit::tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let mut rng = Rng::new(test);
    let (origin, port) = TestAgent::start_listening(&["--accept-push"]);
    let url = format!("https://127.0.0.1:{port}");
    // Small: the resolve fetches only manifest and layer, and every
    // iteration removes the image again (a few ms per chunk).
    let src = origin.path("r.raw");
    random_file(&src, 8 * MIB);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "r"]);
    origin.ok(&["image", "push", "r", "--to", &url]);
    let host = TestAgent::start_with(&["--origin", &url]);
    let small = host.path("small.raw");
    random_file(&small, MIB);
    let small_s = small.to_str().unwrap();

    let t0 = Instant::now();
    host.ok(&["disk", "create", "d", "--image", "r"]);
    let window = t0.elapsed();
    host.ok(&["disk", "rm", "d"]);
    host.ok(&["image", "rm", "r"]);
    println!("{test}: an unraced resolve (disk create) takes {window:?}");

    race_campaign(
        test,
        50,
        RACE_BUDGET,
        &mut rng,
        window.mul_f64(1.5),
        |i, delay| {
            let victim = format!("v{i}");
            host.ok(&["image", "import", small_s, "--name", &victim]);
            let pull = i % 2 == 0;
            let race = Race {
                what: if pull {
                    "image rm during image pull"
                } else {
                    "image rm during disk create (resolve)"
                },
                op: if pull {
                    ["image", "pull", "r"].map(String::from).to_vec()
                } else {
                    ["disk", "create", "d", "--image", "r"]
                        .map(String::from)
                        .to_vec()
                },
                rm: vec!["image".into(), "rm".into(), victim],
                made: Made::Image {
                    name: "r",
                    src: &src,
                    pull_first: !pull,
                },
            };
            let failure = run_race(&host, &race, i, delay);
            let _ = host.run(&["disk", "rm", "d"]);
            let _ = host.run(&["image", "rm", "r"]);
            failure
        },
    );
}

/// `image rm`, `disk rm`, `template rm` (of the template the previous
/// iteration captured) and `vm rm` (of the VM it captured) while `vm
/// template --stop` captures a VM that has just started: the new
/// template's RAM and disk images keep every chunk (a capture's images are
/// made under the same guard as an import's).
#[test]
fn removals_during_a_template_capture_never_free_the_captured_images() {
    let test = "removals during a template capture";
    let mut rng = Rng::new(test);
    let t = TestAgent::start();
    t.import_guest("base");
    let run = |vm: &str| {
        let args = common::vm_run_args(common::guest(), vm, "base", "quiet");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.ok(&args);
    };
    let small = t.path("small.raw");
    random_file(&small, MIB);
    let small_s = small.to_str().unwrap();

    run("u");
    let t0 = Instant::now();
    t.ok(&["vm", "template", "u", "--name", "t0", "--stop"]);
    let window = t0.elapsed();
    check_template(&t, "t0").expect("a capture without a race");
    println!("{test}: an unraced capture takes {window:?}");
    t.ok(&["vm", "rm", "u"]);
    t.ok(&["template", "rm", "t0"]);

    race_campaign(
        test,
        50,
        CAPTURE_RACE_BUDGET,
        &mut rng,
        window.mul_f64(1.2),
        |i, delay| {
            let kind = i % 4;
            let (what, rm): (&str, Vec<String>) = match kind {
                0 => {
                    let victim = format!("i{i}");
                    t.ok(&["image", "import", small_s, "--name", &victim]);
                    ("image rm", vec!["image".into(), "rm".into(), victim])
                }
                1 => {
                    let victim = format!("d{i}");
                    t.ok(&["disk", "create", &victim, "--image", "base"]);
                    ("disk rm", vec!["disk".into(), "rm".into(), victim])
                }
                // What the previous iteration captured, kept for this one.
                2 => (
                    "template rm",
                    vec!["template".into(), "rm".into(), format!("t{i}")],
                ),
                _ => ("vm rm", vec!["vm".into(), "rm".into(), format!("v{i}")]),
            };
            let (vm, name) = (format!("v{}", i + 1), format!("t{}", i + 1));
            run(&vm);
            let race = Race {
                what: &format!("{what} during a capture"),
                op: ["vm", "template", &vm, "--name", &name, "--stop"]
                    .map(String::from)
                    .to_vec(),
                rm,
                made: Made::Template(&name),
            };
            let failure = run_race(&t, &race, i, delay);
            // The next iteration removes this one's VM or template itself.
            if (i + 1) % 4 != 3 {
                let _ = t.run(&["vm", "rm", &vm]);
            }
            if (i + 1) % 4 != 2 {
                let _ = t.run(&["template", "rm", &name]);
            }
            failure
        },
    );
}

// ------------------------------------------- 2. crashes and power cuts

/// The fault-injecting file layer, preloaded into the agent.
///
/// For every write (`pwrite`, `write`, vectored forms, `fallocate`,
/// shrinking `ftruncate`) to a regular file under `$SPORE_POWERCUT_ROOT`
/// it appends to `$SPORE_POWERCUT_LOG` an undo record (device, inode,
/// offset, the old bytes, the old size) before doing the write, under one
/// lock. A successful `fdatasync`/`fsync` of such a file appends a sync
/// record holding the log position at which it *started*: everything
/// logged for that file before then is durable. Writes to `O_DSYNC` files
/// are durable at once. The log is appended with `write(2)`, so it
/// survives SIGKILL of the agent (the page cache does too: that is the
/// point).
const POWERCUT_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

struct rec { uint64_t kind, dev, ino, off, len, old_len, old_size; };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static char root[4096];
static size_t root_len;
static uint64_t log_pos;

static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static ssize_t (*real_pread64)(int, void *, size_t, off_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_fdatasync)(int);
static int (*real_fsync)(int);

__attribute__((constructor)) static void powercut_init(void) {
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_write = dlsym(RTLD_NEXT, "write");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev64");
    real_pwritev2 = dlsym(RTLD_NEXT, "pwritev64v2");
    real_pread64 = dlsym(RTLD_NEXT, "pread64");
    real_fallocate = dlsym(RTLD_NEXT, "fallocate64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate64");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    const char *r = getenv("SPORE_POWERCUT_ROOT");
    const char *l = getenv("SPORE_POWERCUT_LOG");
    /* Only this process: not QEMU or anything else it starts. */
    unsetenv("LD_PRELOAD");
    if (!r || !l || strlen(r) >= sizeof root) return;
    strcpy(root, r);
    root_len = strlen(root);
    log_fd = open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static int tracked(int fd, struct stat *st) {
    char link[64], path[4096];
    if (log_fd < 0 || fd < 0 || fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strncmp(path, root, root_len) == 0;
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = real_write(log_fd, c, n);
        if (w <= 0) abort(); /* a lost record would make the test lie */
        c += w; n -= w; log_pos += w;
    }
}

/* Called with mu held, before the write. */
static void save(int fd, const struct stat *st, uint64_t off, uint64_t len) {
    char *old = len ? malloc(len) : NULL;
    uint64_t got = 0;
    while (got < len) {
        ssize_t r = real_pread64(fd, old + got, len - got, off + got);
        if (r <= 0) break;
        got += r;
    }
    struct rec h = { 'W', st->st_dev, st->st_ino, off, len, got, st->st_size };
    put(&h, sizeof h);
    if (got) put(old, got);
    free(old);
}

static void synced(const struct stat *st, uint64_t pos) {
    struct rec h = { 'S', st->st_dev, st->st_ino, pos, 0, 0, 0 };
    put(&h, sizeof h);
}

static int dsync(int fd) { return (fcntl(fd, F_GETFL) & O_DSYNC) == O_DSYNC; }

static size_t iov_len(const struct iovec *iov, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += iov[i].iov_len;
    return t;
}

static off_t cur_off(int fd, const struct stat *st) {
    if (fcntl(fd, F_GETFL) & O_APPEND) return st->st_size;
    return lseek(fd, 0, SEEK_CUR);
}

#define WRAP(call, off, len)                                  \
    struct stat st;                                           \
    if (!tracked(fd, &st)) return call;                       \
    pthread_mutex_lock(&mu);                                  \
    save(fd, &st, (off), (len));                              \
    ssize_t r = call;                                         \
    if (r >= 0 && dsync(fd)) synced(&st, log_pos);            \
    pthread_mutex_unlock(&mu);                                \
    return r;

ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { WRAP(real_pwrite64(fd, b, n, o), o, n) }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { WRAP(real_pwrite64(fd, b, n, o), o, n) }
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t o) { WRAP(real_pwritev(fd, v, c, o), o, iov_len(v, c)) }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { WRAP(real_pwritev(fd, v, c, o), o, iov_len(v, c)) }
ssize_t pwritev64v2(int fd, const struct iovec *v, int c, off_t o, int f) { WRAP(real_pwritev2(fd, v, c, o, f), o == -1 ? cur_off(fd, &st) : o, iov_len(v, c)) }
ssize_t pwritev2(int fd, const struct iovec *v, int c, off_t o, int f) { WRAP(real_pwritev2(fd, v, c, o, f), o == -1 ? cur_off(fd, &st) : o, iov_len(v, c)) }
ssize_t write(int fd, const void *b, size_t n) { WRAP(real_write(fd, b, n), cur_off(fd, &st), n) }
ssize_t writev(int fd, const struct iovec *v, int c) { WRAP(real_writev(fd, v, c), cur_off(fd, &st), iov_len(v, c)) }

int fallocate64(int fd, int mode, off_t o, off_t n) {
    struct stat st;
    if (!tracked(fd, &st)) return real_fallocate(fd, mode, o, n);
    pthread_mutex_lock(&mu);
    save(fd, &st, o, n);
    int r = real_fallocate(fd, mode, o, n);
    pthread_mutex_unlock(&mu);
    return r;
}
int fallocate(int fd, int mode, off_t o, off_t n) { return fallocate64(fd, mode, o, n); }

int ftruncate64(int fd, off_t n) {
    struct stat st;
    if (!tracked(fd, &st)) return real_ftruncate(fd, n);
    pthread_mutex_lock(&mu);
    save(fd, &st, n < st.st_size ? n : st.st_size, n < st.st_size ? st.st_size - n : 0);
    int r = real_ftruncate(fd, n);
    pthread_mutex_unlock(&mu);
    return r;
}
int ftruncate(int fd, off_t n) { return ftruncate64(fd, n); }

static int sync_with(int (*f)(int), int fd) {
    struct stat st;
    if (!tracked(fd, &st)) return f(fd);
    pthread_mutex_lock(&mu);
    uint64_t pos = log_pos;
    pthread_mutex_unlock(&mu);
    int r = f(fd);
    if (r == 0) {
        pthread_mutex_lock(&mu);
        synced(&st, pos);
        pthread_mutex_unlock(&mu);
    }
    return r;
}
int fdatasync(int fd) { return sync_with(real_fdatasync, fd); }
int fsync(int fd) { return sync_with(real_fsync, fd); }
"#;

/// Builds the preload library once per test binary (None: no C compiler).
fn powercut_library() -> Option<PathBuf> {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if !spore_testkit::tool("cc", "gcc") {
        return None;
    }
    Some(
        LIB.get_or_init(|| {
            // Built under a name of this process, then renamed into place:
            // test binaries running at once never see a half-written one.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("spore-powercut");
            std::fs::create_dir_all(&dir).unwrap();
            let pid = std::process::id();
            let src = dir.join(format!("powercut-{pid}.c"));
            std::fs::write(&src, POWERCUT_C).unwrap();
            let built = dir.join(format!("powercut-{pid}.so"));
            sh(Command::new("cc")
                .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
                .arg(&built)
                .arg(&src)
                .args(["-ldl", "-lpthread"]));
            let _ = std::fs::remove_file(&src);
            let lib = dir.join("powercut.so");
            std::fs::rename(&built, &lib).unwrap();
            lib
        })
        .clone(),
    )
}

/// Rolls back every write in the power-cut log that no later sync of its
/// file covered (newest first); returns how many were undone.
fn apply_power_cut(log: &Path, root: &Path) -> usize {
    let bytes = std::fs::read(log).unwrap_or_default();
    const HEADER: usize = 56;
    let field = |at: usize, i: usize| {
        u64::from_ne_bytes(bytes[at + 8 * i..at + 8 * i + 8].try_into().unwrap())
    };
    // (position, dev, ino, offset, old bytes range, old size)
    let mut writes = Vec::new();
    let mut synced_until: HashMap<(u64, u64), u64> = HashMap::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let (kind, dev, ino, off) = (field(at, 0), field(at, 1), field(at, 2), field(at, 3));
        let (old_len, old_size) = (field(at, 5) as usize, field(at, 6));
        match kind as u8 {
            b'W' => {
                if at + HEADER + old_len > bytes.len() {
                    break; // torn by the kill: that write never happened
                }
                writes.push((
                    at as u64,
                    dev,
                    ino,
                    off,
                    at + HEADER..at + HEADER + old_len,
                    old_size,
                ));
                at += HEADER + old_len;
            }
            b'S' => {
                let e = synced_until.entry((dev, ino)).or_default();
                *e = (*e).max(off);
                at += HEADER;
            }
            k => panic!(
                "power-cut log {}: bad record kind {k} at {at}",
                log.display()
            ),
        }
    }
    // Files by inode (a rename keeps it).
    let mut by_inode: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for f in common::files_under(root) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(&f) {
            by_inode.insert((m.dev(), m.ino()), f);
        }
    }
    let mut undone = 0;
    for (pos, dev, ino, off, old, old_size) in writes.into_iter().rev() {
        if synced_until.get(&(dev, ino)).is_some_and(|&s| pos < s) {
            continue;
        }
        let Some(path) = by_inode.get(&(dev, ino)) else {
            continue; // removed since
        };
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&bytes[old], off).unwrap();
        f.set_len(old_size).unwrap();
        undone += 1;
    }
    undone
}

/// An agent run under the power-cut library, with its own data directory.
struct FaultyAgent {
    _dir: tempfile::TempDir,
    _ram: tempfile::TempDir,
    data: PathBuf,
    ram: PathBuf,
    log: PathBuf,
    lib: PathBuf,
    child: Option<Child>,
}

impl FaultyAgent {
    fn start(lib: PathBuf) -> FaultyAgent {
        let dir = tempfile::tempdir().unwrap();
        let ram = tempfile::Builder::new()
            .prefix("spore-test-ram")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let data = dir.path().canonicalize().unwrap().join("data");
        std::fs::create_dir_all(data.join("disks")).unwrap();
        let mut a = FaultyAgent {
            log: dir.path().join("powercut.log"),
            ram: ram.path().to_owned(),
            _dir: dir,
            _ram: ram,
            data,
            lib,
            child: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("agent.log"))
            .unwrap();
        let mut child = Command::new(SPORE)
            .arg("--data-dir")
            .arg(&self.data)
            .args(["agent", "--cache-size", "64M", "--ram-dir"])
            .arg(&self.ram)
            .env("LD_PRELOAD", &self.lib)
            .env("SPORE_POWERCUT_ROOT", self.data.join("disks"))
            .env("SPORE_POWERCUT_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.data.join("api.sock")).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the agent exited with {status} on start-up:\n{}",
                    self.agent_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up in 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    fn agent_log(&self) -> String {
        let all =
            std::fs::read_to_string(self.data.with_extension("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGKILL, then everything not synced is lost; returns the number of
    /// writes rolled back.
    fn power_cut(&mut self) -> usize {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
        apply_power_cut(&self.log, &self.data.join("disks"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(SPORE)
            .env("SPORE_HOME", &self.data)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "spore {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.data.join("nbd.sock").display()
        )
    }

    fn read_all(&self, export: &str) -> Vec<u8> {
        let out = self.data.with_extension("read.raw");
        let _ = std::fs::remove_file(&out);
        sh(Command::new("nbdcopy").arg(self.uri(export)).arg(&out));
        std::fs::read(&out).unwrap()
    }
}

impl Drop for FaultyAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A qemu-io process reading commands from a pipe: one command at a time,
/// each answered when the next prompt appears.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
}

const PROMPT: &str = "qemu-io> ";

impl QemuIo {
    fn open(uri: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, out) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream);
                loop {
                    let buf = match r.fill_buf() {
                        Ok([]) | Err(_) => return,
                        Ok(b) => b,
                    };
                    let s = String::from_utf8_lossy(buf).into_owned();
                    let n = buf.len();
                    r.consume(n);
                    if tx.send(s).is_err() {
                        return;
                    }
                }
            });
        }
        let mut q = QemuIo { child, stdin, out };
        let first = q.until_prompt();
        assert!(first.is_ok(), "qemu-io did not start: {first:?}");
        q
    }

    fn until_prompt(&mut self) -> Result<String, String> {
        let mut got = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !got.ends_with(PROMPT) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(s) => got.push_str(&s),
                Err(_) => return Err(format!("no answer: {got}")),
            }
        }
        Ok(got.trim_end_matches(PROMPT).to_owned())
    }

    /// Runs one command; Ok(output) when it was acknowledged.
    fn cmd(&mut self, c: &str) -> Result<String, String> {
        writeln!(self.stdin, "{c}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let out = self.until_prompt()?;
        if out.contains("failed") || out.contains("rror") {
            return Err(out);
        }
        Ok(out)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a 512-byte sector of the disk may hold after a crash.
const SECTOR: u64 = 512;
/// The sector's image data (the base image is random, so it never equals
/// a filled sector).
const BASE: u16 = 256;
/// A sector that is neither its image data nor one byte repeated.
const GARBAGE: u16 = 257;

/// What the campaign knows of every sector: the value a crash cannot take
/// away, and values written since that a crash may or may not keep.
struct Model {
    stable: Vec<u16>,
    maybe: Vec<Vec<u16>>,
    /// Since the last acknowledged flush: (sector, value) in write order.
    since_flush: Vec<(usize, u16)>,
    /// Every command of the current run and whether it was acknowledged.
    history: Vec<(String, bool)>,
}

impl Model {
    fn new(sectors: usize) -> Model {
        Model {
            stable: vec![BASE; sectors],
            maybe: vec![Vec::new(); sectors],
            since_flush: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Before a write is sent: from now on its value may be there.
    fn sent(&mut self, first: usize, count: usize, value: u16) {
        for s in first..first + count {
            self.maybe[s].push(value);
            self.since_flush.push((s, value));
        }
    }

    /// A FUA write was acknowledged: its value is durable.
    fn durable(&mut self, first: usize, count: usize, value: u16) {
        for s in first..first + count {
            self.stable[s] = value;
            self.maybe[s].clear();
        }
    }

    /// A flush was acknowledged: every write before it is durable.
    fn flushed(&mut self) {
        for (s, v) in std::mem::take(&mut self.since_flush) {
            self.stable[s] = v;
            self.maybe[s].clear();
        }
    }

    /// What a read after the crash found becomes the new stable state.
    fn observed(&mut self, values: &[u16]) {
        self.stable.copy_from_slice(values);
        for m in &mut self.maybe {
            m.clear();
        }
        self.since_flush.clear();
        self.history.clear();
    }
}

fn classify(sector: &[u8], base: &[u8]) -> u16 {
    if sector == base {
        BASE
    } else if sector.iter().all(|&b| b == sector[0]) {
        sector[0] as u16
    } else {
        GARBAGE
    }
}

fn show(v: u16) -> String {
    match v {
        BASE => "image data".into(),
        GARBAGE => "garbage".into(),
        v => format!("0x{v:02x}"),
    }
}

/// One random command for the campaign: (qemu-io command, first sector,
/// sectors, value, FUA). `written` lists granules written before, so that
/// sub-granule writes often land in a granule the overlay already has
/// (the case that was never synced).
fn random_command(
    rng: &mut Rng,
    sectors: usize,
    written: &[usize],
    value: u16,
) -> Option<(String, usize, usize, u16, bool)> {
    let fua = rng.chance(20);
    let f = if fua { "-f " } else { "" };
    let roll = rng.below(100);
    let (first, count, cmd) = if roll < 15 {
        return None; // a flush
    } else if roll < 45 && !written.is_empty() {
        // 512 B .. 3.5 KiB inside a granule the disk already wrote.
        let g = written[rng.below(written.len() as u64) as usize];
        let within = rng.below(8) as usize;
        let count = 1 + rng.below(8 - within as u64) as usize;
        let first = g * 8 + within;
        (first, count, "write")
    } else if roll < 90 {
        let count = [1usize, 2, 3, 8, 9, 16, 64, 128][rng.below(8) as usize];
        let first = rng.below((sectors - count) as u64) as usize;
        (first, count, "write")
    } else {
        let count = [8usize, 16, 128][rng.below(3) as usize];
        let first = rng.below((sectors - count) as u64) as usize;
        let unmap = if rng.chance(50) { "-u " } else { "" };
        let c = format!(
            "write -z {f}{unmap}{} {}",
            first as u64 * SECTOR,
            count as u64 * SECTOR
        );
        return Some((c, first, count, 0, fua));
    };
    let c = format!(
        "{cmd} {f}-P 0x{value:02x} {} {}",
        first as u64 * SECTOR,
        count as u64 * SECTOR
    );
    Some((c, first, count, value, fua))
}

/// A kill -9 and power-cut campaign: qemu-io writes (any sector-aligned
/// size, sub-granule writes into written granules, FUA, zeroes with and
/// without NO_HOLE) and flushes against a disk; the agent is SIGKILLed at
/// a random moment, every write no sync covered is rolled back, the agent
/// restarts on the same directory, and every sector must hold its last
/// durable value or a value written after it.
///
/// fio's nbd engine was the first choice, but it writes without FUA and
/// counts a write as done when it is acknowledged, before the flush that
/// makes it durable, so its crash verify would blame a correct server for
/// losing a write whose flush never completed. qemu-io answers each
/// command as it completes, which gives the exact acknowledged set.
#[test]
fn acknowledged_writes_survive_kill_9_and_a_power_cut() {
    let test = "kill -9 campaign";
    if !spore_testkit::tool("qemu-io", "qemu-utils")
        || !spore_testkit::tool("nbdcopy", "libnbd-bin")
    {
        return;
    }
    let Some(lib) = powercut_library() else {
        return;
    };
    // 50 iterations take about a minute here; the budget stops it earlier
    // on a slow machine (it says how many ran).
    const ITERATIONS: usize = 50;
    const BUDGET: Duration = Duration::from_secs(150);
    const DISK: u64 = 4 * MIB;
    let mut rng = Rng::new(test);
    let mut agent = FaultyAgent::start(lib);
    let base = agent.data.with_extension("base.raw");
    random_file(&base, DISK);
    let base_bytes = std::fs::read(&base).unwrap();
    agent.ok(&["image", "import", base.to_str().unwrap(), "--name", "base"]);
    agent.ok(&["disk", "create", "d", "--image", "base"]);
    let sectors = (DISK / SECTOR) as usize;
    let mut model = Model::new(sectors);
    let started = Instant::now();
    let mut ran = 0;
    let (mut acked, mut undone_total) = (0usize, 0usize);
    for iteration in 0..ITERATIONS {
        if started.elapsed() > BUDGET {
            break;
        }
        ran += 1;
        let uri = agent.uri("disk/d");
        let kill_after = Duration::from_millis(30 + rng.below(400));
        let mut written: Vec<usize> = (0..sectors / 8)
            .filter(|&g| model.stable[g * 8..g * 8 + 8].iter().any(|&v| v != BASE))
            .collect();
        let mut driver_rng = Rng(rng.next() | 1);
        let model_ref = &mut model;
        let ops = std::thread::scope(|s| {
            let driver = s.spawn(move || {
                let mut q = QemuIo::open(&uri);
                let mut n = 0usize;
                let mut value = (iteration * 37 % 255) as u16;
                loop {
                    value = value % 255 + 1;
                    let Some((c, first, count, v, fua)) =
                        random_command(&mut driver_rng, sectors, &written, value)
                    else {
                        let ok = q.cmd("flush").is_ok();
                        model_ref.history.push(("flush".into(), ok));
                        if !ok {
                            return n;
                        }
                        model_ref.flushed();
                        n += 1;
                        continue;
                    };
                    model_ref.sent(first, count, v);
                    let ok = q.cmd(&c).is_ok();
                    model_ref.history.push((c, ok));
                    if !ok {
                        return n;
                    }
                    if fua {
                        model_ref.durable(first, count, v);
                    }
                    for g in first / 8..=(first + count - 1) / 8 {
                        if !written.contains(&g) {
                            written.push(g);
                        }
                    }
                    n += 1;
                }
            });
            std::thread::sleep(kill_after);
            let undone = agent.power_cut();
            let n = driver.join().unwrap();
            (n, undone)
        });
        acked += ops.0;
        undone_total += ops.1;
        agent.spawn();
        let bytes = agent.read_all("disk/d");
        assert_eq!(bytes.len() as u64, DISK);
        let found: Vec<u16> = (0..sectors)
            .map(|s| {
                let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
                classify(&bytes[r.clone()], &base_bytes[r])
            })
            .collect();
        let wrong: Vec<usize> = (0..sectors)
            .filter(|&s| found[s] != model.stable[s] && !model.maybe[s].contains(&found[s]))
            .collect();
        if !wrong.is_empty() {
            let s = wrong[0];
            let off = s as u64 * SECTOR;
            let touching: Vec<String> = model
                .history
                .iter()
                .enumerate()
                .filter(|(_, (c, _))| {
                    let w: Vec<&str> = c.split_whitespace().rev().take(2).collect();
                    let (l, o) = (w[0].parse::<u64>(), w.get(1).map(|o| o.parse::<u64>()));
                    c == "flush"
                        || matches!((o, l), (Some(Ok(o)), Ok(l)) if o <= off && off < o + l)
                })
                .map(|(i, (c, ok))| {
                    format!(
                        "  #{i} {c}{}",
                        if *ok { "" } else { "  (not acknowledged)" }
                    )
                })
                .collect();
            panic!(
                "{test}: iteration {iteration} (agent killed after {kill_after:?}, {} writes rolled \
                 back): {} sectors lost acknowledged data; the first, at offset {off} (granule {}), \
                 holds {} where {} (or {}) was expected. Commands of this run on it, and flushes:\n{}",
                ops.1,
                wrong.len(),
                off / 4096,
                show(found[s]),
                show(model.stable[s]),
                if model.maybe[s].is_empty() {
                    "nothing else".into()
                } else {
                    model.maybe[s].iter().map(|&v| show(v)).collect::<Vec<_>>().join(", ")
                },
                touching[touching.len().saturating_sub(40)..].join("\n")
            );
        }
        model.observed(&found);
    }
    println!(
        "{test}: {ran} kills in {:.1} s, {acked} acknowledged commands, {undone_total} unsynced writes rolled back",
        started.elapsed().as_secs_f64()
    );
    assert!(ran >= 10, "{test}: only {ran} iterations fit in the budget");
    assert!(
        undone_total > 0,
        "{test}: no power cut ever lost anything: the rollback is not working"
    );
}

/// The sub-granule case of the campaign, alone and deterministic: 512-byte
/// writes into a granule the disk already holds, one FUA, one followed by a
/// flush, then kill -9 and a power cut. QEMU sends such writes (spore
/// advertises a minimum block size of 1); they were written without being
/// marked dirty, so neither the FUA nor the flush synced them.
#[test]
fn sub_granule_fua_and_flushed_writes_survive_a_power_cut() {
    let test = "sub-granule writes and a power cut";
    if !spore_testkit::tool("qemu-io", "qemu-utils") {
        return;
    }
    let Some(lib) = powercut_library() else {
        return;
    };
    let mut agent = FaultyAgent::start(lib);
    let base = agent.data.with_extension("base.raw");
    random_file(&base, MIB);
    agent.ok(&["image", "import", base.to_str().unwrap(), "--name", "base"]);
    agent.ok(&["disk", "create", "d", "--image", "base"]);
    let uri = agent.uri("disk/d");
    let mut q = QemuIo::open(&uri);
    for c in [
        "write -P 0xab 0 4k",
        "write -P 0xab 8192 4k",
        "flush",
        "write -f -P 0xcd 512 512",
        "write -P 0xee 9216 512",
        "flush",
    ] {
        q.cmd(c).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    drop(q);
    let undone = agent.power_cut();
    agent.spawn();
    let mut q = QemuIo::open(&uri);
    let mut lost = Vec::new();
    for (check, what) in [
        ("read -P 0xab 0 512", "the granule's first write (flushed)"),
        (
            "read -P 0xcd 512 512",
            "a FUA 512-byte write into a written granule",
        ),
        ("read -P 0xab 1024 3072", "the rest of that granule"),
        (
            "read -P 0xee 9216 512",
            "a 512-byte write into a written granule, then a flush",
        ),
    ] {
        let out = q.cmd(check);
        if out.is_err()
            || out
                .as_ref()
                .is_ok_and(|o| o.contains("Pattern verification"))
        {
            lost.push(format!("{what}: `{check}`: {}", out.unwrap_or_else(|e| e)));
        }
    }
    assert!(
        lost.is_empty(),
        "{test}: after kill -9 and a power cut ({undone} unsynced writes rolled back), \
         acknowledged data is gone:\n{}",
        lost.join("\n")
    );
}

// ------------------------------ 3. trims, zeroes and NBD_CMD_FLAG_NO_HOLE

/// The disk `name`'s WRITTEN, as `disk ls --json` reports it.
fn written_bytes(t: &TestAgent, name: &str) -> u64 {
    let disks = t.json(&["disk", "ls", "--json"]);
    disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("disk {name} not in {disks}"))["written_bytes"]
        .as_u64()
        .unwrap()
}

/// `nbdinfo --map` of `uri`: (offset, length, type) where type has bit 0
/// for a hole and bit 1 for zeroes.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u64)> {
    sh(Command::new("nbdinfo").arg("--map").arg(uri))
        .lines()
        .map(|l| {
            let w: Vec<u64> = l
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().unwrap())
                .collect();
            (w[0], w[1], w[2])
        })
        .collect()
}

/// Extents of `map` overlapping `[from, to)` that are not reported zero.
fn not_zero_in(map: &[(u64, u64, u64)], from: u64, to: u64) -> Vec<(u64, u64, u64)> {
    map.iter()
        .filter(|(o, l, t)| *o < to && o + l > from && t & 2 == 0)
        .copied()
        .collect()
}

/// The holes of `file` inside `[from, to)` (SEEK_HOLE / SEEK_DATA).
fn holes_in(file: &Path, from: u64, to: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        // SAFETY: lseek on a descriptor we own.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 || hole as u64 >= to {
            break;
        }
        // SAFETY: as above.
        let data = unsafe { libc::lseek(f.as_raw_fd(), hole, libc::SEEK_DATA) };
        let end = if data < 0 { to } else { (data as u64).min(to) };
        out.push((hole as u64, end));
        pos = end;
    }
    out
}

/// The agent of `t` (its process id), to attach strace to.
fn agent_pid(t: &TestAgent) -> u32 {
    let dir = t.data_dir().display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.contains(&dir.as_bytes()) && args.contains(&&b"agent"[..]) {
            return pid;
        }
    }
    panic!("no agent process for {dir}");
}

/// Runs `f` with strace on the agent for `syscalls`; returns strace's log.
fn strace_agent(t: &TestAgent, syscalls: &str, f: impl FnOnce()) -> String {
    let out = t.path("strace.out");
    let _ = std::fs::remove_file(&out);
    let mut st = Command::new("strace")
        .args(["-f", "-e", &format!("trace={syscalls}"), "-o"])
        .arg(&out)
        .arg("-p")
        .arg(agent_pid(t).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // strace says "Process N attached" once per thread it attached.
    let mut err = std::io::BufReader::new(st.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("attached"), "strace: {line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    std::thread::sleep(Duration::from_millis(300));
    f();
    // SAFETY: a signal to the strace we started; it detaches and exits.
    unsafe { libc::kill(st.id() as i32, libc::SIGINT) };
    let _ = st.wait();
    std::fs::read_to_string(&out).unwrap_or_default()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = sh(c.arg(uri));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// TRIM and WRITE_ZEROES (trim allowed) over space the disk never wrote
/// leave it unwritten: WRITTEN does not grow and block status says zero
/// (a guest's fstrim must not turn free space into data to move). A
/// WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE (qemu-io's `write -z` without
/// `-u`) punches no hole: over written data the overlay's data file stays
/// allocated, and over unwritten space no `fallocate(PUNCH_HOLE)` is made.
#[test]
fn trim_and_zeroes_of_unwritten_space_stay_unwritten_and_no_hole_is_honoured() {
    let test = "trim, zeroes and NO_HOLE";
    if !spore_testkit::tool("qemu-io", "qemu-utils")
        || !spore_testkit::tool("nbdinfo", "libnbd-bin")
    {
        return;
    }
    let t = TestAgent::start();
    // A 2 GiB image with data in its first 4 MiB, holes after.
    let img = t.path("img.raw");
    common::sparse_random_file(&img, 4 * MIB, 23);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 * GIB)
        .unwrap();
    t.ok(&["image", "import", img.to_str().unwrap(), "--name", "img"]);
    t.ok(&["disk", "create", "d", "--image", "img"]);
    let uri = t.uri("disk/d");
    let data_file = t.data_dir().join("disks/d/data");
    assert!(
        data_file.exists(),
        "no overlay data file at {}",
        data_file.display()
    );
    let mut problems = Vec::new();

    // TRIM of the unwritten second GiB.
    let before = written_bytes(&t, "d");
    qemu_io(&uri, &["discard 1G 1G", "flush"]);
    let after = written_bytes(&t, "d");
    if after > before {
        problems.push(format!(
            "`discard 1G 1G` on never-written space moved WRITTEN from {before} to {after}"
        ));
    }
    let map = nbd_map(&uri);
    let bad = not_zero_in(&map, GIB, 2 * GIB);
    if !bad.is_empty() {
        problems.push(format!(
            "after `discard 1G 1G` nbdinfo --map reports (offset, length, type) {bad:?} in \
             [1G, 2G) as data"
        ));
    }

    // WRITE_ZEROES that may trim (-u) over unwritten space: the same.
    let before = written_bytes(&t, "d");
    qemu_io(&uri, &["write -z -u 512M 64M", "flush"]);
    let after = written_bytes(&t, "d");
    if after > before {
        problems.push(format!(
            "`write -z -u 512M 64M` on never-written zero space moved WRITTEN from {before} to \
             {after}"
        ));
    }
    let bad = not_zero_in(&nbd_map(&uri), 512 * MIB, 576 * MIB);
    if !bad.is_empty() {
        problems.push(format!(
            "after `write -z -u 512M 64M` nbdinfo --map reports {bad:?} as data"
        ));
    }
    // Either way the bytes read as zero.
    qemu_io(
        &uri,
        &["read -P 0 1G 1M", "read -P 0 2047M 1M", "read -P 0 512M 1M"],
    );

    // NO_HOLE over written data: 256 KiB written and flushed, then zeroed
    // without -u; the data file must still hold blocks there.
    let (off, len) = (131072u64, 262144u64);
    qemu_io(&uri, &[&format!("write -P 0x5a {off} {len}"), "flush"]);
    assert!(
        holes_in(&data_file, off, off + len).is_empty(),
        "the written range is not allocated in {}",
        data_file.display()
    );
    qemu_io(&uri, &[&format!("write -z {off} {len}"), "flush"]);
    qemu_io(&uri, &[&format!("read -P 0 {off} {len}")]);
    let holes = holes_in(&data_file, off, off + len);
    if !holes.is_empty() {
        problems.push(format!(
            "`write -z {off} {len}` (NO_HOLE set) over written data left holes {holes:?} in the \
             overlay's data file"
        ));
    }

    // NO_HOLE over unwritten space: no hole punched.
    if spore_testkit::tool("strace", "strace") {
        let (off, len) = (64 * MIB, MIB);
        let log = strace_agent(&t, "fallocate", || {
            qemu_io(&uri, &[&format!("write -z {off} {len}"), "flush"]);
        });
        let punches: Vec<&str> = log.lines().filter(|l| l.contains("PUNCH_HOLE")).collect();
        if !punches.is_empty() {
            problems.push(format!(
                "`write -z {off} {len}` (NO_HOLE set) made {}",
                punches.join("; ")
            ));
        }
        qemu_io(&uri, &[&format!("read -P 0 {off} {len}")]);
    }
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

//! Named fail-points: steps of multi-step operations that a test can make
//! fail, to check that what follows (undo, adoption, recovery) keeps every
//! VM and every byte (the technique of FreeBSD's fail(9) and TiKV's `fail`
//! crate, without their run-time API).
//!
//! The agent reads `SPORE_FAILPOINTS` (names separated by commas) once, at
//! the first check. `NAME` fails every time; `NAME=N` fails the first N
//! times only (so one agent can fail a step and then finish it). Checks
//! sit on rare steps only (an uncontended lock of a small map). Each point says
//! in its doc what failing means there.
//!
//! Points:
//! - `migration-commit-lost`: the source never delivers its commit to the
//!   destination (as if every request were lost on the way).
//! - `migration-after-continue`: the source's job fails right after it
//!   told QEMU to finish the switch (as if QMP broke at that moment).
//! - `migration-disk-first-pass`: the source's first pass over the disk's
//!   written blocks fails (as if the destination refused a batch), before
//!   any memory is copied.
//! - `migration-before-continue`: the source's job fails at the switch
//!   (QEMU paused at `pre-switchover`, the disk's last pass sent) before it
//!   tells QEMU to continue: the source takes the VM back.
//! - `migration-continue-withheld`: the source's job fails right after it
//!   marked the switch as continued, without telling QEMU (as if the
//!   command never reached it): the source must ask the destination, and
//!   resume only on its 404.
//! - `migration-destination-silent`: the destination never says that its
//!   incoming guest runs (as if QEMU were still loading the device state),
//!   so the source must not pause a stalled post-copy.
//! - `clone-start`: a fresh clone fails after its disk was made, before
//!   its QEMU starts.
//! - `standby-refill`: a standby clone fails the same way.
//! - `capture-save-state`, `capture-commit`, `capture-place-ram`: a
//!   template capture fails while the source is paused, at saving its
//!   device state, committing its disk's layer, or moving its RAM file to
//!   the template's.
//! - `capture-store`: a template capture fails after the source was paused
//!   and resumed, where storing the RAM image and the bundle could fail.
//! - `template-rm-standbys`: `template rm` fails once the template is
//!   marked as being removed and its standbys are gone, before its images.
//! - `template-rm-images`: `template rm` fails after the first of the
//!   template's images (its RAM) was removed.
//!
//! Stall-points (`SPORE_STALLPOINTS`, names separated by commas) hold an
//! operation at a step instead, the first time it is reached in this
//! process: the agent logs `stall-point NAME reached` and waits (up to
//! 10 minutes), so that a test can kill it there (`kill -9`) and check what
//! the next start finishes or rolls back.
//! - `commit-layer`: a disk commit whose layer is written, before the new
//!   image's name is recorded.
//! - `capture-paused`: a template capture with the source VM paused and its
//!   device state saved, before its disk is committed.
//! - `pull-fetching`: an image pull that has fetched some of its chunks.
//! - `migration-incoming-blocks`: an incoming migration at the first batch
//!   of disk blocks from the source (its QEMU waiting for the stream).
//! - `migration-outgoing-active`: an outgoing migration once QEMU streams
//!   the guest's RAM to the destination.
//! - `push-sending`: an image push that has sent its first batch of
//!   chunks, before the name is bound at the destination.
//! - `gc-sweeping`: a garbage collection that has deleted one unreferenced
//!   chunk of several.

use std::collections::HashMap;
use std::sync::OnceLock;

use parking_lot::Mutex;

/// The environment variable that names the active points.
pub const ENV: &str = "SPORE_FAILPOINTS";

/// Active points: how many more times each fails (`None`: always).
fn active() -> &'static Mutex<HashMap<String, Option<u32>>> {
    static ACTIVE: OnceLock<Mutex<HashMap<String, Option<u32>>>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        let points = parse(&std::env::var(ENV).unwrap_or_default());
        if !points.is_empty() {
            tracing::warn!(points = ?points, "fail-points are active (testing only)");
        }
        Mutex::new(points)
    })
}

/// `a,b=2` -> {a: always, b: twice}.
fn parse(spec: &str) -> HashMap<String, Option<u32>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| match p.split_once('=') {
            Some((name, n)) => (name.to_owned(), Some(n.parse().unwrap_or(1))),
            None => (p.to_owned(), None),
        })
        .collect()
}

/// True when the point `name` is to fail now.
pub fn hit(name: &str) -> bool {
    let mut points = active().lock();
    let hit = match points.get_mut(name) {
        None | Some(Some(0)) => false,
        Some(None) => true,
        Some(Some(n)) => {
            *n -= 1;
            true
        }
    };
    if hit {
        tracing::warn!(point = name, "fail-point hit");
    }
    hit
}

/// The environment variable that names the active stall-points.
pub const STALL_ENV: &str = "SPORE_STALLPOINTS";

/// Holds the calling thread at stall-point `name` when it is active and
/// not reached before in this process (see the module doc).
pub fn stall(name: &str) {
    static REACHED: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let spec = std::env::var(STALL_ENV).unwrap_or_default();
    if !spec.split(',').any(|p| p.trim() == name) {
        return;
    }
    if !REACHED
        .get_or_init(Default::default)
        .lock()
        .insert(name.to_owned())
    {
        return;
    }
    tracing::warn!(
        point = name,
        "stall-point {name} reached; waiting (testing only)"
    );
    eprintln!("stall-point {name} reached");
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fail_always_or_a_given_number_of_times() {
        let p = parse(" a, b=2 ,,c=x");
        assert_eq!(p["a"], None);
        assert_eq!(p["b"], Some(2));
        assert_eq!(p["c"], Some(1));
        assert_eq!(p.len(), 3);
    }
}

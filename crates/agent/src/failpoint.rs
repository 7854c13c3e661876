//! Named fail-points: steps of multi-step operations that a test can make
//! fail, to check that what follows (undo, adoption, recovery) keeps every
//! VM and every byte (the technique of FreeBSD's fail(9) and TiKV's `fail`
//! crate, without their run-time API).
//!
//! The agent reads `SPORE_FAILPOINTS` (names separated by commas) once, at
//! the first check. Unset, every check is one relaxed load of a cached
//! empty set. Each point says in its doc what failing means there.
//!
//! Points:
//! - `migration-commit-lost`: the source never delivers its commit to the
//!   destination (as if every request were lost on the way).
//! - `migration-after-continue`: the source's job fails right after it
//!   told QEMU to finish the switch (as if QMP broke at that moment).
//! - `migration-destination-silent`: the destination never says that its
//!   incoming guest runs (as if QEMU were still loading the device state),
//!   so the source must not pause a stalled post-copy.
//! - `clone-start`: a fresh clone fails after its disk was made, before
//!   its QEMU starts.
//! - `standby-refill`: a standby clone fails the same way.
//! - `capture-store`: a template capture fails after the source was paused
//!   and resumed, where storing the RAM image and the bundle could fail.

use std::collections::HashSet;
use std::sync::OnceLock;

/// The environment variable that names the active points.
pub const ENV: &str = "SPORE_FAILPOINTS";

fn active() -> &'static HashSet<String> {
    static ACTIVE: OnceLock<HashSet<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        let set: HashSet<String> = std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !set.is_empty() {
            tracing::warn!(points = ?set, "fail-points are active (testing only)");
        }
        set
    })
}

/// True when the point `name` is to fail now.
pub fn hit(name: &str) -> bool {
    let hit = active().contains(name);
    if hit {
        tracing::warn!(point = name, "fail-point hit");
    }
    hit
}

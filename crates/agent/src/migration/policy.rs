//! When a live migration should stop iterating: the decisions of the
//! `auto`, `postcopy`, `precopy` and `auto-converge` policies.
//!
//! Pure logic over QEMU's progress reports, so that it can be tested
//! without a VM. The algorithm is written down in docs/migration.md.
//!
//! `auto` first asks QEMU for a one-second dirty-rate sample while the
//! first pass runs (page sampling: content that changed). A guest writing
//! at 80 % of the link or more, or fast enough that the passes after the
//! first would take more than [`MAX_PREDICTED_PASSES`], is switched during
//! the first pass: every page sent before the switch that the guest then
//! rewrites would be sent twice. Otherwise the sample stands in for QEMU's
//! dirty rate until QEMU has measured one.
//!
//! Then it looks at each pass over memory as it ends (QEMU's dirty-sync
//! count goes up), and asks whether pre-copy will get the remaining memory
//! under the downtime limit:
//!
//! - done: what remains fits the limit at the link's measured speed; QEMU
//!   finishes on its own.
//! - memory pattern (after the seed's MP): the guest dirties memory at 80 %
//!   or more of the link's speed; each pass leaves nearly as much as it sent.
//! - frequently referenced set (after FRS): the pass left at least 90 % of
//!   what the previous pass left: the same pages are written again and
//!   again.
//! - prediction: remaining shrinks by dirty/link per pass; more than
//!   [`MAX_PREDICTED_PASSES`] more passes to reach the limit.
//! - a hard cap of [`MAX_PASSES`] passes.
//!
//! Any of the last four switches to post-copy at once. Where post-copy is
//! not allowed, the guest is throttled instead (QEMU's CPU throttle, raised
//! each pass that still does not converge) and, once the throttle is at its
//! maximum for [`RELAX_AFTER`] passes, the downtime limit is raised to what
//! the remaining memory needs: a longer pause rather than a migration that
//! never ends.

use spore_api::MigrationPolicy;
use spore_qemu::Progress;

pub const MAX_PASSES: u64 = 10;
pub const MAX_PREDICTED_PASSES: f64 = 5.0;
/// Dirtying at this fraction of the link or faster: the memory pattern
/// rule.
pub const MP_RATIO: f64 = 0.8;
/// A pass that leaves this fraction of the previous pass's remainder or
/// more: the frequently-referenced-set rule.
pub const FRS_RATIO: f64 = 0.9;
pub const RELAX_AFTER: u32 = 2;
/// The pause `auto` plans pre-copy for (QEMU's `downtime-limit`, at most
/// the user's limit): it switches to post-copy rather than let pre-copy use
/// a longer pause. The switch itself costs 10–25 ms more than the memory
/// left (device state, the destination loading it and starting), so 30 ms
/// of memory keeps the whole pause near 50 ms. (Small limits mean many
/// dirty-bitmap syncs, which on QEMU before 9.0 under TCG lost guest
/// writes; spore's TCG RAM sizing avoids that, docs/migration.md.)
pub const AUTO_TARGET_MS: u64 = 30;
const THROTTLE_FIRST: u64 = 30;
const THROTTLE_STEP: u64 = 20;
const THROTTLE_MAX: u64 = 99;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Postcopy,
    /// Throttle the guest's CPUs to this percentage.
    Throttle(u64),
    /// Raise the downtime limit to this many milliseconds.
    RelaxDowntime(u64),
}

/// An action and why it was taken (reported to the user).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Option<Action>,
    pub why: String,
}

#[derive(Debug)]
pub struct Policy {
    kind: MigrationPolicy,
    allow_postcopy: bool,
    max_downtime_ms: u64,
    bandwidth: Option<u64>,
    /// The pass count seen last.
    pass: u64,
    /// What remained at the end of the previous pass.
    prev_remaining: Option<u64>,
    switched: bool,
    /// The dirty rate QEMU sampled during the first pass, if any.
    sampled: Option<u64>,
    /// The highest throughput QEMU has reported (bytes/s).
    fastest: u64,
    throttle: u64,
    passes_at_max_throttle: u32,
    relaxed: bool,
}

impl Policy {
    pub fn new(
        kind: MigrationPolicy,
        allow_postcopy: bool,
        max_downtime_ms: u64,
        bandwidth: Option<u64>,
    ) -> Self {
        Policy {
            kind,
            allow_postcopy,
            max_downtime_ms,
            bandwidth,
            pass: 0,
            prev_remaining: None,
            switched: false,
            sampled: None,
            fastest: 0,
            throttle: 0,
            passes_at_max_throttle: 0,
            relaxed: false,
        }
    }

    /// The downtime pre-copy plans for (QEMU's `downtime-limit`): `auto`
    /// aims at [`AUTO_TARGET_MS`] when post-copy can bound the pause
    /// instead; the other policies take the user's limit.
    pub fn downtime_target_ms(&self) -> u64 {
        match self.kind {
            MigrationPolicy::Auto if self.allow_postcopy => {
                self.max_downtime_ms.min(AUTO_TARGET_MS)
            }
            _ => self.max_downtime_ms,
        }
    }

    /// Whether the migration needs QEMU's post-copy capability.
    pub fn may_postcopy(&self) -> bool {
        match self.kind {
            MigrationPolicy::Postcopy => true,
            MigrationPolicy::Auto => self.allow_postcopy,
            _ => false,
        }
    }

    /// The link's speed: the fastest QEMU has measured it so far (a period
    /// in which QEMU had little to send, such as the zero pages at the end
    /// of a pass, says nothing about the link), else the average so far;
    /// never above the configured cap.
    fn link(&self, p: &Progress) -> u64 {
        let avg = (p.ram_transferred * 1000)
            .checked_div(p.total_ms)
            .unwrap_or(0);
        let measured = match self.fastest.max(p.throughput) {
            0 => avg,
            m => m,
        };
        match self.bandwidth {
            Some(b) if b > 0 && measured > 0 => measured.min(b),
            Some(b) if b > 0 => b,
            _ => measured,
        }
    }

    /// Looks at one progress report (call it with every one); returns a
    /// decision when a pass ended and something was decided (or is worth
    /// saying).
    pub fn observe(&mut self, p: &Progress) -> Option<Decision> {
        self.fastest = self.fastest.max(p.throughput);
        if p.status != "active" || self.switched || p.passes <= self.pass {
            return None;
        }
        self.pass = p.passes;
        // Pass 1 sends everything; its end is the first time the dirty
        // pattern is known.
        if p.passes < 2 {
            return None;
        }
        let prev = self.prev_remaining.replace(p.ram_remaining);
        match self.kind {
            MigrationPolicy::Precopy | MigrationPolicy::AutoConverge => None,
            MigrationPolicy::Postcopy => {
                self.switched = true;
                Some(Decision {
                    action: Some(Action::Postcopy),
                    why: "first pass done: switch to post-copy (policy postcopy)".into(),
                })
            }
            MigrationPolicy::Auto => self.auto(p, prev),
        }
    }

    /// The bandwidth QEMU itself judges the switch by: what it measured
    /// in its last period (never above the cap), else the link estimate.
    fn qemu_bandwidth(&self, p: &Progress) -> u64 {
        match (p.throughput, self.bandwidth) {
            (0, _) => self.link(p),
            (t, Some(b)) if b > 0 => t.min(b),
            (t, _) => t,
        }
    }

    fn auto(&mut self, p: &Progress, prev: Option<u64>) -> Option<Decision> {
        let link = self.link(p);
        let remaining = p.ram_remaining;
        let target = self.downtime_target_ms();
        let budget = link.saturating_mul(target) / 1000;
        let mb = |b: u64| b as f64 / 1e6;
        if link == 0 {
            return None;
        }
        // Pre-copy finishes when what is left fits the downtime at the
        // speed QEMU measures now, not at the fastest the link ever was: a
        // link that got slower keeps QEMU from switching while a remainder
        // between the two budgets would look done here forever.
        let qemu_bw = self.qemu_bandwidth(p);
        if remaining <= qemu_bw.saturating_mul(target) / 1000 {
            return Some(Decision {
                action: None,
                why: format!(
                    "pass {}: {:.1} MB left fits {} ms at {:.1} MB/s; pre-copy finishes",
                    p.passes,
                    mb(remaining),
                    target,
                    mb(qemu_bw)
                ),
            });
        }
        // QEMU measures the dirty rate from the second pass's end on; until
        // then the sample stands in.
        let (dirty, how) = match (p.dirty_rate, self.sampled) {
            (0, Some(s)) => (s, "writing (sampled)"),
            (d, _) => (d, "dirtying"),
        };
        let ratio = dirty as f64 / link as f64;
        let reason = if dirty > 0 && ratio >= MP_RATIO {
            Some(format!(
                "memory pattern: {how} {:.1} MB/s against a {:.1} MB/s link ({:.0} %)",
                mb(dirty),
                mb(link),
                ratio * 100.0
            ))
        } else if let Some(prev) = prev.filter(|&prev| remaining as f64 >= FRS_RATIO * prev as f64)
        {
            Some(format!(
                "frequently referenced set: {:.1} MB left after this pass, {:.1} MB after the last",
                mb(remaining),
                mb(prev)
            ))
        } else if dirty > 0 && predicted_passes(remaining, budget, ratio) > MAX_PREDICTED_PASSES {
            Some(format!(
                "prediction: {:.1} MB left shrinks to {:.0} % per pass; more than {MAX_PREDICTED_PASSES} passes to fit {} ms",
                mb(remaining),
                ratio * 100.0,
                target
            ))
        } else if p.passes >= MAX_PASSES {
            Some(format!("{} passes without converging", p.passes))
        } else {
            None
        };
        self.react(&format!("pass {}", p.passes), reason?, remaining, link)
    }

    /// Whether the policy wants QEMU's sampled dirty rate during the first
    /// pass ([`Policy::observe_sampled`]).
    pub fn wants_sample(&self) -> bool {
        self.kind == MigrationPolicy::Auto
    }

    /// The guest's dirty rate as QEMU sampled it while the first pass runs
    /// (distinct bytes written per second). The memory pattern rule needs
    /// no finished pass: a guest that writes as fast as the link carries
    /// will not converge, and every byte of the first pass sent before the
    /// switch is a byte post-copy sends again if the guest rewrites it.
    pub fn observe_sampled(&mut self, rate: u64, p: &Progress) -> Option<Decision> {
        if self.kind != MigrationPolicy::Auto || self.switched || p.status != "active" {
            return None;
        }
        let link = self.link(p);
        if link == 0 {
            return None;
        }
        // Several samples: the guest is as busy as the busiest one showed
        // (and only a new busiest one is worth a line in the report).
        let busiest = self.sampled.is_none_or(|s| rate > s);
        self.sampled = self.sampled.max(Some(rate));
        let mb = |b: u64| b as f64 / 1e6;
        let ratio = rate as f64 / link as f64;
        let sampled = format!(
            "writing {:.1} MB/s (sampled) against a {:.1} MB/s link ({:.0} %)",
            mb(rate),
            mb(link),
            ratio * 100.0
        );
        let at = format!("pass {}", p.passes);
        if ratio >= MP_RATIO {
            let reason = format!("memory pattern: {sampled}");
            return self.react(&at, reason, p.ram_remaining, link);
        }
        if !busiest {
            return None;
        }
        // No prediction yet: what the first pass leaves is not known, and
        // a one-second rate stretched over the rest of the pass wildly
        // overestimates it (an idle guest just after boot would switch).
        Some(Decision {
            action: None,
            why: format!("{at}: {sampled}: pre-copy may converge; watching the passes"),
        })
    }

    /// What `auto` does once pre-copy is judged not to converge.
    fn react(&mut self, at: &str, reason: String, remaining: u64, link: u64) -> Option<Decision> {
        if self.allow_postcopy {
            self.switched = true;
            return Some(Decision {
                action: Some(Action::Postcopy),
                why: format!("{at}: {reason}: switch to post-copy"),
            });
        }
        if self.throttle < THROTTLE_MAX {
            self.throttle = if self.throttle == 0 {
                THROTTLE_FIRST
            } else {
                (self.throttle + THROTTLE_STEP).min(THROTTLE_MAX)
            };
            return Some(Decision {
                action: Some(Action::Throttle(self.throttle)),
                why: format!(
                    "{at}: {reason}: post-copy not allowed, throttle the guest to {} %",
                    self.throttle
                ),
            });
        }
        self.passes_at_max_throttle += 1;
        if self.passes_at_max_throttle >= RELAX_AFTER && !self.relaxed {
            self.relaxed = true;
            // What the rest needs at this speed, with a margin.
            let ms = (remaining * 1000 / link) * 5 / 4 + 1;
            return Some(Decision {
                action: Some(Action::RelaxDowntime(ms)),
                why: format!(
                    "{at}: {reason} even at the maximum throttle: allow a {ms} ms pause to finish"
                ),
            });
        }
        None
    }
}

/// Passes until `remaining` shrinks to `budget` when each pass leaves
/// `ratio` of what it sent.
fn predicted_passes(remaining: u64, budget: u64, ratio: f64) -> f64 {
    if remaining <= budget {
        return 0.0;
    }
    if ratio >= 1.0 {
        return f64::INFINITY;
    }
    (budget.max(1) as f64 / remaining as f64).ln() / ratio.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn pass(n: u64, remaining: u64, dirty: u64, link: u64) -> Progress {
        Progress {
            status: "active".into(),
            total_ms: 1000 * n,
            ram_total: 512 * MB,
            ram_transferred: 100 * MB * n,
            ram_remaining: remaining,
            passes: n,
            dirty_rate: dirty,
            throughput: link,
            ..Default::default()
        }
    }

    fn auto() -> Policy {
        Policy::new(MigrationPolicy::Auto, true, 300, None)
    }

    #[test]
    fn a_slow_period_at_the_end_of_a_pass_does_not_make_the_link_slow() {
        // The demo's idle guest: pass 1 sent at 11 MB/s, then QEMU's last
        // period (zero pages) measured 0.8 MB/s as the sample came in.
        let mut p = Policy::new(MigrationPolicy::Auto, true, 300, Some(11 * MB));
        let mut busy = pass(1, 300 * MB, 0, 11 * MB);
        busy.total_ms = 100_000;
        assert_eq!(p.observe(&busy), None);
        let mut idle = pass(1, 2 * MB, 0, MB * 8 / 10);
        idle.total_ms = 100_000;
        let d = p.observe_sampled(MB, &idle).unwrap();
        assert_eq!(d.action, None, "{}", d.why);
        assert!(d.why.contains("11.0 MB/s link"), "{}", d.why);
    }

    #[test]
    fn nothing_is_decided_during_the_first_pass_or_twice_per_pass() {
        let mut p = auto();
        assert_eq!(p.observe(&pass(1, 400 * MB, 0, 50 * MB)), None);
        let d = p.observe(&pass(2, 200 * MB, 100 * MB, 50 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert_eq!(p.observe(&pass(2, 200 * MB, 100 * MB, 50 * MB)), None);
        assert_eq!(p.observe(&pass(3, 200 * MB, 100 * MB, 50 * MB)), None);
    }

    #[test]
    fn a_remainder_that_fits_the_limit_is_left_to_qemu() {
        let mut p = auto();
        // AUTO_TARGET_MS (30 ms) at 50 MB/s: 1.5 MB
        let d = p.observe(&pass(2, MB, MB, 50 * MB)).unwrap();
        assert_eq!(d.action, None);
        assert!(d.why.contains("pre-copy finishes"), "{}", d.why);
    }

    #[test]
    fn the_memory_pattern_rule_switches_when_dirtying_near_the_link_speed() {
        let mut p = auto();
        let d = p.observe(&pass(2, 100 * MB, 45 * MB, 50 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("memory pattern"), "{}", d.why);
    }

    #[test]
    fn the_frequently_referenced_set_rule_needs_two_passes() {
        let mut p = auto();
        // 20 % dirty rate: converging by prediction, no switch yet
        assert_eq!(
            p.observe(&pass(2, 100 * MB, 10 * MB, 50 * MB))
                .and_then(|d| d.action),
            None
        );
        let d = p.observe(&pass(3, 95 * MB, 10 * MB, 50 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("frequently referenced"), "{}", d.why);
    }

    #[test]
    fn a_slow_convergence_is_cut_short_by_the_prediction() {
        let mut p = auto();
        // 70 % ratio from 500 MB to a 15 MB budget: about 10 passes
        let d = p.observe(&pass(2, 500 * MB, 35 * MB, 50 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("prediction"), "{}", d.why);
    }

    #[test]
    fn without_postcopy_auto_throttles_then_relaxes_the_limit() {
        let mut p = Policy::new(MigrationPolicy::Auto, false, 300, None);
        let mut actions = Vec::new();
        for n in 2..12 {
            if let Some(d) = p.observe(&pass(n, 100 * MB, 60 * MB, 50 * MB)) {
                actions.push(d.action.unwrap());
            }
        }
        assert_eq!(
            actions[..4],
            [
                Action::Throttle(30),
                Action::Throttle(50),
                Action::Throttle(70),
                Action::Throttle(90)
            ]
        );
        assert_eq!(actions[4], Action::Throttle(99));
        // 100 MB at 50 MB/s = 2000 ms, plus a quarter
        assert_eq!(actions[5], Action::RelaxDowntime(2501));
        assert_eq!(actions.len(), 6, "{actions:?}");
    }

    #[test]
    fn postcopy_switches_after_the_first_pass_and_precopy_never_acts() {
        let mut p = Policy::new(MigrationPolicy::Postcopy, true, 300, None);
        assert!(p.may_postcopy());
        assert_eq!(p.observe(&pass(1, 400 * MB, 0, 50 * MB)), None);
        assert_eq!(
            p.observe(&pass(2, MB, 0, 50 * MB)).unwrap().action,
            Some(Action::Postcopy)
        );
        for kind in [MigrationPolicy::Precopy, MigrationPolicy::AutoConverge] {
            let mut p = Policy::new(kind, true, 300, None);
            assert!(!p.may_postcopy());
            for n in 1..20 {
                assert_eq!(p.observe(&pass(n, 100 * MB, 90 * MB, 50 * MB)), None);
            }
        }
    }

    #[test]
    fn a_sampled_rate_near_the_link_switches_during_the_first_pass() {
        let mut p = auto();
        assert!(p.wants_sample());
        let d = p
            .observe_sampled(64 * MB, &pass(1, 480 * MB, 0, 22 * MB))
            .unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(
            d.why
                .starts_with("pass 1: memory pattern: writing 64.0 MB/s (sampled)"),
            "{}",
            d.why
        );
        // switched: nothing more to decide
        assert_eq!(p.observe(&pass(2, 100 * MB, 60 * MB, 22 * MB)), None);
        assert_eq!(
            p.observe_sampled(64 * MB, &pass(2, 100 * MB, 0, 22 * MB)),
            None
        );
    }

    #[test]
    fn a_low_sampled_rate_leaves_the_decision_to_the_passes() {
        let mut p = auto();
        let d = p
            .observe_sampled(2 * MB, &pass(1, 480 * MB, 0, 22 * MB))
            .unwrap();
        assert_eq!(d.action, None);
        assert!(d.why.contains("may converge"), "{}", d.why);
        // A quieter or equal sample adds nothing to say; a busier one does.
        assert!(p
            .observe_sampled(MB, &pass(1, 400 * MB, 0, 22 * MB))
            .is_none());
        assert!(p
            .observe_sampled(2 * MB, &pass(1, 380 * MB, 0, 22 * MB))
            .is_none());
        let d = p
            .observe_sampled(3 * MB, &pass(1, 360 * MB, 0, 22 * MB))
            .unwrap();
        assert!(d.why.contains("writing 3.0 MB/s"), "{}", d.why);
        let d = p.observe(&pass(2, 100 * MB, 20 * MB, 22 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("memory pattern: dirtying"), "{}", d.why);
    }

    #[test]
    fn a_sampled_rate_below_the_link_predicts_once_the_first_pass_ends() {
        let mut p = auto();
        let d = p
            .observe_sampled(15 * MB, &pass(1, 480 * MB, 0, 22 * MB + MB / 2))
            .unwrap();
        assert_eq!(d.action, None);
        // 67 %: 64 MB left, about 10 passes to 1.1 MB
        let d = p.observe(&pass(2, 64 * MB, 0, 22 * MB + MB / 2)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("prediction"), "{}", d.why);
        // an idle guest's first pass leaves little: pre-copy finishes
        let mut p = auto();
        p.observe_sampled(8 * MB, &pass(1, 480 * MB, 0, 22 * MB));
        let d = p.observe(&pass(2, MB / 2, 0, 22 * MB)).unwrap();
        assert_eq!(d.action, None);
    }

    #[test]
    fn the_sample_stands_in_until_qemu_measures_the_dirty_rate() {
        let mut p = auto();
        let d = p
            .observe_sampled(10 * MB, &pass(1, MB, 0, 22 * MB))
            .unwrap();
        assert_eq!(d.action, None);
        let d = p.observe(&pass(2, 50 * MB, 0, 12 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("writing (sampled) 10.0 MB/s"), "{}", d.why);
    }

    #[test]
    fn a_sampled_rate_without_postcopy_throttles_and_other_policies_ignore_it() {
        let mut p = Policy::new(MigrationPolicy::Auto, false, 300, None);
        let d = p
            .observe_sampled(64 * MB, &pass(1, 480 * MB, 0, 22 * MB))
            .unwrap();
        assert_eq!(d.action, Some(Action::Throttle(30)));
        for kind in [
            MigrationPolicy::Precopy,
            MigrationPolicy::Postcopy,
            MigrationPolicy::AutoConverge,
        ] {
            let mut p = Policy::new(kind, true, 300, None);
            assert!(!p.wants_sample());
            assert_eq!(
                p.observe_sampled(64 * MB, &pass(1, 480 * MB, 0, 22 * MB)),
                None
            );
        }
    }

    #[test]
    fn the_bandwidth_cap_bounds_the_link_estimate() {
        let mut p = Policy::new(MigrationPolicy::Auto, true, 300, Some(10 * MB));
        // 8 MB/s dirtying is 16 % of the measured 50 MB/s, but 80 % of the cap
        let d = p.observe(&pass(2, 100 * MB, 8 * MB, 50 * MB)).unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
    }

    #[test]
    fn passes_are_capped() {
        let mut p = auto();
        let mut last = None;
        // converging slowly but steadily, below every other rule
        let mut remaining = 400 * MB;
        for n in 2..=MAX_PASSES {
            remaining = remaining * 85 / 100;
            last = p.observe(&pass(n, remaining, 0, 50 * MB));
            if last.as_ref().and_then(|d| d.action.clone()).is_some() {
                break;
            }
        }
        let d = last.unwrap();
        assert_eq!(d.action, Some(Action::Postcopy));
        assert!(d.why.contains("passes without converging"), "{}", d.why);
    }

    #[test]
    fn a_link_that_gets_slower_switches_to_postcopy_instead_of_timing_out() {
        // Fast at first (100 MB/s), then 10 MB/s: 1.5 MB left would fit
        // 300 ms at the fastest speed seen but never at QEMU's current
        // one, so QEMU would never switch over by itself.
        let mut p = auto();
        assert_eq!(p.observe(&pass(1, 200 * MB, 0, 100 * MB)), None);
        let mut switched = None;
        for n in 2..=super::MAX_PASSES {
            let d = p.observe(&pass(n, 3 * MB / 2, MB / 10, 10 * MB));
            if let Some(d) = d {
                assert_ne!(
                    d.action, None,
                    "pass {n}: said pre-copy finishes at 10 MB/s: {}",
                    d.why
                );
                switched = Some((n, d));
                break;
            }
        }
        let (n, d) = switched.expect("never switched: the migration would time out");
        assert_eq!(d.action, Some(Action::Postcopy), "{}", d.why);
        assert!(n <= 3, "switched only at pass {n}: {}", d.why);
    }
}

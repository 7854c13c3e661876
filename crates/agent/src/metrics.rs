//! Prometheus text exposition of the agent's counters.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use crate::agent::Agent;

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(a: &Agent) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let cache = a.exports.cache();
    let s = cache.stats();
    metric(
        "spore_cache_hits_total",
        "counter",
        "Chunk cache hits.",
        vec![(String::new(), s.hits.load(Relaxed))],
    );
    metric(
        "spore_cache_misses_total",
        "counter",
        "Chunk cache misses.",
        vec![(String::new(), s.misses.load(Relaxed))],
    );
    metric(
        "spore_cache_bytes",
        "gauge",
        "Bytes of chunk data cached.",
        vec![(String::new(), cache.bytes() as u64)],
    );
    let st = a.store.stats();
    metric(
        "spore_store_chunks_written_total",
        "counter",
        "Chunks written to the store.",
        vec![(String::new(), st.chunks_written.load(Relaxed))],
    );
    metric(
        "spore_store_chunks_read_total",
        "counter",
        "Chunks read (and verified) from the store.",
        vec![(String::new(), st.chunks_read.load(Relaxed))],
    );
    if let Some(f) = &a.fetcher {
        let per_remote = |g: &dyn Fn(&spore_transfer::remote::RemoteStats) -> u64| {
            f.remotes()
                .iter()
                .map(|r| (format!("{{remote=\"{}\"}}", r.url()), g(&r.stats)))
                .collect::<Vec<_>>()
        };
        metric(
            "spore_fetch_chunks_total",
            "counter",
            "Chunks fetched, by source.",
            per_remote(&|s| s.chunks.load(Relaxed)),
        );
        metric(
            "spore_fetch_bytes_total",
            "counter",
            "Bytes fetched, by source.",
            per_remote(&|s| s.bytes.load(Relaxed)),
        );
        metric(
            "spore_fetch_corrupt_total",
            "counter",
            "Chunks a source sent that failed verification.",
            per_remote(&|s| s.corrupt.load(Relaxed)),
        );
        metric(
            "spore_fetch_failures_total",
            "counter",
            "Failed requests, by source.",
            per_remote(&|s| s.failures.load(Relaxed)),
        );
        metric(
            "spore_fetch_hedged_total",
            "counter",
            "Requests also sent to a further source because the one asked was late for a waiting reader.",
            vec![(String::new(), f.stats.hedged.load(Relaxed))],
        );
        metric(
            "spore_fetch_deadlines_total",
            "counter",
            "Reads whose chunk did not arrive within the read deadline (the read failed and the VM paused).",
            vec![(String::new(), f.stats.deadlines.load(Relaxed))],
        );
    }
    let completions = a.images.completions();
    metric(
        "spore_image_completion_chunks_left",
        "gauge",
        "Chunks an image completing in the background still lacks.",
        completions
            .iter()
            .map(|(name, c)| {
                (
                    format!("{{image=\"{}\"}}", escape_label(name)),
                    c.chunks_left,
                )
            })
            .collect(),
    );
    metric(
        "spore_image_completion_waiting",
        "gauge",
        "1 while an image's background completion waits to try again after a failed fetch.",
        completions
            .iter()
            .map(|(name, c)| {
                (
                    format!("{{image=\"{}\"}}", escape_label(name)),
                    u64::from(c.waiting_for.is_some()),
                )
            })
            .collect(),
    );
    metric(
        "spore_peer_served_chunks_total",
        "counter",
        "Chunks served to other hosts.",
        vec![(String::new(), a.peer_stats.chunks.load(Relaxed))],
    );
    metric(
        "spore_peer_served_bytes_total",
        "counter",
        "Bytes served to other hosts.",
        vec![(String::new(), a.peer_stats.bytes.load(Relaxed))],
    );
    metric(
        "spore_peer_refused_total",
        "counter",
        "Peer requests refused for the caller's certificate (a missing role, revoked).",
        vec![(String::new(), a.peer_refused.load(Relaxed))],
    );
    metric(
        "spore_peer_privileged_total",
        "counter",
        "Privileged peer requests admitted: pushes, name binds, migrations in, remote API calls (each also a log line with the caller's identity).",
        vec![(String::new(), a.peer_privileged.load(Relaxed))],
    );
    metric(
        "spore_peer_crl_reloads_total",
        "counter",
        "Revocation lists put in force without a restart.",
        vec![(
            String::new(),
            a.server_tls.as_ref().map_or(0, |t| t.crl_reloads()),
        )],
    );
    metric(
        "spore_peer_tls_failures_total",
        "counter",
        "Peer connections closed before a request: failed or slow TLS handshakes, too many connections; and migration-stream connections the relay refused.",
        vec![(String::new(), a.tls_failures.load(Relaxed))],
    );
    metric(
        "spore_api_refused_total",
        "counter",
        "API connections refused for the caller's credentials (SO_PEERCRED).",
        vec![(String::new(), a.api_refused.load(Relaxed))],
    );
    if let Some(o) = &a.origin_store {
        let st = o.stats();
        let label = format!("{{store=\"{}\"}}", escape_label(o.spec()));
        let one = |v: &std::sync::atomic::AtomicU64| vec![(label.clone(), v.load(Relaxed))];
        metric(
            "spore_origin_store_chunks_written_total",
            "counter",
            "Chunks pushed into the origin store.",
            one(&st.chunks_written),
        );
        metric(
            "spore_origin_store_bytes_written_total",
            "counter",
            "Bytes pushed into the origin store.",
            one(&st.bytes_written),
        );
        metric(
            "spore_origin_store_chunks_read_total",
            "counter",
            "Chunks read from the origin store (served, or checked before a name is bound).",
            one(&st.chunks_read),
        );
        metric(
            "spore_origin_store_bytes_read_total",
            "counter",
            "Bytes read from the origin store.",
            one(&st.bytes_read),
        );
    }
    let disks = a.exports.disks();
    let per_disk = |f: &dyn Fn(&spore_blockdev::IoStats) -> u64| {
        disks
            .iter()
            .map(|(n, d)| (format!("{{disk=\"{n}\"}}"), f(d.stats())))
            .collect::<Vec<_>>()
    };
    metric(
        "spore_disk_reads_total",
        "counter",
        "Read requests per disk.",
        per_disk(&|s| s.reads.load(Relaxed)),
    );
    metric(
        "spore_disk_read_bytes_total",
        "counter",
        "Bytes read per disk.",
        per_disk(&|s| s.bytes_read.load(Relaxed)),
    );
    metric(
        "spore_disk_writes_total",
        "counter",
        "Write requests per disk.",
        per_disk(&|s| s.writes.load(Relaxed)),
    );
    metric(
        "spore_disk_written_bytes_total",
        "counter",
        "Bytes written per disk.",
        per_disk(&|s| s.bytes_written.load(Relaxed)),
    );
    metric(
        "spore_disk_flushes_total",
        "counter",
        "Flushes per disk.",
        per_disk(&|s| s.flushes.load(Relaxed)),
    );
    out
}

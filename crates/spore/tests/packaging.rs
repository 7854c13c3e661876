//! The systemd unit in packaging/: a restart or stop signals the agent
//! alone (its VMs keep running), a crash restarts it, and systemd itself
//! accepts the file.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_systemd_unit_restarts_the_agent_alone_and_systemd_accepts_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("packaging/spore-agent.service")).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for want in [
        "KillMode=process",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/spore agent",
    ] {
        assert!(settings.contains(&want), "{want} missing from the unit");
    }
    // systemd-analyze checks the file against this machine's systemd, with
    // the binary where it is here.
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().join("spore-agent.service");
    std::fs::write(&here, unit.replace("/usr/local/bin/spore", common::SPORE)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (apt-get install systemd; scripts/install-deps.sh does)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! A host that accepts migrations, fed what a hostile or broken peer would
//! send: every value that could reach QEMU's command line is refused with
//! 400 before anything starts, and no QEMU process is left behind.

mod common;

use std::process::Command;

use common::TestAgent;

/// POSTs `body` to `path` on the agent's peer listener: (status, body).
fn post(t: &TestAgent, port: u16, path: &str, body: &serde_json::Value) -> (u16, String) {
    let out = Command::new("curl")
        .args(common::curl_tls(&t.tls_dir()))
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(body.to_string())
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn incoming(vm: &str) -> serde_json::Value {
    serde_json::json!({
        "vm": vm, "from": "127.0.0.1:1", "image": "img", "accel": "tcg",
        "memory_mib": 256, "cpus": 1, "max_memory_mib": 1024, "max_cpus": 2,
        "base_mib": 256, "dimms": [], "boot_cpus": 1,
        "mac": "52:54:00:12:34:56", "vmgenid": "a32f7f28-983f-4f6c-af96-7bc52f2d4293",
        "hostname": "web", "instance_id": "i-1", "postcopy": false, "timeout_s": 30
    })
}

#[test]
fn values_that_would_reach_the_qemu_command_line_are_refused() {
    let (t, port) = TestAgent::start_listening(&["--accept-migrations"]);
    let cases: &[(&str, serde_json::Value)] = &[
        (
            "mac",
            serde_json::json!("52:54:00:12:34:56,romfile=/etc/shadow"),
        ),
        ("mac", serde_json::json!("not a mac")),
        (
            "vmgenid",
            serde_json::json!("a32f7f28-983f-4f6c-af96-7bc52f2d4293,romfile=/etc/shadow"),
        ),
        ("hostname", serde_json::json!("web,x=y")),
        ("instance_id", serde_json::json!("i-1,romfile=/etc/shadow")),
        ("image", serde_json::json!("../../etc")),
        ("vm", serde_json::json!("a/b")),
        (
            "dimms",
            serde_json::json!([["dimm0,romfile=/etc/shadow", 128]]),
        ),
        ("manifest", serde_json::json!("not-a-chunk-id")),
    ];
    for (field, value) in cases {
        let mut body = incoming("victim");
        body[*field] = value.clone();
        let (code, text) = post(&t, port, "/v1/migrations", &body);
        assert_eq!(code, 400, "{field}={value}: {code} {text}");
        assert!(!text.is_empty(), "{field}: no message");
        // Nothing was started or recorded for it.
        let vms = t.json(&["vm", "ls", "--json"]);
        assert_eq!(vms.as_array().map(Vec::len), Some(0), "{field}: {vms}");
    }
    let qemus = Command::new("pgrep")
        .args(["-f", &format!("{}.*victim", t.data_dir().display())])
        .output()
        .unwrap();
    assert!(qemus.stdout.is_empty(), "a QEMU was started");
}

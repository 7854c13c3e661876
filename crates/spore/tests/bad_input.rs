//! Every route of the local API and of the peer listener, fed what a
//! broken or hostile client sends: a body that is not JSON, JSON of the
//! wrong shape, names that do not exist or cannot exist, ids that are not
//! ids, bytes that are not a block batch. Each gets a 4xx with a message
//! (or, for the operations that stream progress, an error event), never a
//! 5xx, and the agent keeps answering. The routes come from the
//! routers' own tables, so a new route is covered when it is added.

mod common;

use std::path::Path;
use std::process::Command;

use common::TestAgent;

/// (status, body) of one request, over the API socket or TCP.
fn request(
    socket: Option<&Path>,
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--max-time",
        "30",
    ]);
    if let Some(s) = socket {
        c.arg("--unix-socket").arg(s);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(String::from_utf8_lossy(b).into_owned());
    }
    let out = c.arg(format!("{base}{path}")).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The malformed variants of one route: (path, body) pairs.
fn variants(path: &str, method: &str) -> Vec<(String, Option<Vec<u8>>)> {
    let names = ["nope", "..%2Fetc", "a%2Cb%3Dc", &"x".repeat(300)];
    let mut paths: Vec<String> = if path.contains('{') {
        names
            .iter()
            .map(|n| {
                path.replace("{name}", n)
                    .replace("{vm}", n)
                    .replace("{id}", n)
            })
            .collect()
    } else {
        vec![path.to_owned()]
    };
    paths.dedup();
    let bodies: Vec<Option<Vec<u8>>> = match method {
        "GET" | "DELETE" => vec![None],
        _ => vec![
            Some(b"{not json".to_vec()),
            Some(b"[]".to_vec()),
            Some(b"{\"name\": 7, \"path\": [1]}".to_vec()),
            Some(vec![0xff; 64]),
        ],
    };
    paths
        .into_iter()
        .flat_map(|p| bodies.iter().map(move |b| (p.clone(), b.clone())))
        .collect()
}

fn check_routes(
    what: &str,
    routes: Vec<(String, &'static str)>,
    send: impl Fn(&str, &str, Option<&[u8]>) -> (u16, String),
) {
    let mut tried = 0;
    for (method, path) in routes {
        if method == "GET" && !path.contains('{') {
            continue; // lists and status: nothing to get wrong
        }
        for (p, body) in variants(path, &method) {
            let (code, text) = send(&method, &p, body.as_deref());
            tried += 1;
            // Long operations stream progress events: their error is the
            // stream's last event.
            let streamed_error = code == 200 && text.contains("\"event\":\"error\"");
            assert!(
                (400..500).contains(&code) || streamed_error,
                "{what} {method} {p} with {:?}: {code} {text}",
                body.as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            );
            assert!(
                !text.trim().is_empty(),
                "{what} {method} {p}: {code} with no message"
            );
        }
    }
    assert!(tried > 20, "{what}: only {tried} requests");
}

#[test]
fn every_api_route_answers_bad_input_with_a_4xx_and_a_message() {
    let t = TestAgent::start();
    let socket = t.data_dir().join("api.sock");
    let routes = spore_agent::api::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    check_routes("API", routes, |m, p, b| {
        request(Some(&socket), "http://spore", m, p, b)
    });
    // An unknown route is a 404 with a message too.
    let (code, text) = request(Some(&socket), "http://spore", "GET", "/v1/nothing", None);
    assert_eq!(code, 404, "{text}");
    // Still serving.
    t.ok(&["image", "ls"]);
}

#[test]
fn every_peer_route_answers_bad_input_with_a_4xx_and_a_message() {
    let (t, port) = TestAgent::start_listening(&["--accept-push", "--accept-migrations"]);
    let base = format!("http://127.0.0.1:{port}");
    let routes = spore_agent::peer::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    check_routes("peer", routes, |m, p, b| request(None, &base, m, p, b));
    // A block batch that is not one, for a migration that does not exist.
    let (code, text) = request(
        None,
        &base,
        "PUT",
        "/v1/migrations/nope/blocks",
        Some(b"SPBLOCKS garbage"),
    );
    assert!((400..500).contains(&code), "{code} {text}");
    t.ok(&["image", "ls"]);
}

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
    tls: Option<&Path>,
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
    if let Some(dir) = tls {
        c.args(common::curl_tls(dir));
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

/// What a route does with its body.
#[derive(Clone, Copy)]
enum Body {
    /// Reads none: whatever is sent is ignored.
    None,
    /// JSON whose required fields must be there: anything else is a 400
    /// whose message holds `malformed` (not JSON) or `shape` (JSON of
    /// another shape).
    Strict {
        malformed: &'static str,
        shape: &'static str,
    },
    /// JSON whose fields are all optional: not JSON is a 400 holding
    /// `malformed`; any JSON object or array goes on to the name.
    Lenient { malformed: &'static str },
    /// A binary batch message: anything else is a 400 holding the text.
    Batch(&'static str),
}

/// What a route answers when its `{name}` names nothing.
#[derive(Clone, Copy)]
enum Absent {
    /// The route has no `{name}`.
    NoName,
    /// 404 `not_found`, the message holding the text.
    NotFound(&'static str),
    /// A progress stream whose last event is an error `not_found`.
    Streamed(&'static str),
    /// `{id}` of a chunk: every value sent is no id, a 400 holding the text.
    ChunkId(&'static str),
}

use Absent::{ChunkId, NoName, NotFound, Streamed};
use Body::{Batch, Lenient, Strict};

const API_BODY: Body = Strict {
    malformed: "bad request body",
    shape: "bad request body",
};
const API_LENIENT: Body = Lenient {
    malformed: "bad request body",
};

/// The API's routes and what each answers to bad input.
fn api_table() -> Vec<(&'static str, &'static str, Absent, Body)> {
    let none = Body::None;
    vec![
        ("POST", "/v1/images", NoName, API_BODY),
        (
            "GET",
            "/v1/images/{name}",
            NotFound("image \"nope\" does not exist"),
            none,
        ),
        (
            "DELETE",
            "/v1/images/{name}",
            NotFound("image \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/images/{name}/export",
            NotFound("image \"nope\""),
            API_BODY,
        ),
        (
            "POST",
            "/v1/images/{name}/push",
            NotFound("image \"nope\""),
            API_BODY,
        ),
        (
            "POST",
            "/v1/images/{name}/pull",
            Streamed("image \"nope\" does not exist"),
            API_LENIENT,
        ),
        ("POST", "/v1/disks", NoName, API_BODY),
        ("POST", "/v1/fsck", NoName, API_BODY),
        ("POST", "/v1/agent/stop", NoName, API_BODY),
        (
            "GET",
            "/v1/disks/{name}",
            NotFound("disk \"nope\" does not exist"),
            none,
        ),
        (
            "DELETE",
            "/v1/disks/{name}",
            NotFound("disk \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/disks/{name}/commit",
            NotFound("disk \"nope\""),
            API_BODY,
        ),
        ("POST", "/v1/vms", NoName, API_BODY),
        (
            "GET",
            "/v1/vms/{name}",
            NotFound("vm \"nope\" does not exist"),
            none,
        ),
        (
            "DELETE",
            "/v1/vms/{name}",
            NotFound("vm \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/vms/{name}/stop",
            NotFound("vm \"nope\" does not exist"),
            none,
        ),
        (
            "GET",
            "/v1/vms/{name}/log",
            NotFound("vm \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/vms/{name}/template",
            NotFound("vm \"nope\""),
            API_BODY,
        ),
        (
            "POST",
            "/v1/vms/{name}/resize",
            NotFound("vm \"nope\" does not exist"),
            API_LENIENT,
        ),
        (
            "POST",
            "/v1/vms/{name}/send",
            NotFound("vm \"nope\""),
            API_BODY,
        ),
        (
            "POST",
            "/v1/vms/{name}/migrate",
            NotFound("vm \"nope\""),
            API_BODY,
        ),
        (
            "GET",
            "/v1/vms/{name}/migration",
            NotFound("migration of vm \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/vms/{name}/migrate/cancel",
            NotFound("migration of vm \"nope\" does not exist"),
            none,
        ),
        (
            "GET",
            "/v1/templates/{name}",
            NotFound("template \"nope\" does not exist"),
            none,
        ),
        (
            "DELETE",
            "/v1/templates/{name}",
            NotFound("template \"nope\" does not exist"),
            none,
        ),
        (
            "POST",
            "/v1/templates/{name}/clone",
            NotFound("template \"nope\" does not exist"),
            API_LENIENT,
        ),
        (
            "POST",
            "/v1/templates/{name}/push",
            NotFound("template \"nope\""),
            API_BODY,
        ),
        (
            "POST",
            "/v1/templates/{name}/pull",
            NotFound("template \"nope\" does not exist"),
            none,
        ),
        (
            "DELETE",
            "/v1/groups/{name}",
            NotFound("group \"nope\" does not exist"),
            none,
        ),
    ]
}

/// The peer surface's routes and what each answers to bad input.
fn peer_table() -> Vec<(&'static str, &'static str, Absent, Body)> {
    let incoming = NotFound("incoming migration \"nope\" does not exist");
    vec![
        (
            "GET",
            "/v1/images/{name}",
            NotFound("image \"nope\" does not exist"),
            Body::None,
        ),
        (
            "PUT",
            "/v1/images/{name}",
            // Nothing to bind to: an absent name is no error of its own.
            NoName,
            Strict {
                malformed: "bad body",
                shape: "body needs a manifest id",
            },
        ),
        (
            "POST",
            "/v1/chunks/batch",
            NoName,
            Batch("bad batch request"),
        ),
        ("POST", "/v1/chunks/missing", NoName, Batch("bad request")),
        (
            "PUT",
            "/v1/chunks/{id}",
            ChunkId("not a chunk id"),
            Body::None,
        ),
        (
            "POST",
            "/v1/migrations",
            NoName,
            Strict {
                malformed: "bad migration request",
                shape: "bad migration request",
            },
        ),
        ("GET", "/v1/migrations/{vm}", incoming, Body::None),
        ("PUT", "/v1/migrations/{vm}/blocks", incoming, Body::None),
        ("POST", "/v1/migrations/{vm}/recover", incoming, Body::None),
        (
            "POST",
            "/v1/migrations/{vm}/commit",
            incoming,
            Lenient {
                malformed: "commit request",
            },
        ),
        ("POST", "/v1/migrations/{vm}/abort", incoming, Body::None),
    ]
}

/// Names sent in `{name}`: one that could exist but does not, then ones
/// that cannot exist (a path, options for QEMU's command line, too long).
const ABSENT: &str = "nope";
const INVALID: [&str; 3] = ["..%2Fetc", "a%2Cb%3Dc", LONG];
/// 129 characters: one more than a name may have.
const LONG: &str = concat!(
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
);

/// Bodies sent: (body, is it JSON at all?).
const BODIES: [(&[u8], bool); 4] = [
    (b"{not json", false),
    (&[0xff; 64], false),
    (b"[]", true),
    (b"{\"name\": 7, \"path\": [1]}", true),
];

/// The answer expected: (status, error code, a fragment of the message).
fn expected(
    name: Option<&str>,
    body: Option<(&[u8], bool)>,
    absent: Absent,
    kind: Body,
) -> (u16, &'static str, String) {
    if let Some(n) = name {
        if let ChunkId(text) = absent {
            return (400, "invalid", text.into());
        }
        if n != ABSENT {
            return (400, "invalid", spore_api::NAME_RULE.into());
        }
    }
    if let Some((_, json)) = body {
        match kind {
            Strict { malformed, .. } | Lenient { malformed } if !json => {
                return (400, "invalid", malformed.into())
            }
            Strict { shape, .. } => return (400, "invalid", shape.into()),
            Batch(text) => return (400, "invalid", text.into()),
            _ => {}
        }
    }
    match absent {
        NotFound(text) => (404, "not_found", text.into()),
        Streamed(text) => (200, "not_found", text.into()),
        NoName | ChunkId(_) => unreachable!("a route without a name whose bad body passed"),
    }
}

/// Sends every bad input to every route of `table`, checks the status,
/// the error code and the message, and checks that the table holds
/// exactly the router's routes.
fn check_routes(
    what: &str,
    router: Vec<(String, &'static str)>,
    table: Vec<(&'static str, &'static str, Absent, Body)>,
    send: impl Fn(&str, &str, Option<&[u8]>) -> (u16, String),
) {
    let mut listed: Vec<(String, String)> = table
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    // Lists and status take no input: nothing to get wrong.
    let mut served: Vec<(String, String)> = router
        .into_iter()
        .filter(|(m, p)| m != "GET" || p.contains('{'))
        .map(|(m, p)| (m, p.to_owned()))
        .collect();
    listed.sort();
    served.sort();
    assert_eq!(listed, served, "{what}: the table and the router differ");

    let mut failures = Vec::new();
    let mut tried = 0;
    for (method, path, absent, kind) in table {
        let names: Vec<Option<&str>> = if path.contains('{') {
            std::iter::once(ABSENT).chain(INVALID).map(Some).collect()
        } else {
            vec![None]
        };
        let bodies: Vec<Option<(&[u8], bool)>> = match method {
            "GET" | "DELETE" => vec![None],
            _ if matches!(kind, Body::None) => vec![None, Some(BODIES[0])],
            _ => BODIES.iter().copied().map(Some).collect(),
        };
        for name in &names {
            for body in &bodies {
                let p = match name {
                    Some(n) => path
                        .replace("{name}", n)
                        .replace("{vm}", n)
                        .replace("{id}", n),
                    None => path.to_owned(),
                };
                let (code, text) = send(method, &p, body.map(|b| b.0));
                tried += 1;
                let (want, want_code, fragment) = expected(*name, *body, absent, kind);
                let v: serde_json::Value = text
                    .lines()
                    .last()
                    .and_then(|l| serde_json::from_str(l).ok())
                    .unwrap_or_default();
                // A stream's error is its last event.
                let err = if want == 200 { &v["error"] } else { &v };
                let ok = code == want
                    && (want != 200 || v["event"] == "error")
                    && err["code"] == want_code
                    && err["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&fragment));
                if !ok {
                    failures.push(format!(
                        "{method} {p} body {:?}: got {code} {text:?}, want {want} {want_code} {fragment:?}",
                        body.map(|b| String::from_utf8_lossy(b.0).into_owned())
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {tried} answers differ from the table:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(tried > 50, "{what}: only {tried} requests");
}

#[test]
fn every_api_route_answers_bad_input_as_its_table_row_says() {
    let t = TestAgent::start();
    let socket = t.data_dir().join("api.sock");
    let routes = spore_agent::api::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    check_routes("API", routes, api_table(), |m, p, b| {
        request(Some(&socket), None, "http://spore", m, p, b)
    });
    // An unknown route is a 404 with a message too.
    let (code, text) = request(
        Some(&socket),
        None,
        "http://spore",
        "GET",
        "/v1/nothing",
        None,
    );
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("no such API route"), "{text}");
    // Still serving.
    t.ok(&["image", "ls"]);
}

#[test]
fn every_peer_route_answers_bad_input_as_its_table_row_says() {
    let (t, port) = TestAgent::start_listening(&["--accept-push", "--accept-migrations"]);
    let base = format!("https://127.0.0.1:{port}");
    let routes = spore_agent::peer::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    check_routes("peer", routes, peer_table(), |m, p, b| {
        request(None, Some(&t.tls_dir()), &base, m, p, b)
    });
    t.ok(&["image", "ls"]);
}

/// An agent listening for peers without `--accept-push` or
/// `--accept-migrations` refuses every route of those callers (the peer
/// table's caller column), whatever the request holds, and serves the
/// routes open to every peer.
#[test]
fn peer_routes_refuse_callers_the_agent_does_not_accept() {
    let (t, port) = TestAgent::start_listening(&[]);
    let base = format!("https://127.0.0.1:{port}");
    let mut refused = 0;
    for (method, path, caller) in spore_agent::peer::callers() {
        let p = path
            .replace("{name}", "img")
            .replace("{vm}", "web")
            .replace("{id}", "00");
        let (code, text) = request(
            None,
            Some(&t.tls_dir()),
            &base,
            method.as_str(),
            &p,
            Some(b"{}"),
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match caller {
            spore_agent::peer::Caller::Peer => assert_ne!(code, 409, "{method} {p}: {text}"),
            spore_agent::peer::Caller::Pusher => {
                assert_eq!(code, 409, "{method} {p}: {text}");
                assert!(
                    v["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("does not accept pushes"),
                    "{method} {p}: {text}"
                );
                refused += 1;
            }
            spore_agent::peer::Caller::MigrationSource => {
                assert_eq!(code, 409, "{method} {p}: {text}");
                assert!(
                    v["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("does not accept migrations"),
                    "{method} {p}: {text}"
                );
                refused += 1;
            }
            // The remote API is not a row of the table (it is the API's
            // own table, under /api).
            spore_agent::peer::Caller::Operator => unreachable!("{method} {p}"),
        }
    }
    assert_eq!(refused, 9, "pushes and migrations are 9 routes");
    t.ok(&["image", "ls"]);
}

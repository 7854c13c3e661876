//! The OpenAPI files document exactly the routes the routers serve, both
//! ways: docs/api.yaml against the API socket's router, docs/peer-api.yaml
//! against the peer listener's router. Both routers are built from the
//! tables `routes()` returns.

use spore_agent::{api, peer};

/// (method, path) of every operation under `paths:` in an OpenAPI file
/// written the way ours are (paths indented two spaces, methods four).
fn documented(file: &str) -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(format!("{}/../../docs/{file}", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let mut out = Vec::new();
    let mut path: Option<String> = None;
    for line in doc.lines() {
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let (Some(p), Some(m)) = (&path, line.strip_prefix("    ")) {
            let m = m.trim_end_matches(':');
            if ["get", "post", "delete", "put", "patch", "head"].contains(&m) {
                out.push((m.to_owned(), p.clone()));
            }
        }
    }
    out.sort();
    out
}

fn served(routes: Vec<(axum::http::Method, &'static str)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = routes
        .into_iter()
        .map(|(m, p)| (m.as_str().to_lowercase(), p.to_owned()))
        .collect();
    out.sort();
    out
}

/// Both ways, each difference named.
fn check(file: &str, documented: &[(String, String)], served: &[(String, String)]) {
    let undocumented: Vec<_> = served.iter().filter(|r| !documented.contains(r)).collect();
    let unserved: Vec<_> = documented.iter().filter(|r| !served.contains(r)).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in docs/{file}: {undocumented:?}; in docs/{file} but not served: {unserved:?}"
    );
    assert!(!served.is_empty(), "no routes read from the router");
}

#[test]
fn api_yaml_matches_the_api_router() {
    check("api.yaml", &documented("api.yaml"), &served(api::routes()));
}

#[test]
fn peer_api_yaml_matches_the_peer_router() {
    check(
        "peer-api.yaml",
        &documented("peer-api.yaml"),
        &served(peer::routes()),
    );
}

/// The comparison itself can fail, in both directions.
#[test]
fn a_route_missing_on_either_side_is_caught() {
    let served = served(api::routes());
    let mut fewer = served.clone();
    let dropped = fewer.pop().unwrap();
    let one_way = std::panic::catch_unwind(|| check("api.yaml", &fewer, &served));
    let other_way = std::panic::catch_unwind(|| check("api.yaml", &served, &fewer));
    for (what, result) in [("undocumented", one_way), ("unserved", other_way)] {
        let message = *result
            .expect_err(&format!("an {what} route passed"))
            .downcast::<String>()
            .unwrap();
        assert!(message.contains(&dropped.1), "{what}: {message}");
    }
}

//! The agent's peer listener (`spore agent --listen ADDR`): what other
//! hosts may ask of this one over the network.
//!
//! Over mutual TLS (crate::listener): each route names the role the
//! caller's certificate must carry ([`Caller::role`]); [`admit`] refuses
//! the rest with 403. `--insecure-listen` serves the same routes in
//! plaintext to anyone.
//!
//! Read-only for everyone: resolve an image name, fetch chunks in batches.
//! Both are answered from this agent's own store and names first, then from
//! its origin store (spore-origin) when it has one. With `--relay`, names
//! and chunks neither holds are then fetched from its own sources
//! (re-export, as in VirtMan's hierarchy).
//! With `--accept-push` (an origin) also: which chunks are missing, upload a
//! chunk (verified against its id before it is stored), bind an image name
//! (only once every chunk it needs is present). What is pushed goes to the
//! origin store, never to the agent's own store. With `--accept-migrations`
//! also: receive a live migration (crate::migration): prepare a VM that
//! waits for its state, take its disk's blocks, commit or abort it. Without
//! that flag nothing here can start VMs or delete anything; the control API
//! stays on the unix socket.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::{stream, StreamExt};
use spore_chunks::{decode_chunk_file, ChunkId};
use spore_origin::{OriginError, OriginStore};
use spore_pki::Role;
use spore_transfer::{wire, Class};

use crate::agent::Agent;
use crate::api::{route, Name, Route};
use crate::error::{AgentError, Result};
use crate::listener::Peer;
use crate::meta::Table;
use crate::records::ImageRecord;

type S = State<Arc<Agent>>;

/// Who may call a peer route: the role its certificate must carry (over
/// mutual TLS), and the flag the agent must run with. Checked in [`admit`],
/// the one place every peer request passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Any host of the fleet: resolving names, fetching chunks.
    Peer,
    /// A host pushing images to this origin (`--accept-push`).
    Pusher,
    /// A host moving a VM here (`--accept-migrations`).
    MigrationSource,
    /// An operator driving this agent's API from another machine (every
    /// API route, under `/api`; over TLS only).
    Operator,
}

impl Caller {
    /// The role a caller's certificate must carry.
    pub fn role(self) -> Role {
        match self {
            Caller::Peer | Caller::MigrationSource => Role::Host,
            Caller::Pusher => Role::Publisher,
            Caller::Operator => Role::Operator,
        }
    }
}

/// Every route other hosts may call and who may call it; [`router`] is
/// built from this table.
fn table() -> Vec<(Caller, Route<Arc<Agent>>)> {
    use Caller::{MigrationSource as Mig, Peer, Pusher};
    use Method as M;
    vec![
        (Peer, route(M::GET, "/v1/images/{name}", resolve)),
        (Pusher, route(M::PUT, "/v1/images/{name}", bind)),
        (Peer, route(M::POST, "/v1/chunks/batch", batch)),
        (Pusher, route(M::POST, "/v1/chunks/missing", missing)),
        (Pusher, route(M::PUT, "/v1/chunks/{id}", upload)),
        (Mig, route(M::POST, "/v1/migrations", incoming_prepare)),
        (Mig, route(M::GET, "/v1/migrations/{vm}", incoming_status)),
        (
            Mig,
            route(M::PUT, "/v1/migrations/{vm}/blocks", incoming_blocks),
        ),
        (
            Mig,
            route(M::POST, "/v1/migrations/{vm}/recover", incoming_recover),
        ),
        (
            Mig,
            route(M::POST, "/v1/migrations/{vm}/commit", incoming_commit),
        ),
        (
            Mig,
            route(M::POST, "/v1/migrations/{vm}/abort", incoming_abort),
        ),
    ]
}

/// The peer surface's routes as (method, path), from the table the router
/// is built from.
pub fn routes() -> Vec<(Method, &'static str)> {
    table().into_iter().map(|(_, (m, p, _))| (m, p)).collect()
}

/// The peer surface's routes with who may call each.
pub fn callers() -> Vec<(Method, &'static str, Caller)> {
    table()
        .into_iter()
        .map(|(c, (m, p, _))| (m, p, c))
        .collect()
}

/// Lets a request through to a route for `caller`, or refuses it: pushes
/// and migrations only where the agent was started to accept them (409),
/// and over TLS only from a certificate that is not revoked and carries
/// the route's role (403). Refusals and privileged requests (pushes,
/// migrations in) are logged with the caller's identity.
fn admit(a: &Agent, caller: Caller, req: &axum::extract::Request) -> Result<()> {
    accepts(a, caller)?;
    let Some(tls) = &a.server_tls else {
        if caller == Caller::Operator {
            return Err(AgentError::Forbidden(
                "the remote API is served over TLS only, to operator certificates; this agent runs with --insecure-listen".into(),
            ));
        }
        // --insecure-listen: whoever reaches the port.
        return Ok(());
    };
    let peer = req.extensions().get::<Peer>();
    // Named in logs and refusals only (not formatted for every batch).
    // The path as sent (a nested router, the remote API's, sees it
    // without its /api prefix).
    let what = || {
        let path = req
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or_else(|| req.uri().path(), |u| u.path());
        format!("{} {}", req.method(), path)
    };
    let refuse = |message: String| {
        a.peer_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(request = what(), peer = ?peer.map(|p| p.addr), "refused: {message}");
        Err(AgentError::Forbidden(message))
    };
    let Some(peer) = peer else {
        return refuse("no client certificate".into());
    };
    if tls.is_revoked(&peer.identity.serial) {
        return refuse(format!(
            "the certificate of {} (serial {}) is revoked",
            peer.identity.name, peer.identity.serial
        ));
    }
    let role = caller.role();
    if !peer.identity.has(role) {
        return refuse(format!(
            "{} needs the {role} role; the certificate of {}",
            what(),
            peer.identity
        ));
    }
    if caller != Caller::Peer {
        a.peer_privileged.fetch_add(1, Ordering::Relaxed);
        tracing::info!(request = what(), peer = %peer.addr, identity = %peer.identity, "privileged peer request");
    }
    Ok(())
}

/// Whether the agent was started to accept `caller`'s kind of request.
fn accepts(a: &Agent, caller: Caller) -> Result<()> {
    match caller {
        Caller::Peer => Ok(()),
        Caller::Pusher if !a.config.accept_push => Err(AgentError::State(
            "this agent does not accept pushes (start it with --accept-push)".into(),
        )),
        Caller::MigrationSource if !a.config.accept_migrations => Err(AgentError::State(
            "this agent does not accept migrations (start it with --accept-migrations)".into(),
        )),
        _ => Ok(()),
    }
}

/// The gate in front of every peer route (and of the remote API): the
/// request goes on only if [`admit`] lets `caller` through.
async fn gate(
    State((a, caller)): State<(Arc<Agent>, Caller)>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    match admit(&a, caller, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub fn router(agent: Arc<Agent>) -> Router {
    // The whole API under /api, for operator certificates.
    let api = crate::api::router(agent.clone()).route_layer(axum::middleware::from_fn_with_state(
        (agent.clone(), Caller::Operator),
        gate,
    ));
    table()
        .into_iter()
        .fold(Router::new(), |r, (caller, (_, path, handler))| {
            r.route(
                path,
                handler.route_layer(axum::middleware::from_fn_with_state(
                    (agent.clone(), caller),
                    gate,
                )),
            )
        })
        // The body bound is the listener's (`Bounds::max_body`): a chunk (a
        // layer of a large image, say) or a batch of a migrating disk's
        // blocks exceeds axum's 2 MB default.
        .with_state(agent)
        .nest("/api", api)
}

fn respond(r: Result<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Runs blocking work (the chunk store, redb, the fetcher) off the async
/// threads.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(AgentError::State(format!("internal task failed: {e}"))),
    }
}

/// The store pushes go to (the pusher routes' gate, [`admit`], already
/// checked that this agent accepts pushes).
fn push_store(a: &Agent) -> Result<Arc<OriginStore>> {
    a.origin_store
        .clone()
        .ok_or_else(|| AgentError::State("this agent has no origin store".into()))
}

/// The image record this agent holds itself under `name`, if any.
async fn own_record(a: &Arc<Agent>, name: &str) -> Result<Option<ImageRecord>> {
    let (a, name) = (a.clone(), name.to_owned());
    off_thread(move || Ok(a.meta.get::<ImageRecord>(Table::Images, &name)?)).await
}

/// Image chunk lists kept for ranking resolves by popularity.
const IMAGE_CHUNK_LISTS: usize = 32;

/// The chunks of the image `manifest` (in the origin store, or else in
/// this agent's own store) that peers demanded most here, most first: a
/// resolve answers only these, not every image's.
async fn popular_of(
    a: &Arc<Agent>,
    manifest: ChunkId,
    in_origin_store: bool,
) -> Result<Vec<ChunkId>> {
    let cached = a.image_chunks.lock().get(&manifest).cloned();
    let chunks = match cached {
        Some(c) => c,
        None => {
            let list = match (&a.origin_store, in_origin_store) {
                (Some(store), true) => store.image_chunks(&manifest).await?,
                _ => {
                    let a = a.clone();
                    off_thread(move || {
                        Ok(a.exports
                            .open_image(&manifest)?
                            .image()
                            .flat
                            .chunks()
                            .to_vec())
                    })
                    .await?
                }
            };
            let list = Arc::new(list);
            let mut cache = a.image_chunks.lock();
            if cache.len() >= IMAGE_CHUNK_LISTS {
                cache.clear();
            }
            cache.insert(manifest, list.clone());
            list
        }
    };
    Ok(a.popularity
        .ranked(chunks.iter(), 1, spore_transfer::MAX_POPULAR))
}

#[derive(serde::Deserialize)]
struct ResolveQuery {
    /// 0: leave the popular chunks out (a check for a newer version).
    #[serde(default = "one")]
    popular: u8,
}

fn one() -> u8 {
    1
}

async fn resolve(State(a): S, Name(name): Name, Query(q): Query<ResolveQuery>) -> Response {
    respond(
        async {
            // A relay's own record of a name it found upstream is looked
            // up there again once it is older than --name-max-age, so a
            // new version reaches the hosts below it.
            let own = own_record(&a, &name).await?;
            let own = match own {
                Some(r) if a.config.relay && r.resolved_at.is_some() => {
                    let a = a.clone();
                    let name = name.clone();
                    Some(off_thread(move || a.images.resolve_image(&name)).await?)
                }
                other => other,
            };
            let mut found = own.map(|r| (r.manifest, r.profile, r.created));
            let mut in_origin_store = false;
            if let (None, Some(store)) = (found, &a.origin_store) {
                found = store
                    .get_image_at(&name)
                    .await?
                    .map(|(r, at)| (r.manifest, r.profile, at));
                in_origin_store = found.is_some();
            }
            let (manifest, profile, bound_at) = match found {
                Some(f) => f,
                None if a.config.relay => {
                    let a = a.clone();
                    let rec = off_thread(move || a.images.resolve_image(&name)).await?;
                    (rec.manifest, rec.profile, rec.created)
                }
                None => {
                    return Err(AgentError::NotFound {
                        kind: "image",
                        name,
                    })
                }
            };
            // The manifest is the version; `bound_at` (unix seconds) says
            // since when the name has pointed at it here.
            let mut body =
                serde_json::json!({ "manifest": manifest.to_hex(), "bound_at": bound_at });
            if let Some(p) = profile {
                body["profile"] = p.to_hex().into();
            }
            // The chunks of this image peers demanded most here.
            let popular: Vec<String> = if q.popular == 0 {
                Vec::new()
            } else {
                popular_of(&a, manifest, in_origin_store)
                    .await?
                    .iter()
                    .map(ChunkId::to_hex)
                    .collect()
            };
            if !popular.is_empty() {
                body["popular"] = popular.into();
            }
            Ok(axum::Json(body).into_response())
        }
        .await,
    )
}

/// A relay's answer to a batch it must partly fetch upstream: the records
/// in request order, each sent as soon as it (and every one before it) is
/// here, so a reader below waiting for the first chunk of a large batch
/// does not wait for the whole batch upstream. What cannot be had within
/// `budget` is answered as missing, and the asker tries its next source.
fn relay_stream(
    a: Arc<Agent>,
    fetcher: Arc<spore_transfer::Fetcher>,
    ids: Vec<ChunkId>,
    raws: Vec<Option<Bytes>>,
    want: Vec<ChunkId>,
    class: Class,
    budget: std::time::Duration,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ChunkId>();
    {
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            let result = fetcher.fetch_within_each(&a.store, &want, class, budget, &mut |id| {
                let _ = tx.send(*id);
            });
            if let Err(e) = result {
                tracing::warn!(error = %e, "relay could not fetch chunks upstream");
            }
        });
    }
    struct State {
        a: Arc<Agent>,
        ids: Vec<ChunkId>,
        raws: Vec<Option<Bytes>>,
        next: usize,
        arrived: std::collections::HashSet<ChunkId>,
        rx: tokio::sync::mpsc::UnboundedReceiver<ChunkId>,
        upstream_done: bool,
    }
    let head = wire::encode_response_head(ids.len());
    let state = State {
        a,
        ids,
        raws,
        next: 0,
        arrived: Default::default(),
        rx,
        upstream_done: false,
    };
    let records = futures_util::stream::unfold(state, |mut st| async move {
        let i = st.next;
        let id = *st.ids.get(i)?;
        st.next += 1;
        if st.raws[i].is_none() {
            // Wait for this chunk, or for the upstream fetch to end.
            while !st.upstream_done && !st.arrived.contains(&id) {
                match st.rx.recv().await {
                    Some(got) => {
                        st.arrived.insert(got);
                    }
                    None => st.upstream_done = true,
                }
            }
            let a = st.a.clone();
            st.raws[i] = tokio::task::spawn_blocking(move || a.store.get_raw(&id))
                .await
                .ok()
                .and_then(|r| r.ok().flatten())
                .map(Bytes::from);
        }
        let raw = st.raws[i].take();
        if let Some(r) = &raw {
            st.a.peer_stats
                .record(std::slice::from_ref(&Some(r.clone())));
        }
        let record = wire::encode_record(&id, raw.as_deref());
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(record)), st))
    });
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) }).chain(records);
    axum::body::Body::from_stream(body).into_response()
}

/// The positions of `raws` still empty, and the ids asked for there.
fn lacking(ids: &[ChunkId], raws: &[Option<Bytes>]) -> (Vec<usize>, Vec<ChunkId>) {
    (0..ids.len())
        .filter(|&i| raws[i].is_none())
        .map(|i| (i, ids[i]))
        .unzip()
}

#[derive(serde::Deserialize)]
struct BatchQuery {
    /// 1: a reader waits for these chunks (the first, and the rest as its
    /// read-ahead); they count towards their popularity.
    #[serde(default)]
    demand: u8,
}

async fn batch(
    State(a): S,
    Query(q): Query<BatchQuery>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    // How long the asker waits (a relay answers within it, with what it
    // could not get upstream by then as missing).
    let asked_budget = headers
        .get(spore_transfer::DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    respond(
        async {
            let ids = wire::decode_request(&body)
                .map_err(|e| AgentError::Invalid(format!("bad batch request: {e}")))?;
            let class = if q.demand == 1 {
                a.popularity.hit(&ids);
                Class::Demand
            } else {
                Class::Background
            };
            // This agent's own store first.
            let mut raws: Vec<Option<Bytes>> = {
                let (a, ids) = (a.clone(), ids.clone());
                off_thread(move || {
                    ids.iter()
                        .map(|id| Ok(a.store.get_raw(id)?.map(Bytes::from)))
                        .collect()
                })
                .await?
            };
            // Then what was pushed here.
            if let Some(store) = &a.origin_store {
                let (at, want) = lacking(&ids, &raws);
                if !want.is_empty() {
                    for (i, raw) in at.into_iter().zip(store.get_raws(&want).await?) {
                        raws[i] = raw;
                    }
                }
            }
            if let (true, Some(fetcher)) = (a.config.relay, a.fetcher.clone()) {
                // Fetch what we lack from upstream (coalesced with any other
                // request for the same chunks), and answer as it arrives.
                let (_, want) = lacking(&ids, &raws);
                if !want.is_empty() {
                    let budget = fetcher.relay_budget(class, asked_budget);
                    return Ok(relay_stream(
                        a.clone(),
                        fetcher,
                        ids,
                        raws,
                        want,
                        class,
                        budget,
                    ));
                }
            }
            a.peer_stats.record(&raws);
            let body =
                wire::encode_response(ids.iter().copied().zip(raws.iter().map(|r| r.as_deref())));
            Ok(body.into_response())
        }
        .await,
    )
}

/// Chunks copied at once from this agent's own store into the origin store.
const COPIES_IN_FLIGHT: usize = 8;

async fn missing(State(a): S, body: Bytes) -> Response {
    respond(
        async {
            let store = push_store(&a)?;
            let ids = wire::decode_request(&body)
                .map_err(|e| AgentError::Invalid(format!("bad request: {e}")))?;
            let absent = store.missing(&ids).await?;
            // Chunks this agent holds itself (an image imported here) are
            // copied into the origin store rather than sent again by the
            // pusher. One that cannot be copied is simply asked for.
            let copied: HashSet<ChunkId> = stream::iter(absent.iter().copied())
                .map(|id| {
                    let (a, store) = (a.clone(), store.clone());
                    async move {
                        let raw = off_thread(move || Ok(a.store.get_raw(&id)?)).await;
                        match raw {
                            Ok(Some(raw)) => match store.put_chunk(id, raw.into()).await {
                                Ok(()) => Some(id),
                                Err(e) => {
                                    tracing::warn!(chunk = %id, error = %AgentError::from(e).chain(), "copying a local chunk into the origin store failed; asking for it");
                                    None
                                }
                            },
                            Ok(None) => None,
                            Err(e) => {
                                tracing::warn!(chunk = %id, error = %e.chain(), "reading a local chunk failed; asking for it");
                                None
                            }
                        }
                    }
                })
                .buffer_unordered(COPIES_IN_FLIGHT)
                .filter_map(|copied| async move { copied })
                .collect()
                .await;
            let lacking: Vec<ChunkId> = absent.into_iter().filter(|id| !copied.contains(id)).collect();
            Ok(wire::encode_request(&lacking).into_response())
        }
        .await,
    )
}

async fn upload(State(a): S, Path(id): Path<String>, body: Bytes) -> Response {
    respond(
        async {
            let store = push_store(&a)?;
            let id: ChunkId = id
                .parse()
                .map_err(|_| AgentError::Invalid("not a chunk id".into()))?;
            store.put_chunk(id, body).await.map_err(|e| match e {
                OriginError::Rejected { source, .. } => {
                    AgentError::Invalid(format!("rejected upload: {source}"))
                }
                e => e.into(),
            })?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn bind(
    State(a): S,
    Name(name): Name,
    peer: Option<axum::Extension<crate::listener::Peer>>,
    body: Bytes,
) -> Response {
    respond(
        async {
            let store = push_store(&a)?;
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| AgentError::Invalid(format!("bad body: {e}")))?;
            let manifest: ChunkId = v["manifest"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| AgentError::Invalid("body needs a manifest id".into()))?;
            let profile: Option<ChunkId> = match v.get("profile").and_then(|p| p.as_str()) {
                Some(p) => Some(
                    p.parse()
                        .map_err(|_| AgentError::Invalid("bad profile id".into()))?,
                ),
                None => None,
            };
            // A name means one image on this agent. Its own images answer
            // first, so a push that bound the name to another manifest in
            // the origin store would never be seen: refuse it.
            let own = own_record(&a, &name).await?;
            if let Some(own) = &own {
                if own.manifest != manifest {
                    return Err(AgentError::State(format!(
                        "image {name:?} is bound to manifest {} in this agent's own store; remove it there before pushing another image under that name",
                        own.manifest
                    )));
                }
            }
            // A name means one image to every host that resolves it: it
            // moves to other content only when the publisher says so.
            let force = v.get("force").and_then(|f| f.as_bool()).unwrap_or(false);
            let bound = store.get_image(&name).await?;
            let rebinding = bound.as_ref().is_some_and(|b| b.manifest != manifest);
            if rebinding && !force {
                return Err(AgentError::State(format!(
                    "image {name:?} is bound here to other content (manifest {}); push with --force to rebind the name",
                    bound.as_ref().map(|b| b.manifest.to_hex()).unwrap_or_default()
                )));
            }
            let rec = spore_origin::ImageRecord { manifest, profile };
            store.bind_image(&name, &rec).await.map_err(|e| match e {
                OriginError::NoManifest(m) => {
                    AgentError::State(format!("manifest {m} is not here; push its chunks first"))
                }
                OriginError::Incomplete { manifest, absent } => AgentError::State(format!(
                    "{absent} chunks of manifest {manifest} are missing; push them first"
                )),
                e => e.into(),
            })?;
            // The same image held here too learns the pushed boot profile.
            if let (Some(own), Some(p)) = (own, profile) {
                if own.profile != Some(p) {
                    adopt_profile(&a, &store, &name, manifest, p).await?;
                }
            }
            if rebinding {
                tracing::warn!(
                    image = %name,
                    from = %bound.map(|b| b.manifest.to_hex()).unwrap_or_default(),
                    to = %manifest,
                    by = %peer.map(|p| p.identity.to_string()).unwrap_or_else(|| "a plaintext peer".into()),
                    "name rebound (--force)"
                );
            }
            tracing::info!(image = %name, %manifest, store = store.spec(), "image pushed here");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// Copies boot profile `profile` from the origin store into this agent's
/// own store and binds it to its own image `name` (still at `manifest`).
async fn adopt_profile(
    a: &Arc<Agent>,
    store: &OriginStore,
    name: &str,
    manifest: ChunkId,
    profile: ChunkId,
) -> Result<()> {
    let raw = store
        .get_raw(&profile)
        .await?
        .ok_or_else(|| AgentError::State(format!("boot profile {profile} vanished")))?;
    let (a, name) = (a.clone(), name.to_owned());
    off_thread(move || {
        let data = decode_chunk_file(&profile, &raw)?;
        let _shared = a.gc_lock.read();
        a.store.put_with_id(profile, &data)?;
        a.store.sync()?;
        if let Some(mut rec) = a.meta.get::<ImageRecord>(Table::Images, &name)? {
            if rec.manifest == manifest {
                rec.profile = Some(profile);
                a.meta.put(Table::Images, &name, &rec)?;
            }
        }
        Ok(())
    })
    .await
}

async fn incoming_prepare(State(a): S, body: Bytes) -> Response {
    respond(
        async move {
            let req: spore_api::IncomingRequest = serde_json::from_slice(&body)
                .map_err(|e| AgentError::Invalid(format!("bad migration request: {e}")))?;
            let ready = off_thread(move || a.migration.incoming_prepare(req)).await?;
            Ok(axum::Json(ready).into_response())
        }
        .await,
    )
}

async fn incoming_blocks(State(a): S, Name(vm): Name, body: Bytes) -> Response {
    respond(
        off_thread(move || a.migration.incoming_blocks(&vm, &body))
            .await
            .map(|n| axum::Json(n).into_response()),
    )
}

async fn incoming_status(State(a): S, Name(vm): Name) -> Response {
    respond(
        off_thread(move || a.migration.incoming_status(&vm))
            .await
            .map(|r| axum::Json(r).into_response()),
    )
}

async fn incoming_recover(State(a): S, Name(vm): Name) -> Response {
    respond(
        off_thread(move || a.migration.incoming_recover(&vm))
            .await
            .map(|r| axum::Json(r).into_response()),
    )
}

async fn incoming_commit(State(a): S, Name(vm): Name, body: Bytes) -> Response {
    let commit = if body.iter().all(u8::is_ascii_whitespace) {
        spore_api::IncomingCommit::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => return respond(Err(AgentError::Invalid(format!("commit request: {e}")))),
        }
    };
    respond(
        off_thread(move || a.migration.incoming_commit(&vm, &commit))
            .await
            .map(|r| axum::Json(r).into_response()),
    )
}

async fn incoming_abort(State(a): S, Name(vm): Name) -> Response {
    respond(
        off_thread(move || a.migration.incoming_abort(&vm))
            .await
            .map(|()| axum::Json(serde_json::json!({ "aborted": true })).into_response()),
    )
}

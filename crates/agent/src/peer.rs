//! The agent's peer listener (`spore agent --listen ADDR`): what other
//! hosts may ask of this one over the network.
//!
//! Read-only for everyone: resolve an image name, fetch chunks in batches.
//! With `--relay`, names and chunks this host lacks are first fetched from
//! its own sources (re-export, as in VirtMan's hierarchy).
//! With `--accept-push` (an origin) also: which chunks are missing, upload a
//! chunk (verified against its id before it is stored), bind an image name
//! (only once every chunk it needs is present). The control API stays on
//! the unix socket; nothing here can start VMs or delete anything.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use spore_chunks::{decode_chunk_file, ChunkId};
use spore_transfer::wire;

use crate::agent::{now, Agent, ImageRecord};
use crate::error::{check_name, AgentError, Result};
use crate::meta::Table;

pub const PEER_ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/images/{name}"),
    ("put", "/v1/images/{name}"),
    ("post", "/v1/chunks/batch"),
    ("post", "/v1/chunks/missing"),
    ("put", "/v1/chunks/{id}"),
];

type S = State<Arc<Agent>>;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/images/{name}", get(resolve).put(bind))
        .route("/v1/chunks/batch", post(batch))
        .route("/v1/chunks/missing", post(missing))
        .route("/v1/chunks/{id}", put(upload))
        // A chunk (a layer of a large image, say) may exceed axum's 2 MB default.
        .layer(axum::extract::DefaultBodyLimit::max(
            spore_chunks::MAX_CHUNK_SIZE + 4096,
        ))
        .with_state(agent)
}

async fn blocking(f: impl FnOnce() -> Result<Response> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(e) => AgentError::State(format!("internal task failed: {e}")).into_response(),
    }
}

fn require_push(a: &Agent) -> Result<()> {
    if a.config.accept_push {
        Ok(())
    } else {
        Err(AgentError::State(
            "this agent does not accept pushes (start it with --accept-push)".into(),
        ))
    }
}

async fn resolve(State(a): S, Path(name): Path<String>) -> Response {
    blocking(move || {
        let rec = if a.config.relay {
            a.resolve_image(&name)?
        } else {
            a.image_record(&name)?
        };
        let mut body = serde_json::json!({ "manifest": rec.manifest.to_hex() });
        if let Some(p) = rec.profile {
            body["profile"] = p.to_hex().into();
        }
        Ok(axum::Json(body).into_response())
    })
    .await
}

async fn batch(State(a): S, body: Bytes) -> Response {
    blocking(move || {
        let ids = wire::decode_request(&body)
            .map_err(|e| AgentError::Invalid(format!("bad batch request: {e}")))?;
        if let (true, Some(fetcher)) = (a.config.relay, &a.fetcher) {
            // Fetch what we lack from upstream first (coalesced with any
            // other request for the same chunks). What cannot be had is
            // answered as missing, and the asker tries its next source.
            let lacking: Vec<ChunkId> = ids
                .iter()
                .filter(|id| !a.store.contains(id))
                .copied()
                .collect();
            if !lacking.is_empty() {
                if let Err(e) = fetcher.fetch(&a.store, &lacking) {
                    tracing::warn!(error = %e, "relay could not fetch chunks upstream");
                }
            }
        }
        let raws = ids
            .iter()
            .map(|id| a.store.get_raw(id))
            .collect::<Result<Vec<_>, _>>()?;
        a.peer_stats.record(&raws);
        let body =
            wire::encode_response(ids.iter().copied().zip(raws.iter().map(|r| r.as_deref())));
        Ok(body.into_response())
    })
    .await
}

async fn missing(State(a): S, body: Bytes) -> Response {
    blocking(move || {
        require_push(&a)?;
        let ids = wire::decode_request(&body)
            .map_err(|e| AgentError::Invalid(format!("bad request: {e}")))?;
        let lacking: Vec<ChunkId> = ids.into_iter().filter(|id| !a.store.contains(id)).collect();
        Ok(wire::encode_request(&lacking).into_response())
    })
    .await
}

async fn upload(State(a): S, Path(id): Path<String>, body: Bytes) -> Response {
    blocking(move || {
        require_push(&a)?;
        let id: ChunkId = id
            .parse()
            .map_err(|_| AgentError::Invalid("not a chunk id".into()))?;
        let data = decode_chunk_file(&id, &body)
            .map_err(|e| AgentError::Invalid(format!("rejected upload: {e}")))?;
        let _shared = a.gc_lock.read();
        a.store.put_with_id(id, &data)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn bind(State(a): S, Path(name): Path<String>, body: Bytes) -> Response {
    blocking(move || {
        require_push(&a)?;
        check_name("image", &name)?;
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
        let _shared = a.gc_lock.read();
        if !a.store.contains(&manifest) {
            return Err(AgentError::State(format!(
                "manifest {manifest} is not here; push its chunks first"
            )));
        }
        // Every chunk the image needs must be here before its name is.
        let mut needed = spore_image::image::reachable_chunks(&a.store, [&manifest])?;
        needed.extend(profile);
        let absent = needed.iter().filter(|id| !a.store.contains(id)).count();
        if absent > 0 {
            return Err(AgentError::State(format!(
                "{absent} chunks of manifest {manifest} are missing; push them first"
            )));
        }
        a.store.sync()?;
        a.meta.put(
            Table::Images,
            &name,
            &ImageRecord {
                manifest,
                created: now(),
                complete: false,
                profile,
            },
        )?;
        a.exports.bind_image(&name, manifest);
        tracing::info!(image = %name, %manifest, "image pushed here");
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

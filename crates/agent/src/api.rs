//! The REST API on the agent's unix socket. The router is built from one
//! table of routes ([`routes`] lists it) and docs/api.yaml documents it (a
//! test keeps the two in step).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use spore_api::{
    AgentStatus, CloneRequest, CommitRequest, DiskCreate, ErrorBody, Event, ExportRequest,
    ImportRequest, MigrateRequest, PullRequest, PushRequest, ResizeRequest, SourceStatus,
    TemplateCreate, VmCreate,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::agent::Agent;
use crate::error::{AgentError, Result};

type S = State<Arc<Agent>>;

/// One route: its method, its path and what serves it.
pub(crate) type Route<St> = (Method, &'static str, MethodRouter<St>);

/// A table entry: `handler` serves `method` on `path`.
pub(crate) fn route<H, T, St>(method: Method, path: &'static str, handler: H) -> Route<St>
where
    H: Handler<T, St>,
    T: 'static,
    St: Clone + Send + Sync + 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum can route");
    (method, path, on(filter, handler))
}

/// The `{name}` (or `{vm}`) segment of a route's path, checked at the
/// boundary: a name that cannot exist (a `/`, a `,`, too long, ...) is a
/// 400 before any handler runs, whatever else the request holds. What kind
/// of name it is follows from the path (`/v1/vms/...` names a VM).
pub(crate) struct Name(pub String);

impl<St: Send + Sync> axum::extract::FromRequestParts<St> for Name {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &St,
    ) -> std::result::Result<Self, Response> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let kind = match parts.uri.path().split('/').nth(2) {
            Some("images") => "image",
            Some("disks") => "disk",
            Some("templates") => "template",
            Some("groups") => "group",
            _ => "vm",
        };
        crate::error::check_name(kind, &name).map_err(IntoResponse::into_response)?;
        Ok(Name(name))
    }
}

/// Every route the API serves; [`router`] is built from this table.
fn table() -> Vec<Route<Arc<Agent>>> {
    use Method as M;
    vec![
        route(M::GET, "/v1/status", status),
        route(M::GET, "/v1/images", list_images),
        route(M::POST, "/v1/images", import_image),
        route(M::GET, "/v1/images/{name}", inspect_image),
        route(M::DELETE, "/v1/images/{name}", remove_image),
        route(M::POST, "/v1/images/{name}/export", export_image),
        route(M::POST, "/v1/images/{name}/push", push_image),
        route(M::POST, "/v1/images/{name}/pull", pull_image),
        route(M::GET, "/v1/disks", list_disks),
        route(M::POST, "/v1/disks", create_disk),
        route(M::GET, "/v1/disks/{name}", get_disk),
        route(M::DELETE, "/v1/disks/{name}", remove_disk),
        route(M::POST, "/v1/disks/{name}/commit", commit_disk),
        route(M::GET, "/v1/vms", list_vms),
        route(M::POST, "/v1/vms", run_vm),
        route(M::GET, "/v1/vms/{name}", get_vm),
        route(M::DELETE, "/v1/vms/{name}", remove_vm),
        route(M::POST, "/v1/vms/{name}/stop", stop_vm),
        route(M::GET, "/v1/vms/{name}/log", vm_log),
        route(M::POST, "/v1/vms/{name}/template", template_vm),
        route(M::POST, "/v1/vms/{name}/resize", resize_vm),
        route(M::POST, "/v1/vms/{name}/send", send_line),
        route(M::POST, "/v1/vms/{name}/migrate", migrate_vm),
        route(M::GET, "/v1/vms/{name}/migration", get_migration),
        route(M::POST, "/v1/vms/{name}/migrate/cancel", cancel_migration),
        route(M::GET, "/v1/templates", list_templates),
        route(M::GET, "/v1/templates/{name}", get_template),
        route(M::DELETE, "/v1/templates/{name}", remove_template),
        route(M::POST, "/v1/templates/{name}/clone", clone_template),
        route(M::POST, "/v1/templates/{name}/push", push_template),
        route(M::POST, "/v1/templates/{name}/pull", pull_template),
        route(M::DELETE, "/v1/groups/{name}", remove_group),
        route(M::POST, "/v1/fsck", fsck),
        route(M::POST, "/v1/agent/stop", stop_agent),
        route(M::GET, "/metrics", metrics),
    ]
}

/// The API's routes as (method, path), from the table the router is built
/// from.
pub fn routes() -> Vec<(Method, &'static str)> {
    table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

pub fn router(agent: Arc<Agent>) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .fallback(|| async {
            error_response(
                &AgentError::Invalid("no such API route".into()),
                StatusCode::NOT_FOUND,
            )
        })
        .with_state(agent)
}

fn error_response(e: &AgentError, status: StatusCode) -> Response {
    let (_, code) = e.status();
    let body = ErrorBody {
        code: code.into(),
        message: e.chain(),
    };
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, _) = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.chain(), "request failed");
        }
        error_response(&self, status)
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| AgentError::Invalid(format!("bad request body: {e}")))
}

/// Runs blocking agent work off the async threads.
async fn blocking<T: Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => AgentError::State(format!("internal task failed: {e}")).into_response(),
    }
}

/// Runs a long operation, streaming NDJSON progress events and the result.
fn streaming<T: Serialize + Send + 'static>(
    f: impl FnOnce(&(dyn Fn(&str, u64, u64) + Sync)) -> Result<T> + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::task::spawn_blocking(move || {
        // At most ~4 progress events a second, plus the last one.
        let last = Mutex::new(Instant::now() - Duration::from_secs(1));
        let progress = |phase: &str, done: u64, total: u64| {
            let mut l = last.lock();
            if done >= total || l.elapsed() >= Duration::from_millis(250) {
                *l = Instant::now();
                let _ = tx.try_send(Event::Progress {
                    phase: phase.into(),
                    done,
                    total,
                });
            }
        };
        let event = match f(&progress) {
            Ok(v) => Event::Done {
                result: serde_json::to_value(v).unwrap_or_default(),
            },
            Err(e) => {
                tracing::warn!(error = %e.chain(), "operation failed");
                Event::Error {
                    error: ErrorBody {
                        code: e.status().1.into(),
                        message: e.chain(),
                    },
                }
            }
        };
        let _ = tx.blocking_send(event);
    });
    let stream = ReceiverStream::new(rx).map(|ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn status(State(a): S) -> Response {
    blocking(move || {
        Ok(AgentStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: a.data_dir().to_owned(),
            nbd_socket: a.nbd_socket(),
            nbd_tcp: a.config.nbd_tcp.clone(),
            accel: a.vms.accel().to_string(),
            images: a.images.list_images()?.len(),
            disks: a.disks.list_disks()?.len(),
            vms: a.vms.list_vms()?.len(),
            cache_bytes: a.exports.cache().bytes() as u64,
            cache_budget: a.config.cache_bytes as u64,
            recovered: a.recovered.lock().clone(),
            sources: a
                .fetcher
                .iter()
                .flat_map(|f| f.remotes())
                .map(|r| SourceStatus {
                    url: r.url().to_owned(),
                    chunks: r.stats.chunks.load(Relaxed),
                    bytes: r.stats.bytes.load(Relaxed),
                    corrupt: r.stats.corrupt.load(Relaxed),
                    failures: r.stats.failures.load(Relaxed),
                })
                .collect(),
            served_chunks: a.peer_stats.chunks.load(Relaxed),
            served_bytes: a.peer_stats.bytes.load(Relaxed),
        })
    })
    .await
}

async fn list_images(State(a): S) -> Response {
    blocking(move || a.images.list_images()).await
}

async fn import_image(State(a): S, body: Bytes) -> Response {
    match parse::<ImportRequest>(&body) {
        Ok(req) => streaming(move |p| a.images.import_image(&req, p)),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct InspectQuery {
    /// Also list the boot profile's blocks in order.
    #[serde(default)]
    profile: bool,
}

async fn inspect_image(State(a): S, Name(name): Name, Query(q): Query<InspectQuery>) -> Response {
    blocking(move || a.images.inspect_image(&name, q.profile)).await
}

async fn remove_image(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.images.remove_image(&name)).await
}

async fn export_image(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<ExportRequest>(&body) {
        Ok(req) => streaming(move |p| a.images.export_image(&name, &req.path, &req.format, p)),
        Err(e) => e.into_response(),
    }
}

async fn push_image(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<PushRequest>(&body) {
        Ok(req) => streaming(move |p| a.images.push_image(&name, &req.to, req.force, p)),
        Err(e) => e.into_response(),
    }
}

async fn pull_image(State(a): S, Name(name): Name, body: Bytes) -> Response {
    let req = if body.is_empty() {
        Ok(PullRequest { background: false })
    } else {
        parse::<PullRequest>(&body)
    };
    match req {
        Ok(req) => streaming(move |p| a.images.pull_image(&name, req.background, p)),
        Err(e) => e.into_response(),
    }
}

async fn fsck(State(a): S, body: Bytes) -> Response {
    let req = if body.is_empty() {
        Ok(spore_api::FsckRequest::default())
    } else {
        parse::<spore_api::FsckRequest>(&body)
    };
    match req {
        Ok(req) => streaming(move |p| a.images.fsck(req.repair, p)),
        Err(e) => e.into_response(),
    }
}

async fn stop_agent(State(a): S, body: Bytes) -> Response {
    let req = if body.is_empty() {
        Ok(spore_api::AgentStop::default())
    } else {
        parse::<spore_api::AgentStop>(&body)
    };
    match req {
        Ok(req) => {
            let running = a.vms.running_count() as u32;
            tracing::info!(vms = req.vms, running, "stop requested over the API");
            a.stop.request(req.vms);
            axum::Json(spore_api::AgentStopping {
                vms: req.vms,
                running,
                pid: std::process::id(),
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn list_disks(State(a): S) -> Response {
    blocking(move || a.disks.list_disks()).await
}

async fn create_disk(State(a): S, body: Bytes) -> Response {
    match parse::<DiskCreate>(&body) {
        Ok(req) => blocking(move || a.disks.create_disk(&req.name, &req.image, None)).await,
        Err(e) => e.into_response(),
    }
}

async fn get_disk(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.disks.get_disk(&name)).await
}

async fn remove_disk(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.disks.remove_disk(&name, false)).await
}

async fn commit_disk(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<CommitRequest>(&body) {
        Ok(req) => blocking(move || a.vms.commit_disk_of_vm(&name, &req.name)).await,
        Err(e) => e.into_response(),
    }
}

async fn list_vms(State(a): S) -> Response {
    blocking(move || a.vms.list_vms()).await
}

async fn run_vm(State(a): S, body: Bytes) -> Response {
    match parse::<VmCreate>(&body) {
        Ok(req) => blocking(move || a.vms.run_vm(&req)).await,
        Err(e) => e.into_response(),
    }
}

async fn get_vm(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.vms.get_vm(&name)).await
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove_vm(State(a): S, Name(name): Name, Query(q): Query<RemoveQuery>) -> Response {
    blocking(move || {
        a.migration.not_migrating(&name)?;
        a.vms
            .remove_vm(&name, q.force)
            .map(|()| serde_json::json!({ "removed": name }))
    })
    .await
}

#[derive(Deserialize)]
struct StopQuery {
    /// Stop QEMU at once instead of asking the guest to power off.
    #[serde(default)]
    force: bool,
    /// Seconds the guest has to power off before QEMU is stopped.
    timeout_s: Option<u64>,
}

/// How long a guest has to power off, unless the caller says.
const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 60;
const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;

async fn stop_vm(State(a): S, Name(name): Name, Query(q): Query<StopQuery>) -> Response {
    blocking(move || {
        a.migration.not_migrating(&name)?;
        let timeout = q.timeout_s.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_S);
        if timeout > MAX_SHUTDOWN_TIMEOUT_S {
            return Err(crate::error::AgentError::Invalid(format!(
                "timeout_s {timeout} is over the limit of {MAX_SHUTDOWN_TIMEOUT_S}"
            )));
        }
        a.vms
            .shutdown_vm(&name, q.force, std::time::Duration::from_secs(timeout))
    })
    .await
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

async fn vm_log(State(a): S, Name(name): Name, Query(q): Query<LogQuery>) -> Response {
    blocking(move || a.vms.vm_log(&name, q.offset)).await
}

async fn template_vm(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<TemplateCreate>(&body) {
        Ok(req) => {
            blocking(move || {
                a.migration.not_migrating(&name)?;
                a.templates.template_vm(&name, &req)
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn resize_vm(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<ResizeRequest>(&body) {
        Ok(req) => {
            blocking(move || {
                a.migration.not_migrating(&name)?;
                a.vms.resize_vm(&name, req.memory_mib, req.cpus)
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn send_line(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<spore_api::SendRequest>(&body) {
        Ok(req) => {
            blocking(move || {
                a.vms
                    .send(&name, &spore_qemu::Message::Line(req.line))
                    .map(|()| serde_json::json!({ "sent": true }))
            })
            .await
        }
        Err(e) => e.into_response(),
    }
}

async fn migrate_vm(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<MigrateRequest>(&body) {
        Ok(req) => blocking(move || a.migration.migrate_vm(&name, req)).await,
        Err(e) => e.into_response(),
    }
}

async fn get_migration(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.migration.migration(&name)).await
}

async fn cancel_migration(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.migration.cancel_migration(&name)).await
}

async fn list_templates(State(a): S) -> Response {
    blocking(move || a.templates.list_templates()).await
}

async fn get_template(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.templates.get_template(&name)).await
}

async fn remove_template(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.templates.remove_template(&name)).await
}

async fn clone_template(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<CloneRequest>(&body) {
        Ok(req) => blocking(move || a.templates.clone_template(&name, &req)).await,
        Err(e) => e.into_response(),
    }
}

async fn push_template(State(a): S, Name(name): Name, body: Bytes) -> Response {
    match parse::<PushRequest>(&body) {
        Ok(req) => streaming(move |p| a.templates.push_template(&name, &req.to, req.force, p)),
        Err(e) => e.into_response(),
    }
}

async fn pull_template(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.templates.pull_template(&name)).await
}

async fn remove_group(State(a): S, Name(name): Name) -> Response {
    blocking(move || a.templates.remove_group(&name)).await
}

async fn metrics(State(a): S) -> Response {
    let text = crate::metrics::render(&a);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

//! A client for the agent's API: over its unix socket (the local operator),
//! or over another host's peer listener with an operator certificate
//! (`spore --remote https://HOST:PORT`, the API under `/api`).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::types::{ErrorBody, Event};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no spore agent is running at {socket} (start one with `spore agent`, or set --data-dir / SPORE_HOME)")]
    NoAgent { socket: PathBuf },
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("talking to the agent")]
    Http(#[from] hyper::Error),
    #[error("building the request")]
    Request(#[from] hyper::http::Error),
    #[error("the agent's answer is not the expected JSON")]
    Json(#[from] serde_json::Error),
    #[error("agent socket I/O")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the stream before the operation finished")]
    Truncated,
    #[error("remote agent {0}")]
    Remote(String),
}

#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
}

/// Where the agent is.
#[derive(Debug, Clone)]
enum Target {
    /// The local agent's API socket.
    Socket(PathBuf),
    Remote(Remote),
}

/// Another host's agent, reached over mutual TLS.
#[derive(Clone)]
struct Remote {
    /// `HOST:PORT`.
    addr: String,
    name: rustls::pki_types::ServerName<'static>,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("addr", &self.addr).finish()
    }
}

/// Whether an agent holds `dir`'s lock (waiting up to 3 s for one to take
/// it when a socket holder says an agent is restarting there). The socket
/// holder keeps the API socket open while no agent runs, so a connect
/// alone would wait in its backlog instead of failing.
async fn agent_runs(dir: &Path) -> bool {
    let Some(running) = crate::agent_running(dir) else {
        // No lock file: an agent from before it existed, or none at all;
        // the connect decides.
        return true;
    };
    if running {
        return true;
    }
    if !dir.join(crate::HOLDER_SOCKET).exists() {
        return false;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if crate::agent_running(dir) == Some(true) {
            return true;
        }
    }
    false
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            target: Target::Socket(socket.into()),
        }
    }

    /// The agent whose peer listener is at `url` (`https://HOST:PORT`),
    /// driven with the certificate in `tls` (which must hold the
    /// `operator` role there).
    pub fn remote(
        url: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Remote(format!("{url}: {why}"));
        let addr = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("the remote API is reached over https:// only"))?
            .trim_end_matches('/');
        if addr.contains('/') || !addr.contains(':') {
            return Err(bad("expected https://HOST:PORT"));
        }
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']'))
            .unwrap_or(addr);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| bad("not a host name or address"))?;
        Ok(Client {
            target: Target::Remote(Remote {
                addr: addr.to_owned(),
                name,
                tls,
            }),
        })
    }

    /// True for another host's agent (`--remote`).
    pub fn is_remote(&self) -> bool {
        matches!(self.target, Target::Remote(_))
    }

    /// The client for the agent of `data_dir`.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        Self::new(data_dir.join(crate::API_SOCKET))
    }

    /// One request to another host's agent, over mutual TLS.
    async fn send_remote(
        &self,
        remote: &Remote,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let tcp = tokio::net::TcpStream::connect(&remote.addr).await?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(remote.tls.clone())
            .connect(remote.name.clone(), tcp)
            .await
            .map_err(|e| ClientError::Remote(format!("{}: TLS: {e}", remote.addr)))?;
        self.exchange(TokioIo::new(tls), method, &format!("/api{path}"), body)
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let socket = match &self.target {
            Target::Socket(socket) => socket,
            Target::Remote(remote) => return self.send_remote(remote, method, path, body).await,
        };
        if let Some(dir) = socket.parent() {
            if !agent_runs(dir).await {
                return Err(ClientError::NoAgent {
                    socket: socket.clone(),
                });
            }
        }
        let stream = match UnixStream::connect(socket).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ClientError::NoAgent {
                    socket: socket.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        self.exchange(TokioIo::new(stream), method, path, body)
            .await
    }

    /// One request and its answer on a fresh connection.
    async fn exchange<S>(
        &self,
        io: TokioIo<S>,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "spore-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Err(api_error(status, &bytes))
    }

    /// A request answered by one JSON document.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, path, body).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// A request answered by a stream of events; `on_progress` sees each
    /// progress event, and the final result is returned.
    pub async fn stream<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
        mut on_progress: impl FnMut(&str, u64, u64),
    ) -> Result<T, ClientError> {
        let resp = self
            .send(method, path, Some(serde_json::to_vec(body)?))
            .await?;
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                pending.extend_from_slice(&data);
            }
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                if line.len() <= 1 {
                    continue;
                }
                match serde_json::from_slice::<Event>(&line)? {
                    Event::Progress { phase, done, total } => on_progress(&phase, done, total),
                    Event::Done { result } => return Ok(serde_json::from_value(result)?),
                    Event::Error { error } => {
                        return Err(ClientError::Api {
                            status: 500,
                            code: error.code,
                            message: error.message,
                        })
                    }
                }
            }
        }
        Err(ClientError::Truncated)
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: format!("HTTP {status}: {}", String::from_utf8_lossy(body)),
        },
    }
}

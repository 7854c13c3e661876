//! The origin's store: pushed chunks and image names kept in an object
//! store (a local directory or S3) through `object_store`.
//!
//! An origin is the agent hosts push images to and resolve names at. What
//! was pushed lives here rather than in the agent's own chunk store and
//! metadata, so that it can outgrow one machine: the same code keeps it in
//! a local directory (the default) or an S3-compatible bucket, which
//! several origin agents may serve at once.
//!
//! Layout under the store's root (a directory, or a bucket and prefix),
//! also written down in docs/formats.md:
//!
//! ```text
//! chunks/<2 hex>/<64 hex>   a chunk file, byte for byte as the batch wire
//!                           carries it (header + payload, docs/formats.md)
//! images/<name>             an image record, JSON with a format version
//!                           (record.rs)
//! ```
//!
//! A chunk is verified against its id before it is stored; whoever fetches
//! it verifies it again. A name is bound only once its manifest and every
//! chunk that manifest reaches (layers, data, the boot profile) are in the
//! store, so a host that resolves a name can always read the whole image.

mod record;

pub use record::{ImageRecord, RecordError, IMAGE_RECORD_VERSION, MAX_RECORD_LEN};

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use spore_chunks::{decode_chunk_file, ChunkId, MAX_CHUNK_SIZE};

/// Requests in flight at once for one batch, missing check or bind.
pub const CONCURRENCY: usize = 32;
/// A chunk file is at most its 16-byte header and the largest payload.
const MAX_CHUNK_OBJECT: u64 = MAX_CHUNK_SIZE as u64 + 16;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("origin store {0:?}: expected a directory, file:///DIR or s3://BUCKET[/PREFIX]")]
    Scheme(String),
    #[error("origin store {0:?} names no bucket: expected s3://BUCKET[/PREFIX]")]
    NoBucket(String),
    #[error("origin store {0:?}: a file URL needs an absolute path, file:///DIR")]
    FileUrl(String),
    #[error("creating the origin store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening origin store {spec}")]
    Store {
        spec: String,
        #[source]
        source: object_store::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin store {op} {path}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("origin store object {path} is {len} bytes, over the limit")]
    TooLarge { path: String, len: u64 },
    #[error("image record {name:?} in the origin store")]
    Record {
        name: String,
        #[source]
        source: RecordError,
    },
    #[error("chunk {id} was rejected")]
    Rejected {
        id: ChunkId,
        #[source]
        source: spore_chunks::Error,
    },
    #[error("chunk {id} in the origin store is unusable")]
    Corrupt {
        id: ChunkId,
        #[source]
        source: spore_chunks::Error,
    },
    #[error("decoding chunk {id} of the image")]
    Image {
        id: ChunkId,
        #[source]
        source: spore_image::ImageError,
    },
    #[error("manifest {0} is not in the origin store")]
    NoManifest(ChunkId),
    #[error("{absent} chunks of manifest {manifest} are not in the origin store")]
    Incomplete { manifest: ChunkId, absent: usize },
    #[error("syncing the origin store directory {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("origin store task failed: {0}")]
    Task(String),
}

pub type Result<T, E = OriginError> = std::result::Result<T, E>;

/// Counters of what the store did since it was opened.
#[derive(Debug, Default)]
pub struct Stats {
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub chunks_read: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Pushed chunks and image names in an object store.
#[derive(Debug)]
pub struct OriginStore {
    store: Arc<dyn ObjectStore>,
    spec: String,
    /// The directory of a local store, synced before a name is bound (the
    /// local backend does not sync each object it writes).
    local_root: Option<PathBuf>,
    stats: Stats,
}

fn chunk_path(id: &ChunkId) -> Path {
    let hex = id.to_hex();
    Path::from_iter(["chunks", &hex[..2], &hex])
}

fn image_path(name: &str) -> Path {
    // A name that is not a single safe path segment is percent-encoded
    // into one; the agent only lets plain names through anyway.
    Path::from_iter(["images", name])
}

impl OriginStore {
    /// Opens the store `spec` names:
    ///
    /// - `DIR` or `file:///DIR`: a local directory (created if need be);
    /// - `s3://BUCKET[/PREFIX]`: a bucket of an S3-compatible service, set up
    ///   from the usual environment (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT`,
    ///   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    ///   `AWS_ALLOW_HTTP=true` for an endpoint without TLS).
    ///
    /// Nothing is sent anywhere yet; [`OriginStore::check`] does that.
    pub fn open(spec: &str) -> Result<Self, OpenError> {
        match spec.split_once("://") {
            None if !spec.is_empty() => Self::local(spec, FsPath::new(spec)),
            None => Err(OpenError::Scheme(spec.into())),
            Some(("file", path)) if path.starts_with('/') => Self::local(spec, FsPath::new(path)),
            Some(("file", _)) => Err(OpenError::FileUrl(spec.into())),
            Some(("s3" | "s3a", rest)) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(OpenError::NoBucket(spec.into()));
                }
                let opened = |source| OpenError::Store {
                    spec: spec.into(),
                    source,
                };
                let s3 = AmazonS3Builder::from_env()
                    .with_url(format!("s3://{bucket}"))
                    .build()
                    .map_err(opened)?;
                let prefix = prefix.trim_matches('/');
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    let prefix = Path::parse(prefix).map_err(|e| opened(e.into()))?;
                    Arc::new(PrefixStore::new(s3, prefix))
                };
                Ok(OriginStore {
                    store,
                    spec: spec.into(),
                    local_root: None,
                    stats: Stats::default(),
                })
            }
            Some(_) => Err(OpenError::Scheme(spec.into())),
        }
    }

    fn local(spec: &str, dir: &FsPath) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(dir).map_err(|source| OpenError::Store {
            spec: spec.into(),
            source,
        })?;
        Ok(OriginStore {
            store: Arc::new(fs),
            spec: spec.into(),
            local_root: Some(dir.to_owned()),
            stats: Stats::default(),
        })
    }

    /// The spec the store was opened with, e.g. `s3://bucket/prefix`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Makes one request, so that a store that cannot be reached (wrong
    /// endpoint, credentials, bucket) is reported when the agent starts
    /// rather than at the first push.
    pub async fn check(&self) -> Result<()> {
        let prefix = Path::from("images");
        self.store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|source| OriginError::Store {
                op: "listing",
                path: prefix.to_string(),
                source,
            })?;
        Ok(())
    }

    /// The object at `path`, or None when there is none; objects larger
    /// than `limit` are an error and are not read.
    async fn get_object(&self, path: &Path, limit: u64) -> Result<Option<Bytes>> {
        Ok(self.get_object_at(path, limit).await?.map(|(b, _)| b))
    }

    /// [`OriginStore::get_object`] and when the object was last written
    /// (unix seconds).
    async fn get_object_at(&self, path: &Path, limit: u64) -> Result<Option<(Bytes, u64)>> {
        let failed = |source| OriginError::Store {
            op: "reading",
            path: path.to_string(),
            source,
        };
        let got = match self.store.get(path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(failed(e)),
        };
        if got.meta.size > limit {
            return Err(OriginError::TooLarge {
                path: path.to_string(),
                len: got.meta.size,
            });
        }
        let at = u64::try_from(got.meta.last_modified.timestamp()).unwrap_or(0);
        got.bytes().await.map(|b| Some((b, at))).map_err(failed)
    }

    /// The chunk file of `id` as stored (unverified: the receiver checks
    /// it), or None when the store lacks it.
    pub async fn get_raw(&self, id: &ChunkId) -> Result<Option<Bytes>> {
        let raw = self.get_object(&chunk_path(id), MAX_CHUNK_OBJECT).await?;
        if let Some(r) = &raw {
            self.stats.chunks_read.fetch_add(1, Relaxed);
            self.stats.bytes_read.fetch_add(r.len() as u64, Relaxed);
        }
        Ok(raw)
    }

    /// [`OriginStore::get_raw`] for each of `ids`, in order, a few at a
    /// time. A chunk the store fails to give (an error, not an absence)
    /// is answered as missing, with a warning: one bad read fails that
    /// chunk only, and the asker tries its next source for it.
    pub async fn get_raws(&self, ids: &[ChunkId]) -> Result<Vec<Option<Bytes>>> {
        // Ids by value: a closure over borrowed items would make the future
        // unusable in a Send context (a higher-ranked lifetime rustc cannot
        // prove Send for).
        Ok(stream::iter(ids.iter().copied())
            .map(|id| async move {
                match self.get_raw(&id).await {
                    Ok(raw) => raw,
                    Err(e) => {
                        tracing::warn!(chunk = %id, error = %e, "origin store read failed; answered as missing");
                        None
                    }
                }
            })
            .buffered(CONCURRENCY)
            .collect()
            .await)
    }

    /// Which of `ids` the store lacks, in their order (one HEAD each, a few
    /// at a time).
    pub async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let present: Vec<bool> = stream::iter(ids.iter().copied())
            .map(|id| async move {
                let path = chunk_path(&id);
                match self.store.head(&path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(source) => Err(OriginError::Store {
                        op: "looking up",
                        path: path.to_string(),
                        source,
                    }),
                }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(ids
            .iter()
            .zip(present)
            .filter(|(_, here)| !here)
            .map(|(id, _)| *id)
            .collect())
    }

    /// Stores the chunk file `raw` under `id` after checking that it
    /// decodes to data whose hash is `id` (on a blocking thread: a chunk
    /// may be megabytes of zstd). Not durable until a name is bound.
    pub async fn put_chunk(&self, id: ChunkId, raw: Bytes) -> Result<()> {
        let checked = raw.clone();
        blocking(move || decode_chunk_file(&id, &checked).map(drop))
            .await?
            .map_err(|source| OriginError::Rejected { id, source })?;
        let path = chunk_path(&id);
        let len = raw.len() as u64;
        self.store
            .put(&path, raw.into())
            .await
            .map_err(|source| OriginError::Store {
                op: "writing",
                path: path.to_string(),
                source,
            })?;
        self.stats.chunks_written.fetch_add(1, Relaxed);
        self.stats.bytes_written.fetch_add(len, Relaxed);
        Ok(())
    }

    /// What `name` is bound to, if anything.
    pub async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>> {
        Ok(self.get_image_at(name).await?.map(|(r, _)| r))
    }

    /// [`OriginStore::get_image`] and when the name was bound (unix
    /// seconds: the record object's last write).
    pub async fn get_image_at(&self, name: &str) -> Result<Option<(ImageRecord, u64)>> {
        let Some((bytes, at)) = self
            .get_object_at(&image_path(name), MAX_RECORD_LEN)
            .await?
        else {
            return Ok(None);
        };
        ImageRecord::decode(&bytes)
            .map(|r| Some((r, at)))
            .map_err(|source| OriginError::Record {
                name: name.into(),
                source,
            })
    }

    /// Binds `name` to `rec`, once the manifest and every chunk it reaches
    /// (and the profile) are in the store; until then the name is left as
    /// it was and the error says what is lacking.
    /// The data chunks of the image whose manifest is `manifest`, as far
    /// as the store holds its layers (a resolve ranks only these by
    /// popularity).
    pub async fn image_chunks(&self, manifest: &ChunkId) -> Result<Vec<ChunkId>> {
        let Some(raw) = self.get_raw(manifest).await? else {
            return Err(OriginError::NoManifest(*manifest));
        };
        let m = self
            .decode(*manifest, raw, spore_image::image::decode_manifest)
            .await?;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for layer in self.layers(&m).await?.iter().flatten() {
            out.extend(layer.chunks().iter().filter(|id| seen.insert(**id)));
        }
        Ok(out)
    }

    /// The layers of `manifest` the store holds (None where it lacks one).
    async fn layers(
        &self,
        manifest: &spore_image::Manifest,
    ) -> Result<Vec<Option<spore_image::Layer>>> {
        stream::iter(manifest.layers.iter().copied())
            .map(|id| async move {
                match self.get_raw(&id).await? {
                    Some(raw) => self
                        .decode(id, raw, spore_image::image::decode_layer)
                        .await
                        .map(Some),
                    None => Ok(None),
                }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    pub async fn bind_image(&self, name: &str, rec: &ImageRecord) -> Result<()> {
        let Some(raw) = self.get_raw(&rec.manifest).await? else {
            return Err(OriginError::NoManifest(rec.manifest));
        };
        let manifest_id = rec.manifest;
        let manifest = self
            .decode(manifest_id, raw, spore_image::image::decode_manifest)
            .await?;
        // The layers present are read to learn their chunks; a missing one
        // is counted as missing below (its chunks cannot be known yet).
        let layers = self.layers(&manifest).await?;
        let mut needed: HashSet<ChunkId> = manifest.layers.iter().copied().collect();
        for layer in layers.iter().flatten() {
            needed.extend(layer.chunks().iter().copied());
        }
        needed.extend(rec.profile);
        let needed: Vec<ChunkId> = needed.into_iter().collect();
        let absent = self.missing(&needed).await?.len();
        if absent > 0 {
            return Err(OriginError::Incomplete {
                manifest: manifest_id,
                absent,
            });
        }
        // The chunks must be durable before a name points at them.
        self.sync_local().await?;
        let path = image_path(name);
        self.store
            .put(&path, rec.encode().into())
            .await
            .map_err(|source| OriginError::Store {
                op: "writing",
                path: path.to_string(),
                source,
            })?;
        self.sync_local().await
    }

    /// Verifies the chunk file `raw` of `id` and parses its contents.
    async fn decode<T: Send + 'static>(
        &self,
        id: ChunkId,
        raw: Bytes,
        parse: fn(&ChunkId, &[u8]) -> Result<T, spore_image::ImageError>,
    ) -> Result<T> {
        blocking(move || {
            let data = decode_chunk_file(&id, &raw)
                .map_err(|source| OriginError::Corrupt { id, source })?;
            parse(&id, &data).map_err(|source| OriginError::Image { id, source })
        })
        .await?
    }

    /// For a local directory: one `syncfs` of its file system, which makes
    /// every object written so far durable (the way the chunk store does).
    async fn sync_local(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        blocking(move || {
            let failed = |source| OriginError::Sync {
                path: root.clone(),
                source,
            };
            let dir = std::fs::File::open(&root).map_err(failed)?;
            // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
            let rc = unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&dir)) };
            if rc != 0 {
                return Err(failed(std::io::Error::last_os_error()));
            }
            Ok(())
        })
        .await?
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OriginError::Task(e.to_string()))
}

#[cfg(test)]
mod tests;

//! Request and response bodies.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A short machine-readable code: not_found, conflict, invalid, in_use, internal.
    pub code: String,
    /// The error and its causes, outermost first.
    pub message: String,
}

/// One line of a streamed (NDJSON) response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Progress {
        phase: String,
        done: u64,
        total: u64,
    },
    Done {
        result: serde_json::Value,
    },
    Error {
        error: ErrorBody,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub data_dir: PathBuf,
    pub nbd_socket: PathBuf,
    pub nbd_tcp: Option<String>,
    pub accel: String,
    pub images: usize,
    pub disks: usize,
    pub vms: usize,
    pub cache_bytes: u64,
    pub cache_budget: u64,
    /// Peers and origin this agent fetches from, in the order it asks them.
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
    /// Chunks and bytes this agent served to other hosts.
    #[serde(default)]
    pub served_chunks: u64,
    #[serde(default)]
    pub served_bytes: u64,
    /// What this agent's start found left by a previous run and settled
    /// or removed (VMs that were running, their RAM files and FUSE mounts,
    /// standby clones, template RAM files and directories nothing owns,
    /// disk directories without a record, template removals left
    /// half-way), one line each.
    #[serde(default)]
    pub recovered: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub url: String,
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks it sent that failed verification.
    pub corrupt: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    /// A raw or qcow2 file on the agent's host (absolute path).
    pub path: PathBuf,
    pub name: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub block_size: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportResult {
    pub image: ImageSummary,
    pub format: String,
    /// Blocks that differ from the parent (all data blocks without one).
    pub changed_blocks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub manifest: String,
    pub virtual_size: u64,
    pub block_size: u32,
    pub layers: usize,
    pub created: u64,
    pub source: String,
    /// The manifest the origin binds the name to now, when that differs
    /// from this one (`image pull` takes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newer_at_origin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    pub id: String,
    /// Blocks the layer sets.
    pub blocks: u64,
    pub chunks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub summary: ImageSummary,
    /// Bottom first.
    pub layer_list: Vec<LayerInfo>,
    /// Distinct chunks the image reads.
    pub chunks: u64,
    /// Blocks holding data.
    pub data_blocks: u64,
    /// Bytes on disk for the image's chunks, layers and manifest.
    pub stored_bytes: u64,
    /// Part of `stored_bytes` that other images use too.
    pub shared_bytes: u64,
    /// Memory of the flat block map.
    pub map_bytes: u64,
    /// Data chunks of the image present in this host's store (the rest is
    /// fetched from peers or the origin when read).
    pub local_chunks: u64,
    /// Bytes those local chunks take.
    pub local_bytes: u64,
    /// Chunks the recorded boot profile names, if the image has one.
    #[serde(default)]
    pub profile_blocks: Option<u64>,
    /// Bytes those chunks take as stored and sent (compressed): the boot's
    /// working set W.
    #[serde(default)]
    pub profile_bytes: Option<u64>,
    /// The profile's blocks in first-read order (with `inspect --profile`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile_order: Vec<u64>,
    /// Disks created from the image.
    pub used_by: Vec<String>,
    pub export: String,
    /// The image is being completed in the background (every chunk made
    /// local): how far, and what it waits for after a failed fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completing: Option<CompletionInfo>,
}

/// Background completion of an image (`image pull --background`,
/// `--complete-images`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompletionInfo {
    /// Chunks not local yet.
    pub chunks_left: u64,
    /// Why the last round stopped short (a source's error), while it
    /// waits to try again.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Seconds until the next try, while waiting.
    #[serde(default)]
    pub retry_in_s: Option<f64>,
    /// Failed rounds so far.
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRequest {
    pub path: PathBuf,
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_format() -> String {
    "raw".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveResult {
    pub removed: String,
    pub freed_chunks: u64,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskCreate {
    pub name: String,
    pub image: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub name: String,
    pub image: String,
    pub manifest: String,
    pub virtual_size: u64,
    /// Bytes the VM wrote (4 KiB granules in the overlay).
    pub written_bytes: u64,
    /// Bytes read through the disk since the agent started.
    pub read_bytes: u64,
    pub export: String,
    pub vm: Option<String>,
    pub created: u64,
    /// Why the disk is not served: its files could not be opened when the
    /// agent started (they are kept as they are, for repair).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    /// Name of the new image.
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmCreate {
    pub name: String,
    pub image: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    /// kvm or tcg; detected when absent.
    #[serde(default)]
    pub accel: Option<String>,
}

fn default_memory() -> u64 {
    512
}

fn default_cpus() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Starting,
    /// A clone paused with its template's state loaded, waiting to be
    /// handed a name and an identity (`spore agent --clone-standby`).
    Standby,
    Running,
    /// The destination of a live migration: QEMU waits for (or is
    /// receiving) the VM's state; the source still runs the VM.
    Incoming,
    Stopping,
    Stopped,
    Failed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Standby => "standby",
            VmState::Running => "running",
            VmState::Incoming => "incoming",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub image: String,
    pub disk: String,
    pub state: VmState,
    pub pid: Option<u32>,
    pub accel: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub created: u64,
    /// Why the VM is stopped or failed, when it is.
    pub reason: Option<String>,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The template this VM was cloned from (or resumed from after it was
    /// captured), if any.
    #[serde(default)]
    pub template: Option<String>,
    /// The clone group (`spore vm clone --name`), if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Guest-visible identity: hostname, instance id, MAC, generation ID.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub vmgenid: Option<String>,
    /// Where this VM's time to running went, in milliseconds, when it was
    /// started by this agent run (clones: QEMU start, state load, resume).
    #[serde(default)]
    pub start_ms: Option<StartTimes>,
    /// Why QEMU holds the guest paused while the VM is `running`: `disk
    /// full` (a write found no space for the disk's overlay; the agent
    /// resumes the VM by itself once there is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// Phases of starting a VM, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartTimes {
    /// Disk overlay created.
    pub disk: f64,
    /// QEMU process started and its monitor answering.
    pub qemu: f64,
    /// Device state loaded (clones).
    pub load: f64,
    /// Memory and CPUs added beyond the template (clones).
    pub resize: f64,
    /// From the request to the guest running.
    pub total: f64,
    /// Taken from the standby pool: QEMU had started and loaded the state
    /// before the request (`qemu` and `load` are then 0).
    #[serde(default)]
    pub standby: bool,
}

/// `POST /v1/vms/{name}/template`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateCreate {
    /// Name of the new template.
    pub name: String,
    /// Leave the source VM stopped instead of resuming it from the template.
    #[serde(default)]
    pub stop: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: String,
    /// The VM it was captured from, and that VM's image.
    pub source_vm: String,
    pub source_image: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub max_memory_mib: u64,
    pub max_cpus: u32,
    pub accel: String,
    /// The image holding its RAM (zero pages not stored, chunks deduped).
    pub ram_image: String,
    /// The image holding its disk: the source's image plus what it wrote.
    pub disk_image: String,
    /// RAM bytes that are not zero, as stored in chunks.
    pub ram_stored_bytes: u64,
    /// RAM chunks, and those that were already in the store (dedupe).
    pub ram_chunks: u64,
    pub ram_chunks_deduped: u64,
    /// Size of the device-state stream.
    pub state_bytes: u64,
    /// How long the source VM was paused for the capture, in ms.
    pub pause_ms: f64,
    /// VMs made from this template that exist now.
    pub clones: Vec<String>,
    pub created: u64,
    /// What happened to the source VM.
    pub source_after: String,
    /// A removal started and stopped half-way: nothing starts from the
    /// template; `template rm` (or the agent's next start) finishes it.
    #[serde(default)]
    pub removing: bool,
}

/// `POST /v1/templates/{name}/clone`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneRequest {
    #[serde(default = "default_count")]
    pub count: u32,
    /// Clone names are `PREFIX-1`, `PREFIX-2`, ... and the clones form the
    /// group PREFIX. Default: the template's name.
    #[serde(default)]
    pub prefix: Option<String>,
    /// More memory than the template (hot-plugged, multiple of 128 MiB).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// More CPUs than the template (hot-plugged).
    #[serde(default)]
    pub cpus: Option<u32>,
}

fn default_count() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneResult {
    pub template: String,
    pub group: String,
    pub vms: Vec<VmInfo>,
    /// Clones that failed to start, with why.
    pub failed: Vec<(String, String)>,
    /// Wall time of the whole request, in ms.
    pub total_ms: f64,
}

/// `POST /v1/vms/{name}/resize`: grow a running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResizeRequest {
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub cpus: Option<u32>,
}

/// `DELETE /v1/groups/{name}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRemoved {
    pub group: String,
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmLog {
    /// Serial console output from `offset` on.
    pub text: String,
    /// Offset to ask for next time to get only new output.
    pub next_offset: u64,
    pub state: VmState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRequest {
    /// The origin's peer URL, e.g. https://10.77.0.1:7070
    pub to: String,
    /// Rebind a name the origin has bound to other content (the
    /// certificate must hold the publisher role, as for every push).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushResult {
    pub image: String,
    pub to: String,
    /// Chunks the image consists of (manifest, layers, data).
    pub chunks: u64,
    /// Chunks the origin lacked and that were sent.
    pub sent_chunks: u64,
    pub sent_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullRequest {
    /// Return at once and complete the image in the background.
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullResult {
    pub image: String,
    /// Data chunks the image reads.
    pub chunks: u64,
    /// Chunks that were not here when the pull started.
    pub missing: u64,
    pub background: bool,
}

/// `POST /v1/agent/stop`: the agent stops serving and exits. Its VMs keep
/// running (a restarted agent takes them over) unless `vms` is set. An
/// empty body keeps the VMs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStop {
    /// Stop every VM (and standby clone) first, as `vm stop --force` does.
    pub vms: bool,
}

/// The answer to `POST /v1/agent/stop`: the agent is on its way out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStopping {
    /// Whether the VMs are stopped too.
    pub vms: bool,
    /// VMs (standbys included) with a running QEMU now: stopped first with
    /// `vms`, else left running for the next agent.
    pub running: u32,
    /// The agent's process id: it is gone once this process is.
    pub pid: u32,
}

/// `POST /v1/fsck`: the chunk store checked against the metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FsckRequest {
    /// Refetch what is missing or corrupt from the origin or peers, and
    /// drop chunks nothing refers to. (An empty body is `false`.)
    pub repair: bool,
}

/// A chunk something needs that the store does not hold (intact).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsckProblem {
    pub chunk: String,
    /// What the chunk is: `manifest`, `layer`, `data` or `profile`.
    pub kind: String,
    /// `missing`, or `corrupt` (its bytes did not hash to its id: moved
    /// aside to `chunks/corrupt/`).
    pub problem: String,
    /// What needs it: `image NAME`, `disk NAME`.
    pub needed_by: Vec<String>,
    /// With `--repair`: `fetched`, or why it could not be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

/// What `spore fsck` found (and, with `--repair`, did).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FsckReport {
    /// Chunk files read and hashed.
    pub chunks_checked: u64,
    /// Their bytes, decoded.
    pub bytes_checked: u64,
    /// Chunk files whose bytes did not hash to their id (moved aside).
    pub corrupt: u64,
    /// Chunks needed and not here (corrupt ones included).
    pub missing: u64,
    pub problems: Vec<FsckProblem>,
    /// Names that refer to names not here: `template T: its RAM image
    /// T.ram is not here` (not repaired: the template must be pulled or
    /// removed).
    #[serde(default)]
    pub dangling: Vec<String>,
    /// Data chunks of images read on demand that were not fetched yet:
    /// not a fault (`image pull` makes an image complete).
    pub not_fetched: u64,
    /// Chunks nothing refers to, and their bytes on disk.
    pub leaked_chunks: u64,
    pub leaked_bytes: u64,
    /// With `--repair`: chunks fetched, leaked chunks dropped.
    pub fetched: u64,
    pub dropped: u64,
    /// Problems left (found, or after the repair).
    pub unrepaired: u64,
    /// Nothing left to repair and nothing leaked.
    pub clean: bool,
}

/// `POST /v1/vms/{name}/send`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// One line for the guest channel (the demo guest's hook reads it).
    pub line: String,
}

/// How a live migration decides when the VM switches hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPolicy {
    /// Watch every pass; switch to post-copy (or throttle) as soon as
    /// pre-copy is predicted not to finish within the downtime limit.
    #[default]
    Auto,
    /// QEMU's default pre-copy: iterate until the rest fits the downtime
    /// limit (may never finish; `timeout` gives up).
    Precopy,
    /// Switch after the first pass; memory follows on demand.
    Postcopy,
    /// Pre-copy with QEMU's auto-converge (CPU throttling).
    AutoConverge,
}

impl std::fmt::Display for MigrationPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationPolicy::Auto => "auto",
            MigrationPolicy::Precopy => "precopy",
            MigrationPolicy::Postcopy => "postcopy",
            MigrationPolicy::AutoConverge => "auto-converge",
        })
    }
}

impl std::str::FromStr for MigrationPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => MigrationPolicy::Auto,
            "precopy" => MigrationPolicy::Precopy,
            "postcopy" => MigrationPolicy::Postcopy,
            "auto-converge" => MigrationPolicy::AutoConverge,
            _ => {
                return Err(format!(
                    "unknown policy {s:?} (auto, precopy, postcopy or auto-converge)"
                ))
            }
        })
    }
}

fn default_downtime() -> u64 {
    300
}

fn default_migration_timeout() -> u64 {
    600
}

fn yes() -> bool {
    true
}

/// `POST /v1/vms/{name}/migrate`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination agent's peer URL, e.g. https://10.77.0.3:7070
    pub to: String,
    #[serde(default)]
    pub policy: MigrationPolicy,
    /// The longest pause of the guest that pre-copy may plan for.
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Cap on the migration's use of the link, bytes per second.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Give up if the VM has not switched hosts after this long (the source
    /// keeps running).
    #[serde(default = "default_migration_timeout")]
    pub timeout_s: u64,
    /// May `auto` use post-copy? Without it, `auto` throttles the guest.
    #[serde(default = "yes")]
    pub allow_postcopy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationPhase {
    /// Asking the destination to get ready.
    Preparing,
    /// Copying the blocks the VM wrote.
    Disk,
    /// Pre-copy passes over memory.
    Memory,
    /// The guest is paused: last blocks and device state.
    Switching,
    /// The guest runs at the destination; memory still arriving.
    Postcopy,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationPhase {
    pub fn finished(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Disk => "disk",
            MigrationPhase::Memory => "memory",
            MigrationPhase::Switching => "switching",
            MigrationPhase::Postcopy => "postcopy",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        })
    }
}

/// One decision of a migration policy, or an event worth reporting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationDecision {
    /// Since the migration started.
    pub at_ms: f64,
    /// The pass over memory in progress (1 = the first).
    pub pass: u64,
    pub text: String,
}

/// A point of a migration's timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationSample {
    pub at_ms: f64,
    pub status: String,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    pub dirty_rate: u64,
    pub throughput: u64,
}

/// A live migration as its source agent sees it (kept after it ends).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub vm: String,
    pub to: String,
    pub policy: MigrationPolicy,
    pub phase: MigrationPhase,
    /// Unix time of the request.
    pub started: u64,
    pub elapsed_ms: f64,
    /// When the guest stopped at the source (ms after the start).
    pub switched_at_ms: Option<f64>,
    /// Guest RAM, bytes.
    pub ram_total: u64,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    /// Passes over memory (QEMU's dirty-sync count).
    pub passes: u64,
    pub dirty_rate: u64,
    /// The guest's write rate as QEMU sampled it during the first pass
    /// (`auto` only; distinct bytes per second).
    #[serde(default)]
    pub sampled_dirty_rate: Option<u64>,
    /// Post-copy faults travel on their own connection
    /// (`postcopy-preempt`).
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// QEMU's memory stream was encrypted (its own TLS, the fleet's
    /// certificates); block batches and control always travel over the
    /// peer listener's TLS.
    #[serde(default)]
    pub stream_tls: bool,
    pub throughput: u64,
    pub postcopy_requests: u64,
    pub throttle_percent: u64,
    /// Blocks the VM had written, sent from the source's overlay.
    pub disk_bytes: u64,
    /// Passes over the disk's dirty blocks (the first copies every written
    /// block; the last runs while the guest is paused).
    pub disk_passes: u32,
    /// Bytes sent in the last disk pass, while the guest was paused.
    pub disk_final_bytes: u64,
    /// Downtime as QEMU measured it.
    pub downtime_ms: Option<f64>,
    /// The longest time the guest did not answer the agent's pings
    /// (every 10 ms over the guest channel), from the start of the
    /// migration until the destination committed.
    pub guest_stall_ms: Option<f64>,
    /// When that longest stall began (ms after the start).
    #[serde(default)]
    pub guest_stall_at_ms: Option<f64>,
    /// When the destination said its guest runs (post-copy; ms after the
    /// start). Until then a post-copy is never paused on purpose: QEMU
    /// loses a post-copy broken off before the destination starts the
    /// guest (docs/migration.md, "Post-copy recovery").
    #[serde(default)]
    pub destination_runs_at_ms: Option<f64>,
    pub decisions: Vec<MigrationDecision>,
    pub timeline: Vec<MigrationSample>,
    pub error: Option<String>,
}

/// `POST /v1/migrations` on the destination's peer listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRequest {
    pub vm: String,
    /// Where the request comes from (for records and logs).
    pub from: String,
    pub image: String,
    /// The manifest (hex) of the image the VM's disk is on: the destination
    /// builds the disk on exactly this, fetched by content if it lacks it,
    /// whatever `image` names there. Absent from older sources.
    #[serde(default)]
    pub manifest: Option<String>,
    pub accel: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub max_memory_mib: u64,
    pub max_cpus: u32,
    /// Base RAM (MiB), DIMMs (id, MiB), boot CPUs: what QEMU must look like
    /// before the stream arrives.
    pub base_mib: u64,
    /// Base RAM exactly (KiB). Absent from older sources, whose TCG VMs
    /// had 8 KiB less than `base_mib` (spore_qemu::cmdline::ram_kib_for).
    #[serde(default)]
    pub base_kib: Option<u64>,
    pub dimms: Vec<(String, u64)>,
    pub boot_cpus: u32,
    pub mac: Option<String>,
    pub vmgenid: Option<String>,
    pub hostname: Option<String>,
    pub instance_id: Option<String>,
    /// The clone group the VM belongs to, kept at the destination.
    #[serde(default)]
    pub group: Option<String>,
    pub postcopy: bool,
    /// Post-copy with QEMU's `postcopy-preempt`: pages the guest faults on
    /// travel on a second connection, ahead of the background stream.
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// The destination gives up (and cleans up) if the migration has not
    /// committed by then.
    pub timeout_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReady {
    /// The port the destination QEMU listens on for the migration stream.
    pub port: u16,
    /// Bytes of the disk (block batches must match it).
    pub disk_size: u64,
    /// The stream must be TLS (QEMU's own, with the fleet's certificates):
    /// the destination's peer listener is.
    #[serde(default)]
    pub tls: bool,
}

/// `GET /v1/migrations/{vm}` on the destination's peer listener: how far
/// an incoming migration got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingStatus {
    /// The destination QEMU runs the guest (it loaded the device state and
    /// started the CPUs): from here a post-copy can be paused and
    /// recovered; before, breaking its stream fails it.
    pub guest_runs: bool,
}

/// `POST /v1/migrations/{vm}/commit` (the body may be empty: an older
/// source).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingCommit {
    /// The guest answered the source's pings during the migration: the
    /// destination waits a moment for its first answer, which ends the
    /// stall being measured. A guest without spore's channel (a stock
    /// guest) never answers, and nothing waits for it.
    #[serde(default = "yes")]
    pub guest_answers: bool,
}

impl Default for IncomingCommit {
    fn default() -> Self {
        IncomingCommit {
            guest_answers: true,
        }
    }
}

/// The destination's answer to a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingCommitted {
    /// When the destination saw the guest answer pings (µs since the Unix
    /// epoch).
    pub pongs: Vec<u64>,
    /// When the destination QEMU began running the guest (µs since epoch).
    pub running_at: Option<u64>,
}

//! The NBD wire format, free of I/O: constants, the messages of each phase as
//! enums, and pure functions that parse what a client sends and encode what
//! the server answers.
//!
//! Everything a client sends is parsed here, from byte slices, so that the
//! parsers can be fuzzed and unit-tested without sockets or threads. The I/O
//! layers (the `handshake` and `transmission` modules) only move bytes.
//!
//! All integers are big-endian on the wire. Messages, by phase:
//!
//! ```text
//! handshake     S: NBDMAGIC IHAVEOPT u16 handshake-flags     C: u32 client-flags
//! options       C: IHAVEOPT u32 option u32 length data       -> OptionRequest
//!               S: REPLY_MAGIC u32 option u32 type u32 length data  <- OptionReply
//!               (NBD_OPT_EXPORT_NAME instead gets: u64 size u16 flags [124 zero bytes])
//! transmission  C: REQUEST_MAGIC u16 flags u16 type u64 handle u64 offset u32 length [data]
//!               S: SIMPLE_REPLY_MAGIC u32 error u64 handle [data]
//!               S: STRUCTURED_REPLY_MAGIC u16 flags u16 type u64 handle u32 length payload
//! ```

use thiserror::Error;

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`], and by the client
/// before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

/// Longest option payload the server accepts; a longer one is answered with
/// `NBD_REP_ERR_TOO_BIG` and the connection is closed (the only legitimate
/// large payloads are meta-context queries, which are far shorter).
pub const MAX_OPTION_LENGTH: u32 = 64 * 1024;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING_LENGTH: usize = 4096;
/// Largest READ or WRITE payload, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Flags the client answers the handshake with.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags, sent with the export's size.
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Flags of a transmission request.
pub mod command_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    /// TLS must be negotiated (`NBD_OPT_STARTTLS`) before this option.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// `NBD_INFO_*` items of an `NBD_REP_INFO` reply.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `NBD_REPLY_FLAG_DONE`: the last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// `base:allocation` block-status flags.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context the server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id the server gives `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The error codes NBD defines for transmission replies. The wire values are
/// fixed by the protocol (they happen to match Linux errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl ErrorCode {
    /// The value sent on the wire.
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// The NBD error for an export I/O error: the errno where NBD has an
    /// equivalent, otherwise EIO. ENOTSUP and EOVERFLOW are reserved by the
    /// protocol for fast zeroing and unfragmented reads, so they are not
    /// produced here (see [`ErrorCode::from_io_fast_zero`]).
    pub fn from_io(err: &std::io::Error) -> ErrorCode {
        match Self::from_io_any(err) {
            ErrorCode::Overflow => ErrorCode::Inval,
            ErrorCode::NotSup => ErrorCode::Io,
            code => code,
        }
    }

    /// [`ErrorCode::from_io`] for a WRITE_ZEROES with `NBD_CMD_FLAG_FAST_ZERO`,
    /// where "not supported" means "not fast" and is passed on.
    pub fn from_io_fast_zero(err: &std::io::Error) -> ErrorCode {
        match Self::from_io_any(err) {
            ErrorCode::NotSup => ErrorCode::NotSup,
            _ => Self::from_io(err),
        }
    }

    fn from_io_any(err: &std::io::Error) -> ErrorCode {
        use std::io::ErrorKind;
        if let Some(errno) = err.raw_os_error() {
            return match errno {
                libc::EPERM | libc::EACCES | libc::EROFS => ErrorCode::Perm,
                libc::ENOMEM => ErrorCode::NoMem,
                libc::EINVAL => ErrorCode::Inval,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorCode::NoSpc,
                libc::EOVERFLOW => ErrorCode::Overflow,
                libc::EOPNOTSUPP => ErrorCode::NotSup,
                libc::ESHUTDOWN => ErrorCode::Shutdown,
                _ => ErrorCode::Io,
            };
        }
        match err.kind() {
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => ErrorCode::Perm,
            ErrorKind::OutOfMemory => ErrorCode::NoMem,
            ErrorKind::InvalidInput => ErrorCode::Inval,
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                ErrorCode::NoSpc
            }
            ErrorKind::Unsupported => ErrorCode::NotSup,
            _ => ErrorCode::Io,
        }
    }
}

/// Ways in which bytes from a client break the protocol badly enough that the
/// connection cannot go on (lesser faults get an error reply instead).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option {option} has {length} bytes of data, limit {limit}")]
    OptionTooLong {
        option: u32,
        length: u32,
        limit: u32,
    },
    #[error("write of {length} bytes exceeds the {limit}-byte maximum")]
    PayloadTooLarge { length: u32, limit: u32 },
    #[error("bytes sent after NBD_OPT_STARTTLS before its reply")]
    BytesAfterStartTls,
    #[error("NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    TlsRequired,
}

/// Why an option's data could not be parsed (answered with
/// `NBD_REP_ERR_INVALID`; the message goes to the client).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionError {
    #[error("option data is truncated")]
    Truncated,
    #[error("option data has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("option takes no data")]
    UnexpectedData,
    #[error("string is longer than 4096 bytes")]
    StringTooLong,
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("string contains NUL")]
    ContainsNul,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------------------
// Option haggling

/// The fixed header of an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Parse an option header; a bad magic means the client is not speaking NBD.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be_u32(&buf[8..12]),
        length: be_u32(&buf[12..16]),
    })
}

/// Which `NBD_INFO_*` items a client asked for in `NBD_OPT_INFO`/`GO`
/// (unknown items are ignored, as the protocol requires).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InfoRequests {
    pub name: bool,
    pub description: bool,
    pub block_size: bool,
}

/// An option sent by the client during haggling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest<'a> {
    /// `NBD_OPT_EXPORT_NAME`: pick an export and enter transmission; no
    /// error reply is possible.
    ExportName { name: &'a str },
    /// `NBD_OPT_ABORT`: the client is leaving.
    Abort,
    /// `NBD_OPT_LIST`: name every export.
    List,
    /// `NBD_OPT_INFO`: describe an export, stay in haggling.
    Info {
        name: &'a str,
        requests: InfoRequests,
    },
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    Go {
        name: &'a str,
        requests: InfoRequests,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext {
        export: &'a str,
        queries: Vec<&'a str>,
    },
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext {
        export: &'a str,
        queries: Vec<&'a str>,
    },
    /// `NBD_OPT_STARTTLS`: go on inside TLS.
    StartTls,
    /// Any option this server does not implement.
    Unsupported(u32),
}

/// A cursor over option data that fails instead of panicking.
struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.data.len() < n {
            return Err(OptionError::Truncated);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(be_u32)
    }
    /// A string preceded by its u32 length.
    fn string(&mut self) -> Result<&'a str, OptionError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LENGTH {
            return Err(OptionError::StringTooLong);
        }
        check_string(self.take(len)?)
    }
    fn finish(self) -> Result<(), OptionError> {
        match self.data.len() {
            0 => Ok(()),
            n => Err(OptionError::TrailingBytes(n)),
        }
    }
}

fn check_string(bytes: &[u8]) -> Result<&str, OptionError> {
    if bytes.len() > MAX_STRING_LENGTH {
        return Err(OptionError::StringTooLong);
    }
    let s = std::str::from_utf8(bytes).map_err(|_| OptionError::NotUtf8)?;
    if s.contains('\0') {
        return Err(OptionError::ContainsNul);
    }
    Ok(s)
}

/// Parse the data of option `option`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest<'_>, OptionError> {
    let mut f = Fields { data };
    let req = match option {
        opt::EXPORT_NAME => {
            return Ok(OptionRequest::ExportName {
                name: check_string(data)?,
            })
        }
        opt::ABORT => OptionRequest::Abort,
        opt::LIST => OptionRequest::List,
        opt::STARTTLS => OptionRequest::StartTls,
        opt::STRUCTURED_REPLY => OptionRequest::StructuredReply,
        opt::INFO | opt::GO => {
            let name = f.string()?;
            let count = f.u16()?;
            let mut requests = InfoRequests::default();
            for _ in 0..count {
                match f.u16()? {
                    info::NAME => requests.name = true,
                    info::DESCRIPTION => requests.description = true,
                    info::BLOCK_SIZE => requests.block_size = true,
                    _ => {}
                }
            }
            f.finish()?;
            return Ok(if option == opt::GO {
                OptionRequest::Go { name, requests }
            } else {
                OptionRequest::Info { name, requests }
            });
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let export = f.string()?;
            let count = f.u32()?;
            // Each query takes at least four bytes: bound the allocation by
            // what the data can actually hold.
            let mut queries = Vec::with_capacity((count as usize).min(f.data.len() / 4));
            for _ in 0..count {
                queries.push(f.string()?);
            }
            f.finish()?;
            return Ok(if option == opt::SET_META_CONTEXT {
                OptionRequest::SetMetaContext { export, queries }
            } else {
                OptionRequest::ListMetaContext { export, queries }
            });
        }
        other => return Ok(OptionRequest::Unsupported(other)),
    };
    // The data-less options.
    if !data.is_empty() {
        return Err(OptionError::UnexpectedData);
    }
    Ok(req)
}

/// Whether meta-context query `query` selects `base:allocation`. `list`
/// allows the namespace-only form `base:` (which lists every context of the
/// namespace); for SET a context is selected only by its full name.
pub fn query_selects_base_allocation(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// One server reply during option haggling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply<'a> {
    Ack,
    /// `NBD_REP_SERVER`: one export, for `NBD_OPT_LIST`.
    Server {
        name: &'a str,
        description: &'a str,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
    InfoExport {
        size: u64,
        flags: u16,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_NAME`.
    InfoName(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
    InfoDescription(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
    InfoBlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        id: u32,
        name: &'a str,
    },
    /// An `NBD_REP_ERR_*` with a message for humans.
    Error {
        code: u32,
        message: &'a str,
    },
}

impl OptionReply<'_> {
    /// Append the encoded reply to option `option` to `out`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        let reply_type = match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::InfoExport { .. }
            | OptionReply::InfoName(_)
            | OptionReply::InfoDescription(_)
            | OptionReply::InfoBlockSize { .. } => rep::INFO,
            OptionReply::MetaContext { .. } => rep::META_CONTEXT,
            OptionReply::Error { code, .. } => *code,
        };
        out.extend_from_slice(&reply_type.to_be_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                out.extend_from_slice(&(name.len() as u32).to_be_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(description.as_bytes());
            }
            OptionReply::InfoExport { size, flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            OptionReply::InfoName(name) => {
                out.extend_from_slice(&info::NAME.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            OptionReply::InfoDescription(text) => {
                out.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            OptionReply::InfoBlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&minimum.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&maximum.to_be_bytes());
            }
            OptionReply::MetaContext { id, name } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => out.extend_from_slice(message.as_bytes()),
        }
        let len = (out.len() - body) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        debug_assert!(out.len() - start >= 20);
    }
}

// ---------------------------------------------------------------------------
// Transmission

/// The command of a transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A command number this server does not know (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

/// A parsed request header. A WRITE is followed by `length` bytes of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes of data that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Parse a request header. Only a bad magic is fatal; every other fault is
/// found by [`check_request`] and answered with an error reply.
pub fn parse_request_header(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtocolError> {
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: be_u16(&buf[4..6]),
        command: Command::from_wire(be_u16(&buf[6..8])),
        handle: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        length: be_u32(&buf[24..28]),
    })
}

/// What was negotiated for a connection and the export it serves; all that
/// [`check_request`] needs to judge a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    /// The transmission flags sent to the client.
    pub flags: u16,
    pub structured_replies: bool,
    /// Whether `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(transmission_flags::READ_ONLY)
    }
}

/// A request that passed every check, ready for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
        /// Send at most one content chunk.
        no_fragment: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        may_trim: bool,
        fua: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

/// Judge a request against the session: flags, permissions, bounds. The
/// error is what the client gets back; the request is not executed.
pub fn check_request(req: &Request, session: &Session) -> Result<Op, ErrorCode> {
    use command_flags as cf;
    use transmission_flags as tf;

    // FUA is valid on every command once advertised (clients set it on
    // flushes and reads too); each command adds the flags that apply to it.
    let mut allowed = if session.has(tf::SEND_FUA) {
        cf::FUA
    } else {
        0
    };
    match req.command {
        Command::Read if session.has(tf::SEND_DF) => allowed |= cf::DF,
        Command::WriteZeroes => {
            allowed |= cf::NO_HOLE;
            if session.has(tf::SEND_FAST_ZERO) {
                allowed |= cf::FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= cf::REQ_ONE,
        Command::Unknown(_) => return Err(ErrorCode::Inval),
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(ErrorCode::Inval);
    }
    let fua = req.flags & cf::FUA != 0;
    let (offset, length) = (req.offset, req.length);
    let in_bounds = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= session.size);
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && session.read_only() {
        return Err(ErrorCode::Perm);
    }
    if matches!(req.command, Command::Read | Command::Write) && length > MAX_PAYLOAD {
        return Err(ErrorCode::Inval);
    }
    if !in_bounds {
        // The protocol asks for ENOSPC on writes past the end.
        return Err(match req.command {
            Command::Write | Command::WriteZeroes => ErrorCode::NoSpc,
            _ => ErrorCode::Inval,
        });
    }
    Ok(match req.command {
        Command::Read => Op::Read {
            offset,
            length,
            no_fragment: req.flags & cf::DF != 0,
        },
        Command::Write => Op::Write {
            offset,
            length,
            fua,
        },
        Command::Disconnect => Op::Disconnect,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim {
            offset,
            length,
            fua,
        },
        Command::Cache => Op::Cache { offset, length },
        Command::WriteZeroes => Op::WriteZeroes {
            offset,
            length,
            may_trim: req.flags & cf::NO_HOLE == 0,
            fua,
            fast: req.flags & cf::FAST_ZERO != 0,
        },
        Command::BlockStatus => {
            if !session.base_allocation || length == 0 {
                return Err(ErrorCode::Inval);
            }
            Op::BlockStatus {
                offset,
                length,
                req_one: req.flags & cf::REQ_ONE != 0,
            }
        }
        Command::Unknown(_) => return Err(ErrorCode::Inval),
    })
}

/// A reply to a transmission request: one simple reply, or one chunk of a
/// structured reply. Payloads are borrowed so that read data is never copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Simple reply; `data` only for a successful READ.
    Simple { error: u32, data: &'a [u8] },
    /// `NBD_REPLY_TYPE_NONE`.
    Done,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        offset: u64,
        data: &'a [u8],
        done: bool,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        offset: u64,
        length: u32,
        done: bool,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`; `descriptors` is the already encoded
    /// run of (u32 length, u32 flags) pairs.
    BlockStatus {
        context_id: u32,
        descriptors: &'a [u8],
        done: bool,
    },
    /// `NBD_REPLY_TYPE_ERROR`, always final here.
    Error { error: ErrorCode, message: &'a str },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`, always final here.
    ErrorOffset {
        error: ErrorCode,
        message: &'a str,
        offset: u64,
    },
}

/// Longest encoded header [`Reply::encode`] produces (chunk header, fixed
/// fields and the longest error message it keeps).
pub const MAX_REPLY_HEADER: usize = STRUCTURED_REPLY_HEADER_LEN + 14 + MAX_ERROR_MESSAGE;
/// Error messages are cut to this many bytes.
pub const MAX_ERROR_MESSAGE: usize = 128;

/// A reply's bytes: a small header in place plus a borrowed tail.
pub struct EncodedReply<'a> {
    header: [u8; MAX_REPLY_HEADER],
    header_len: usize,
    pub tail: &'a [u8],
}

impl EncodedReply<'_> {
    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len]
    }
}

struct HeaderWriter {
    buf: [u8; MAX_REPLY_HEADER],
    len: usize,
}

impl HeaderWriter {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl<'a> Reply<'a> {
    /// Encode the reply to the request with `handle`.
    pub fn encode(&self, handle: u64) -> EncodedReply<'a> {
        let mut w = HeaderWriter {
            buf: [0; MAX_REPLY_HEADER],
            len: 0,
        };
        let chunk = |w: &mut HeaderWriter, kind: u16, done: bool, len: usize| {
            w.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            w.put(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
            w.put(&kind.to_be_bytes());
            w.put(&handle.to_be_bytes());
            w.put(&(len as u32).to_be_bytes());
        };
        let tail: &'a [u8] = match *self {
            Reply::Simple { error, data } => {
                w.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                w.put(&error.to_be_bytes());
                w.put(&handle.to_be_bytes());
                data
            }
            Reply::Done => {
                chunk(&mut w, reply_type::NONE, true, 0);
                &[]
            }
            Reply::OffsetData { offset, data, done } => {
                chunk(&mut w, reply_type::OFFSET_DATA, done, 8 + data.len());
                w.put(&offset.to_be_bytes());
                data
            }
            Reply::OffsetHole {
                offset,
                length,
                done,
            } => {
                chunk(&mut w, reply_type::OFFSET_HOLE, done, 12);
                w.put(&offset.to_be_bytes());
                w.put(&length.to_be_bytes());
                &[]
            }
            Reply::BlockStatus {
                context_id,
                descriptors,
                done,
            } => {
                chunk(
                    &mut w,
                    reply_type::BLOCK_STATUS,
                    done,
                    4 + descriptors.len(),
                );
                w.put(&context_id.to_be_bytes());
                descriptors
            }
            Reply::Error { error, message } => {
                let message = truncate_message(message);
                chunk(&mut w, reply_type::ERROR, true, 6 + message.len());
                w.put(&error.wire().to_be_bytes());
                w.put(&(message.len() as u16).to_be_bytes());
                w.put(message.as_bytes());
                &[]
            }
            Reply::ErrorOffset {
                error,
                message,
                offset,
            } => {
                let message = truncate_message(message);
                chunk(&mut w, reply_type::ERROR_OFFSET, true, 14 + message.len());
                w.put(&error.wire().to_be_bytes());
                w.put(&(message.len() as u16).to_be_bytes());
                w.put(message.as_bytes());
                w.put(&offset.to_be_bytes());
                &[]
            }
        };
        EncodedReply {
            header: w.buf,
            header_len: w.len,
            tail,
        }
    }
}

/// Encode `base:allocation` extents as block-status descriptors into `out`
/// (cleared first): zero-length extents are dropped, neighbours with the same
/// flags merged, the total capped at `length`, and with `req_one` only the
/// first descriptor kept. Returns the number of descriptors; if the export
/// described nothing usable a single "allocated data" descriptor covering the
/// request is produced, which the protocol allows.
pub fn encode_extents(
    extents: &[crate::Extent],
    length: u32,
    req_one: bool,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    let mut remaining = u64::from(length);
    let mut count = 0usize;
    let mut last: Option<(u32, u32)> = None; // (len, flags) not yet written
    for e in extents {
        if remaining == 0 {
            break;
        }
        let len = e.length.min(remaining);
        if len == 0 {
            continue;
        }
        remaining -= len;
        let flags = (if e.hole { state::HOLE } else { 0 }) | (if e.zero { state::ZERO } else { 0 });
        // `len` is at most `length`, a u32, and so is a merged run.
        let len = len as u32;
        last = match last {
            Some((l, f)) if f == flags => Some((l + len, f)),
            Some((l, f)) => {
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&f.to_be_bytes());
                count += 1;
                if req_one {
                    return count;
                }
                Some((len, flags))
            }
            None => Some((len, flags)),
        };
    }
    match last {
        Some((l, f)) => {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
        None => {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
        }
    }
    count + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Extent;

    fn header(magic: u32, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn session() -> Session {
        use transmission_flags as tf;
        Session {
            size: 1 << 20,
            flags: tf::HAS_FLAGS
                | tf::SEND_FLUSH
                | tf::SEND_FUA
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES
                | tf::SEND_DF
                | tf::SEND_CACHE,
            structured_replies: true,
            base_allocation: true,
        }
    }

    fn check(cmd: u16, flags: u16, offset: u64, len: u32) -> Result<Op, ErrorCode> {
        let req = parse_request_header(&header(REQUEST_MAGIC, flags, cmd, 7, offset, len)).unwrap();
        check_request(&req, &session())
    }

    #[test]
    fn parses_a_read_header() {
        let req = parse_request_header(&header(REQUEST_MAGIC, 1, 0, 0xdead, 4096, 512)).unwrap();
        assert_eq!(
            req,
            Request {
                flags: 1,
                command: Command::Read,
                handle: 0xdead,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(req.payload_len(), 0);
    }

    #[test]
    fn rejects_bad_request_magic() {
        let err = parse_request_header(&header(0x2560_9514, 0, 0, 0, 0, 0)).unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::BadMagic {
                found: 0x2560_9514,
                ..
            }
        ));
        assert!(parse_request_header(&[0u8; 28]).is_err());
        assert!(parse_request_header(&[0xff; 28]).is_err());
    }

    #[test]
    fn unknown_command_is_einval_without_payload() {
        let req = parse_request_header(&header(REQUEST_MAGIC, 0, 99, 1, 0, 4096)).unwrap();
        assert_eq!(req.command, Command::Unknown(99));
        assert_eq!(req.payload_len(), 0);
        assert_eq!(check(99, 0, 0, 0), Err(ErrorCode::Inval));
        assert_eq!(
            check(0xffff, 0xffff, u64::MAX, u32::MAX),
            Err(ErrorCode::Inval)
        );
    }

    #[test]
    fn bounds_are_checked_without_overflow() {
        assert!(check(0, 0, (1 << 20) - 512, 512).is_ok());
        assert_eq!(check(0, 0, (1 << 20) - 511, 512), Err(ErrorCode::Inval));
        assert_eq!(check(0, 0, u64::MAX, 1), Err(ErrorCode::Inval));
        assert_eq!(check(0, 0, u64::MAX - 10, u32::MAX), Err(ErrorCode::Inval));
        assert_eq!(check(1, 0, u64::MAX, 1), Err(ErrorCode::NoSpc));
        assert_eq!(check(6, 0, 1 << 20, 1), Err(ErrorCode::NoSpc));
        assert_eq!(check(4, 0, 1 << 20, 1), Err(ErrorCode::Inval));
        assert_eq!(check(7, 0, 1 << 20, 1), Err(ErrorCode::Inval));
        // Zero-length requests at the very end are fine, except block status.
        assert!(check(0, 0, 1 << 20, 0).is_ok());
        assert_eq!(check(7, 0, 0, 0), Err(ErrorCode::Inval));
    }

    #[test]
    fn oversized_payloads_are_rejected() {
        let big = MAX_PAYLOAD + 1;
        let mut s = session();
        s.size = u64::MAX;
        for cmd in [0u16, 1] {
            let req = parse_request_header(&header(REQUEST_MAGIC, 0, cmd, 1, 0, big)).unwrap();
            assert_eq!(check_request(&req, &s), Err(ErrorCode::Inval));
        }
        // Trim and write-zeroes carry no payload and may be large.
        let req = parse_request_header(&header(REQUEST_MAGIC, 0, 4, 1, 0, u32::MAX)).unwrap();
        assert!(check_request(&req, &s).is_ok());
    }

    #[test]
    fn flags_must_fit_the_command() {
        use command_flags as cf;
        assert!(check(0, cf::FUA | cf::DF, 0, 512).is_ok());
        assert_eq!(check(0, cf::REQ_ONE, 0, 512), Err(ErrorCode::Inval));
        assert_eq!(check(1, cf::NO_HOLE, 0, 512), Err(ErrorCode::Inval));
        assert_eq!(check(0, 1 << 9, 0, 512), Err(ErrorCode::Inval));
        // FAST_ZERO is not advertised in this session.
        assert_eq!(check(6, cf::FAST_ZERO, 0, 512), Err(ErrorCode::Inval));
        assert_eq!(
            check(6, cf::NO_HOLE | cf::FUA, 0, 512),
            Ok(Op::WriteZeroes {
                offset: 0,
                length: 512,
                may_trim: false,
                fua: true,
                fast: false
            })
        );
        assert_eq!(
            check(7, cf::REQ_ONE, 0, 512),
            Ok(Op::BlockStatus {
                offset: 0,
                length: 512,
                req_one: true
            })
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mut s = session();
        s.flags |= transmission_flags::READ_ONLY;
        for cmd in [1u16, 4, 6] {
            let req = parse_request_header(&header(REQUEST_MAGIC, 0, cmd, 1, 0, 512)).unwrap();
            assert_eq!(check_request(&req, &s), Err(ErrorCode::Perm));
        }
        let req = parse_request_header(&header(REQUEST_MAGIC, 0, 0, 1, 0, 512)).unwrap();
        assert!(check_request(&req, &s).is_ok());
    }

    #[test]
    fn block_status_needs_a_context() {
        let mut s = session();
        s.base_allocation = false;
        let req = parse_request_header(&header(REQUEST_MAGIC, 0, 7, 1, 0, 512)).unwrap();
        assert_eq!(check_request(&req, &s), Err(ErrorCode::Inval));
    }

    fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn parses_go_and_info() {
        let d = go_data(b"disk", &[info::BLOCK_SIZE, 77, info::NAME]);
        assert_eq!(
            parse_option(opt::GO, &d),
            Ok(OptionRequest::Go {
                name: "disk",
                requests: InfoRequests {
                    name: true,
                    description: false,
                    block_size: true
                }
            })
        );
        let d = go_data(b"", &[]);
        assert!(matches!(
            parse_option(opt::INFO, &d),
            Ok(OptionRequest::Info { name: "", .. })
        ));
    }

    #[test]
    fn malformed_go_is_invalid() {
        // Name length beyond the data.
        let mut d = go_data(b"disk", &[]);
        d[3] = 200;
        assert_eq!(parse_option(opt::GO, &d), Err(OptionError::Truncated));
        // Info count beyond the data.
        let mut d = go_data(b"disk", &[1]);
        d[9] = 5;
        assert_eq!(parse_option(opt::GO, &d), Err(OptionError::Truncated));
        // Trailing junk.
        let mut d = go_data(b"disk", &[]);
        d.push(0);
        assert_eq!(
            parse_option(opt::GO, &d),
            Err(OptionError::TrailingBytes(1))
        );
        // Bad strings.
        assert_eq!(
            parse_option(opt::GO, &go_data(b"\xff", &[])),
            Err(OptionError::NotUtf8)
        );
        assert_eq!(
            parse_option(opt::GO, &go_data(b"a\0", &[])),
            Err(OptionError::ContainsNul)
        );
        assert_eq!(
            parse_option(opt::GO, &go_data(&[b'a'; 5000], &[])),
            Err(OptionError::StringTooLong)
        );
        assert_eq!(parse_option(opt::GO, &[]), Err(OptionError::Truncated));
        assert_eq!(
            parse_option(opt::GO, &[0xff; 4]),
            Err(OptionError::StringTooLong)
        );
    }

    #[test]
    fn data_less_options_refuse_data() {
        assert_eq!(parse_option(opt::LIST, &[]), Ok(OptionRequest::List));
        assert_eq!(
            parse_option(opt::LIST, &[0]),
            Err(OptionError::UnexpectedData)
        );
        assert_eq!(
            parse_option(opt::STRUCTURED_REPLY, &[1, 2]),
            Err(OptionError::UnexpectedData)
        );
        assert_eq!(parse_option(opt::ABORT, &[]), Ok(OptionRequest::Abort));
        assert_eq!(
            parse_option(0x1234, &[1, 2, 3]),
            Ok(OptionRequest::Unsupported(0x1234))
        );
        assert_eq!(
            parse_option(opt::STARTTLS, &[]),
            Ok(OptionRequest::StartTls)
        );
        assert_eq!(
            parse_option(opt::STARTTLS, &[0]),
            Err(OptionError::UnexpectedData)
        );
    }

    #[test]
    fn parses_meta_context_queries() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &d),
            Ok(OptionRequest::SetMetaContext {
                export: "disk",
                queries: vec!["base:allocation", "qemu:dirty"]
            })
        );
        // A huge query count with no data behind it fails without allocating.
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option(opt::LIST_META_CONTEXT, &d),
            Err(OptionError::Truncated)
        );
        assert!(query_selects_base_allocation("base:", true));
        assert!(!query_selects_base_allocation("base:", false));
        assert!(!query_selects_base_allocation("base:allocationx", true));
    }

    #[test]
    fn option_header_magic() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: 7,
                length: 9
            })
        );
        b[0] = 0;
        assert!(parse_option_header(&b).is_err());
    }

    #[test]
    fn encodes_option_replies() {
        let mut out = Vec::new();
        OptionReply::Server {
            name: "a",
            description: "bc",
        }
        .encode(opt::LIST, &mut out);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &opt::LIST.to_be_bytes());
        assert_eq!(&out[12..16], &rep::SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &7u32.to_be_bytes());
        assert_eq!(&out[20..], b"\0\0\0\x01abc");
    }

    #[test]
    fn encodes_structured_chunks() {
        let data = [1u8, 2, 3];
        let r = Reply::OffsetData {
            offset: 9,
            data: &data,
            done: true,
        }
        .encode(0x55);
        let h = r.header();
        assert_eq!(h.len(), 28);
        assert_eq!(&h[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&h[6..8], &reply_type::OFFSET_DATA.to_be_bytes());
        assert_eq!(&h[8..16], &0x55u64.to_be_bytes());
        assert_eq!(&h[16..20], &11u32.to_be_bytes());
        assert_eq!(r.tail, &data);

        let long = "é".repeat(200);
        let r = Reply::Error {
            error: ErrorCode::Io,
            message: &long,
        }
        .encode(1);
        let h = r.header();
        let msg_len = u16::from_be_bytes([h[24], h[25]]) as usize;
        assert!(msg_len <= MAX_ERROR_MESSAGE);
        assert_eq!(h.len(), 26 + msg_len);
        assert!(std::str::from_utf8(&h[26..]).is_ok());
    }

    #[test]
    fn extents_are_merged_and_capped() {
        let e = |length, hole, zero| Extent { length, hole, zero };
        let mut out = Vec::new();
        let n = encode_extents(
            &[
                e(0, false, false),
                e(512, false, false),
                e(512, false, false),
                e(1024, true, true),
            ],
            1536,
            false,
            &mut out,
        );
        assert_eq!(n, 2);
        assert_eq!(out, [0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]);
        let n = encode_extents(
            &[e(512, false, false), e(512, true, true)],
            4096,
            true,
            &mut out,
        );
        assert_eq!(n, 1);
        assert_eq!(out, [0, 0, 2, 0, 0, 0, 0, 0]);
        let n = encode_extents(&[], 100, false, &mut out);
        assert_eq!(n, 1);
        assert_eq!(out, [0, 0, 0, 100, 0, 0, 0, 0]);
        let n = encode_extents(&[e(u64::MAX, true, false)], u32::MAX, false, &mut out);
        assert_eq!(n, 1);
        assert_eq!(out, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
    }

    #[test]
    fn io_errors_map_to_nbd_errors() {
        use std::io;
        assert_eq!(
            ErrorCode::from_io(&io::Error::from_raw_os_error(libc::ENOSPC)),
            ErrorCode::NoSpc
        );
        assert_eq!(
            ErrorCode::from_io(&io::Error::from_raw_os_error(libc::EDQUOT)),
            ErrorCode::NoSpc
        );
        assert_eq!(
            ErrorCode::from_io(&io::Error::from_raw_os_error(libc::EROFS)),
            ErrorCode::Perm
        );
        assert_eq!(
            ErrorCode::from_io(&io::Error::from_raw_os_error(libc::EBADF)),
            ErrorCode::Io
        );
        assert_eq!(ErrorCode::from_io(&io::Error::other("boom")), ErrorCode::Io);
        let unsupported = io::Error::from(io::ErrorKind::Unsupported);
        assert_eq!(ErrorCode::from_io(&unsupported), ErrorCode::Io);
        assert_eq!(
            ErrorCode::from_io_fast_zero(&unsupported),
            ErrorCode::NotSup
        );
        let overflow = io::Error::from_raw_os_error(libc::EOVERFLOW);
        assert_eq!(ErrorCode::from_io(&overflow), ErrorCode::Inval);
        assert_eq!(
            ErrorCode::from_io(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            ErrorCode::Inval
        );
    }
}

//! The handshake and option haggling: from accept to the choice of an export.
//!
//! One option is read, answered in a single write, and the next one read;
//! the client may not pipeline options. Parsing is in [`crate::proto`]; this
//! module decides what to answer.

use std::io::{self, BufRead, IoSlice, Read};
use std::sync::Arc;

use tracing::{debug, warn};

use crate::proto::{
    self, client_flags, handshake_flags, opt, rep, transmission_flags as tf, InfoRequests,
    OptionReply, OptionRequest, ProtocolError, Session, BASE_ALLOCATION, BASE_ALLOCATION_ID,
    MAX_OPTION_LENGTH, MAX_PAYLOAD,
};
use crate::transport::{send_all, Transport};
use crate::{ConnectionError, Export, Exports};

/// The export and parameters agreed on for transmission.
pub(crate) struct Negotiated {
    pub export: Arc<dyn Export>,
    pub name: String,
    pub session: Session,
}

/// How option haggling ended.
pub(crate) enum HandshakeEnd {
    Transmission(Negotiated),
    /// `NBD_OPT_ABORT`.
    Aborted,
    /// The client closed the connection between options.
    Closed,
    /// `NBD_OPT_STARTTLS` was acknowledged: the client's TLS hello comes
    /// next.
    StartTls {
        no_zeroes: bool,
    },
}

/// The transmission flags for `export`.
pub(crate) fn transmission_flags(export: &dyn Export, structured_replies: bool) -> u16 {
    let mut flags =
        tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::CAN_MULTI_CONN | tf::SEND_CACHE;
    if export.read_only() {
        flags |= tf::READ_ONLY;
    } else {
        flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES;
        if export.can_fast_zero() {
            flags |= tf::SEND_FAST_ZERO;
        }
    }
    if structured_replies {
        // Every READ is answered with a single content chunk anyway.
        flags |= tf::SEND_DF;
    }
    flags
}

/// Fill `buf` completely. `Ok(false)`: the stream ended before the first
/// byte; an end after that is [`ConnectionError::Truncated`].
pub(crate) fn read_message<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<bool, ConnectionError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(ConnectionError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnectionError::Io(e)),
        }
    }
    Ok(true)
}

struct Haggler<'a, T: ?Sized, R> {
    transport: &'a T,
    reader: &'a mut R,
    exports: &'a dyn Exports,
    structured_replies: bool,
    /// The export for which `base:allocation` was selected.
    meta_context_export: Option<String>,
    no_zeroes: bool,
    /// TLS is required and not negotiated yet.
    needs_tls: bool,
    /// TLS is offered (and required).
    tls_offered: bool,
    data: Vec<u8>,
    out: Vec<u8>,
}

/// Run the handshake and option haggling on a fresh connection. With
/// `tls`, the client must upgrade with `NBD_OPT_STARTTLS` first.
pub(crate) fn negotiate<T: Transport + ?Sized, R: BufRead>(
    transport: &T,
    reader: &mut R,
    exports: &dyn Exports,
    tls: Option<&dyn crate::TlsPolicy>,
) -> Result<HandshakeEnd, ConnectionError> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    send_all(transport, &mut [IoSlice::new(&greeting)]).map_err(ConnectionError::Io)?;

    let mut flags = [0u8; 4];
    if !read_message(reader, &mut flags)? {
        return Ok(HandshakeEnd::Closed);
    }
    let flags = u32::from_be_bytes(flags);
    if flags & !client_flags::KNOWN != 0 {
        warn!(flags, "client sent unknown handshake flags");
        return Err(ProtocolError::UnknownClientFlags(flags).into());
    }
    haggle(
        transport,
        reader,
        exports,
        flags & client_flags::NO_ZEROES != 0,
        tls.is_some(),
        tls.is_some(),
    )
}

/// Option haggling anew inside TLS, after `NBD_OPT_STARTTLS`.
pub(crate) fn negotiate_in_tls<T: Transport + ?Sized, R: BufRead>(
    transport: &T,
    reader: &mut R,
    exports: &dyn Exports,
    no_zeroes: bool,
) -> Result<HandshakeEnd, ConnectionError> {
    haggle(transport, reader, exports, no_zeroes, false, true)
}

fn haggle<T: Transport + ?Sized, R: BufRead>(
    transport: &T,
    reader: &mut R,
    exports: &dyn Exports,
    no_zeroes: bool,
    needs_tls: bool,
    tls_offered: bool,
) -> Result<HandshakeEnd, ConnectionError> {
    let mut h = Haggler {
        transport,
        reader,
        exports,
        structured_replies: false,
        meta_context_export: None,
        no_zeroes,
        needs_tls,
        tls_offered,
        data: Vec::new(),
        out: Vec::new(),
    };
    loop {
        if let Some(end) = h.next_option()? {
            return Ok(end);
        }
    }
}

impl<T: Transport + ?Sized, R: BufRead> Haggler<'_, T, R> {
    /// Read and answer one option; `Some` when haggling is over.
    fn next_option(&mut self) -> Result<Option<HandshakeEnd>, ConnectionError> {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        if !read_message(self.reader, &mut header)? {
            return Ok(Some(HandshakeEnd::Closed));
        }
        let header = proto::parse_option_header(&header).inspect_err(|e| {
            warn!(error = %e, "bad option magic, closing");
        })?;
        let option = header.option;
        if header.length > MAX_OPTION_LENGTH {
            warn!(option, length = header.length, "option too long, closing");
            if option != opt::EXPORT_NAME {
                // Best effort: the connection is closed either way.
                let _ = self.reply(
                    option,
                    &[OptionReply::Error {
                        code: rep::ERR_TOO_BIG,
                        message: "option data too long",
                    }],
                );
            }
            return Err(ProtocolError::OptionTooLong {
                option,
                length: header.length,
                limit: MAX_OPTION_LENGTH,
            }
            .into());
        }
        let mut data = std::mem::take(&mut self.data);
        data.resize(header.length as usize, 0);
        if !read_message(self.reader, &mut data)? && !data.is_empty() {
            return Err(ConnectionError::Truncated);
        }
        let result = self.handle_option(option, &data);
        self.data = data;
        result
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<HandshakeEnd>, ConnectionError> {
        let request = match proto::parse_option(option, data) {
            Ok(request) => request,
            Err(e) if option == opt::EXPORT_NAME => {
                warn!(error = %e, "malformed NBD_OPT_EXPORT_NAME, closing");
                return Err(ConnectionError::UnknownExport(
                    String::from_utf8_lossy(data).into_owned(),
                ));
            }
            Err(e) => {
                warn!(option, error = %e, "malformed option");
                let message = e.to_string();
                self.reply(
                    option,
                    &[OptionReply::Error {
                        code: rep::ERR_INVALID,
                        message: &message,
                    }],
                )?;
                return Ok(None);
            }
        };
        debug!(option, "option");
        if self.needs_tls {
            return self.before_tls(option, request);
        }
        match request {
            OptionRequest::ExportName { name } => self.export_name(name).map(Some),
            OptionRequest::Abort => {
                // The client may already be gone; that is fine.
                let _ = self.reply(option, &[OptionReply::Ack]);
                Ok(Some(HandshakeEnd::Aborted))
            }
            OptionRequest::List => {
                let list = self.exports.list();
                let mut replies: Vec<OptionReply> = list
                    .iter()
                    .filter(|(name, _)| name.len() <= proto::MAX_STRING_LENGTH)
                    .map(|(name, description)| OptionReply::Server { name, description })
                    .collect();
                replies.push(OptionReply::Ack);
                self.reply(option, &replies)?;
                Ok(None)
            }
            OptionRequest::Info { name, requests } => {
                self.info(option, name, requests)?;
                Ok(None)
            }
            OptionRequest::Go { name, requests } => Ok(self
                .info(option, name, requests)?
                .map(HandshakeEnd::Transmission)),
            OptionRequest::StructuredReply => {
                self.structured_replies = true;
                self.reply(option, &[OptionReply::Ack])?;
                Ok(None)
            }
            OptionRequest::ListMetaContext { export, queries } => {
                self.meta_context(option, export, &queries, true)?;
                Ok(None)
            }
            OptionRequest::SetMetaContext { export, queries } => {
                self.meta_context(option, export, &queries, false)?;
                Ok(None)
            }
            OptionRequest::StartTls => {
                let (code, message) = if self.tls_offered {
                    (rep::ERR_INVALID, "TLS is already negotiated")
                } else {
                    (rep::ERR_UNSUP, "this server does not offer TLS")
                };
                self.reply(option, &[OptionReply::Error { code, message }])?;
                Ok(None)
            }
            OptionRequest::Unsupported(code) => {
                debug!(option = code, "unsupported option");
                self.reply(
                    option,
                    &[OptionReply::Error {
                        code: rep::ERR_UNSUP,
                        message: "option not supported",
                    }],
                )?;
                Ok(None)
            }
        }
    }

    /// TLS-required mode, before TLS: only STARTTLS and ABORT are served.
    fn before_tls(
        &mut self,
        option: u32,
        request: OptionRequest<'_>,
    ) -> Result<Option<HandshakeEnd>, ConnectionError> {
        match request {
            OptionRequest::StartTls => {
                self.reply(option, &[OptionReply::Ack])?;
                Ok(Some(HandshakeEnd::StartTls {
                    no_zeroes: self.no_zeroes,
                }))
            }
            OptionRequest::Abort => {
                let _ = self.reply(option, &[OptionReply::Ack]);
                Ok(Some(HandshakeEnd::Aborted))
            }
            OptionRequest::ExportName { .. } => {
                warn!("NBD_OPT_EXPORT_NAME before TLS, closing");
                Err(ProtocolError::TlsRequired.into())
            }
            _ => {
                debug!(option, "option before TLS refused");
                self.reply(
                    option,
                    &[OptionReply::Error {
                        code: rep::ERR_TLS_REQD,
                        message: "this server requires TLS: send NBD_OPT_STARTTLS first",
                    }],
                )?;
                Ok(None)
            }
        }
    }

    fn session(&self, name: &str, export: &dyn Export) -> Session {
        Session {
            size: export.size(),
            flags: transmission_flags(export, self.structured_replies),
            structured_replies: self.structured_replies,
            base_allocation: self.meta_context_export.as_deref() == Some(name),
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists, an unknown name closes.
    fn export_name(&mut self, name: &str) -> Result<HandshakeEnd, ConnectionError> {
        let Some(export) = self.exports.get(name) else {
            warn!(
                export = name,
                "NBD_OPT_EXPORT_NAME for unknown export, closing"
            );
            return Err(ConnectionError::UnknownExport(name.to_owned()));
        };
        let session = self.session(name, &*export);
        let mut reply = [0u8; 8 + 2 + 124];
        reply[0..8].copy_from_slice(&session.size.to_be_bytes());
        reply[8..10].copy_from_slice(&session.flags.to_be_bytes());
        let len = if self.no_zeroes { 10 } else { reply.len() };
        send_all(self.transport, &mut [IoSlice::new(&reply[..len])])
            .map_err(ConnectionError::Io)?;
        Ok(HandshakeEnd::Transmission(Negotiated {
            export,
            name: name.to_owned(),
            session,
        }))
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; for GO on a known export, returns what
    /// transmission needs.
    fn info(
        &mut self,
        option: u32,
        name: &str,
        requests: InfoRequests,
    ) -> Result<Option<Negotiated>, ConnectionError> {
        let Some(export) = self.exports.get(name) else {
            debug!(export = name, "info for unknown export");
            self.reply(
                option,
                &[OptionReply::Error {
                    code: rep::ERR_UNKNOWN,
                    message: "unknown export",
                }],
            )?;
            return Ok(None);
        };
        let session = self.session(name, &*export);
        let description = self
            .exports
            .list()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .unwrap_or_default();
        let mut replies = vec![OptionReply::InfoExport {
            size: session.size,
            flags: session.flags,
        }];
        if requests.name {
            replies.push(OptionReply::InfoName(name));
        }
        if requests.description && !description.is_empty() {
            replies.push(OptionReply::InfoDescription(&description));
        }
        // Always sent: with a minimum of 1 the client needs no negotiation,
        // and it tells the client our preferred size and payload limit.
        let preferred = export.preferred_block_size().clamp(512, MAX_PAYLOAD);
        replies.push(OptionReply::InfoBlockSize {
            minimum: 1,
            preferred,
            maximum: MAX_PAYLOAD,
        });
        replies.push(OptionReply::Ack);
        self.reply(option, &replies)?;
        if option != opt::GO {
            return Ok(None);
        }
        debug!(
            export = name,
            size = session.size,
            flags = session.flags,
            "export chosen"
        );
        Ok(Some(Negotiated {
            export,
            name: name.to_owned(),
            session,
        }))
    }

    fn meta_context(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
        list: bool,
    ) -> Result<(), ConnectionError> {
        let error = if !self.structured_replies {
            Some((rep::ERR_INVALID, "structured replies not negotiated"))
        } else if self.exports.get(export).is_none() {
            Some((rep::ERR_UNKNOWN, "unknown export"))
        } else {
            None
        };
        if let Some((code, message)) = error {
            debug!(option, export, message, "meta context refused");
            if !list {
                // A failed SET still replaces the previous selection.
                self.meta_context_export = None;
            }
            return self.reply(option, &[OptionReply::Error { code, message }]);
        }
        let selected = if list && queries.is_empty() {
            true
        } else {
            queries
                .iter()
                .any(|q| proto::query_selects_base_allocation(q, list))
        };
        if !list {
            self.meta_context_export = selected.then(|| export.to_owned());
        }
        let mut replies = Vec::with_capacity(2);
        if selected {
            replies.push(OptionReply::MetaContext {
                id: if list { 0 } else { BASE_ALLOCATION_ID },
                name: BASE_ALLOCATION,
            });
        }
        replies.push(OptionReply::Ack);
        self.reply(option, &replies)
    }

    fn reply(&mut self, option: u32, replies: &[OptionReply<'_>]) -> Result<(), ConnectionError> {
        self.out.clear();
        for r in replies {
            r.encode(option, &mut self.out);
        }
        send_all(self.transport, &mut [IoSlice::new(&self.out)]).map_err(ConnectionError::Io)
    }
}

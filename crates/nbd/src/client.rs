//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time.
//!
//! It exists for the storm benchmark, which replays a recorded boot's reads
//! on a hundred hosts at once; a thread with this client costs far less
//! than a hundred `qemu-io` processes. The tests that check spore's server
//! use real clients (qemu-io, qemu-img, nbdcopy, nbdinfo), not this one.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::proto::{
    client_flags, handshake_flags, opt, rep, IHAVEOPT, MAX_PAYLOAD, NBD_MAGIC, OPTION_REPLY_MAGIC,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const INFO_EXPORT: u16 = 0;

/// An open export.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    size: u64,
    next_handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connects to the server on unix socket `socket` and opens `export`.
    pub fn connect_unix(socket: &Path, export: &str) -> io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        Client::handshake(stream, export)
    }

    fn handshake(mut s: UnixStream, export: &str) -> io::Result<Client> {
        if read_u64(&mut s)? != NBD_MAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not an NBD newstyle server"));
        }
        let flags = read_u16(&mut s)?;
        if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(bad("server does not speak fixed newstyle"));
        }
        let mut ours = client_flags::FIXED_NEWSTYLE;
        if flags & handshake_flags::NO_ZEROES != 0 {
            ours |= client_flags::NO_ZEROES;
        }
        s.write_all(&ours.to_be_bytes())?;

        let name = export.as_bytes();
        let mut req = Vec::with_capacity(16 + 6 + name.len());
        req.extend_from_slice(&IHAVEOPT.to_be_bytes());
        req.extend_from_slice(&opt::GO.to_be_bytes());
        req.extend_from_slice(&((name.len() + 6) as u32).to_be_bytes());
        req.extend_from_slice(&(name.len() as u32).to_be_bytes());
        req.extend_from_slice(name);
        req.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        s.write_all(&req)?;

        let mut size = None;
        loop {
            if read_u64(&mut s)? != OPTION_REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let option = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)?;
            if option != opt::GO {
                return Err(bad(format!("reply to option {option}, not GO")));
            }
            if len > 64 * 1024 {
                return Err(bad("option reply too long"));
            }
            let mut data = vec![0; len as usize];
            s.read_exact(&mut data)?;
            match kind {
                rep::ACK => break,
                rep::INFO => match data.get(0..2).map(|t| u16::from_be_bytes([t[0], t[1]])) {
                    Some(INFO_EXPORT) => {
                        let bytes = data.get(2..10).ok_or_else(|| bad("short export info"))?;
                        size = Some(u64::from_be_bytes(bytes.try_into().expect("8 bytes")));
                    }
                    Some(_) => {} // information this client does not use
                    None => return Err(bad("short info reply")),
                },
                k if k & (1 << 31) != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "server refused export {export:?}: {}",
                            String::from_utf8_lossy(&data)
                        ),
                    ))
                }
                _ => {} // replies this client does not use
            }
        }
        let size = size.ok_or_else(|| bad("server sent no export size"))?;
        Ok(Client {
            stream: s,
            size,
            next_handle: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, command: u16, offset: u64, length: u32) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&command.to_be_bytes());
        req[8..16].copy_from_slice(&handle.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&req)?;
        Ok(handle)
    }

    /// Reads `buf.len()` bytes at `offset`. A server error comes back as an
    /// I/O error with the errno the server sent.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() as u64 > MAX_PAYLOAD as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read larger than the protocol's payload limit",
            ));
        }
        let handle = self.request(CMD_READ, offset, buf.len() as u32)?;
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != handle {
            return Err(bad("reply to another request"));
        }
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error as i32));
        }
        self.stream.read_exact(buf)
    }

    /// Tells the server goodbye.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0).map(drop)
    }
}

//! Fake peers for tests (feature `fake-peers`, and this crate's own
//! tests): small plaintext HTTP servers on loopback that answer the batch
//! route (`POST /v1/chunks/batch`) well, late, or badly on purpose. The
//! agents they face run with `--insecure-listen`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spore_chunks::ChunkId;

use crate::wire;

/// How a fake peer answers a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Acts {
    /// At once, with every chunk it holds (the rest as missing).
    Good,
    /// Never: it reads the request and holds the connection open.
    Wedged,
    /// As `Good`, after this long.
    Slow(Duration),
    /// With bytes that are no batch response.
    Garbage,
    /// With a record that says 60 MiB, then bytes for as long as anyone
    /// reads (at most 30 s).
    Endless,
    /// With half of the answer, then the connection closed.
    Vanishes,
    /// With the first record at once, the rest after this long.
    FirstThenPause(Duration),
}

/// The chunk files a fake peer holds.
pub type Held = Arc<dyn Fn(&ChunkId) -> Option<Vec<u8>> + Send + Sync>;

/// A running fake peer: it serves until the process ends.
pub struct FakePeer {
    pub port: u16,
    /// Batch requests it has read.
    pub asked: Arc<AtomicUsize>,
}

impl FakePeer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

/// Starts a fake peer that acts as `acts`, holding `held`.
pub fn serve(acts: Acts, held: Held) -> FakePeer {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let port = l.local_addr().expect("a bound address").port();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (held, counter) = (held.clone(), counter.clone());
            std::thread::spawn(move || answer(c, acts, &held, &counter));
        }
    });
    FakePeer { port, asked }
}

fn answer(mut c: TcpStream, acts: Acts, held: &Held, counter: &AtomicUsize) {
    let Some(ids) = read_batch_request(&mut c) else {
        return;
    };
    counter.fetch_add(1, Ordering::SeqCst);
    let head = wire::encode_response_head(ids.len());
    let records: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| wire::encode_record(id, held(id).as_deref()))
        .collect();
    let total = head.len() + records.iter().map(Vec::len).sum::<usize>();
    let http = |len: usize| {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
    };
    let whole = |c: &mut TcpStream| {
        c.write_all(http(total).as_bytes())
            .and_then(|()| c.write_all(&head))
            .and_then(|()| records.iter().try_for_each(|r| c.write_all(r)))
    };
    let _ = match acts {
        Acts::Good => whole(&mut c),
        Acts::Slow(d) => {
            std::thread::sleep(d);
            whole(&mut c)
        }
        Acts::Wedged => {
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        }
        Acts::Garbage => {
            let junk = b"this is not a batch response at all";
            c.write_all(http(junk.len()).as_bytes())
                .and_then(|()| c.write_all(junk))
        }
        Acts::Endless => {
            let mut start = head.clone();
            start.extend_from_slice(ids[0].as_bytes());
            start.push(0);
            start.extend_from_slice(&(60u32 << 20).to_le_bytes());
            let until = Instant::now() + Duration::from_secs(30);
            let junk = vec![7u8; 1 << 16];
            let mut r = c
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .and_then(|()| c.write_all(&start));
            while r.is_ok() && Instant::now() < until {
                r = c.write_all(&junk);
            }
            r
        }
        Acts::Vanishes => {
            let mut all = head.clone();
            records.iter().for_each(|r| all.extend_from_slice(r));
            c.write_all(http(total).as_bytes())
                .and_then(|()| c.write_all(&all[..all.len() / 2]))
        }
        Acts::FirstThenPause(d) => {
            let r = c
                .write_all(http(total).as_bytes())
                .and_then(|()| c.write_all(&head))
                .and_then(|()| c.write_all(&records[0]))
                .and_then(|()| c.flush());
            std::thread::sleep(d);
            r.and_then(|()| records[1..].iter().try_for_each(|r| c.write_all(r)))
        }
    };
}

/// Reads one batch request from `c`: the ids it asks for.
pub fn read_batch_request(c: &mut TcpStream) -> Option<Vec<ChunkId>> {
    let body = spore_testkit::read_http_body(c)?;
    wire::decode_request(&body).ok()
}

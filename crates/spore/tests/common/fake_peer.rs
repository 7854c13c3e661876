//! Fake peers for the distribution tests: small HTTP servers on loopback
//! that answer the batch route (`POST /v1/chunks/batch`) badly on purpose.
//! Plaintext: the agents they face run with `--insecure-listen`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use spore_chunks::ChunkId;
use spore_transfer::wire;

/// How a fake peer answers a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(dead_code)]
pub enum Acts {
    /// After this long, with every chunk it has (the rest as missing).
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

/// Starts a fake peer: its port. It serves until the test process ends.
#[allow(dead_code)]
pub fn serve(acts: Acts, held: Held) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let held = held.clone();
            std::thread::spawn(move || answer(c, acts, &held));
        }
    });
    port
}

fn answer(mut c: TcpStream, acts: Acts, held: &Held) {
    let Some(ids) = read_batch_request(&mut c) else {
        return;
    };
    let head = wire::encode_response_head(ids.len());
    let records: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| wire::encode_record(id, held(id).as_deref()))
        .collect();
    let total = head.len() + records.iter().map(Vec::len).sum::<usize>();
    let http = |len: usize| {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
    };
    let _ = match acts {
        Acts::Slow(d) => {
            std::thread::sleep(d);
            c.write_all(http(total).as_bytes())
                .and_then(|()| c.write_all(&head))
                .and_then(|()| records.iter().try_for_each(|r| c.write_all(r)))
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
            let until = std::time::Instant::now() + Duration::from_secs(30);
            let junk = vec![7u8; 1 << 16];
            let mut r = c
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .and_then(|()| c.write_all(&start));
            while r.is_ok() && std::time::Instant::now() < until {
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
    wire::decode_request(&spore_testkit::read_http_body(c)?).ok()
}

//! The server against hand-crafted bytes on a real unix socket: well-formed
//! sessions checked field by field, and hostile or broken clients.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use spore_nbd::ServerConfig;

const SIZE: u64 = 1 << 20;

fn fixture() -> (Fixture, Arc<MemExport>) {
    let exports = MemExports::default();
    let disk = MemExport::new(SIZE);
    exports.add("disk", "a test disk", disk.clone());
    exports.add(
        "ro",
        "read-only",
        MemExport::read_only(pattern(SIZE as usize, 3)),
    );
    (Fixture::start(exports), disk)
}

fn simple_error(reply: &(RawReply, Vec<u8>)) -> u32 {
    match reply.0 {
        RawReply::Simple { error, .. } => error,
        ref other => panic!("expected a simple reply, got {other:?}"),
    }
}

fn chunk_error(reply: &RawReply) -> u32 {
    match reply {
        RawReply::Chunk {
            kind,
            payload,
            flags,
            ..
        } => {
            assert_eq!(*kind, 0x8001, "expected NBD_REPLY_TYPE_ERROR");
            assert_eq!(*flags, 1, "error chunk must be final");
            u32::from_be_bytes(payload[0..4].try_into().unwrap())
        }
        other => panic!("expected a structured reply, got {other:?}"),
    }
}

/// The check the close tests rest on can fail: a peer that accepts and
/// keeps the connection open is "not closed" (the read times out), one
/// that closes is "closed".
#[test]
fn is_closed_tells_a_timeout_from_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut c = RawClient::connect(&socket);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (held, _) = listener.accept().unwrap();
    assert!(
        !c.is_closed(),
        "an open, silent connection counted as closed"
    );
    drop(held);
    assert!(c.is_closed(), "a closed connection counted as open");
}

#[test]
fn bad_option_magic_closes() {
    let (f, _) = fixture();
    let mut c = f.connect();
    c.greet();
    c.stream.write_all(&[0x42; 16]).unwrap();
    assert!(c.is_closed());
}

#[test]
fn unknown_client_flags_close() {
    let (f, _) = fixture();
    let mut c = f.connect();
    let mut g = [0u8; 18];
    std::io::Read::read_exact(&mut c.stream, &mut g).unwrap();
    c.stream.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(c.is_closed());
}

#[test]
fn oversized_option_is_refused_and_closes() {
    let (f, _) = fixture();
    let mut c = f.connect();
    c.greet();
    // Only the header: the server must not wait for (or buffer) 16 MiB.
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(16u32 << 20).to_be_bytes());
    c.stream.write_all(&m).unwrap();
    let (_, kind, _) = c.option_reply().unwrap();
    assert_eq!(kind, REP_ERR_TOO_BIG);
    assert!(c.is_closed());
}

#[test]
fn unknown_and_malformed_options_get_errors_and_haggling_goes_on() {
    let (f, _) = fixture();
    let mut c = f.connect();
    c.greet();
    assert_eq!(c.option(0x4242, b"junk")[0].0, REP_ERR_UNSUP);
    assert_eq!(c.option(5, &[])[0].0, REP_ERR_UNSUP, "STARTTLS");
    assert_eq!(c.option(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);
    assert_eq!(c.option(OPT_GO, &[0, 0, 0, 9, b'd'])[0].0, REP_ERR_INVALID);
    let mut trailing = go_data("disk", &[]);
    trailing.push(0);
    assert_eq!(c.option(OPT_GO, &trailing)[0].0, REP_ERR_INVALID);
    assert_eq!(
        c.option(OPT_GO, &go_data("nope", &[]))[0].0,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        c.option(OPT_INFO, &go_data("nope", &[]))[0].0,
        REP_ERR_UNKNOWN
    );
    // Meta contexts need structured replies first.
    let r = c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(r[0].0, REP_ERR_INVALID);
    // After all that, the session still works.
    let (size, flags) = c.go("disk");
    assert_eq!(size, SIZE);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    c.request(0, CMD_READ, 1, 0, 512);
    let r = c.reply(512).unwrap();
    assert_eq!(simple_error(&r), 0);
    assert_eq!(r.1, vec![0; 512]);
}

#[test]
fn list_info_and_meta_contexts() {
    let (f, _) = fixture();
    let mut c = f.connect();
    c.greet();
    let r = c.option(OPT_LIST, &[]);
    let names: Vec<_> = r
        .iter()
        .filter(|(k, _)| *k == REP_SERVER)
        .map(|(_, d)| {
            let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(d[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(d[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("disk".into(), "a test disk".into()),
            ("ro".into(), "read-only".into())
        ]
    );
    // INFO with NAME, DESCRIPTION and BLOCK_SIZE.
    let r = c.option(OPT_INFO, &go_data("ro", &[1, 2, 3]));
    let infos: Vec<(u16, Vec<u8>)> = r
        .iter()
        .filter(|(k, _)| *k == REP_INFO)
        .map(|(_, d)| (u16::from_be_bytes([d[0], d[1]]), d[2..].to_vec()))
        .collect();
    let get = |t: u16| {
        infos
            .iter()
            .find(|(k, _)| *k == t)
            .map(|(_, d)| d.clone())
            .unwrap()
    };
    let export = get(0);
    let flags = u16::from_be_bytes([export[8], export[9]]);
    assert_eq!(flags & 2, 2, "READ_ONLY");
    assert_eq!(flags & (1 << 5), 0, "no TRIM on a read-only export");
    assert_eq!(get(1), b"ro");
    assert_eq!(get(2), b"read-only");
    assert_eq!(get(3), [0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
    // Meta contexts.
    c.structured();
    let r = c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"base:allocation");
    let r = c.option(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r, [(REP_ACK, vec![])]);
    let r = c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
    );
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    c.set_base_allocation("disk");
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().unwrap().1, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn export_name_enters_transmission_and_unknown_name_closes() {
    let (f, _) = fixture();
    let mut c = f.connect();
    c.greet();
    c.send_option(OPT_EXPORT_NAME, b"disk");
    let mut r = [0u8; 10]; // NO_ZEROES negotiated: no 124 zero bytes
    std::io::Read::read_exact(&mut c.stream, &mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), SIZE);
    c.request(0, CMD_FLUSH, 9, 0, 0);
    assert_eq!(simple_error(&c.reply(0).unwrap()), 0);

    let mut c = f.connect();
    c.greet();
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
}

#[test]
fn read_write_round_trip_simple_and_structured() {
    let (f, disk) = fixture();
    for structured in [false, true] {
        let mut c = RawClient::open(&f.socket, "disk", structured);
        let data = pattern(8192, structured as u64);
        c.request(1, CMD_WRITE, 7, 4096, 8192); // with FUA
        c.stream.write_all(&data).unwrap();
        let (r, _) = c.reply(0).unwrap();
        assert_eq!(
            r,
            RawReply::Simple {
                error: 0,
                handle: 7
            }
        );
        assert_eq!(&disk.contents()[4096..12288], &data[..]);
        c.request(0, CMD_READ, 8, 4096, 8192);
        let (r, d) = c.reply(8192).unwrap();
        if structured {
            match r {
                RawReply::Chunk {
                    flags,
                    kind,
                    handle,
                    payload,
                } => {
                    assert_eq!((flags, kind, handle), (1, 1, 8));
                    assert_eq!(u64::from_be_bytes(payload[0..8].try_into().unwrap()), 4096);
                    assert_eq!(&payload[8..], &data[..]);
                }
                other => panic!("{other:?}"),
            }
        } else {
            assert_eq!(
                r,
                RawReply::Simple {
                    error: 0,
                    handle: 8
                }
            );
            assert_eq!(d, data);
        }
        c.request(0, CMD_DISC, 0, 0, 0);
        assert!(c.is_closed());
    }
}

#[test]
fn structured_read_of_zeroes_is_a_hole_and_block_status_reports_it() {
    let (f, _) = fixture();
    let mut c = RawClient::open(&f.socket, "disk", true);
    c.request(0, CMD_WRITE, 1, 0, 4096);
    c.stream.write_all(&[1; 4096]).unwrap();
    c.reply(0).unwrap();
    c.request(0, CMD_READ, 2, 65536, 8192);
    match c.reply(0).unwrap().0 {
        RawReply::Chunk {
            kind: 2,
            flags: 1,
            payload,
            ..
        } => {
            assert_eq!(
                payload,
                [&65536u64.to_be_bytes()[..], &8192u32.to_be_bytes()].concat()
            )
        }
        other => panic!("expected an OFFSET_HOLE chunk, got {other:?}"),
    }
    // With DF the server must send the data itself.
    c.request(1 << 2, CMD_READ, 3, 65536, 8192);
    assert!(matches!(
        c.reply(0).unwrap().0,
        RawReply::Chunk { kind: 1, .. }
    ));

    c.request(0, CMD_BLOCK_STATUS, 4, 0, 16384);
    match c.reply(0).unwrap().0 {
        RawReply::Chunk {
            kind: 5,
            flags: 1,
            payload,
            handle: 4,
        } => {
            let be = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
            assert_eq!(be(0), 1, "context id");
            assert_eq!((be(4), be(8)), (4096, 0), "data");
            assert_eq!((be(12), be(16)), (12288, 3), "hole+zero");
            assert_eq!(payload.len(), 20);
        }
        other => panic!("{other:?}"),
    }
    // REQ_ONE: a single descriptor.
    c.request(1 << 3, CMD_BLOCK_STATUS, 5, 0, 16384);
    match c.reply(0).unwrap().0 {
        RawReply::Chunk {
            kind: 5, payload, ..
        } => assert_eq!(payload.len(), 12),
        other => panic!("{other:?}"),
    }
    // Trim turns the data block back into a hole.
    c.request(0, CMD_TRIM, 6, 0, 4096);
    assert_eq!(
        c.reply(0).unwrap().0,
        RawReply::Simple {
            error: 0,
            handle: 6
        }
    );
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 16384);
    match c.reply(0).unwrap().0 {
        RawReply::Chunk {
            kind: 5, payload, ..
        } => {
            assert_eq!(payload[4..], [0, 0, 0x40, 0, 0, 0, 0, 3])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_requests_get_errors_and_the_session_goes_on() {
    let (f, _) = fixture();
    let mut c = RawClient::open(&f.socket, "disk", false);
    // Out of range read.
    c.request(0, CMD_READ, 1, SIZE - 100, 512);
    assert_eq!(simple_error(&c.reply(512).unwrap()), EINVAL);
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512);
    assert_eq!(simple_error(&c.reply(512).unwrap()), EINVAL);
    // Oversized read (over the 32 MiB maximum).
    c.request(0, CMD_READ, 3, 0, (32 << 20) + 1);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EINVAL);
    // Unknown command.
    c.request(0, 42, 4, 0, 0);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EINVAL);
    // Unknown flag.
    c.request(1 << 12, CMD_READ, 5, 0, 512);
    assert_eq!(simple_error(&c.reply(512).unwrap()), EINVAL);
    // Block status without a negotiated context.
    c.request(0, CMD_BLOCK_STATUS, 6, 0, 512);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EINVAL);
    // Write past the end: ENOSPC, payload skipped.
    c.request(0, CMD_WRITE, 7, SIZE - 10, 512);
    c.stream.write_all(&[9; 512]).unwrap();
    assert_eq!(simple_error(&c.reply(0).unwrap()), ENOSPC);
    // Still in sync: a good read works.
    c.request(0, CMD_READ, 8, 0, 512);
    let r = c.reply(512).unwrap();
    assert_eq!(
        r.0,
        RawReply::Simple {
            error: 0,
            handle: 8
        }
    );
}

#[test]
fn structured_errors_are_error_chunks() {
    let (f, disk) = fixture();
    disk.set_failing_read(8192, libc_eio());
    let mut c = RawClient::open(&f.socket, "disk", true);
    c.request(0, CMD_READ, 1, SIZE, 1);
    assert_eq!(chunk_error(&c.reply(0).unwrap().0), EINVAL);
    c.request(0, CMD_READ, 2, 8192, 512);
    assert_eq!(chunk_error(&c.reply(0).unwrap().0), EIO);
    c.request(0, 99, 3, 0, 0);
    assert_eq!(chunk_error(&c.reply(0).unwrap().0), EINVAL);
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn read_only_export_refuses_writes() {
    let (f, _) = fixture();
    let mut c = RawClient::open(&f.socket, "ro", false);
    c.request(0, CMD_WRITE, 1, 0, 4096);
    c.stream.write_all(&[0; 4096]).unwrap();
    assert_eq!(simple_error(&c.reply(0).unwrap()), EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EPERM);
    c.request(0, CMD_READ, 4, 0, 16);
    let r = c.reply(16).unwrap();
    assert_eq!(r.1, pattern(SIZE as usize, 3)[..16]);
}

#[test]
fn bad_request_magic_closes() {
    let (f, _) = fixture();
    let mut c = RawClient::open(&f.socket, "disk", false);
    let mut h = request_header(0, CMD_READ, 1, 0, 512);
    h[0] ^= 0xff;
    c.stream.write_all(&h).unwrap();
    assert!(c.is_closed());
}

#[test]
fn oversized_write_closes_after_an_error() {
    let (f, _) = fixture();
    let mut c = RawClient::open(&f.socket, "disk", false);
    c.request(0, CMD_WRITE, 1, 0, u32::MAX);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EINVAL);
    assert!(c.is_closed());
}

#[test]
fn client_vanishing_mid_write_applies_nothing() {
    let (f, disk) = fixture();
    let mut c = RawClient::open(&f.socket, "disk", false);
    c.request(0, CMD_WRITE, 1, 0, 65536);
    c.stream.write_all(&[0xee; 1000]).unwrap();
    drop(c);
    // Also a client that leaves mid-header.
    let mut c = RawClient::open(&f.socket, "disk", false);
    c.stream
        .write_all(&request_header(0, CMD_WRITE, 1, 0, 512)[..10])
        .unwrap();
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert!(c.is_closed());

    // The server keeps serving, and nothing was written.
    let mut c = RawClient::open(&f.socket, "disk", false);
    c.request(0, CMD_READ, 2, 0, 65536);
    let (r, d) = c.reply(65536).unwrap();
    assert_eq!(
        r,
        RawReply::Simple {
            error: 0,
            handle: 2
        }
    );
    assert!(d.iter().all(|&b| b == 0));
    assert!(disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let (f, disk) = fixture();
    disk.set_slow_read(0, Duration::from_millis(500));
    let mut c = RawClient::open(&f.socket, "disk", false);
    let start = Instant::now();
    c.request(0, CMD_READ, 100, 0, 512); // slow
    for h in 0..8 {
        c.request(0, CMD_READ, h, 4096 * (h + 1), 512);
    }
    let mut order = Vec::new();
    for _ in 0..9 {
        let (r, _) = c.reply(512).unwrap();
        order.push(r.handle());
    }
    assert_eq!(
        *order.last().unwrap(),
        100,
        "slow read answered last: {order:?}"
    );
    let mut fast: Vec<u64> = order[..8].to_vec();
    fast.sort();
    assert_eq!(fast, (0..8).collect::<Vec<_>>());
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// More reads waiting (on the network, say) than the connection has
/// workers: a read the export can answer at once is not held up behind
/// them, the connection grows a worker for it.
#[test]
fn slow_reads_beyond_the_workers_do_not_hold_up_a_quick_one() {
    let (f, disk) = fixture();
    disk.set_slow_read(0, Duration::from_secs(2));
    let mut c = RawClient::open(&f.socket, "disk", false);
    let start = Instant::now();
    for h in 0..6 {
        c.request(0, CMD_READ, 100 + h, 0, 512); // each waits 2 s
    }
    c.request(0, CMD_READ, 7, 4096, 512);
    let (first, _) = c.reply(512).unwrap();
    assert_eq!(
        first.handle(),
        7,
        "the quick read waited behind the slow ones"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "the quick read took {:?}",
        start.elapsed()
    );
    for _ in 0..6 {
        c.reply(512).unwrap();
    }
}

#[test]
fn disconnect_waits_for_in_flight_requests() {
    let (f, disk) = fixture();
    disk.set_slow_read(0, Duration::from_millis(300));
    let mut c = RawClient::open(&f.socket, "disk", false);
    c.request(0, CMD_READ, 1, 0, 512);
    c.request(0, CMD_DISC, 2, 0, 0);
    let (r, _) = c.reply(512).unwrap();
    assert_eq!(
        r,
        RawReply::Simple {
            error: 0,
            handle: 1
        }
    );
    assert!(c.is_closed());
}

#[test]
fn many_connections_at_once() {
    let (f, disk) = fixture();
    let socket = f.socket.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let socket = socket.clone();
            thread::spawn(move || {
                let mut c = RawClient::open(&socket, "disk", i % 2 == 0);
                let data = pattern(65536, i + 10);
                for round in 0..4u64 {
                    let offset = i * 65536;
                    c.request(0, CMD_WRITE, round, offset, 65536);
                    c.stream.write_all(&data).unwrap();
                    let (r, _) = c.reply(0).unwrap();
                    assert_eq!(
                        r,
                        RawReply::Simple {
                            error: 0,
                            handle: round
                        }
                    );
                }
                c.request(0, CMD_DISC, 0, 0, 0);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let contents = disk.contents();
    for i in 0..8u64 {
        let range = (i * 65536) as usize..((i + 1) * 65536) as usize;
        assert_eq!(&contents[range], &pattern(65536, i + 10)[..]);
    }
}

#[test]
fn shutdown_closes_live_connections() {
    let (mut f, _) = fixture();
    let mut idle = RawClient::open(&f.socket, "disk", false);
    let mut haggling = f.connect();
    haggling.greet();
    // Wait until both connections are registered.
    let handle = f.handle.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.connection_count() < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(handle.connection_count(), 2);
    handle.shutdown();
    assert!(idle.is_closed());
    assert!(haggling.is_closed());
    assert!(std::os::unix::net::UnixStream::connect(&f.socket).is_err());
}

#[test]
fn handshake_timeout_drops_silent_clients() {
    let exports = MemExports::default();
    exports.add("disk", "", MemExport::new(4096));
    let config = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    };
    let f = Fixture::start_with(exports, config);
    let mut c = f.connect();
    c.greet();
    thread::sleep(Duration::from_millis(500));
    assert!(c.is_closed());
}

#[test]
fn handshake_deadline_is_total_not_per_read() {
    let exports = MemExports::default();
    exports.add("disk", "", MemExport::new(4096));
    let config = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    };
    let f = Fixture::start_with(exports, config);
    let mut c = f.connect();
    c.greet();
    // Trickle an option header one byte at a time, each well within 300 ms.
    let start = Instant::now();
    let mut closed = false;
    for b in IHAVEOPT.to_be_bytes().iter().chain(&[0u8; 8]) {
        if c.stream.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(closed || c.is_closed());
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn shutdown_does_not_wait_forever_for_a_client_that_never_reads() {
    let exports = MemExports::default();
    exports.add("disk", "", MemExport::new(32 << 20));
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let mut f = Fixture::start_with(exports, config);
    let mut c = RawClient::open(&f.socket, "disk", false);
    // 64 MiB of replies that nobody reads: the workers block in send.
    for h in 0..32 {
        c.request(0, CMD_READ, h, 0, 2 << 20);
    }
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    f.handle.take().unwrap().shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn write_zeroes_flags() {
    let (f, disk) = fixture();
    let mut c = RawClient::connect(&f.socket);
    c.greet();
    let (_, flags) = c.go("disk");
    assert_ne!(
        flags & (1 << 11),
        0,
        "SEND_FAST_ZERO for a fast-zero export"
    );
    assert_ne!(flags & (1 << 6), 0, "SEND_WRITE_ZEROES");
    c.request(0, CMD_WRITE, 1, 0, 8192);
    c.stream.write_all(&[7; 8192]).unwrap();
    c.reply(0).unwrap();
    // FAST_ZERO | NO_HOLE | FUA.
    c.request((1 << 4) | (1 << 1) | 1, CMD_WRITE_ZEROES, 2, 0, 4096);
    assert_eq!(
        c.reply(0).unwrap().0,
        RawReply::Simple {
            error: 0,
            handle: 2
        }
    );
    let contents = disk.contents();
    assert!(contents[..4096].iter().all(|&b| b == 0));
    assert!(contents[4096..8192].iter().all(|&b| b == 7));
    // REQ_ONE does not belong to WRITE_ZEROES.
    c.request(1 << 3, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(simple_error(&c.reply(0).unwrap()), EINVAL);
}

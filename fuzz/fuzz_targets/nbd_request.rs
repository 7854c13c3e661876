//! The pure NBD parsers on arbitrary bytes: request headers (and the checks
//! that follow them), option payloads, and the encoders fed with what they
//! produced. Nothing may panic; every request either parses or is refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_nbd::proto::{self, Op, Reply, Session};
use spore_nbd::Extent;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (params, rest) = data.split_at(12);
    let session = Session {
        size: u64::from_be_bytes(params[0..8].try_into().unwrap()),
        flags: u16::from_be_bytes([params[8], params[9]]),
        structured_replies: params[10] & 1 != 0,
        base_allocation: params[10] & 2 != 0,
    };

    for chunk in rest.chunks_exact(proto::REQUEST_HEADER_LEN) {
        let header: &[u8; proto::REQUEST_HEADER_LEN] = chunk.try_into().unwrap();
        let Ok(req) = proto::parse_request_header(header) else {
            continue;
        };
        if let Ok(op) = proto::check_request(&req, &session) {
            // Whatever passes the checks lies inside the export and within
            // the payload limit.
            let range = match op {
                Op::Read { offset, length, .. }
                | Op::Write { offset, length, .. }
                | Op::Trim { offset, length, .. }
                | Op::Cache { offset, length }
                | Op::WriteZeroes { offset, length, .. }
                | Op::BlockStatus { offset, length, .. } => Some((offset, length)),
                Op::Disconnect | Op::Flush => None,
            };
            if let Some((offset, length)) = range {
                assert!(offset.checked_add(length.into()).unwrap() <= session.size);
            }
            if let Op::Read { length, .. } | Op::Write { length, .. } = op {
                assert!(length <= proto::MAX_PAYLOAD);
            }
            if matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }) {
                assert!(!session.read_only());
            }
        }
        let encoded = Reply::ErrorOffset {
            error: proto::ErrorCode::Inval,
            message: std::str::from_utf8(&chunk[..chunk[0] as usize % 28]).unwrap_or("x"),
            offset: req.offset,
        }
        .encode(req.handle);
        assert!(encoded.header().len() >= proto::STRUCTURED_REPLY_HEADER_LEN + 14);
    }

    // The same bytes as option data for the option code in params.
    let option = u32::from(params[11]);
    let _ = proto::parse_option(option, rest);
    if let Ok(header) = <&[u8; proto::OPTION_HEADER_LEN]>::try_from(&rest[..rest.len().min(16)]) {
        let _ = proto::parse_option_header(header);
    }

    // Extents built from the bytes, described for a request length.
    let extents: Vec<Extent> = rest
        .chunks_exact(9)
        .map(|c| Extent {
            length: u64::from_be_bytes(c[0..8].try_into().unwrap()),
            hole: c[8] & 1 != 0,
            zero: c[8] & 2 != 0,
        })
        .collect();
    let length = (session.size as u32).max(1);
    let req_one = params[10] & 4 != 0;
    let mut out = Vec::new();
    let n = proto::encode_extents(&extents, length, req_one, &mut out);
    assert_eq!(out.len(), n * 8);
    assert!(n >= 1);
    assert!(!req_one || n == 1);
    let total: u64 = out
        .chunks_exact(8)
        .map(|d| {
            let len = u32::from_be_bytes(d[0..4].try_into().unwrap());
            assert!(len > 0);
            u64::from(len)
        })
        .sum();
    assert!(total <= u64::from(length));
});

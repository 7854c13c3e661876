#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/corpus/<target>/: a few valid inputs and a
few malformed ones per target, small files. Run from the repository root;
qcow2 seeds need qemu-img. The fuzzer adds what it finds to a copy under
target/ (scripts/fuzz.sh), never here."""
import json
import os
import struct
import subprocess
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def seed(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


ID_A, ID_B = bytes(range(32)), bytes(range(32, 64))
HEX_A = ID_A.hex()

# NBD server: 12 parameter bytes (size, flags, structured/base/req_one,
# option), then 28-byte request headers.
def nbd_req(flags, cmd, handle, offset, length):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)

params = struct.pack(">QHBB", 1 << 20, 0x1 | 0x8 | 0x20, 3, 7)
seed("nbd_request", "read-write-disc", params + nbd_req(0, 0, 1, 0, 4096)
     + nbd_req(1, 1, 2, 4096, 512) + nbd_req(0, 2, 3, 0, 0))
seed("nbd_request", "block-status", params + nbd_req(0, 7, 9, 0, 1 << 20))
seed("nbd_request", "past-the-end", params + nbd_req(0, 0, 1, (1 << 20) - 1, 2))
seed("nbd_request", "bad-magic", params + b"\xff" * 28)
seed("nbd_request", "short", b"\x00" * 11)

# NBD handshake on the server's transport: the client's bytes.
IHAVEOPT = 0x49484156454F5054
def opt(code, data):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data
go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
seed("nbd_options", "go", struct.pack(">I", 3) + opt(8, b"") + opt(7, go))
seed("nbd_options", "list-abort", struct.pack(">I", 3) + opt(3, b"") + opt(2, b""))
seed("nbd_options", "go-then-read", struct.pack(">I", 3) + opt(7, go) + nbd_req(0, 0, 1, 0, 512))
seed("nbd_options", "oversized-option", struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 1 << 24))
seed("nbd_options", "bad-flags", struct.pack(">I", 0x80000001))

# Peer wire: chunk requests, and responses to the ids after the first byte.
req = b"SPBQ" + struct.pack("<I", 2) + ID_A + ID_B
seed("peer_wire", "request", req)
resp = b"SPBR" + struct.pack("<I", 2) + ID_A + b"\x00" + struct.pack("<I", 3) + b"abc" + ID_B + b"\x01" + struct.pack("<I", 0)
seed("peer_wire", "response", b"\x02" + ID_A + ID_B + resp)
seed("peer_wire", "response-out-of-order", b"\x02" + ID_B + ID_A + resp)
seed("peer_wire", "request-count-lies", b"SPBQ" + struct.pack("<I", 1000) + ID_A)
seed("peer_wire", "record-too-large", b"\x01" + ID_A + b"SPBR" + struct.pack("<I", 1) + ID_A + b"\x00" + struct.pack("<I", 0xFFFFFFFF))

# Origin image records.
seed("origin_record", "v1", json.dumps({"version": 1, "manifest": HEX_A}))
seed("origin_record", "v1-profile", json.dumps({"version": 1, "manifest": HEX_A, "profile": ID_B.hex()}))
seed("origin_record", "v2", json.dumps({"version": 2, "manifest": HEX_A}))
seed("origin_record", "no-version", json.dumps({"manifest": HEX_A}))
seed("origin_record", "bad-id", json.dumps({"version": 1, "manifest": "zz"}))
seed("origin_record", "extra-field", json.dumps({"version": 1, "manifest": HEX_A, "x": 1}))

# Template bundles: the target seals its input as an envelope payload, so
# seeds are payloads: header length, JSON header, section bytes.
def bundle_payload(meta, sections):
    header = json.dumps({"meta": meta, "sections": [{"name": n, "len": len(b)} for n, b in sections]}).encode()
    return struct.pack("<I", len(header)) + header + b"".join(b for _, b in sections)
meta = {"format": 2, "ram_kib": 262144, "cpus": 1, "kernel": None}
seed("bundle", "template", bundle_payload(meta, [("state", b"\x01" * 64), ("description", b"{}")]))
seed("bundle", "no-sections", bundle_payload({}, []))
seed("bundle", "section-twice", bundle_payload({}, [("a", b"x"), ("a", b"y")]))
seed("bundle", "section-past-end", struct.pack("<I", 40) + b'{"meta":{},"sections":[{"name":"a","len":99}]}'[:40])
seed("bundle", "header-too-long", struct.pack("<I", 0xFFFFFFFF) + b"{}")

# Guest console lines: a first byte that says how the rest is cut.
seed("console_lines", "pongs", b"\x07" + b"SPORE-PONG 1\n$ SPORE-PONG 2\nboot noise\nSPORE-PON")
seed("console_lines", "no-newline", b"\x01SPORE-PONG 3")
seed("console_lines", "binary", b"\x03" + bytes(range(256)))

# QMP: greeting, then replies (ids spore-1.. with out-of-band) and events.
greeting = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}
lines = [greeting, {"return": {}, "id": "spore-1"},
         {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}},
         {"return": {"status": "running", "running": True}, "id": "spore-2"},
         {"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}, "id": "spore-3"},
         {"error": {"class": "GenericError", "desc": "no migration"}, "id": "spore-4"}]
seed("qmp_replies", "session", "".join(json.dumps(l) + "\n" for l in lines))
seed("qmp_replies", "no-oob", json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n" + json.dumps({"return": {}}) + "\n")
seed("qmp_replies", "not-json", "hello\n")
seed("qmp_replies", "wrong-id", json.dumps(greeting) + "\n" + json.dumps({"return": {}, "id": "spore-9"}) + "\n")

# NBD client: what a server sends.
greet = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
def rep(kind, data):
    return struct.pack(">QIII", 0x3E889045565A9, 7, kind, len(data)) + data
info = rep(3, struct.pack(">HQH", 0, 1 << 20, 1))
ok_read = struct.pack(">IIQ", 0x67446698, 0, 1) + b"\xab" * 4096
seed("nbd_client", "session", greet + info + rep(1, b"") + ok_read)
seed("nbd_client", "refused", greet + rep(0x80000006, b"no such export"))
seed("nbd_client", "read-error", greet + info + rep(1, b"") + struct.pack(">IIQ", 0x67446698, 5, 1))
seed("nbd_client", "huge-reply", greet + rep(3, b"") [:20] + struct.pack(">I", 0xFFFFFFFF))
seed("nbd_client", "not-nbd", b"HTTP/1.1 200 OK\r\n\r\n")

# Block batches (SPBLOCKS): the target checksums its input itself.
seed("block_batch", "one-granule", b"SPBLOCKS" + struct.pack("<HHIQ", 1, 0, 1, 1 << 20)
     + struct.pack("<QI", 4096, 4096) + b"\x5a" * 4096)
seed("block_batch", "unaligned", b"SPBLOCKS" + struct.pack("<HHIQ", 1, 0, 1, 1 << 20)
     + struct.pack("<QI", 100, 8) + b"12345678")
seed("block_batch", "garbage", b"SPBLOCK\x00" + b"\xff" * 40)
seed("block_batch", "empty", b"")

# Image formats and chunk files: mostly malformed; the valid ones come
# from the fuzzer.
seed("image_formats", "json", b'{"version":1}')
seed("image_formats", "envelope-head", b"SPBUNDLE" + struct.pack("<HHIQ", 1, 0, 0, 0) + b"\x00" * 32)
seed("image_formats", "zeros", b"\x00" * 64)

# qcow2: small real images from qemu-img, and broken headers.
with tempfile.TemporaryDirectory() as tmp:
    for name, opts in [("empty-512", "cluster_size=512"), ("v2-compat", "compat=0.10,cluster_size=512")]:
        path = os.path.join(tmp, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "64K"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 1024 2048", path], check=True)
        with open(path, "rb") as f:
            seed("qcow2_open", name, f.read())
seed("qcow2_open", "bad-version", b"QFI\xfb" + struct.pack(">I", 9) + b"\x00" * 96)
seed("qcow2_open", "truncated", b"QFI\xfb\x00\x00\x00\x03")


# Fleet certificates (spore-pki): what a peer presents in the TLS handshake,
# and revocation lists an agent loads. Made with `spore ca issue host-a
# --role host,publisher --san 127.0.0.1` and `spore ca revoke ops`.
import base64
CERT = base64.b64decode("MIIB0jCCAXegAwIBAgIQVKC6GBtC6ejgV0k5rFbnNzAKBggqhkjOPQQDAjAfMR0wGwYDVQQDDBRzcG9yZSBmbGVldCBDQSBzcG9yZTAeFw0yNjEyMDYxOTUwMTFaFw0yODAxMDcyMDUwMTFaMCoxDzANBgNVBAMMBmhvc3QtYTEXMBUGA1UECwwOaG9zdCxwdWJsaXNoZXIwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ9kPC0+6Z7b/pR2gsH4DjmpqtMBlKVaEDoeQjm/EncYGbtcL8u1FvFoj4eIThwVEtPs6Y7VreeiMG8daUlBIWjo4GJMIGGMB8GA1UdIwQYMBaAFHIk5T20iL+sp13pSrTubzLNr+eeMBcGA1UdEQQQMA6CBmhvc3QtYYcEfwAAATAdBgNVHSUEFjAUBggrBgEFBQcDAQYIKwYBBQUHAwIwHQYDVR0OBBYEFKITlzWS6M77QE+3v0iXwAV4ZkaOMAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0EAwIDSQAwRgIhAKtNOugonFMAQxT86Yuc33GyOREaEY5PXplwqPvzcn8RAiEAymy+OX93jqlbHFLPH+dtnN3KMvIpogiG0ZwaNIoEI+o=")
CRL = base64.b64decode("MIH9MIGkAgEBMAoGCCqGSM49BAMCMB8xHTAbBgNVBAMMFHNwb3JlIGZsZWV0IENBIHNwb3JlFw0yNjEyMDYyMDQ1MTFaFw0zNjEyMDMyMDUwMTFaMCMwIQIQce/1COaCQsoVOaNHmXQ/gxcNMjYxMjA2MjA1MDExWqAvMC0wHwYDVR0jBBgwFoAUciTlPbSIv6ynXelKtO5vMs2v554wCgYDVR0UBAMCAQIwCgYIKoZIzj0EAwIDSAAwRQIge9L2hrzOQ5acGSnqbyz/nPfMeXFJs5pbEqaIe29R/CcCIQDPrwQtWdwz4wID2+6t3YOalL7pGYiYs5laAR2VqytbYA==")
seed("peer_certificate", "cert", b"c" + CERT)
seed("peer_certificate", "cert-truncated", b"c" + CERT[: len(CERT) // 2])
seed("peer_certificate", "crl", b"r" + CRL)
seed("peer_certificate", "crl-flipped", b"r" + CRL[:40] + bytes([CRL[40] ^ 0xFF]) + CRL[41:])
seed("peer_certificate", "empty", b"")

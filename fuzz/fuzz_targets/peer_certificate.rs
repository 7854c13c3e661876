//! What a peer presents in the TLS handshake and what an agent loads as a
//! revocation list (spore-pki), on arbitrary bytes: the first byte picks
//! which (`c`: a certificate, read for its name, roles and serial; else a
//! revocation list, read for its serials). Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((b'c', der)) => {
            if let Ok(id) = spore_pki::PeerIdentity::of(der) {
                assert!(id.serial.bytes().all(|b| b.is_ascii_hexdigit()));
            }
        }
        Some((_, der)) => {
            let _ = spore_pki::revoked_serials_der(der);
        }
        None => {}
    }
});

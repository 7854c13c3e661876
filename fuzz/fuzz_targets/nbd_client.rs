//! The NBD client's handshake and reply parsing (spore-nbd's client) against
//! a server that sends the fuzzer's bytes on a real unix socket. It must
//! return a result or an error, never panic, hang or allocate what a length
//! field claims.

#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spore_nbd::client::Client;

fn listener() -> &'static (UnixListener, PathBuf) {
    static L: OnceLock<(UnixListener, PathBuf)> = OnceLock::new();
    L.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spore-fuzz-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&path);
        (UnixListener::bind(&path).unwrap(), path)
    })
}

fuzz_target!(|data: &[u8]| {
    let (listener, path) = listener();
    let bytes = data.to_vec();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    if let Ok(mut client) = Client::connect_unix(path, "disk") {
        let mut buf = vec![0u8; 4096];
        let _ = client.read(0, &mut buf);
        let _ = client.disconnect();
    }
    server.join().unwrap();
});

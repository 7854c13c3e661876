//! QMP as QEMU's monitor might answer (spore-qemu's client): the greeting,
//! replies and events are the fuzzer's bytes, served on a real unix socket.
//! The client must return a result or an error, never panic or hang.

#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use spore_qemu::Qmp;

fn listener() -> &'static (UnixListener, PathBuf) {
    static L: OnceLock<(UnixListener, PathBuf)> = OnceLock::new();
    L.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spore-fuzz-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
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
    if let Ok(mut qmp) = Qmp::connect_oob(path, Duration::from_secs(5)) {
        let _ = qmp.status();
        let _ = qmp.version();
        let _ = qmp.execute_oob("migrate-pause", None);
        let _ = qmp.wait_event(Duration::from_millis(1));
    }
    server.join().unwrap();
});

//! Serve one file as NBD export "disk" on a unix socket, for trying the
//! server with real clients and measuring it against `qemu-nbd`:
//!
//! ```text
//! cargo run --release -p spore-nbd --example serve_file -- /tmp/nbd.sock /dev/shm/disk.img [workers]
//! fio --name=r --ioengine=nbd --uri='nbd+unix:///disk?socket=/tmp/nbd.sock' \
//!     --rw=randread --bs=4k --iodepth=16 --runtime=10 --time_based
//! ```
//!
//! Runs until stdin is closed (or Ctrl-C).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use spore_nbd::{Export, Exports, Extent, ServerConfig};

struct FileExport {
    file: File,
    size: u64,
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _may_trim: bool, fua: bool) -> io::Result<()> {
        let zeroes = vec![0u8; length.min(1 << 20) as usize];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64);
            self.file
                .write_all_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn trim(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

struct One(Arc<FileExport>);

impl Exports for One {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name == "disk" || name.is_empty()).then(|| self.0.clone() as Arc<dyn Export>)
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), String::new())]
    }
}

fn main() -> io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: serve_file SOCKET FILE [WORKERS]");
        std::process::exit(2);
    };
    let workers = args.next().map_or(4, |w| w.parse().expect("workers"));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let size = file.metadata()?.len();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let config = ServerConfig {
        workers_per_connection: workers,
        ..ServerConfig::default()
    };
    let handle = spore_nbd::serve_unix(
        listener,
        Arc::new(One(Arc::new(FileExport { file, size }))),
        config,
    )?;
    eprintln!("serving {path} ({size} bytes) as \"disk\" on {socket}");
    // Park until stdin closes.
    let _ = io::stdin().read_to_end(&mut Vec::new());
    handle.shutdown();
    Ok(())
}

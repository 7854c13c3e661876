//! `spore`: the agent daemon and its command-line client.
//!
//! `spore agent` runs the per-host agent; every other command talks to it
//! over its API socket (`--data-dir` or `SPORE_HOME` tells where).

mod ca;
mod cli;
mod cluster;
mod format;
mod migrate;
mod output;
mod templates;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/spore"),
        None => PathBuf::from("/var/lib/spore"),
    }
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if !matches!(
        args.command,
        cli::Command::Agent(_) | cli::Command::Bench(_) | cli::Command::HoldSockets { .. }
    ) {
        // A client command piped into `head` ends quietly when the pipe
        // closes, as Unix tools do, instead of panicking on the write. The
        // agent and the benchmarks keep Rust's default (SIGPIPE ignored,
        // EPIPE as an error), since they write to sockets.
        // SAFETY: restoring a signal's default disposition at start-up,
        // before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPORE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if matches!(args.command, cli::Command::Agent(_)) {
            "info"
        } else {
            "warn"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    match cli::run(args, data_dir) {
        Ok(code) => code,
        Err(e) => {
            // One line with the whole chain of causes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            match e.downcast_ref::<spore_api::ClientError>() {
                Some(spore_api::ClientError::NoAgent { .. }) => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}

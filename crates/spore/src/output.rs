//! What a command shows while it works and when it is done: progress bars
//! for streamed operations and JSON for `--json`.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use spore_api::Client;

fn bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// A POST answered by a stream of progress events, shown as a bar.
pub(crate) async fn with_progress<T: serde::de::DeserializeOwned>(
    c: &Client,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<T> {
    let pb = bar(0);
    let result = c
        .stream(hyper::Method::POST, path, body, |phase, done, total| {
            pb.set_message(phase.to_owned());
            pb.set_length(total);
            pb.set_position(done);
        })
        .await;
    pb.finish_and_clear();
    Ok(result?)
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

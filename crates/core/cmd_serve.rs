//! `ferry serve VOLUME[@BACKUP]`: a backup as a read-only raw image over HTTP.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::{serve_http, BackupImage, CancellationToken};
use ferry_repo::BackupSpec;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::Progress;

/// Serves a backup as a read-only raw image over HTTP/1.1 with range requests, at
/// http://ADDR/TOKEN/image.raw (the token authorises; any other path is 404), until
/// interrupted: `curl -r`, `qemu-img convert`, or the source of an `rbd migration prepare
/// --import-only` (`ferry restore --instant` does that for you). Holes cost no fetch; every
/// block is verified when fetched.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// VOLUME or VOLUME@BACKUP (as for restore).
    target: String,
    /// The address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8079")]
    listen: std::net::SocketAddr,
    /// Read the token from this file (default: a new random one, printed with the URL).
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
}

pub async fn run(a: ServeArgs, r: RepoArgs) -> Result<u8> {
    let (volume, spec) = BackupSpec::split_target(&a.target)?;
    let engine = r.engine(Progress::new(true)).await?;
    let (_, manifest) = engine.resolve(volume, &spec).await?;
    let token = match &a.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f).with_context(|| format!("reading token file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                anyhow::bail!("token file {} must hold letters, digits, '-' or '_'", f.display());
            }
            t
        }
        None => ferry_engine::new_token(),
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let bound = listener.local_addr()?;
    let image = Arc::new(BackupImage::new(engine.repository().clone(), manifest.clone()));
    {
        use std::io::Write;
        println!(
            "serving {volume}@{} ({} bytes) at http://{bound}/{token}/image.raw",
            manifest.meta.backup_id,
            image.size()
        );
        let _ = std::io::stdout().flush();
    }
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_http(image, listener, token, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    let _ = server.await;
    Ok(exit::OK)
}

//! `ferry serve VOLUME[@BACKUP]`: a backup as a read-only image over HTTP and/or NBD.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::{serve_http, serve_nbd, serve_nbd_unix, BackupImage, CancellationToken};
use ferry_repo::BackupSpec;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{human_bytes, Progress};

/// Serves a backup read-only, without restoring it, until interrupted (SIGINT/SIGTERM).
///
/// Over HTTP/1.1 with range requests at http://ADDR/TOKEN/image.raw (`--listen`; the default
/// when nothing else is asked for): `curl -r`, `qemu-img convert`, or the source of an `rbd
/// migration prepare --import-only` (`ferry restore --instant` does that for you).
///
/// Over NBD (`--nbd ADDR`, `--nbd-socket PATH`), export name TOKEN: `qemu-img convert
/// nbd://ADDR/TOKEN out.raw`, `nbdcopy`, `nbdinfo --map`, `guestfish --format=raw -a
/// nbd://ADDR/TOKEN`, `nbd-client` + `mount -o ro`. Block status reports the backup's holes;
/// reads of holes cost no fetch.
///
/// The token authorises: another path or export name is refused. Every block is verified
/// when fetched; a sequential reader is read ahead of; the last blocks read are kept decoded
/// (--cache-mib).
/// A Unix socket (created 0600) keeps the export on this machine.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// VOLUME or VOLUME@BACKUP (as for restore).
    target: String,
    /// Serve HTTP on this address (default 127.0.0.1:8079 when neither --nbd nor
    /// --nbd-socket is given).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Serve NBD on this address (the usual port is 10809; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    nbd: Option<std::net::SocketAddr>,
    /// Serve NBD on a Unix socket at this path (created with mode 0600, removed at exit; an
    /// existing file is not replaced).
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Decoded blocks kept in memory, in MiB (at least two blocks).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    cache_mib: u64,
    /// Read the token from this file (default: a new random one, printed with the URLs).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the URLs as one JSON object (and what was served, at exit, as another).
    #[arg(long)]
    json: bool,
}

/// Removes the Unix socket at exit.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind_unix(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile)> {
    if std::fs::symlink_metadata(path).is_ok() {
        anyhow::bail!("{} exists: not replaced (remove it if no server uses it)", path.display());
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding the Unix socket {}", path.display()))?;
    let file = SocketFile(path.to_path_buf());
    // The owner alone may connect (the token is asked for as well).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("making {} private", path.display()))?;
    Ok((listener, file))
}

pub async fn run(a: ServeArgs, r: RepoArgs) -> Result<u8> {
    let (volume, spec) = BackupSpec::split_target(&a.target)?;
    let token = match &a.token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f).with_context(|| format!("reading token file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() || t.len() > 256 || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                anyhow::bail!("token file {} must hold 1 to 256 letters, digits, '-' or '_'", f.display());
            }
            t
        }
        None => ferry_engine::new_token(),
    };
    let http = match (a.listen, a.nbd, &a.nbd_socket) {
        (None, None, None) => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8079))),
        (l, _, _) => l,
    };
    let engine = r.engine(Progress::new(true)).await?;
    let (_, manifest) = engine.resolve(volume, &spec).await?;
    let image = Arc::new(BackupImage::with_cache(
        engine.repository().clone(),
        manifest.clone(),
        a.cache_mib.saturating_mul(1 << 20),
    ));
    let stop = CancellationToken::new();
    let mut servers = Vec::new();
    let mut urls = serde_json::Map::new();
    if let Some(addr) = http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        urls.insert("http".into(), format!("http://{bound}/{token}/image.raw").into());
        servers.push(tokio::spawn(serve_http(image.clone(), listener, token.clone(), stop.clone())));
    }
    if let Some(addr) = a.nbd {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        urls.insert("nbd".into(), format!("nbd://{bound}/{token}").into());
        servers.push(tokio::spawn(serve_nbd(image.clone(), listener, token.clone(), stop.clone())));
    }
    let mut socket_file = None;
    if let Some(path) = &a.nbd_socket {
        let (listener, file) = bind_unix(path)?;
        socket_file = Some(file);
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        urls.insert("nbd_unix".into(), format!("nbd+unix:///{token}?socket={}", abs.display()).into());
        servers.push(tokio::spawn(serve_nbd_unix(image.clone(), listener, token.clone(), stop.clone())));
    }
    // Listening for SIGTERM before the URLs are out: a client that has them may be done (and
    // its owner send the signal) before this task is scheduled again.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    {
        use std::io::Write;
        if a.json {
            let mut v = serde_json::Map::new();
            v.insert("volume".into(), volume.into());
            v.insert("backup".into(), manifest.meta.backup_id.to_string().into());
            v.insert("size".into(), image.size().into());
            v.extend(urls);
            println!("{}", serde_json::Value::Object(v));
        } else {
            println!(
                "serving {volume}@{} ({} bytes) read-only until interrupted",
                manifest.meta.backup_id,
                image.size()
            );
            for url in urls.values().filter_map(|u| u.as_str()) {
                println!("  {url}");
            }
        }
        let _ = std::io::stdout().flush();
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    for s in servers {
        let _ = s.await;
    }
    drop(socket_file);
    let st = image.stats();
    let (requests, bytes, fetched, ahead) = (
        st.requests.load(Ordering::Relaxed),
        st.bytes.load(Ordering::Relaxed),
        st.blocks_fetched.load(Ordering::Relaxed),
        st.blocks_read_ahead.load(Ordering::Relaxed),
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": requests,
                "bytes_served": bytes,
                "blocks_fetched": fetched,
                "blocks_read_ahead": ahead,
            })
        );
    } else {
        eprintln!(
            "served {requests} requests, {}; fetched {fetched} blocks ({ahead} read ahead)",
            human_bytes(bytes)
        );
    }
    Ok(exit::OK)
}

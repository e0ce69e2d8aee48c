//! `ferry doctor`: checks the source cluster and the repository and says precisely what is
//! wrong, one line per check.

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use ferry_engine::RbdImage;

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::print_json;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also check this image (rbd:POOL/IMAGE) or pool (rbd:POOL).
    #[arg(long)]
    source: Option<String>,
    /// Skip the Ceph checks (repository only).
    #[arg(long)]
    no_ceph: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Check {
    check: String,
    ok: bool,
    detail: String,
}

pub async fn run(a: DoctorArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let mut checks: Vec<Check> = Vec::new();
    let mut push = |check: &str, res: Result<String>| {
        checks.push(match res {
            Ok(detail) => Check {
                check: check.into(),
                ok: true,
                detail,
            },
            Err(e) => Check {
                check: check.into(),
                ok: false,
                detail: format!("{e:#}"),
            },
        })
    };

    // Repository: reachable, a ferry repository, and the passphrase opens it.
    if r.repo.is_some() {
        let store = r.store();
        match store {
            Err(e) => push("repository url", Err(e)),
            Ok(store) => {
                let cfg = ferry_repo::Repository::read_config(&store).await;
                let ok = cfg.is_ok();
                push(
                    "repository reachable",
                    cfg.map(|c| format!("{} (repository {}, format {})", store.url, c.repository_id, c.format))
                        .map_err(|e| anyhow::Error::new(e).context(format!("cannot read the repository config at {}", store.url))),
                );
                if ok {
                    let res = match r.passphrase() {
                        Ok(p) => ferry_repo::Repository::open(store, &p)
                            .await
                            .map(|_| "the passphrase opens a key slot".to_string())
                            .map_err(anyhow::Error::new),
                        Err(e) => Err(e),
                    };
                    push("repository passphrase", res);
                }
            }
        }
    }

    // Ceph: the rbd tool, the cluster (keyring, monitors), health, the pool/image.
    if !a.no_ceph {
        let cfg = ceph.ceph().config;
        let program = ceph.rbd_program.clone().unwrap_or_else(|| "rbd".into());
        let rbd_ok = tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(program);
            ferry_ceph::scrub_secrets(&mut cmd);
            cmd.arg("--version").output()
        })
        .await?;
        push(
            "rbd command",
            rbd_ok
                .map_err(|e| anyhow::anyhow!("cannot run `rbd`: {e} (install ceph-common)"))
                .and_then(|o| {
                    if o.status.success() {
                        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
                    } else {
                        Err(anyhow::anyhow!("`rbd --version` failed"))
                    }
                }),
        );
        let cluster = tokio::task::spawn_blocking(move || ferry_ceph::Cluster::connect(&cfg)).await?;
        match cluster {
            Err(e) => push("ceph cluster", Err(anyhow::Error::new(e))),
            Ok(cluster) => {
                let cluster = std::sync::Arc::new(cluster);
                let c = cluster.clone();
                let (fsid, health) = tokio::task::spawn_blocking(move || (c.fsid(), c.health())).await?;
                push(
                    "ceph cluster",
                    fsid.map(|f| format!("connected as {}, fsid {f}", cluster.client_name()))
                        .map_err(anyhow::Error::new),
                );
                push(
                    "ceph health",
                    health.map_err(anyhow::Error::new).and_then(|h| {
                        if h.status == "HEALTH_ERR" {
                            Err(anyhow::anyhow!("{h}"))
                        } else {
                            Ok(h.to_string())
                        }
                    }),
                );
                if let Some(src) = &a.source {
                    let (pool, image) = match RbdImage::parse(src) {
                        Some(s) => (s.pool, Some(s.image)),
                        None => (src.strip_prefix("rbd:").unwrap_or(src).to_string(), None),
                    };
                    let c = cluster.clone();
                    let p = pool.clone();
                    let pools = tokio::task::spawn_blocking(move || c.pools()).await?;
                    push(
                        "source pool",
                        pools.map_err(anyhow::Error::new).and_then(|ps| {
                            if ps.contains(&p) {
                                Ok(format!("pool '{p}' exists"))
                            } else {
                                Err(anyhow::anyhow!("pool '{p}' does not exist (pools: {})", ps.join(", ")))
                            }
                        }),
                    );
                    if let Some(image) = image {
                        let rbd = ceph.ceph().rbd();
                        let p = pool.clone();
                        let info = tokio::task::spawn_blocking(move || rbd.info(&p, &image).map(|i| (image, i))).await?;
                        push(
                            "source image",
                            info.map(|(image, i)| format!("{pool}/{image}: {} bytes, object size {}, id {}", i.size, i.object_size, i.id))
                                .map_err(anyhow::Error::new),
                        );
                    }
                }
            }
        }
    }

    let ok = checks.iter().all(|c| c.ok);
    if a.json {
        print_json(&serde_json::json!({ "ok": ok, "checks": checks }))?;
    } else {
        for c in &checks {
            println!("{:<5} {:<22} {}", if c.ok { "OK" } else { "FAIL" }, c.check, c.detail);
        }
        if checks.is_empty() {
            println!("nothing to check: give --repo and/or Ceph settings");
        }
    }
    Ok(if ok { exit::OK } else { exit::FAILURE })
}

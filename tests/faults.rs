//! The store misbehaving (injected with $FERRY_TEST_FAULTS): transient failures are retried,
//! unknown outcomes are read back, and nothing is ever reported as damaged data or as
//! uncommitted when it is the other way round.

use ferry_testdata::Volume;

use crate::util::{hash_file, Repo};

const MIB: u64 = 1 << 20;

fn with_faults(repo: &Repo, plan: &str, args: &[&str]) -> std::process::Output {
    repo.cmd(args).env("FERRY_TEST_FAULTS", plan).output().expect("ferry")
}

fn stream_file(repo: &Repo, v: &mut Volume, snap: &str) -> String {
    let f = repo.path(&format!("{snap}.diff"));
    std::fs::write(&f, v.diff(snap, Vec::new()).expect("diff")).expect("write");
    f.to_str().expect("utf8").to_string()
}

#[test]
fn a_chunk_put_that_stores_then_resets_is_retried_and_found() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(4 * MIB, 1 << 20, 61);
    let f = stream_file(&repo, &mut v, "s1");
    let out = with_faults(
        &repo,
        "put:chunks/*:reset-after:times=2",
        &["backup", "--volume", "v", "--diff", &f, "--json"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["requests"]["failed"], 2, "{j}");
    let r = repo.path("r.raw");
    repo.ok(&["restore", "v", "--to", r.to_str().expect("utf8")]);
    assert_eq!(hash_file(&r), v.hash());
    repo.ok(&["audit", "--read-data"]);
}

#[test]
fn a_manifest_put_with_an_unknown_outcome_is_read_back_and_committed_once() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 62);
    let f = stream_file(&repo, &mut v, "s1");
    // The store saves the manifest, then the connection resets: the retry finds it exists,
    // reads it back, recognises it and reports the commit (exit 0), once.
    let out = with_faults(
        &repo,
        "put:volumes/*:reset-after:times=1",
        &["backup", "--volume", "v", "--diff", &f, "--json"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let backups = repo.backups("v");
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0]["backup_id"], j["backup_id"]);
    let r = repo.path("r.raw");
    repo.ok(&["restore", "v", "--to", r.to_str().expect("utf8")]);
    assert_eq!(hash_file(&r), v.hash());
    // A 503 on the manifest PUT: the PUT is never sent twice (a second copy could re-create a
    // manifest pruned in between, behind a GC's back); the outcome is settled by fencing the
    // name (the fence's first attempt gets a 503 too, its retry lands): nothing committed, for
    // certain, and running the backup again uploads only a manifest.
    v.write(10, b"second");
    let f = stream_file(&repo, &mut v, "s2");
    let out = with_faults(
        &repo,
        "put:volumes/*:status=503:times=2",
        &["backup", "--volume", "v", "--diff", &f],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing was committed"), "{err}");
    assert_eq!(repo.backups("v").len(), 1);
    let j = repo.json(&["backup", "--volume", "v", "--diff", &f]);
    assert_eq!(j["stats"]["blocks_new"], 0, "{j}");
    assert_eq!(repo.backups("v").len(), 2);
}

#[test]
fn a_manifest_that_never_reaches_the_store_is_a_network_failure_and_nothing_is_committed() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 63);
    let f = stream_file(&repo, &mut v, "s1");
    let out = with_faults(&repo, "put:volumes/*:reset-before", &["backup", "--volume", "v", "--diff", &f]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("still unavailable after") && err.contains("nothing was committed"),
        "{err}"
    );
    assert!(!err.contains("integrity") && !err.contains("not a valid ferry object"), "{err}");
    assert!(repo.backups("v").is_empty());
    // The retry uploads only the manifest: the chunks are there.
    let j = repo.json(&["backup", "--volume", "v", "--diff", &f]);
    assert_eq!(j["stats"]["blocks_new"], 0, "{j}");
}

#[test]
fn a_burst_of_503s_during_a_restore_is_ridden_out() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(4 * MIB, 1 << 20, 64);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let r = repo.path("r.raw");
    let out = with_faults(
        &repo,
        "get:chunks/*:status=503:times=4",
        &["restore", "v", "--to", r.to_str().expect("utf8")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hash_file(&r), v.hash());
}

/// A restore killed half-way never leaves a full-size file that looks complete: it writes
/// `<path>.ferry-partial` and renames it only when every block is in.
#[test]
fn a_killed_restore_leaves_no_file_that_looks_complete() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(8 * MIB, 1 << 20, 65);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("out.raw");
    let partial = repo.path("out.raw.ferry-partial");
    let mut child = repo
        .cmd(&["restore", "v", "--to", out.to_str().expect("utf8"), "--jobs", "1"])
        .env("FERRY_TEST_FAULTS", "get:chunks/*:slow=400ms")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !partial.exists() {
        assert!(std::time::Instant::now() < deadline, "no partial file appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().expect("kill -9");
    let _ = child.wait();
    assert!(!out.exists(), "a killed restore must not leave {}", out.display());
    assert!(partial.exists());
    // The next restore replaces the partial file and puts the complete one in place.
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), v.hash());
    assert!(!partial.exists());
}

/// `--force` over an existing file keeps the old content until the new one is whole.
#[test]
fn a_failed_forced_restore_keeps_the_old_file() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 66);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("out.raw");
    std::fs::write(&out, b"the previous restore, still needed").expect("write");
    let o = repo
        .cmd(&["restore", "v", "--to", out.to_str().expect("utf8"), "--force"])
        .env("FERRY_TEST_FAULTS", "get:chunks/*:status=503")
        .output()
        .expect("ferry");
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).expect("read"), b"the previous restore, still needed");
    assert!(!repo.path("out.raw.ferry-partial").exists());
}

/// Issue 9, fault runs: backup, restore, audit, prune and gc, each under every kind of store
/// fault at 10 % of the requests (every 10th matching request, so the run is reproducible).
/// Each command completes or fails cleanly with a network error (exit 1) — never a false
/// "damaged" (3), never a crash; every backup reported committed is there and restores
/// bit-exactly; nothing committed and kept is lost; the repository audits clean afterwards.
#[test]
fn every_command_under_ten_percent_faults_of_each_kind_loses_nothing() {
    let kinds = [
        "any:*:status=503:every=10",
        "any:*:reset-before:every=10",
        "any:*:reset-after:every=10",
        "any:*:timeout=300ms:every=10",
        "get:*:truncate:every=10",
        "any:*:slow=100ms:every=10",
    ];
    let mut summary = Vec::new();
    for (k, plan) in kinds.iter().enumerate() {
        let repo = Repo::file(&["--block-size", "256K"]);
        let mut v = Volume::generated(6 * MIB, 256 << 10, 900 + k as u64);
        let mut committed: Vec<(String, String)> = Vec::new(); // (backup id, content hash)
        let mut codes = Vec::new();
        let run = |args: &[&str]| {
            let out = repo
                .cmd(args)
                .env("FERRY_TEST_FAULTS", plan)
                .env("FERRY_STORE_DEADLINE", "2")
                .output()
                .expect("ferry");
            let code = out.status.code();
            assert!(
                matches!(code, Some(0) | Some(1)),
                "{plan}: ferry {args:?} exited {:?} (only 0, or 1 for a network failure, may come of store faults):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            out
        };
        for snap in ["s1", "s2", "s3", "s4"] {
            if snap != "s1" {
                let off = (snap.as_bytes()[1] - b'0') as u64 * MIB;
                v.write(off, &vec![snap.as_bytes()[1]; 700 << 10]);
            }
            let f = stream_file(&repo, &mut v, snap);
            // A stream must continue the chain: without faults once the faulty try failed,
            // so the next snapshot has its parent.
            let out = run(&["backup", "--volume", "v", "--diff", &f, "--json"]);
            codes.push(out.status.code());
            let out = if out.status.success() {
                out
            } else {
                let out = repo.run(&["backup", "--volume", "v", "--diff", &f, "--json"]);
                assert!(out.status.success(), "{plan}: {}", String::from_utf8_lossy(&out.stderr));
                out
            };
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            committed.push((j["backup_id"].as_str().expect("id").to_string(), v.hash()));
        }
        // Restores and audit under faults: the right bytes, or a network failure.
        for (id, hash) in &committed {
            let r = repo.path("r.raw");
            let out = run(&["restore", &format!("v@{id}"), "--to", r.to_str().expect("utf8"), "--force"]);
            codes.push(out.status.code());
            if out.status.success() {
                assert_eq!(&hash_file(&r), hash, "{plan}: restore of {id} under faults");
            } else {
                assert!(!r.exists(), "{plan}: a failed restore left a complete-looking file");
            }
        }
        codes.push(run(&["audit", "--read-data"]).status.code());
        // Prune (keep the newest two) and gc under faults, then check without faults.
        codes.push(run(&["prune", "v", "--keep-last", "2"]).status.code());
        codes.push(run(&["gc", "--ack-timeout", "2"]).status.code());
        repo.ok(&["prune", "v", "--keep-last", "2"]);
        repo.ok(&["gc"]);
        let left: Vec<String> = repo
            .backups("v")
            .iter()
            .map(|b| b["backup_id"].as_str().expect("id").to_string())
            .collect();
        let want: Vec<String> = committed[2..].iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(left, want, "{plan}: keep-last 2 must leave the two newest backups");
        for (id, hash) in &committed[2..] {
            let r = repo.path("final.raw");
            repo.ok(&["restore", &format!("v@{id}"), "--to", r.to_str().expect("utf8"), "--force"]);
            assert_eq!(&hash_file(&r), hash, "{plan}: backup {id} after prune and gc");
        }
        repo.ok(&["audit", "--read-data"]);
        let failed = codes.iter().filter(|c| **c == Some(1)).count();
        summary.push(format!("{plan}: {} commands, {failed} failed cleanly (exit 1)", codes.len()));
    }
    eprintln!("{}", summary.join("\n"));
}

/// A TCP proxy in front of RGW that misbehaves on a share of its connections: every 5th one
/// is reset (RST) after 64 KiB either way, every 7th stalls 1.5 s before passing anything.
/// Returns the port and a counter of connections (reset, stalled, total).
fn fault_proxy(upstream: std::net::SocketAddr) -> (u16, std::sync::Arc<[std::sync::atomic::AtomicU64; 3]>) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = l.local_addr().expect("addr").port();
    let counts: std::sync::Arc<[std::sync::atomic::AtomicU64; 3]> = std::sync::Arc::new(Default::default());
    let c = counts.clone();
    std::thread::spawn(move || {
        for (n, client) in l.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(upstream) else {
                continue;
            };
            c[2].fetch_add(1, Ordering::Relaxed);
            let reset = n % 5 == 4;
            let stall = n % 7 == 6;
            if reset {
                c[0].fetch_add(1, Ordering::Relaxed);
            }
            if stall {
                c[1].fetch_add(1, Ordering::Relaxed);
            }
            let pump = move |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    if stall {
                        std::thread::sleep(std::time::Duration::from_millis(1500));
                    }
                    let mut buf = [0u8; 16 << 10];
                    let mut passed = 0usize;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        passed += n;
                        if reset && passed >= 64 << 10 {
                            // An abortive close: RST to both sides.
                            for s in [&from, &to] {
                                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                                // SAFETY: setsockopt on a socket we own, with a valid struct.
                                unsafe {
                                    libc::setsockopt(
                                        std::os::unix::io::AsRawFd::as_raw_fd(s),
                                        libc::SOL_SOCKET,
                                        libc::SO_LINGER,
                                        &linger as *const libc::linger as *const libc::c_void,
                                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                                    );
                                }
                            }
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            pump(client, server);
            pump(s2, c2);
        }
    });
    (port, counts)
}

/// Issue 9, fault runs against real S3: RGW behind a TCP proxy that resets and stalls
/// connections. Backups, restores, audit, prune and gc complete or fail with exit 1; every
/// backup reported committed is there and restores bit-exactly; the repository audits clean.
#[test]
fn rgw_behind_a_resetting_and_stalling_proxy_loses_nothing() {
    use std::sync::atomic::Ordering;
    let c = crate::util::cluster();
    let repo = c.s3_repo();
    let endpoint = c.var("AWS_ENDPOINT").to_string();
    let upstream: std::net::SocketAddr = endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("AWS_ENDPOINT is http://IP:PORT");
    let (port, counts) = fault_proxy(upstream);
    let proxied = format!("http://127.0.0.1:{port}");
    let run = |args: &[&str]| {
        let out = repo
            .cmd(args)
            .env("AWS_ENDPOINT", &proxied)
            .env("FERRY_STORE_DEADLINE", "20")
            .env("FERRY_STORE_RETRIES", "6")
            .output()
            .expect("ferry");
        assert!(
            matches!(out.status.code(), Some(0) | Some(1)),
            "ferry {args:?} through the proxy exited {:?}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let mut v = Volume::generated(8 * MIB, 1 << 20, 77);
    let mut committed = Vec::new();
    let mut failures = 0;
    for snap in ["s1", "s2", "s3"] {
        if snap != "s1" {
            v.write((snap.as_bytes()[1] - b'0') as u64 * MIB, &vec![9; 900 << 10]);
        }
        let f = stream_file(&repo, &mut v, snap);
        let mut out = run(&["backup", "--volume", "v", "--diff", &f, "--json"]);
        if !out.status.success() {
            failures += 1;
            out = repo.run(&["backup", "--volume", "v", "--diff", &f, "--json"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        committed.push((j["backup_id"].as_str().expect("id").to_string(), v.hash()));
    }
    for (id, hash) in &committed {
        let r = repo.path("r.raw");
        let out = run(&["restore", &format!("v@{id}"), "--to", r.to_str().expect("utf8"), "--force"]);
        if out.status.success() {
            assert_eq!(&hash_file(&r), hash, "restore of {id} through the proxy");
        } else {
            failures += 1;
        }
    }
    for args in [
        &["audit", "--read-data"][..],
        &["prune", "v", "--keep-last", "2"],
        &["gc", "--ack-timeout", "5"],
    ] {
        if !run(args).status.success() {
            failures += 1;
        }
    }
    // Straight to RGW: whatever the proxy did, nothing committed and kept is lost.
    repo.ok(&["prune", "v", "--keep-last", "2"]);
    repo.ok(&["gc"]);
    for (id, hash) in &committed[1..] {
        let r = repo.path("final.raw");
        repo.ok(&["restore", &format!("v@{id}"), "--to", r.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&r), hash, "backup {id} after the proxied run");
    }
    repo.ok(&["audit", "--read-data"]);
    let (resets, stalls, total) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
        counts[2].load(Ordering::Relaxed),
    );
    eprintln!("proxy: {total} connections, {resets} reset after 64 KiB, {stalls} stalled 1.5 s; {failures} commands failed cleanly");
    assert!(resets > 0, "the proxy reset no connection: the test did not test");
}

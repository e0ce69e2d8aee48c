//! Commands the worker runs for the operator: hooks around the snapshot and notifications.
//!
//! Every command runs in its own process group with ferry's secrets removed from its
//! environment (`FERRY_*`, `AWS_*`, … — see `ferry_ceph::SECRET_ENV_PREFIXES`) and the event
//! described in `FERRY_*` variables of its own; a command still running at its time limit is
//! killed with its whole group.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use crate::config::{Hooks, Notifier};

/// Runs `argv` with `env` (after removing secrets), `stdin` as its input, within `timeout`.
/// Ok when it exits 0; else what happened (exit status, timeout, cannot start) with the end of
/// its stderr.
pub async fn run_command(argv: &[String], env: &BTreeMap<String, String>, stdin: Option<Vec<u8>>, timeout: Duration) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    ferry_ceph::scrub_secrets(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {program}: {e}"))?;
    let pgid = child.id();
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        // A command that does not read its input is its own business.
        let _ = tokio::time::timeout(timeout, w.write_all(&data)).await;
    }
    let kill_group = || {
        if let Some(pid) = pgid {
            // SAFETY: kill(2) on the process group the child leads; it cannot hurt us.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            kill_group();
            Err(format!("{program} did not finish within {}; killed", humantime(timeout)))
        }
        Ok(Err(e)) => {
            kill_group();
            Err(format!("waiting for {program}: {e}"))
        }
        Ok(Ok(out)) => {
            // Whatever it left behind in its group goes too.
            kill_group();
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            let status = match out.status.code() {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".into(),
            };
            Err(if tail.is_empty() {
                format!("{program} failed ({status})")
            } else {
                format!("{program} failed ({status}): {tail}")
            })
        }
    }
}

/// `90s`, `2m30s`-style rendering of a duration.
pub fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// The pre- and post-snapshot hooks of one volume's run.
#[derive(Debug)]
pub struct VolumeHooks {
    /// The selection's hooks.
    pub hooks: Hooks,
    /// `FERRY_VOLUME`, `FERRY_POOL`, `FERRY_IMAGE`, `FERRY_SELECTION` and the UUID labels.
    pub env: BTreeMap<String, String>,
}

impl VolumeHooks {
    fn env(&self, phase: &str) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.insert("FERRY_HOOK".into(), phase.into());
        env
    }
}

impl ferry_engine::SnapshotHooks for VolumeHooks {
    fn before_snapshot(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match &self.hooks.pre {
                None => Ok(()),
                Some(argv) => run_command(argv, &self.env("pre"), None, self.hooks.timeout).await,
            }
        })
    }

    fn after_snapshot(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(argv) = &self.hooks.post {
                if let Err(e) = run_command(argv, &self.env("post"), None, self.hooks.timeout).await {
                    tracing::warn!(volume = %self.env.get("FERRY_VOLUME").map(String::as_str).unwrap_or("?"), "post-snapshot hook failed: {e}");
                }
            }
        })
    }
}

/// Sends `event` (a JSON object) to every notifier; failures are logged, never fatal.
pub async fn notify(notifiers: &[Notifier], event: &serde_json::Value, timeout: Duration) {
    for n in notifiers {
        let result = match n {
            Notifier::Command(argv) => {
                let mut env = BTreeMap::new();
                if let Some(obj) = event.as_object() {
                    for (k, v) in obj {
                        let v = match v {
                            serde_json::Value::String(s) => s.clone(),
                            serde_json::Value::Null => continue,
                            other => other.to_string(),
                        };
                        env.insert(format!("FERRY_EVENT_{}", k.to_ascii_uppercase()), v);
                    }
                }
                let body = serde_json::to_vec(event).unwrap_or_default();
                run_command(argv, &env, Some(body), timeout).await
            }
            Notifier::Http(url) => post(url, event, timeout).await,
        };
        if let Err(e) = result {
            tracing::warn!("notification failed ({}): {e}", describe(n));
        }
    }
}

fn describe(n: &Notifier) -> String {
    match n {
        Notifier::Command(argv) => format!("command {}", argv.first().map(String::as_str).unwrap_or("?")),
        // Only scheme and host: a webhook URL's path is often its secret.
        Notifier::Http(url) => match url::Url::parse(url) {
            Ok(u) => format!("POST to {}://{}", u.scheme(), u.host_str().unwrap_or("?")),
            Err(_) => "POST".into(),
        },
    }
}

async fn post(url: &str, event: &serde_json::Value, timeout: Duration) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("request failed: {}", e.without_url()))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the server answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn commands_succeed_fail_and_time_out() {
        let env = BTreeMap::from([("FERRY_VOLUME".to_string(), "v".to_string())]);
        assert!(run_command(&sh("test \"$FERRY_VOLUME\" = v"), &env, None, Duration::from_secs(5))
            .await
            .is_ok());
        let e = run_command(&sh("echo broken >&2; exit 3"), &env, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("exit status 3") && e.contains("broken"), "{e}");
        let t = std::time::Instant::now();
        let e = run_command(&sh("sleep 30 & sleep 30"), &env, None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.contains("did not finish within 300ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = run_command(&["/no/such/program".to_string()], &env, None, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
    }

    #[tokio::test]
    async fn secrets_do_not_reach_commands() {
        // The test process's own environment may hold FERRY_* variables; the child sees none
        // but the ones given.
        let env = BTreeMap::from([("FERRY_HOOK".to_string(), "pre".to_string())]);
        let r = run_command(
            &sh("env | grep -E '^(FERRY_|AWS_)' | grep -v '^FERRY_HOOK=' && exit 1 || exit 0"),
            &env,
            None,
            Duration::from_secs(5),
        )
        .await;
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn command_notifications_get_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("event.json");
        let n = vec![Notifier::Command(sh(&format!(
            "cat > {} && test \"$FERRY_EVENT_VOLUME\" = v1 && test \"$FERRY_EVENT_OK\" = true",
            out.display()
        )))];
        notify(&n, &serde_json::json!({"volume": "v1", "ok": true}), Duration::from_secs(5)).await;
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["volume"], "v1");
    }
}

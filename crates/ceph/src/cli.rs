//! The `rbd` command line driver.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::RbdContext;
use crate::{CephConfig, Error};

/// How long a metadata command (`info`, `snap ls`, `snap create`, ...) may run before it is
/// killed and [`Error::Timeout`] returned.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Passed to every `rbd` as `--client-mount-timeout`: how long it may try to reach the monitors
/// before giving up (Ceph's own default is 300 s).
pub const DEFAULT_MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this much of a child's stderr is kept (the rest is read and dropped).
const STDERR_LIMIT: usize = 256 * 1024;

/// `rbd info --format json`.
///
/// Fields `rbd` may leave out are `#[serde(default)]`: empty, zero or `None` when absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageInfo {
    /// Image name.
    pub name: String,
    /// Image id (empty for old format-1 images).
    #[serde(default)]
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes (`1 << order`; [`ImageInfo::from_json`] fills it in from `order`
    /// when `rbd` does not print it).
    #[serde(default)]
    pub object_size: u64,
    /// log2 of the object size in bytes (22 for 4 MiB objects).
    pub order: u32,
    /// Enabled features by name, e.g. `layering`, `exclusive-lock`, `fast-diff`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Number of objects the image spans (`size / object_size`, rounded up).
    #[serde(default)]
    pub objects: u64,
    /// Number of snapshots of the image.
    #[serde(default)]
    pub snapshot_count: u64,
    /// Name prefix of the RADOS objects holding the image's data, e.g. `rbd_data.<id>`.
    #[serde(default)]
    pub block_name_prefix: String,
    /// Image format: 1 (old) or 2 (the default for new images in current Ceph).
    #[serde(default)]
    pub format: u32,
    /// Operation features by name, as `rbd` prints them (e.g. `clone-child`).
    #[serde(default)]
    pub op_features: Vec<String>,
    /// Image flags by name, as `rbd` prints them (e.g. `object map invalid`).
    #[serde(default)]
    pub flags: Vec<String>,
    /// Separate data pool (erasure-coded setups), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_pool: Option<String>,
    /// Set for clones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ImageParent>,
    /// When the image was created, as `rbd` prints it, e.g. "Tue Nov 24 19:01:55 2026".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_timestamp: Option<String>,
    /// When the image was last read, as `rbd` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_timestamp: Option<String>,
    /// When the image was last written, as `rbd` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modify_timestamp: Option<String>,
}

impl ImageInfo {
    /// Parses the output of `rbd info --format json`.
    pub fn from_json(json: &[u8]) -> Result<ImageInfo, serde_json::Error> {
        let mut info: ImageInfo = serde_json::from_slice(json)?;
        if info.object_size == 0 && info.order < 64 {
            info.object_size = 1u64 << info.order;
        }
        Ok(info)
    }

    /// Whether the image has the named feature, e.g. `"fast-diff"`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// The `parent` of a cloned image in `rbd info --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageParent {
    /// Pool of the parent image.
    pub pool: String,
    /// RADOS namespace of the parent image (empty: the default namespace).
    #[serde(default)]
    pub pool_namespace: String,
    /// Name of the parent image.
    pub image: String,
    /// Id of the parent image.
    #[serde(default)]
    pub id: String,
    /// The parent snapshot the clone was made from.
    pub snapshot: String,
    /// Whether the parent image is in the trash (string or JSON bool accepted).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub trash: bool,
    /// The parent overlap, in bytes: how much of the clone, from offset 0, is backed by the
    /// parent snapshot.
    #[serde(default)]
    pub overlap: u64,
}

/// One changed extent as `rbd diff --format json` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    /// Byte offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// False when the range was discarded or zeroed (it reads as zeros).
    pub exists: bool,
}

impl DiffExtent {
    /// Parses `rbd diff --format json` (`exists` is the string "true"/"false" in Ceph 16, a
    /// boolean elsewhere: both are taken).
    pub fn list_from_json(json: &[u8]) -> Result<Vec<DiffExtent>, serde_json::Error> {
        #[derive(Deserialize)]
        struct Raw {
            offset: u64,
            length: u64,
            exists: serde_json::Value,
        }
        let raw: Vec<Raw> = serde_json::from_slice(json)?;
        Ok(raw
            .into_iter()
            .map(|r| DiffExtent {
                offset: r.offset,
                length: r.length,
                exists: matches!(&r.exists, serde_json::Value::Bool(true)) || r.exists.as_str() == Some("true"),
            })
            .collect())
    }
}

/// One entry of `rbd snap ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct SnapInfo {
    /// Snapshot id (Ceph's numeric id for the snapshot).
    pub id: u64,
    /// Snapshot name.
    pub name: String,
    /// Image size at the snapshot, bytes.
    pub size: u64,
    /// `rbd` prints this as the string "true"/"false"; both forms are accepted.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub protected: bool,
    /// As `rbd` prints it, e.g. "Tue Nov 24 19:01:56 2026" (local time of the client).
    #[serde(default)]
    pub timestamp: Option<String>,
}

impl SnapInfo {
    /// Parses the output of `rbd snap ls --format json`.
    pub fn list_from_json(json: &[u8]) -> Result<Vec<SnapInfo>, serde_json::Error> {
        serde_json::from_slice(json)
    }
}

fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        Bool(bool),
        Str(String),
    }
    match B::deserialize(d)? {
        B::Bool(b) => Ok(b),
        B::Str(s) => match s.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(serde::de::Error::custom(format!("expected true or false, got {other:?}"))),
        },
    }
}

/// Prefixes of environment variables a child process (`rbd`) must not inherit: ferry's own
/// (the repository passphrase among them) and the object stores' credentials. The Ceph client
/// settings (`CEPH_*`) stay.
pub const SECRET_ENV_PREFIXES: &[&str] = &["FERRY_", "AWS_", "AZURE_", "GOOGLE_", "GCS_"];

/// Removes every variable named by [`SECRET_ENV_PREFIXES`] from a child's environment.
pub fn scrub_secrets(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if let Some(n) = name.to_str() {
            if SECRET_ENV_PREFIXES.iter().any(|p| n.starts_with(p)) {
                cmd.env_remove(&name);
            }
        }
    }
}

/// Drives the `rbd` command line tool.
#[derive(Debug, Clone)]
pub struct RbdCli {
    config: CephConfig,
    program: PathBuf,
    command_timeout: Duration,
    mount_timeout: Option<Duration>,
}

/// What an `rbd` invocation is about, to turn its failures into precise errors.
#[derive(Debug, Clone)]
struct Target {
    pool: String,
    image: Option<String>,
    snap: Option<String>,
    /// `--from-snap` of an export-diff.
    from_snap: Option<String>,
    op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Other,
    Create,
    Remove,
    SnapCreate,
    SnapRemove,
    ExportDiff,
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl RbdCli {
    /// An `rbd` driver using `rbd` from `PATH`.
    pub fn new(config: CephConfig) -> Self {
        RbdCli {
            config,
            program: PathBuf::from("rbd"),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            mount_timeout: Some(DEFAULT_MOUNT_TIMEOUT),
        }
    }

    /// Use another `rbd` binary (a path, or a name looked up in `PATH`).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Time limit of the metadata commands (not of `export_diff`/`import_diff`).
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// `--client-mount-timeout` for every command; `None` leaves Ceph's setting alone.
    pub fn with_mount_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.mount_timeout = timeout;
        self
    }

    /// The connection settings every command gets.
    pub fn config(&self) -> &CephConfig {
        &self.config
    }

    /// The `rbd` binary that is run (default `rbd`, looked up in `PATH`).
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// `rbd info --format json POOL/IMAGE`.
    pub fn info(&self, pool: &str, image: &str) -> Result<ImageInfo, Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        let (cmd, out) = self.run_ok(&["info", "--format", "json", &spec], &target)?;
        ImageInfo::from_json(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd snap ls --format json POOL/IMAGE` (user snapshots, oldest first).
    pub fn snap_list(&self, pool: &str, image: &str) -> Result<Vec<SnapInfo>, Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        let (cmd, out) = self.run_ok(&["snap", "ls", "--format", "json", &spec], &target)?;
        SnapInfo::list_from_json(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd ls --format json POOL`.
    pub fn list(&self, pool: &str) -> Result<Vec<String>, Error> {
        check_name("pool", pool)?;
        let target = Target::pool(pool);
        let (cmd, out) = self.run_ok(&["ls", "--format", "json", pool], &target)?;
        serde_json::from_slice(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd snap create POOL/IMAGE@SNAP`. [`Error::SnapshotExists`] if the name is taken.
    pub fn snap_create(&self, pool: &str, image: &str, snap: &str) -> Result<(), Error> {
        let spec = snap_spec(pool, image, snap)?;
        let target = Target::snap(pool, image, snap, Op::SnapCreate);
        self.run_ok(&["snap", "create", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// `rbd snap rm POOL/IMAGE@SNAP`. [`Error::SnapshotNotFound`] if there is no such snapshot.
    pub fn snap_remove(&self, pool: &str, image: &str, snap: &str) -> Result<(), Error> {
        let spec = snap_spec(pool, image, snap)?;
        let target = Target::snap(pool, image, snap, Op::SnapRemove);
        self.run_ok(&["snap", "rm", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// `rbd create --size SIZE [--object-size OBJECT_SIZE] POOL/IMAGE` (bytes; object size a
    /// power of two from 4 KiB to 32 MiB). [`Error::ImageExists`] if the name is taken.
    pub fn create(&self, pool: &str, image: &str, size: u64, object_size: Option<u64>) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let size_arg = format!("{size}B");
        let mut args = vec!["create", "--size", &size_arg];
        let os_arg;
        if let Some(os) = object_size {
            os_arg = format!("{os}B");
            args.extend(["--object-size", &os_arg]);
        }
        args.push(&spec);
        let target = Target::image(pool, image, Op::Create);
        self.run_ok(&args, &target)?;
        Ok(())
    }

    /// `rbd rm POOL/IMAGE`. Fails if the image still has snapshots.
    pub fn remove(&self, pool: &str, image: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Remove);
        self.run_ok(&["rm", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// Whether POOL/IMAGE exists. A missing pool is an error, not `false`.
    pub fn exists(&self, pool: &str, image: &str) -> Result<bool, Error> {
        match self.info(pool, image) {
            Ok(_) => Ok(true),
            Err(Error::ImageNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `rbd diff --from-snap FROM --format json POOL/IMAGE@SNAP`: the exact extents that changed
    /// between the snapshots (`exists` false: discarded or zeroed), ascending; no data is read.
    pub fn diff_extents(&self, pool: &str, image: &str, snap: &str, from_snap: &str) -> Result<Vec<DiffExtent>, Error> {
        let spec = snap_spec(pool, image, snap)?;
        check_name("snapshot", from_snap)?;
        let mut target = Target::snap(pool, image, snap, Op::ExportDiff);
        target.from_snap = Some(from_snap.to_owned());
        let (cmd, out) = self.run_ok(&["diff", "--from-snap", from_snap, "--format", "json", &spec], &target)?;
        DiffExtent::list_from_json(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd diff --from-snap FROM --format json POOL/IMAGE`: what was written to the image
    /// (its head) since snapshot FROM; exact extents, no data read.
    pub fn head_diff_extents(&self, pool: &str, image: &str, from_snap: &str) -> Result<Vec<DiffExtent>, Error> {
        let spec = image_spec(pool, image)?;
        check_name("snapshot", from_snap)?;
        let mut target = Target::image(pool, image, Op::Other);
        target.from_snap = Some(from_snap.to_owned());
        let (cmd, out) = self.run_ok(&["diff", "--from-snap", from_snap, "--format", "json", &spec], &target)?;
        DiffExtent::list_from_json(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd migration prepare --import-only --source-spec-path SPEC POOL/IMAGE`: creates the
    /// image as an import-only live migration from the source the spec names (Ceph 16.2+); the
    /// image is usable at once, reads of data not yet copied go to the source.
    pub fn migration_prepare_import(&self, pool: &str, image: &str, source_spec: &std::path::Path) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Create);
        let path = source_spec.to_string_lossy();
        self.run_ok(
            &["migration", "prepare", "--import-only", "--source-spec-path", &path, &spec],
            &target,
        )?;
        Ok(())
    }

    /// `rbd migration execute --no-progress POOL/IMAGE`: copies everything from the source
    /// (as long as it takes: no command timeout).
    pub fn migration_execute(&self, pool: &str, image: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        let long = RbdCli {
            command_timeout: Duration::from_secs(30 * 24 * 3600),
            ..self.clone()
        };
        long.run_ok(&["migration", "execute", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// `rbd migration commit --no-progress POOL/IMAGE`: ends a finished migration (the image
    /// no longer refers to its source).
    pub fn migration_commit(&self, pool: &str, image: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        self.run_ok(&["migration", "commit", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// `rbd migration abort --no-progress POOL/IMAGE`: abandons a migration (an import-only
    /// one: the image is removed).
    pub fn migration_abort(&self, pool: &str, image: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        self.run_ok(&["migration", "abort", "--no-progress", &spec], &target)?;
        Ok(())
    }

    /// `rbd image-meta list --format json POOL/IMAGE`: the image's metadata keys and values.
    pub fn meta_list(&self, pool: &str, image: &str) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        let (cmd, out) = self.run_ok(&["image-meta", "list", "--format", "json", &spec], &target)?;
        // An image without metadata prints nothing at all on some releases.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Default::default());
        }
        serde_json::from_slice(&out.stdout).map_err(|source| json_error(cmd, &out.stdout, source))
    }

    /// `rbd image-meta set POOL/IMAGE KEY VALUE`.
    pub fn meta_set(&self, pool: &str, image: &str, key: &str, value: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        self.run_ok(&["image-meta", "set", &spec, key, value], &target)?;
        Ok(())
    }

    /// `rbd image-meta remove POOL/IMAGE KEY`.
    pub fn meta_remove(&self, pool: &str, image: &str, key: &str) -> Result<(), Error> {
        let spec = image_spec(pool, image)?;
        let target = Target::image(pool, image, Op::Other);
        self.run_ok(&["image-meta", "remove", &spec, key], &target)?;
        Ok(())
    }

    /// Spawns `rbd export-diff [--whole-object] [--from-snap FROM] --no-progress POOL/IMAGE@SNAP -`.
    ///
    /// Read the diff stream (format v1) from the returned [`ExportDiff`] to its end, then call
    /// [`ExportDiff::wait`]: only a successful `wait` means the stream is complete.
    pub fn export_diff(
        &self,
        pool: &str,
        image: &str,
        snap: &str,
        from_snap: Option<&str>,
        whole_object: bool,
    ) -> Result<ExportDiff, Error> {
        let spec = snap_spec(pool, image, snap)?;
        let mut args: Vec<&str> = vec!["export-diff"];
        if whole_object {
            args.push("--whole-object");
        }
        if let Some(from) = from_snap {
            check_name("snapshot", from)?;
            args.extend(["--from-snap", from]);
        }
        args.extend(["--no-progress", &spec, "-"]);
        let mut target = Target::snap(pool, image, snap, Op::ExportDiff);
        target.from_snap = from_snap.map(str::to_owned);

        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group: a caller stopping the export can signal everything that holds
        // the pipe (a wrapper script's children too), see [`ExportDiff::process_group`].
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let command = self.display(&args);
        let mut child = self.spawn(&mut cmd, &command)?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            kill_and_reap(&mut child);
            return Err(pipe_missing(&command));
        };
        widen_pipe(&stdout);
        Ok(ExportDiff(Piped {
            child: Some(child),
            pipe: Some(stdout),
            stderr: Some(drain(stderr)),
            command,
            target,
        }))
    }

    /// Spawns `rbd import-diff --no-progress - POOL/IMAGE`; write a diff stream to the returned
    /// [`ImportDiff`], then call [`ImportDiff::finish`].
    pub fn import_diff(&self, pool: &str, image: &str) -> Result<ImportDiff, Error> {
        let spec = image_spec(pool, image)?;
        let args = ["import-diff", "--no-progress", "-", spec.as_str()];
        let target = Target::image(pool, image, Op::Other);
        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let command = self.display(&args);
        let mut child = self.spawn(&mut cmd, &command)?;
        let (Some(stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
            kill_and_reap(&mut child);
            return Err(pipe_missing(&command));
        };
        Ok(ImportDiff(Piped {
            child: Some(child),
            pipe: Some(stdin),
            stderr: Some(drain(stderr)),
            command,
            target,
        }))
    }

    // ---- plumbing ------------------------------------------------------------------------

    fn base_args(&self) -> Vec<OsString> {
        let mut args = self.config.cli_args();
        if let Some(t) = self.mount_timeout {
            args.push("--client-mount-timeout".into());
            args.push(t.as_secs().max(1).to_string().into());
        }
        args
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.base_args()).args(args);
        scrub_secrets(&mut cmd);
        cmd
    }

    fn display(&self, args: &[&str]) -> String {
        let mut parts: Vec<String> = vec![quote(self.program.as_os_str())];
        parts.extend(self.base_args().iter().map(|a| quote(a)));
        parts.extend(args.iter().map(|a| quote(OsStr::new(a))));
        parts.join(" ")
    }

    fn spawn(&self, cmd: &mut Command, command: &str) -> Result<Child, Error> {
        cmd.spawn().map_err(|source| Error::Spawn {
            program: self.program.display().to_string(),
            command: command.to_owned(),
            source,
        })
    }

    /// Runs a metadata command to completion (bounded by the command timeout) and turns a
    /// failure into the most precise error. Returns the command line and its output.
    fn run_ok(&self, args: &[&str], target: &Target) -> Result<(String, Output), Error> {
        let command = self.display(args);
        let out = self.run(args, &command)?;
        if out.status.success() && !stderr_has_error(&out.stderr) {
            Ok((command, out))
        } else {
            Err(classify(command, out.status, out.stderr, target))
        }
    }

    fn run(&self, args: &[&str], command: &str) -> Result<Output, Error> {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn(&mut cmd, command)?;
        let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            kill_and_reap(&mut child);
            return Err(pipe_missing(command));
        };
        let stderr = drain(stderr);
        let stdout = thread::spawn(move || {
            let mut buf = Vec::new();
            stdout.read_to_end(&mut buf).map(|_| buf)
        });

        let deadline = Instant::now() + self.command_timeout;
        let mut pause = Duration::from_millis(2);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(source) => {
                    kill_and_reap(&mut child);
                    return Err(Error::Io {
                        context: format!("waiting for `{command}`"),
                        source,
                    });
                }
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                let _ = stdout.join();
                return Err(Error::Timeout {
                    command: command.to_owned(),
                    after: self.command_timeout,
                    stderr: join_drain(stderr),
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        let stdout = match stdout.join() {
            Ok(Ok(buf)) => buf,
            Ok(Err(source)) => {
                return Err(Error::Io {
                    context: format!("reading the output of `{command}`"),
                    source,
                })
            }
            Err(_) => {
                return Err(Error::Io {
                    context: format!("reading the output of `{command}`"),
                    source: io::Error::other("reader thread panicked"),
                })
            }
        };
        Ok(Output {
            status,
            stdout,
            stderr: join_drain(stderr),
        })
    }
}

impl Target {
    fn pool(pool: &str) -> Self {
        Target {
            pool: pool.to_owned(),
            image: None,
            snap: None,
            from_snap: None,
            op: Op::Other,
        }
    }

    fn image(pool: &str, image: &str, op: Op) -> Self {
        Target {
            image: Some(image.to_owned()),
            op,
            ..Target::pool(pool)
        }
    }

    fn snap(pool: &str, image: &str, snap: &str, op: Op) -> Self {
        Target {
            snap: Some(snap.to_owned()),
            ..Target::image(pool, image, op)
        }
    }
}

/// A spawned `rbd` child with one pipe to it (`P` = stdout or stdin) and a thread draining its
/// stderr. Shared by [`ExportDiff`] and [`ImportDiff`]; dropping it kills the child.
struct Piped<P> {
    child: Option<Child>,
    pipe: Option<P>,
    stderr: Option<JoinHandle<String>>,
    command: String,
    target: Target,
}

impl<P> Piped<P> {
    fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
    }

    /// Closes the pipe, waits for the child and checks it: `Err` if it exited non-zero, was
    /// killed, or printed an error line on stderr; the error carries the stderr text.
    fn finish(&mut self) -> Result<(), Error> {
        drop(self.pipe.take());
        let status = match self.child.take() {
            Some(mut child) => child.wait().map_err(|source| Error::Io {
                context: format!("waiting for `{}`", self.command),
                source,
            })?,
            None => return Err(pipe_missing(&self.command)),
        };
        let stderr = self.stderr.take().map(join_drain).unwrap_or_default();
        if status.success() && !stderr_has_error(&stderr) {
            Ok(())
        } else {
            Err(classify(std::mem::take(&mut self.command), status, stderr, &self.target))
        }
    }
}

impl<P> Drop for Piped<P> {
    fn drop(&mut self) {
        drop(self.pipe.take());
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
    }
}

/// A running `rbd export-diff … -`. Read the stream through [`Read`] or [`ExportDiff::stdout`],
/// then [`ExportDiff::wait`]. Dropping it without `wait` kills the child.
pub struct ExportDiff(Piped<ChildStdout>);

impl ExportDiff {
    /// The child's stdout, the diff stream.
    pub fn stdout(&mut self) -> &mut ChildStdout {
        // Invariant: only `wait` (which consumes self) and `drop` take it.
        self.0.pipe.as_mut().expect("ExportDiff stdout is present until wait")
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.0.command
    }

    /// The process group of the `rbd` child (it leads its own): signal `-group` to stop it
    /// and anything it started that holds the pipe.
    pub fn process_group(&self) -> Option<u32> {
        // The child leads its own group (spawned with `process_group(0)`).
        self.id()
    }

    /// Process id of the `rbd` child.
    pub fn id(&self) -> Option<u32> {
        self.0.id()
    }

    /// Kills the child (SIGKILL); a later [`ExportDiff::wait`] then returns an error.
    pub fn kill(&mut self) {
        self.0.kill()
    }

    /// Closes stdout, waits for the child and checks it: `Err` if it exited non-zero, was
    /// killed, or printed an error line on stderr; the error carries the stderr text. Read the
    /// stream to its end first: closing it early makes `rbd` fail with EPIPE.
    pub fn wait(mut self) -> Result<(), Error> {
        self.0.finish()
    }
}

/// Lets the export run up to 1 MiB ahead of its reader (the default pipe holds 64 KiB: a
/// context switch and a wake-up every 64 KiB of a multi-GiB stream, and `rbd` stalled as soon
/// as the reader is busy). Only a hint: the default size still works.
fn widen_pipe(pipe: &std::process::ChildStdout) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fcntl on a valid pipe descriptor; F_SETPIPE_SZ only resizes its buffer.
        unsafe {
            libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = pipe;
}

impl Read for ExportDiff {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.pipe.as_mut() {
            Some(s) => s.read(buf),
            None => Ok(0),
        }
    }
}

impl std::fmt::Debug for ExportDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportDiff")
            .field("command", &self.0.command)
            .field("pid", &self.id())
            .finish()
    }
}

/// A running `rbd import-diff - POOL/IMAGE`. Write the diff stream through [`Write`] or
/// [`ImportDiff::stdin`], then [`ImportDiff::finish`]. If a write fails (EPIPE: `rbd` gave up),
/// call `finish` for `rbd`'s own error. Dropping it without `finish` kills the child; the image
/// then holds whatever part of the stream was applied (the end snapshot is not created).
pub struct ImportDiff(Piped<ChildStdin>);

impl ImportDiff {
    /// The child's stdin.
    pub fn stdin(&mut self) -> &mut ChildStdin {
        // Invariant: only `finish` (which consumes self) and `drop` take it.
        self.0.pipe.as_mut().expect("ImportDiff stdin is present until finish")
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.0.command
    }

    /// Process id of the `rbd` child.
    pub fn id(&self) -> Option<u32> {
        self.0.id()
    }

    /// Kills the child (SIGKILL); a later [`ImportDiff::finish`] then returns an error.
    pub fn kill(&mut self) {
        self.0.kill()
    }

    /// Closes stdin, waits for the child and checks its exit status and stderr.
    pub fn finish(mut self) -> Result<(), Error> {
        self.0.finish()
    }
}

impl std::fmt::Debug for ImportDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportDiff")
            .field("command", &self.0.command)
            .field("pid", &self.id())
            .finish()
    }
}

impl Write for ImportDiff {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.pipe.as_mut() {
            Some(s) => s.write(buf),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.pipe.as_mut() {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

// ---- helpers ---------------------------------------------------------------------------------

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn pipe_missing(command: &str) -> Error {
    Error::Io {
        context: format!("`{command}`"),
        source: io::Error::other("child pipe missing"),
    }
}

/// Reads a child's stderr to its end on a thread, so the child never blocks on a full pipe.
fn drain(mut stderr: ChildStderr) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut dropped = 0usize;
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = STDERR_LIMIT.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&buf[..room]);
                    dropped += n - room;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        if dropped > 0 {
            text.push_str(&format!("\n[{dropped} more bytes of stderr dropped]"));
        }
        text
    })
}

fn join_drain(h: JoinHandle<String>) -> String {
    h.join().unwrap_or_else(|_| String::from("[stderr reader panicked]"))
}

fn json_error(command: String, output: &[u8], source: serde_json::Error) -> Error {
    let mut text = String::from_utf8_lossy(output).into_owned();
    if text.len() > 2000 {
        let mut cut = 2000;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    Error::Json {
        command,
        output: text,
        source,
    }
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./@:=,+%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Names go into `POOL/IMAGE@SNAP` specs, so they must not contain the separators, and must not
/// look like options.
fn check_name(what: &'static str, name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "is empty"
    } else if name.contains('/') || name.contains('@') {
        "contains '/' or '@'"
    } else if name.starts_with('-') {
        "starts with '-'"
    } else if name.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

fn image_spec(pool: &str, image: &str) -> Result<String, Error> {
    check_name("pool", pool)?;
    check_name("image", image)?;
    Ok(format!("{pool}/{image}"))
}

fn snap_spec(pool: &str, image: &str, snap: &str) -> Result<String, Error> {
    let spec = image_spec(pool, image)?;
    check_name("snapshot", snap)?;
    Ok(format!("{spec}@{snap}"))
}

/// Whether `rbd`'s stderr reports an error: a line starting with `rbd:`, a line mentioning
/// "error", or a Ceph log line of level -1 (`<time> <thread> -1 <message>`).
pub(crate) fn stderr_has_error(stderr: &str) -> bool {
    stderr.lines().map(str::trim).any(|l| {
        if l.is_empty() {
            return false;
        }
        if l.starts_with("rbd:") || l.to_ascii_lowercase().contains("error") {
            return true;
        }
        let mut words = l.split_whitespace();
        matches!(
            (words.next(), words.next(), words.next()),
            (Some(t), Some(_), Some("-1")) if t.starts_with(|c: char| c.is_ascii_digit())
        )
    })
}

/// The errno `rbd` reported, from the `(N) Text` pattern of its messages.
fn reported_errno(stderr: &str) -> Option<i32> {
    let mut rest = stderr;
    while let Some(open) = rest.find('(') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find(')') {
            if let Ok(n) = after[..close].parse::<i32>() {
                if after[close + 1..].starts_with(' ') {
                    return Some(n);
                }
            }
        }
        rest = after;
    }
    None
}

fn classify(command: String, status: ExitStatus, stderr: String, t: &Target) -> Error {
    let errno = reported_errno(&stderr);
    let enoent = errno == Some(libc::ENOENT);
    let eexist = errno == Some(libc::EEXIST);
    let has = |s: &str| stderr.contains(s);
    let pool = t.pool.clone();
    let image = t.image.clone().unwrap_or_default();
    let ctx = |command: String, stderr: String| Box::new(RbdContext { command, stderr });

    if enoent && has("error opening pool") {
        return Error::PoolNotFound {
            pool,
            rbd: ctx(command, stderr),
        };
    }
    if t.image.is_some() {
        if enoent && (has("error opening image") || (t.op == Op::Remove && has("delete error"))) {
            return Error::ImageNotFound {
                pool,
                image,
                rbd: ctx(command, stderr),
            };
        }
        if eexist && t.op == Op::Create {
            return Error::ImageExists {
                pool,
                image,
                rbd: ctx(command, stderr),
            };
        }
    }
    if let Some(snap) = &t.snap {
        let missing = enoent && (has("error setting snapshot context") || (t.op == Op::SnapRemove && has("failed to remove snapshot")));
        // export-diff with a missing --from-snap: "rbd: export-diff error: (2) ..."
        let from_missing = enoent && t.op == Op::ExportDiff && has("export-diff error");
        let missing_snap = if missing {
            Some(snap.clone())
        } else if from_missing {
            t.from_snap.clone()
        } else {
            None
        };
        if let Some(snap) = missing_snap {
            return Error::SnapshotNotFound {
                pool,
                image,
                snap,
                rbd: ctx(command, stderr),
            };
        }
        if eexist && t.op == Op::SnapCreate {
            return Error::SnapshotExists {
                pool,
                image,
                snap: snap.clone(),
                rbd: ctx(command, stderr),
            };
        }
    }
    Error::RbdFailed { command, status, stderr }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn status(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn names_are_checked() {
        assert!(image_spec("rbd", "vm-1.disk_0").is_ok());
        for bad in ["", "a/b", "a@b", "-x", "a\nb"] {
            assert!(matches!(image_spec("rbd", bad), Err(Error::InvalidName { .. })), "{bad:?}");
        }
        assert_eq!(snap_spec("p", "i", "s").unwrap_or_default(), "p/i@s");
    }

    #[test]
    fn error_lines_are_recognised() {
        assert!(!stderr_has_error(""));
        assert!(!stderr_has_error("\n  \n"));
        assert!(stderr_has_error("rbd: export-diff error: (32) Broken pipe\n"));
        assert!(stderr_has_error("error setting snapshot context: (2) No such file or directory"));
        assert!(stderr_has_error(
            "2026-11-24T19:02:10.303+0000 7f7c1c49c380 -1 librbd: rbd image t1 already exists"
        ));
        assert!(!stderr_has_error(
            "2026-11-24T19:02:10.303+0000 7f7c1c49c380  0 librbd: something informative"
        ));
    }

    #[test]
    fn errno_is_extracted() {
        assert_eq!(reported_errno("rbd: failed to create snapshot: (17) File exists"), Some(17));
        assert_eq!(reported_errno("x (y) (2) No such file"), Some(2));
        assert_eq!(reported_errno("nothing here (abc)"), None);
    }

    #[test]
    fn failures_are_classified() {
        let t = Target::snap("rbd", "t1", "s9", Op::ExportDiff);
        let e = classify(
            "rbd export-diff".into(),
            status(2),
            "error setting snapshot context: (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::SnapshotNotFound { ref snap, .. } if snap == "s9"), "{e:?}");

        let t = Target::image("rbd", "nosuch", Op::Other);
        let e = classify(
            "rbd info".into(),
            status(2),
            "rbd: error opening image nosuch: (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::ImageNotFound { .. }), "{e:?}");

        let t = Target::image("nosuchpool", "x", Op::Other);
        let e = classify(
            "rbd info".into(),
            status(2),
            "rbd: error opening pool 'nosuchpool': (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::PoolNotFound { .. }), "{e:?}");

        let t = Target::snap("rbd", "t1", "s2", Op::SnapCreate);
        let e = classify(
            "rbd snap create".into(),
            status(17),
            "rbd: failed to create snapshot: (17) File exists\n".into(),
            &t,
        );
        assert!(matches!(e, Error::SnapshotExists { .. }), "{e:?}");

        let t = Target::snap("rbd", "t1", "nosuch", Op::SnapRemove);
        let e = classify(
            "rbd snap rm".into(),
            status(2),
            "rbd: failed to remove snapshot: (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::SnapshotNotFound { .. }), "{e:?}");

        let t = Target::image("rbd", "t1", Op::Create);
        let e = classify(
            "rbd create".into(),
            status(17),
            "rbd: create error: (17) File exists2026-11-24T19:02:10.303+0000 7f7c1c49c380 -1 librbd: rbd image t1 already exists\n".into(),
            &t,
        );
        assert!(matches!(e, Error::ImageExists { .. }), "{e:?}");

        let t = Target::image("rbd", "gone", Op::Remove);
        let e = classify(
            "rbd rm".into(),
            status(2),
            "rbd: delete error: (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::ImageNotFound { .. }), "{e:?}");

        let mut t = Target::snap("rbd", "t1", "s2", Op::ExportDiff);
        t.from_snap = Some("s0".into());
        let e = classify(
            "rbd export-diff".into(),
            status(2),
            "rbd: export-diff error: (2) No such file or directory\n".into(),
            &t,
        );
        assert!(matches!(e, Error::SnapshotNotFound { ref snap, .. } if snap == "s0"), "{e:?}");

        let t = Target::image("rbd", "t1", Op::Other);
        let e = classify(
            "rbd import-diff - rbd/t1".into(),
            status(74),
            "rbd: failed to decode diff banner\nrbd: import-diff failed: (74) Bad message\n".into(),
            &t,
        );
        assert!(matches!(e, Error::RbdFailed { .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("import-diff") && m.contains("Bad message"), "{m}");
    }

    #[test]
    fn quoting_is_shell_safe() {
        assert_eq!(quote(OsStr::new("rbd/t1@s")), "rbd/t1@s");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("")), "''");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
    }
}

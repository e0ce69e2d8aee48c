//! librados: cluster identity, health, pools and leases.
//!
//! Only the raw bindings of the `ceph` crate (`ceph::rados`) are used: its higher-level
//! `ceph_mon_command` reads librados' length-delimited buffers as C strings (undefined
//! behaviour) and `CephClient::new` rejects Pacific and newer.

use std::collections::BTreeMap;
use std::ffi::{c_char, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ceph::rados as sys;
use serde::{Deserialize, Serialize};

use crate::{CephConfig, Error};

/// Default limit for reaching the monitors (`client_mount_timeout`) and for each monitor
/// command (`rados_mon_op_timeout`); OSD operations get twice as long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Name of the RADOS lock that [`Cluster::lease`] takes on its object.
pub const LEASE_LOCK_NAME: &str = "ferry.lease";

const LOCK_FLAG_MUST_RENEW: u8 = 2;

/// An owned `rados_t`; shut down when the last [`Cluster`], [`Lease`] or I/O context using it is
/// gone.
struct Handle(sys::rados_t);

// librados cluster handles may be used from any thread concurrently.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by rados_create; every IoCtx holds an Arc<Handle>, so none is left.
        unsafe { sys::rados_shutdown(self.0) }
    }
}

/// An owned `rados_ioctx_t`; keeps its cluster handle alive, and is destroyed before it.
struct IoCtx {
    raw: sys::rados_ioctx_t,
    _cluster: Arc<Handle>,
}

// librados I/O contexts are thread-safe for the operations used here (lock calls).
unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; the cluster handle outlives it (field order
        // does not matter: Drop::drop runs before the fields, including the Arc, are dropped).
        unsafe { sys::rados_ioctx_destroy(self.raw) }
    }
}

/// A librados connection.
pub struct Cluster {
    handle: Arc<Handle>,
    client: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("client", &self.client).finish()
    }
}

/// `ceph health --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `HEALTH_OK`, `HEALTH_WARN` or `HEALTH_ERR`.
    pub status: String,
    /// The active health checks, sorted by name (empty when healthy).
    pub checks: Vec<HealthCheck>,
}

/// One active health check, e.g. `OSDMAP_FLAGS` / `HEALTH_WARN` / "noout flag(s) set".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The check's code, e.g. `OSDMAP_FLAGS`.
    pub name: String,
    /// `HEALTH_WARN` or `HEALTH_ERR` (empty if the monitor did not say).
    pub severity: String,
    /// The one-line summary, e.g. "noout flag(s) set".
    pub message: String,
    /// The summary's `count` field (0 if absent); what it counts depends on the check.
    pub count: u64,
    /// Whether the check is muted (`ceph health mute`).
    pub muted: bool,
}

impl Health {
    /// True if the status is `HEALTH_OK`.
    pub fn is_ok(&self) -> bool {
        self.status == "HEALTH_OK"
    }

    /// Parses the output of the `health` mon command in JSON.
    pub fn from_json(json: &[u8]) -> Result<Health, serde_json::Error> {
        #[derive(Deserialize)]
        struct Raw {
            status: String,
            #[serde(default)]
            checks: BTreeMap<String, RawCheck>,
        }
        #[derive(Deserialize)]
        struct RawCheck {
            #[serde(default)]
            severity: String,
            #[serde(default)]
            summary: RawSummary,
            #[serde(default)]
            muted: bool,
        }
        #[derive(Deserialize, Default)]
        struct RawSummary {
            #[serde(default)]
            message: String,
            #[serde(default)]
            count: u64,
        }
        let raw: Raw = serde_json::from_slice(json)?;
        Ok(Health {
            status: raw.status,
            checks: raw
                .checks
                .into_iter()
                .map(|(name, c)| HealthCheck {
                    name,
                    severity: c.severity,
                    message: c.summary.message,
                    count: c.summary.count,
                    muted: c.muted,
                })
                .collect(),
        })
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.status)?;
        for c in &self.checks {
            write!(f, "; {} {}: {}", c.severity, c.name, c.message)?;
        }
        Ok(())
    }
}

fn cstring(what: &'static str, s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::InvalidName {
        what,
        name: s.to_owned(),
        reason: "contains a NUL byte",
    })
}

fn path_cstring(what: &'static str, p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::InvalidName {
        what,
        name: p.display().to_string(),
        reason: "contains a NUL byte",
    })
}

fn rados_err(op: impl Into<String>, rc: i32, detail: impl Into<String>) -> Error {
    Error::Rados {
        op: op.into(),
        code: -rc,
        detail: detail.into(),
    }
}

impl Cluster {
    /// Connects with [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect(config: &CephConfig) -> Result<Cluster, Error> {
        Self::connect_with_timeout(config, DEFAULT_CONNECT_TIMEOUT)
    }

    /// Connects as `client.<client_id>` (default `admin`): reads `config.conf` (or Ceph's default
    /// search: `$CEPH_CONF`, `/etc/ceph/ceph.conf`, ...), then `CEPH_ARGS`, then sets the keyring
    /// if given. A dead monitor or a refused key fails within about `timeout`.
    pub fn connect_with_timeout(config: &CephConfig, timeout: Duration) -> Result<Cluster, Error> {
        let client = config.client_id_or_default().to_owned();
        let conf_desc = config
            .conf
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| conf_from_ceph_args().map(|c| format!("{c} (from CEPH_ARGS)")))
            .or_else(|| std::env::var("CEPH_CONF").ok().map(|c| format!("{c} (from CEPH_CONF)")))
            .unwrap_or_else(|| "none given: default search".to_owned());
        let keyring_desc = config
            .keyring
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none given: from conf, CEPH_ARGS or CEPH_KEYRING".to_owned());
        let connect_err = |step: &'static str, rc: i32, hint: String| Error::Connect {
            client: client.clone(),
            step,
            code: -rc,
            message: format!("conf: {conf_desc}; keyring: {keyring_desc}; {hint}"),
        };

        let id = cstring("client id", &client)?;
        let conf = config.conf.as_deref().map(|p| path_cstring("conf path", p)).transpose()?;
        let keyring = config.keyring.as_deref().map(|p| path_cstring("keyring path", p)).transpose()?;

        let mut raw: sys::rados_t = ptr::null_mut();
        // SAFETY: valid out pointer and C string.
        let rc = unsafe { sys::rados_create(&mut raw, id.as_ptr()) };
        if rc < 0 || raw.is_null() {
            return Err(connect_err("rados_create", rc.min(-1), String::new()));
        }
        let handle = Handle(raw);

        let conf_ptr = conf.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: live handle; NULL means "search the default locations".
        let rc = unsafe { sys::rados_conf_read_file(handle.0, conf_ptr) };
        if rc < 0 && conf.is_some() {
            return Err(connect_err(
                "reading the conf file",
                rc,
                "check that the conf file exists and is readable".to_owned(),
            ));
        }
        // CEPH_ARGS (rados_conf_parse_env does not understand --conf/-c: handle them here).
        if conf.is_none() {
            if let Some(path) = conf_from_ceph_args() {
                let c = path_cstring("conf path", Path::new(&path))?;
                // SAFETY: live handle, valid C string.
                let rc = unsafe { sys::rados_conf_read_file(handle.0, c.as_ptr()) };
                if rc < 0 {
                    return Err(connect_err(
                        "reading the conf file named in CEPH_ARGS",
                        rc,
                        format!("CEPH_ARGS names {path}"),
                    ));
                }
            }
        }
        // SAFETY: live handle; NULL means CEPH_ARGS.
        let rc = unsafe { sys::rados_conf_parse_env(handle.0, ptr::null()) };
        if rc < 0 {
            return Err(connect_err("parsing CEPH_ARGS", rc, "CEPH_ARGS holds an invalid option".to_owned()));
        }
        let secs = timeout.as_secs().max(1);
        let mut settings: Vec<(&str, CString)> = vec![
            ("client_mount_timeout", cstring("timeout", &secs.to_string())?),
            ("rados_mon_op_timeout", cstring("timeout", &secs.to_string())?),
            ("rados_osd_op_timeout", cstring("timeout", &(2 * secs).to_string())?),
        ];
        if let Some(k) = keyring {
            settings.push(("keyring", k));
        }
        for (name, value) in settings {
            let n = cstring("option", name)?;
            // SAFETY: live handle, valid C strings.
            let rc = unsafe { sys::rados_conf_set(handle.0, n.as_ptr(), value.as_ptr()) };
            if rc < 0 {
                return Err(connect_err("setting an option", rc, format!("rados_conf_set {name}")));
            }
        }

        // SAFETY: live, configured handle.
        let rc = unsafe { sys::rados_connect(handle.0) };
        if rc < 0 {
            let hint = match -rc {
                libc::EACCES | libc::EPERM => format!(
                    "the monitors refused authentication: the key in the keyring is not the key of client.{client} (wrong keyring or wrong client id?)"
                ),
                libc::ETIMEDOUT => format!(
                    "no monitor answered within {secs} s: is the cluster running, and does `mon host` in the conf point at it?"
                ),
                libc::ENOENT => format!(
                    "a file was not found: check the conf and keyring paths (the keyring must hold a key for client.{client}); or no `mon host` is configured"
                ),
                libc::EINVAL => "invalid configuration (no monitors configured?)".to_owned(),
                _ => String::new(),
            };
            return Err(connect_err("rados_connect", rc, hint));
        }
        Ok(Cluster {
            handle: Arc::new(handle),
            client,
        })
    }

    /// The client name, e.g. `client.admin`.
    pub fn client_name(&self) -> String {
        format!("client.{}", self.client)
    }

    /// The cluster's fsid (a UUID string).
    pub fn fsid(&self) -> Result<String, Error> {
        let mut buf = [0u8; 64];
        // SAFETY: live handle; buffer and its length.
        let rc = unsafe { sys::rados_cluster_fsid(self.handle.0, buf.as_mut_ptr() as *mut c_char, buf.len()) };
        if rc < 0 {
            return Err(rados_err("rados_cluster_fsid", rc, ""));
        }
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    }

    /// `ceph health`.
    pub fn health(&self) -> Result<Health, Error> {
        let (out, _) = self.mon_command(r#"{"prefix":"health","format":"json"}"#)?;
        Health::from_json(&out).map_err(|source| Error::Json {
            command: "mon command health".to_owned(),
            output: String::from_utf8_lossy(&out).into_owned(),
            source,
        })
    }

    /// Names of all pools.
    pub fn pools(&self) -> Result<Vec<String>, Error> {
        let mut len = 4096usize;
        for _ in 0..8 {
            let mut buf = vec![0u8; len];
            // SAFETY: live handle; buffer and its length.
            let rc = unsafe { sys::rados_pool_list(self.handle.0, buf.as_mut_ptr() as *mut c_char, buf.len()) };
            if rc < 0 {
                return Err(rados_err("rados_pool_list", rc, ""));
            }
            let need = rc as usize;
            if need > len {
                len = need;
                continue;
            }
            buf.truncate(need);
            return Ok(split_nul_list(&buf));
        }
        Err(rados_err("rados_pool_list", -libc::ERANGE, "pool list kept growing"))
    }

    /// Runs a monitor command (JSON) and returns its output buffer and status string.
    pub fn mon_command(&self, cmd_json: &str) -> Result<(Vec<u8>, String), Error> {
        let cmd = cstring("mon command", cmd_json)?;
        let mut cmds = [cmd.as_ptr()];
        let mut outbuf: *mut c_char = ptr::null_mut();
        let mut outbuf_len: usize = 0;
        let mut outs: *mut c_char = ptr::null_mut();
        let mut outs_len: usize = 0;
        // SAFETY: live handle; one valid command string; out pointers to locals.
        let rc = unsafe {
            sys::rados_mon_command(
                self.handle.0,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut outbuf,
                &mut outbuf_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // SAFETY: librados hands back (ptr, len) buffers that we copy once and free.
        let out = unsafe { take_rados_buffer(outbuf, outbuf_len) };
        let status = unsafe { take_rados_buffer(outs, outs_len) };
        let status = String::from_utf8_lossy(&status).into_owned();
        if rc < 0 {
            return Err(rados_err(format!("mon command {cmd_json}"), rc, status));
        }
        Ok((out, status))
    }

    fn ioctx(&self, pool: &str) -> Result<IoCtx, Error> {
        let name = cstring("pool", pool)?;
        let mut raw: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: live handle, valid name, out pointer.
        let rc = unsafe { sys::rados_ioctx_create(self.handle.0, name.as_ptr(), &mut raw) };
        if rc == -libc::ENOENT {
            return Err(Error::PoolNotFound {
                pool: pool.to_owned(),
                rbd: Box::new(crate::error::RbdContext {
                    command: format!("rados_ioctx_create {pool}"),
                    stderr: String::new(),
                }),
            });
        }
        if rc < 0 || raw.is_null() {
            return Err(rados_err(format!("rados_ioctx_create {pool}"), rc.min(-1), ""));
        }
        Ok(IoCtx {
            raw,
            _cluster: Arc::clone(&self.handle),
        })
    }

    /// Takes an exclusive lease on `pool`/`object` (a RADOS exclusive lock named
    /// [`LEASE_LOCK_NAME`] with a random cookie, expiring after `duration` unless renewed; the
    /// object is created if missing). A background thread renews it every `duration / 3` until
    /// the [`Lease`] is released or dropped. [`Error::LeaseHeld`] if another holder has it.
    ///
    /// `description` is stored with the lock and starts the cookie, so it shows up in
    /// `LeaseHeld` errors and in `rados lock info`: put host and process in it.
    pub fn lease(&self, pool: &str, object: &str, duration: Duration, description: &str) -> Result<Lease, Error> {
        if duration < Duration::from_millis(10) {
            return Err(Error::InvalidArgument(format!("lease duration {duration:?} is too short")));
        }
        let io = self.ioctx(pool)?;
        let desc: String = description.chars().filter(|c| !c.is_control()).collect();
        let cookie = format!("{}#{}", desc.chars().take(100).collect::<String>(), random_hex());
        let inner = LeaseInner {
            object_c: cstring("object", object)?,
            lock_c: cstring("lock", LEASE_LOCK_NAME)?,
            cookie_c: cstring("cookie", &cookie)?,
            desc_c: cstring("description", &desc)?,
            io,
            pool: pool.to_owned(),
            object: object.to_owned(),
            cookie,
            duration,
            state: Mutex::new(LeaseState {
                stop: false,
                failure: None,
                expires: Instant::now(),
            }),
            wake: Condvar::new(),
        };
        let started = Instant::now();
        let rc = inner.lock(0);
        if rc == -libc::EBUSY || rc == -libc::EEXIST {
            let holder = describe_lockers(&inner.io, &inner.object_c, &inner.lock_c);
            return Err(Error::LeaseHeld {
                object: format!("{pool}/{object}"),
                holder,
            });
        }
        if rc < 0 {
            return Err(rados_err(format!("lock_exclusive {pool}/{object}"), rc, ""));
        }
        inner.state().expires = started + duration;
        let inner = Arc::new(inner);
        let worker = Arc::clone(&inner);
        let thread = thread::Builder::new()
            .name(format!("lease {object}"))
            .spawn(move || worker.renew_loop());
        match thread {
            Ok(thread) => Ok(Lease {
                inner,
                thread: Some(thread),
                released: false,
            }),
            Err(source) => {
                let _ = inner.unlock();
                Err(Error::Io {
                    context: "starting the lease renewal thread".to_owned(),
                    source,
                })
            }
        }
    }

    /// Deletes a RADOS object (e.g. a lease object nobody needs any more). Returns false if it
    /// did not exist.
    pub fn remove_object(&self, pool: &str, object: &str) -> Result<bool, Error> {
        let io = self.ioctx(pool)?;
        let oid = cstring("object", object)?;
        // SAFETY: live ioctx, valid C string.
        let rc = unsafe { sys::rados_remove(io.raw, oid.as_ptr()) };
        match rc {
            0 => Ok(true),
            rc if rc == -libc::ENOENT => Ok(false),
            rc => Err(rados_err(format!("remove {pool}/{object}"), rc, "")),
        }
    }

    /// Breaks the leases on `pool`/`object` whose cookie `is_dead` says belongs to a holder
    /// known to be gone (the cookie starts with the description given to [`Cluster::lease`]).
    /// Only those lockers are broken, by client and cookie, so a live holder that took the
    /// lock meanwhile keeps it. Returns how many were broken.
    pub fn break_dead_leases(&self, pool: &str, object: &str, is_dead: impl Fn(&str) -> bool) -> Result<usize, Error> {
        let io = self.ioctx(pool)?;
        let object_c = cstring("object", object)?;
        let lock_c = cstring("lock", LEASE_LOCK_NAME)?;
        let mut broken = 0;
        for l in list_lockers(&io, &object_c, &lock_c)?.into_iter().filter(|l| is_dead(&l.cookie)) {
            let client = cstring("client", &l.client)?;
            let cookie = cstring("cookie", &l.cookie)?;
            // SAFETY: live ioctx, valid C strings.
            let rc = unsafe { sys::rados_break_lock(io.raw, object_c.as_ptr(), lock_c.as_ptr(), client.as_ptr(), cookie.as_ptr()) };
            if rc == 0 {
                broken += 1;
            } else if rc != -libc::ENOENT {
                return Err(rados_err(format!("break_lock {pool}/{object}"), rc, ""));
            }
        }
        Ok(broken)
    }

    /// Breaks every holder's lease on `pool`/`object` (an administrator's override for a holder
    /// that died: its lease would expire by itself after its duration). Returns how many were
    /// broken.
    pub fn break_lease(&self, pool: &str, object: &str) -> Result<usize, Error> {
        self.break_dead_leases(pool, object, |_| true)
    }
}

/// Copies and frees a buffer librados allocated.
///
/// # Safety
/// `buf` is null or a buffer of at least `len` bytes from librados, not yet freed.
unsafe fn take_rados_buffer(buf: *mut c_char, len: usize) -> Vec<u8> {
    if buf.is_null() {
        return Vec::new();
    }
    let v = if len > 0 {
        std::slice::from_raw_parts(buf as *const u8, len).to_vec()
    } else {
        Vec::new()
    };
    sys::rados_buffer_free(buf);
    v
}

fn split_nul_list(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// `--conf X`, `--conf=X`, `-c X` from CEPH_ARGS.
fn conf_from_ceph_args() -> Option<String> {
    let args = std::env::var("CEPH_ARGS").ok()?;
    let mut words = args.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--conf" || w == "-c" {
            return words.next().map(str::to_owned);
        }
        if let Some(v) = w.strip_prefix("--conf=") {
            return Some(v.to_owned());
        }
    }
    None
}

fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: buffer and its length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough without the kernel's randomness: time, pid and a counter.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let v = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17);
        bytes = v.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Locker {
    client: String,
    cookie: String,
    addr: String,
}

fn list_lockers(io: &IoCtx, object: &CString, lock: &CString) -> Result<Vec<Locker>, Error> {
    let mut sizes = [256usize; 4];
    for _ in 0..4 {
        let mut tag = vec![0u8; sizes[0]];
        let mut clients = vec![0u8; sizes[1]];
        let mut cookies = vec![0u8; sizes[2]];
        let mut addrs = vec![0u8; sizes[3]];
        let (mut tag_len, mut clients_len, mut cookies_len, mut addrs_len) = (tag.len(), clients.len(), cookies.len(), addrs.len());
        let mut exclusive: libc::c_int = 0;
        // SAFETY: live ioctx, valid C strings, buffers with their lengths.
        let rc = unsafe {
            sys::rados_list_lockers(
                io.raw,
                object.as_ptr(),
                lock.as_ptr(),
                &mut exclusive,
                tag.as_mut_ptr() as *mut c_char,
                &mut tag_len,
                clients.as_mut_ptr() as *mut c_char,
                &mut clients_len,
                cookies.as_mut_ptr() as *mut c_char,
                &mut cookies_len,
                addrs.as_mut_ptr() as *mut c_char,
                &mut addrs_len,
            )
        };
        if rc == -(libc::ERANGE as isize) {
            sizes = [
                tag_len.max(sizes[0]) + 1,
                clients_len.max(sizes[1]) + 1,
                cookies_len.max(sizes[2]) + 1,
                addrs_len.max(sizes[3]) + 1,
            ];
            continue;
        }
        if rc < 0 {
            return Err(rados_err("rados_list_lockers", rc as i32, ""));
        }
        clients.truncate(clients_len.min(clients.len()));
        cookies.truncate(cookies_len.min(cookies.len()));
        addrs.truncate(addrs_len.min(addrs.len()));
        let (c, k, a) = (split_nul_list(&clients), split_nul_list(&cookies), split_nul_list(&addrs));
        return Ok(c
            .into_iter()
            .enumerate()
            .map(|(i, client)| Locker {
                client,
                cookie: k.get(i).cloned().unwrap_or_default(),
                addr: a.get(i).cloned().unwrap_or_default(),
            })
            .collect());
    }
    Err(rados_err("rados_list_lockers", -libc::ERANGE, "buffers kept growing"))
}

fn describe_lockers(io: &IoCtx, object: &CString, lock: &CString) -> String {
    match list_lockers(io, object, lock) {
        Ok(l) if l.is_empty() => "another client (it released the lock just now)".to_owned(),
        Ok(l) => l
            .iter()
            .map(|l| format!("{} (cookie {:?}) at {}", l.client, l.cookie, l.addr))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("another client (listing the lockers failed: {e})"),
    }
}

struct LeaseState {
    stop: bool,
    failure: Option<String>,
    /// When the lock expires at the latest, counted from before the last successful request.
    expires: Instant,
}

struct LeaseInner {
    // Holds the cluster handle alive on its own, so a Lease may outlive its Cluster.
    io: IoCtx,
    object_c: CString,
    lock_c: CString,
    cookie_c: CString,
    desc_c: CString,
    pool: String,
    object: String,
    cookie: String,
    duration: Duration,
    state: Mutex<LeaseState>,
    wake: Condvar,
}

impl LeaseInner {
    fn state(&self) -> MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self, flags: u8) -> i32 {
        let mut tv = libc::timeval {
            tv_sec: self.duration.as_secs() as libc::time_t,
            tv_usec: self.duration.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: live ioctx, valid C strings, timeval on the stack.
        unsafe {
            sys::rados_lock_exclusive(
                self.io.raw,
                self.object_c.as_ptr(),
                self.lock_c.as_ptr(),
                self.cookie_c.as_ptr(),
                self.desc_c.as_ptr(),
                &mut tv,
                flags,
            )
        }
    }

    fn unlock(&self) -> i32 {
        // SAFETY: live ioctx, valid C strings.
        unsafe { sys::rados_unlock(self.io.raw, self.object_c.as_ptr(), self.lock_c.as_ptr(), self.cookie_c.as_ptr()) }
    }

    fn renew_loop(&self) {
        let interval = self.duration / 3;
        loop {
            {
                let guard = self.state();
                let (guard, _) = self
                    .wake
                    .wait_timeout_while(guard, interval, |s| !s.stop)
                    .unwrap_or_else(|e| e.into_inner());
                if guard.stop {
                    return;
                }
            }
            self.renew_once();
        }
    }

    /// One renewal; a failure is recorded for good.
    fn renew_once(&self) {
        let started = Instant::now();
        // MUST_RENEW: if our lock expired or was broken meanwhile, do not silently take it again.
        let rc = self.lock(LOCK_FLAG_MUST_RENEW);
        let mut s = self.state();
        if rc == 0 {
            if s.failure.is_none() {
                s.expires = started + self.duration;
            }
        } else if s.failure.is_none() {
            let why = match -rc {
                libc::ENOENT => "the lock had expired or was broken".to_owned(),
                libc::EBUSY => "another client holds the lock".to_owned(),
                code => format!("renewal failed: {} (errno {code})", crate::error::strerror(code)),
            };
            s.failure = Some(why);
        }
    }

    fn stop(&self) {
        self.state().stop = true;
        self.wake.notify_all();
    }
}

/// An exclusive, self-renewing lease on a RADOS object; see [`Cluster::lease`].
///
/// It keeps the librados connection alive on its own, so it may outlive its [`Cluster`]. Check
/// [`Lease::is_healthy`] before each step that relies on exclusivity: once a renewal failed or
/// the last renewal is older than the duration, the lease may be someone else's.
pub struct Lease {
    inner: Arc<LeaseInner>,
    thread: Option<JoinHandle<()>>,
    released: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("object", &self.object())
            .field("cookie", &self.inner.cookie)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl Lease {
    /// `pool/object`.
    pub fn object(&self) -> String {
        format!("{}/{}", self.inner.pool, self.inner.object)
    }

    /// The lock cookie: `<description>#<random hex>`.
    pub fn cookie(&self) -> &str {
        &self.inner.cookie
    }

    /// The lease duration given to [`Cluster::lease`]: the lock expires this long after the
    /// last successful (re)lock request was started.
    pub fn duration(&self) -> Duration {
        self.inner.duration
    }

    /// True while every renewal succeeded and the last one is younger than the duration.
    pub fn is_healthy(&self) -> bool {
        let s = self.inner.state();
        s.failure.is_none() && Instant::now() < s.expires
    }

    /// Renews the lock now, asking the cluster (not only the local renewal record), and
    /// returns [`Lease::is_healthy`]. Call it right before a step that relies on exclusivity:
    /// a lock broken by another client (e.g. `rados lock break`) since the last periodic
    /// renewal is found here, not up to a third of the duration later. Blocks for one round
    /// trip to the OSD.
    pub fn renew_now(&self) -> bool {
        self.inner.renew_once();
        self.is_healthy()
    }

    /// Why the lease is unhealthy, if a renewal failed.
    pub fn failure(&self) -> Option<String> {
        self.inner.state().failure.clone()
    }

    /// How long the lease is sure to hold without another renewal (zero when expired).
    pub fn time_left(&self) -> Duration {
        self.inner.state().expires.saturating_duration_since(Instant::now())
    }

    fn stop_renewing(&mut self) {
        self.inner.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops renewing and unlocks. [`Error::LeaseLost`] if the lock was no longer ours.
    pub fn release(mut self) -> Result<(), Error> {
        self.stop_renewing();
        self.released = true;
        let rc = self.inner.unlock();
        match rc {
            0 => Ok(()),
            rc if rc == -libc::ENOENT => Err(Error::LeaseLost {
                object: self.object(),
                reason: self.failure().unwrap_or_else(|| "the lock was not held any more".to_owned()),
            }),
            rc => Err(rados_err(format!("unlock {}", self.object()), rc, "")),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if !self.released {
            let _ = self.inner.unlock();
        }
    }
}

// ---- librbd: read-only access to a snapshot -------------------------------------------------
// The `ceph` crate has no RBD API; these few functions of librbd.h are all ferry needs to
// re-read blocks of a snapshot independently of the diff machinery.

type RbdImageRaw = *mut std::ffi::c_void;

#[link(name = "rbd")]
extern "C" {
    fn rbd_open_read_only(
        io: sys::rados_ioctx_t,
        name: *const std::ffi::c_char,
        image: *mut RbdImageRaw,
        snap_name: *const std::ffi::c_char,
    ) -> i32;
    fn rbd_read(image: RbdImageRaw, ofs: u64, len: usize, buf: *mut std::ffi::c_char) -> isize;
    fn rbd_close(image: RbdImageRaw) -> i32;
}

/// A snapshot of an RBD image opened read-only through librbd.
pub struct SnapshotReader {
    image: RbdImageRaw,
    // Field order: the image is closed (in Drop) before the I/O context goes.
    _io: IoCtx,
    what: String,
}

// librbd image handles are safe to use from one thread at a time; `read` takes &mut self.
unsafe impl Send for SnapshotReader {}

impl SnapshotReader {
    /// Reads `buf.len()` bytes at `offset` (short at the end of the image).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        // SAFETY: open image handle, buffer valid for its length.
        let n = unsafe { rbd_read(self.image, offset, buf.len(), buf.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(rados_err(format!("rbd_read {} at {offset}", self.what), n as i32, ""));
        }
        Ok(n as usize)
    }
}

impl Drop for SnapshotReader {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open_read_only, closed once.
        unsafe {
            rbd_close(self.image);
        }
    }
}

impl Cluster {
    /// Opens `pool/image@snap` read-only through librbd.
    pub fn open_snapshot(&self, pool: &str, image: &str, snap: &str) -> Result<SnapshotReader, Error> {
        let io = self.ioctx(pool)?;
        let name = cstring("image", image)?;
        let snap_c = cstring("snapshot", snap)?;
        let mut raw: RbdImageRaw = ptr::null_mut();
        // SAFETY: live I/O context, valid C strings, out pointer.
        let rc = unsafe { rbd_open_read_only(io.raw, name.as_ptr(), &mut raw, snap_c.as_ptr()) };
        if rc < 0 || raw.is_null() {
            return Err(rados_err(format!("rbd_open_read_only {pool}/{image}@{snap}"), rc.min(-1), ""));
        }
        Ok(SnapshotReader {
            image: raw,
            _io: io,
            what: format!("{pool}/{image}@{snap}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_lists_split() {
        assert_eq!(split_nul_list(b"rbd\0.rgw.root\0\0"), ["rbd", ".rgw.root"]);
        assert!(split_nul_list(b"").is_empty());
        assert!(split_nul_list(b"\0").is_empty());
    }

    #[test]
    fn random_cookies_differ() {
        let a = random_hex();
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_hex());
    }

    #[test]
    fn health_parses() {
        let h = Health::from_json(br#"{"status":"HEALTH_OK","checks":{},"mutes":[]}"#).expect("parse");
        assert!(h.is_ok());
        assert!(h.checks.is_empty());
        let h = Health::from_json(
            br#"{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{"severity":"HEALTH_WARN","summary":{"message":"noout flag(s) set","count":5},"muted":false}},"mutes":[]}"#,
        )
        .expect("parse");
        assert!(!h.is_ok());
        assert_eq!(h.checks.len(), 1);
        assert_eq!(h.checks[0].name, "OSDMAP_FLAGS");
        assert_eq!(h.checks[0].message, "noout flag(s) set");
        assert_eq!(h.checks[0].count, 5);
        assert_eq!(h.to_string(), "HEALTH_WARN; HEALTH_WARN OSDMAP_FLAGS: noout flag(s) set");
    }
}

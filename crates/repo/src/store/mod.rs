//! Repository URLs to object stores. The rest of the crate sees only `Arc<dyn ObjectStore>`
//! rooted at the repository (a prefix inside a bucket is applied here).
//!
//! [`open_store`] builds the backend from the URL and wraps it in decorators, each an
//! [`ObjectStore`] around the next (the shape of `object_store`'s `limit.rs` / `throttle.rs`):
//!
//! ```text
//! backend (file, memory, s3, gs, az)
//!   → PrefixStore        the path inside the bucket (s3/gs/az URLs with a path)
//!   → FaultStore         injected failures, tests only (StoreOptions::faults)
//!   → UploadLimitStore   bandwidth limit of uploads (StoreOptions::upload_limit)
//!   → CountingStore      requests and bytes, always installed, outermost
//! ```
//!
//! The counter is outermost so it counts what ferry asked for (an injected fault is still a
//! request ferry made); `object_store`'s own HTTP retries happen inside the backend and are
//! not seen by any decorator.

pub mod counting;
pub mod faults;
pub mod limit;

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

pub use counting::{CountingStore, RequestCounter, RequestStats};
pub use faults::{FaultAction, FaultMethod, FaultPlan, FaultRule, FaultStore};
pub use limit::{UploadLimitStore, UploadLimiter};

/// Settings for remote stores beyond what the URL says. Unset fields fall back to the
/// standard environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Where to send requests instead of the provider's public endpoint:
    /// - `s3://`: the S3 endpoint (e.g. an RGW, `http://127.0.0.1:7480`); falls back to
    ///   `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`;
    /// - `gs://`: the GCS base URL (an emulator, e.g. `http://127.0.0.1:4443`);
    /// - `az://`: the blob account URL (e.g. Azurite's
    ///   `http://127.0.0.1:10000/devstoreaccount1`; the account name and key still come from
    ///   `AZURE_STORAGE_ACCOUNT_NAME` / `AZURE_STORAGE_ACCOUNT_KEY`).
    ///
    /// A plain `http://` endpoint also needs [`StoreOptions::allow_http`].
    pub endpoint: Option<String>,
    /// S3 region (falls back to `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Allow plain HTTP (an on-premise RGW, an emulator). Unset: `AWS_ALLOW_HTTP`, and for
    /// `az://` / `gs://` also `AZURE_ALLOW_HTTP` / `GOOGLE_ALLOW_HTTP`.
    pub allow_http: Option<bool>,
    /// S3 access key ID (falls back to `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// S3 secret key (falls back to `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// Retries of a failed request (default 4). Decrypt failures are never retried: they are
    /// not network errors.
    pub max_retries: Option<usize>,
    /// Give up on a request after this long in total (default 30 s).
    pub retry_timeout: Option<Duration>,
    /// Connect timeout (default 5 s), so an unreachable endpoint fails fast.
    pub connect_timeout: Option<Duration>,
    /// Upload bandwidth limit in bytes per second, shared by every request of the store and
    /// all its clones (see [`limit`]). `None`: no limiter is installed. The rate can be changed
    /// later through [`Store::limiter`], including to unlimited.
    pub upload_limit: Option<u64>,
    /// Failures to inject (tests only; see [`faults`] for the rule syntax).
    pub faults: Option<FaultPlan>,
}

/// An opened store plus the URL it came from (for messages).
///
/// `inner` is the fully decorated store (the request counter outermost): use it for every
/// request so that [`Store::requests`] sees them.
#[derive(Clone, Debug)]
pub struct Store {
    /// The store rooted at the repository, wrapped in ferry's decorators.
    pub inner: Arc<dyn ObjectStore>,
    /// The repository URL as given (for messages).
    pub url: String,
    counter: RequestCounter,
    limiter: Option<UploadLimiter>,
    /// For `file://`: the directory, so [`Store::barrier`] can make writes durable.
    local_root: Option<std::path::PathBuf>,
}

impl Store {
    /// Wraps an already built store in a request counter (no other decorator). For stores
    /// that do not come from a URL, e.g. in tests.
    pub fn new(inner: Arc<dyn ObjectStore>, url: impl Into<String>) -> Store {
        let counting = CountingStore::new(inner);
        let counter = counting.counter();
        Store {
            inner: Arc::new(counting),
            url: url.into(),
            counter,
            limiter: None,
            local_root: None,
        }
    }

    /// Makes every object written so far durable (on `file://`: `syncfs` of the repository's
    /// file system — file data, new files and new directories; object stores acknowledge a
    /// PUT only once it is durable, so there it does nothing). The commit protocol calls it
    /// before a manifest is written (its chunks first) and after (the commit itself).
    pub async fn barrier(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let io = |source: std::io::Error| Error::Io {
            context: format!("making writes under {} durable (syncfs)", root.display()),
            source,
        };
        let r = tokio::task::spawn_blocking({
            let root = root.clone();
            move || -> std::io::Result<()> {
                use std::os::unix::io::AsRawFd;
                let dir = std::fs::File::open(&root)?;
                // SAFETY: a valid file descriptor of an open directory.
                if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            }
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        r.map_err(io)
    }

    /// On `file://`: starts writing object `key`'s file back to disk now, without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the disk works while the pipeline
    /// computes and the [`Store::barrier`] before a commit finds little left to write. Only a
    /// hint: durability still comes from the barrier; a failure here changes nothing.
    pub async fn start_writeback(&self, key: &str) {
        #[cfg(target_os = "linux")]
        if let Some(root) = &self.local_root {
            let path = root.join(key);
            let _ = tokio::task::spawn_blocking(move || {
                use std::os::unix::io::AsRawFd;
                if let Ok(f) = std::fs::File::open(&path) {
                    // SAFETY: a valid file descriptor; the call only schedules writeback.
                    unsafe {
                        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                    }
                }
            })
            .await;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = key;
    }

    /// Requests made through this store (and its clones) so far.
    pub fn requests(&self) -> RequestStats {
        self.counter.snapshot()
    }

    /// The shared request counter, e.g. to hand to a metrics exporter.
    pub fn request_counter(&self) -> &RequestCounter {
        &self.counter
    }

    /// The upload limiter, when the store was opened with [`StoreOptions::upload_limit`]; its
    /// [`UploadLimiter::set_rate`] changes the rate for every clone at once.
    pub fn limiter(&self) -> Option<&UploadLimiter> {
        self.limiter.as_ref()
    }
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name)
        .ok()
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Opens `file:///path`, `memory://`, `s3://bucket[/prefix]`, `gs://bucket[/prefix]`,
/// `az://container[/prefix]`. A bare path is taken as a local directory.
///
/// The backend is wrapped in the decorators listed in the [module documentation](self).
pub fn open_store(url: &str, opts: &StoreOptions) -> Result<Store> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None if !url.is_empty() => ("file", url),
        None => return Err(invalid("empty URL")),
    };
    let retry = RetryConfig {
        max_retries: opts.max_retries.unwrap_or(4),
        retry_timeout: opts.retry_timeout.unwrap_or(Duration::from_secs(30)),
        ..Default::default()
    };
    let mut client = ClientOptions::new().with_connect_timeout(opts.connect_timeout.unwrap_or(Duration::from_secs(5)));
    let scheme_http_env = match scheme {
        "az" | "azure" => env_flag("AZURE_ALLOW_HTTP"),
        "gs" => env_flag("GOOGLE_ALLOW_HTTP"),
        _ => None,
    };
    let allow_http = opts
        .allow_http
        .or(scheme_http_env.filter(|&b| b))
        .or_else(|| env_flag("AWS_ALLOW_HTTP"))
        .unwrap_or(false);
    if allow_http {
        client = client.with_allow_http(true);
    }
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (rest, ""),
    };
    let backend: Arc<dyn ObjectStore> = match scheme {
        "file" => {
            let path = std::path::Path::new(if rest.is_empty() { "." } else { rest });
            std::fs::create_dir_all(path).map_err(|source| Error::Io {
                context: format!("creating repository directory {}", path.display()),
                source,
            })?;
            Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|e| invalid(&e.to_string()))?)
        }
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => {
            if bucket.is_empty() {
                return Err(invalid("no bucket name"));
            }
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(client)
                .with_virtual_hosted_style_request(false);
            if let Some(e) = opts.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()) {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &opts.region {
                b = b.with_region(r);
            }
            if let Some(k) = &opts.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &opts.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            Arc::new(b.build().map_err(|e| invalid(&e.to_string()))?)
        }
        "gs" => {
            if bucket.is_empty() {
                return Err(invalid("no bucket name"));
            }
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(client);
            if let Some(e) = &opts.endpoint {
                b = b.with_base_url(e.trim_end_matches('/'));
            }
            Arc::new(b.build().map_err(|e| invalid(&e.to_string()))?)
        }
        "az" | "azure" => {
            if bucket.is_empty() {
                return Err(invalid("no container name"));
            }
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry)
                .with_client_options(client);
            if let Some(e) = &opts.endpoint {
                b = b.with_endpoint(e.trim_end_matches('/').to_string());
            }
            Arc::new(b.build().map_err(|e| invalid(&e.to_string()))?)
        }
        other => {
            return Err(invalid(&format!(
                "unknown scheme '{other}' (use file://, s3://, gs://, az:// or memory://)"
            )))
        }
    };
    // A file:// URL's whole path is the directory; memory:// has no bucket to share.
    let mut inner: Arc<dyn ObjectStore> = if prefix.is_empty() || matches!(scheme, "memory" | "file") {
        backend
    } else {
        Arc::new(PrefixStore::new(backend, prefix))
    };
    if let Some(plan) = &opts.faults {
        inner = Arc::new(FaultStore::new(inner, plan.clone()));
    }
    let mut limiter = None;
    if let Some(rate) = opts.upload_limit {
        let store = UploadLimitStore::new(inner, UploadLimiter::new(Some(rate)));
        limiter = Some(store.limiter().clone());
        inner = Arc::new(store);
    }
    let mut store = Store::new(inner, url);
    store.limiter = limiter;
    if scheme == "file" {
        store.local_root = Some(std::path::PathBuf::from(if rest.is_empty() { "." } else { rest }));
    }
    Ok(store)
}

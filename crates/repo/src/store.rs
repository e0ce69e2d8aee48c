//! Repository URLs to object stores. The rest of the crate sees only `Arc<dyn ObjectStore>`
//! rooted at the repository (a prefix inside a bucket is applied here).

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

/// Settings for remote stores beyond what the URL says. Unset fields fall back to the
/// standard environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Retries of a failed request (default 4). Decrypt failures are never retried: they are
    /// not network errors.
    pub max_retries: Option<usize>,
    /// Give up on a request after this long in total (default 30 s).
    pub retry_timeout: Option<Duration>,
    /// Connect timeout (default 5 s), so an unreachable endpoint fails fast.
    pub connect_timeout: Option<Duration>,
}

/// An opened store plus the URL it came from (for messages).
#[derive(Clone, Debug)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    pub url: String,
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name)
        .ok()
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Opens `file:///path`, `memory://`, `s3://bucket[/prefix]`, `gs://bucket[/prefix]`,
/// `az://container[/prefix]`. A bare path is taken as a local directory.
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
    let allow_http = opts.allow_http.or_else(|| env_flag("AWS_ALLOW_HTTP")).unwrap_or(false);
    if allow_http {
        client = client.with_allow_http(true);
    }
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (rest, ""),
    };
    let inner: Arc<dyn ObjectStore> = match scheme {
        "file" => {
            let path = std::path::Path::new(if rest.is_empty() { "." } else { rest });
            std::fs::create_dir_all(path).map_err(|source| Error::Io {
                context: format!("creating repository directory {}", path.display()),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(path).map_err(|e| invalid(&e.to_string()))?;
            return Ok(Store {
                inner: Arc::new(store),
                url: url.to_string(),
            });
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
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(|e| invalid(&e.to_string()))?,
        ),
        "az" | "azure" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry)
                .with_client_options(client)
                .build()
                .map_err(|e| invalid(&e.to_string()))?,
        ),
        other => {
            return Err(invalid(&format!(
                "unknown scheme '{other}' (use file://, s3://, gs://, az:// or memory://)"
            )))
        }
    };
    let inner: Arc<dyn ObjectStore> = if prefix.is_empty() || scheme == "memory" {
        inner
    } else {
        Arc::new(PrefixStore::new(inner, prefix))
    };
    Ok(Store {
        inner,
        url: url.to_string(),
    })
}

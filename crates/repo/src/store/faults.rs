//! A fault injector for tests: an [`ObjectStore`] that fails, delays or cuts requests chosen by
//! rules, and forwards everything else untouched.
//!
//! # Syntax
//!
//! A plan is rules separated by `;` or newlines (blank rules are ignored); a rule is fields
//! separated by `:`:
//!
//! ```text
//! METHOD:PATTERN:ACTION[:times=N][:after=N]
//! ```
//!
//! For example
//! `put:chunks/*:reset-after:times=1;get:*:status=503:times=3;get:volumes/*:slow=200ms`.
//!
//! - **METHOD**: `put` (single PUTs, and multipart uploads at their completion), `get` (GETs
//!   with a body, `get_ranges`), `head`, `list` (all three listing calls), `delete` (each
//!   location of `delete_stream`), or `any` (all of these plus copy and rename).
//! - **PATTERN**: matched against the object key relative to the repository root (inside any
//!   bucket prefix), e.g. `chunks/ab/ab12…`, `volumes/v1/backups/…`, `config`. With `*` (any
//!   run of characters, `/` included) or `?` (one character) it is a glob over the whole key:
//!   `chunks/*`, `volumes/*/backups/*`, `*`. Without them it is a substring: `config`, `keys/`.
//!   A listing's key is its prefix plus `/` (`volumes/`), or the empty string for the root;
//!   copy and rename match on the destination. Patterns cannot contain `:` or `;`.
//! - **ACTION**, what happens to a request the rule fires on:
//!   - `status=CODE` — fail at once with `object_store::Error::Generic`, message
//!     "injected HTTP CODE …" (CODE is 429 or 500–599); nothing reaches the store.
//!   - `timeout` or `timeout=DURATION` — sleep (default 1s), then fail ("injected timeout");
//!     nothing reaches the store.
//!   - `reset-before` — fail at once ("injected connection reset before the request was
//!     sent"); nothing reaches the store, nothing is stored.
//!   - `reset-after` — forward the request, and if it succeeded fail anyway ("injected
//!     connection reset after …"): a PUT's object **is stored**, a DELETE did delete, the
//!     caller just never hears of it.
//!   - `slow=DURATION` — sleep, then forward.
//!   - `truncate` or `truncate=BYTES` — GET only: forward, then end the body after BYTES bytes
//!     (default: half the body), without an error. The result's `meta` and `range` still
//!     announce the full size, like a server that closed the stream early. `get_ranges` cuts
//!     every range.
//! - **times=N**: fire on at most N requests (N ≥ 1), then pass everything. **after=N**: let
//!   the first N matching requests pass before firing. Both together: requests N+1 … N+times
//!   fire. Neither: fire on every match. **every=N**: within that window, fire only on every
//!   Nth matching request (the Nth, 2Nth, …): `every=10` is a steady, reproducible 10 %.
//!
//! DURATION is an integer with `ms`, `s` or `m` (`200ms`, `2s`). Method and action names are
//! case-insensitive.
//!
//! # Semantics
//!
//! A rule *matches* a request when its method and pattern do (and, for `truncate`, the
//! request is a GET). Rules are tried in plan order: a matching rule counts the request (that
//! is what `after` and `times` count) and fires if its window is open; the first rule that
//! fires alone decides the outcome, and the rules after it never see that request. So
//! `put:*:status=500:times=1;put:chunks/*:status=503:times=2` fails the first chunk PUT with
//! 500 and the next two with 503. Clones of a [`FaultPlan`] share their counters, so a test can
//! keep a clone and ask [`FaultPlan::fired`] afterwards.
//!
//! The injector sits above `object_store`'s HTTP client, so injected errors are never retried
//! by it: ferry sees them as final, as it sees a request that failed after all retries.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{Future, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

/// Which requests a [`FaultRule`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMethod {
    /// Single PUTs and multipart completions.
    Put,
    /// GETs with a body and `get_ranges`.
    Get,
    /// HEADs.
    Head,
    /// Listings.
    List,
    /// Each deleted location.
    Delete,
    /// All of the above, plus copy and rename.
    Any,
}

impl FaultMethod {
    fn name(self) -> &'static str {
        match self {
            FaultMethod::Put => "put",
            FaultMethod::Get => "get",
            FaultMethod::Head => "head",
            FaultMethod::List => "list",
            FaultMethod::Delete => "delete",
            FaultMethod::Any => "any",
        }
    }
}

/// What a firing [`FaultRule`] does (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail at once with an injected HTTP status (429 or 5xx).
    Status(u16),
    /// Sleep, then fail.
    Timeout(Duration),
    /// Fail without forwarding: nothing is stored.
    ResetBefore,
    /// Forward, then fail: the request took effect.
    ResetAfter,
    /// Sleep, then forward.
    Slow(Duration),
    /// GET only: forward, then cut the body to this many bytes (`None`: half).
    Truncate(Option<u64>),
}

/// The operation a request performs (finer than [`FaultMethod`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    Head,
    List,
    Delete,
    Copy,
    Rename,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "PUT",
            Op::Get => "GET",
            Op::Head => "HEAD",
            Op::List => "LIST",
            Op::Delete => "DELETE",
            Op::Copy => "COPY",
            Op::Rename => "RENAME",
        }
    }
}

/// One rule of a [`FaultPlan`], with its counters.
#[derive(Debug)]
pub struct FaultRule {
    method: FaultMethod,
    pattern: String,
    action: FaultAction,
    times: Option<u64>,
    after: u64,
    every: Option<u64>,
    seen: AtomicU64,
    fired: AtomicU64,
}

impl FaultRule {
    /// The method the rule applies to.
    pub fn method(&self) -> FaultMethod {
        self.method
    }

    /// The key pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The action.
    pub fn action(&self) -> FaultAction {
        self.action
    }

    /// `times=N`, if given.
    pub fn times(&self) -> Option<u64> {
        self.times
    }

    /// `after=N` (0 if not given).
    pub fn after(&self) -> u64 {
        self.after
    }

    /// How many requests the rule matched so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// How many times the rule fired so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    fn matches(&self, op: Op, key: &str) -> bool {
        let method = match self.method {
            FaultMethod::Any => true,
            FaultMethod::Put => op == Op::Put,
            FaultMethod::Get => op == Op::Get,
            FaultMethod::Head => op == Op::Head,
            FaultMethod::List => op == Op::List,
            FaultMethod::Delete => op == Op::Delete,
        };
        let applies = !matches!(self.action, FaultAction::Truncate(_)) || op == Op::Get;
        method && applies && pattern_matches(&self.pattern, key)
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.method.name(), self.pattern)?;
        match self.action {
            FaultAction::Status(code) => write!(f, "status={code}")?,
            FaultAction::Timeout(d) => write!(f, "timeout={}", fmt_duration(d))?,
            FaultAction::ResetBefore => write!(f, "reset-before")?,
            FaultAction::ResetAfter => write!(f, "reset-after")?,
            FaultAction::Slow(d) => write!(f, "slow={}", fmt_duration(d))?,
            FaultAction::Truncate(None) => write!(f, "truncate")?,
            FaultAction::Truncate(Some(n)) => write!(f, "truncate={n}")?,
        }
        if let Some(n) = self.times {
            write!(f, ":times={n}")?;
        }
        if self.after > 0 {
            write!(f, ":after={}", self.after)?;
        }
        if let Some(e) = self.every {
            write!(f, ":every={e}")?;
        }
        Ok(())
    }
}

fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Glob (`*`, `?`) over the whole key when the pattern has a wildcard, else substring.
fn pattern_matches(pattern: &str, key: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return key.contains(pattern);
    }
    let (p, k): (Vec<char>, Vec<char>) = (pattern.chars().collect(), key.chars().collect());
    let (mut pi, mut ki) = (0, 0);
    // Position of the last `*` and the key position it currently absorbs up to.
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == k[ki]) {
            pi += 1;
            ki += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ki));
            pi += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A set of [`FaultRule`]s, parsed from the syntax in the [module documentation](self).
/// Clones share the rules' counters.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    rules: Arc<Vec<FaultRule>>,
}

impl FaultPlan {
    /// Parses a plan, e.g. `put:chunks/*:reset-after:times=1;get:*:status=503:times=3`.
    /// The error names the offending rule and why.
    pub fn parse(text: &str) -> Result<FaultPlan, String> {
        let rules = text
            .split([';', '\n'])
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| parse_rule(r).map_err(|e| format!("fault rule '{r}': {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FaultPlan { rules: Arc::new(rules) })
    }

    /// The rules, in plan order.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// True when the plan has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How often each rule fired so far, in plan order.
    pub fn fired(&self) -> Vec<u64> {
        self.rules.iter().map(FaultRule::fired).collect()
    }

    /// Tries the rules in order; returns the first that fires (see the module documentation).
    fn decide(&self, op: Op, key: &str) -> Option<&FaultRule> {
        self.rules.iter().filter(|r| r.matches(op, key)).find(|rule| {
            let n = rule.seen.fetch_add(1, Ordering::SeqCst);
            let open = n >= rule.after
                && rule.times.is_none_or(|t| n - rule.after < t)
                && rule.every.is_none_or(|e| (n - rule.after) % e == e - 1);
            if open {
                rule.fired.fetch_add(1, Ordering::SeqCst);
            }
            open
        })
    }

    /// True when some rule can apply to deletes.
    fn has_delete_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.method, FaultMethod::Delete | FaultMethod::Any) && !matches!(r.action, FaultAction::Truncate(_)))
    }
}

impl FromStr for FaultPlan {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultPlan, String> {
        FaultPlan::parse(s)
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("duration '{s}' needs a unit (ms, s or m)"))?;
    let n: u64 = num.parse().map_err(|_| format!("bad duration '{s}'"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration '{s}' (use ms, s or m)")),
    }
}

fn parse_count(name: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("{name}={v} is not a number"))
}

fn parse_rule(rule: &str) -> Result<FaultRule, String> {
    let fields: Vec<&str> = rule.split(':').map(str::trim).collect();
    if fields.len() < 3 {
        return Err("expected METHOD:PATTERN:ACTION[:times=N][:after=N]".into());
    }
    let method = match fields[0].to_ascii_lowercase().as_str() {
        "put" => FaultMethod::Put,
        "get" => FaultMethod::Get,
        "head" => FaultMethod::Head,
        "list" => FaultMethod::List,
        "delete" => FaultMethod::Delete,
        "any" => FaultMethod::Any,
        m => return Err(format!("unknown method '{m}' (put, get, head, list, delete, any)")),
    };
    let pattern = fields[1].to_string();
    if pattern.is_empty() {
        return Err("empty key pattern (use * for every key)".into());
    }
    let (name, value) = match fields[2].split_once('=') {
        Some((n, v)) => (n.to_ascii_lowercase(), Some(v)),
        None => (fields[2].to_ascii_lowercase(), None),
    };
    let action = match (name.as_str(), value) {
        ("status", Some(v)) => {
            let code: u16 = v.parse().map_err(|_| format!("status={v} is not a number"))?;
            if code != 429 && !(500..=599).contains(&code) {
                return Err(format!("status={code}: only 429 and 500-599 can be injected"));
            }
            FaultAction::Status(code)
        }
        ("timeout", None) => FaultAction::Timeout(Duration::from_secs(1)),
        ("timeout", Some(v)) => FaultAction::Timeout(parse_duration(v)?),
        ("reset-before", None) => FaultAction::ResetBefore,
        ("reset-after", None) => FaultAction::ResetAfter,
        ("slow", Some(v)) => FaultAction::Slow(parse_duration(v)?),
        ("truncate", None) => FaultAction::Truncate(None),
        ("truncate", Some(v)) => FaultAction::Truncate(Some(parse_count("truncate", v)?)),
        _ => {
            return Err(format!(
                "unknown action '{}' (status=CODE, timeout[=DURATION], reset-before, reset-after, slow=DURATION, truncate[=BYTES])",
                fields[2]
            ))
        }
    };
    if matches!(action, FaultAction::Truncate(_)) && !matches!(method, FaultMethod::Get | FaultMethod::Any) {
        return Err("truncate applies to GETs only (method get or any)".into());
    }
    let (mut times, mut after, mut every) = (None, None, None);
    for opt in &fields[3..] {
        match opt.split_once('=') {
            Some(("times", v)) if times.is_none() => {
                let n = parse_count("times", v)?;
                if n == 0 {
                    return Err("times=0 would never fire".into());
                }
                times = Some(n);
            }
            Some(("after", v)) if after.is_none() => after = Some(parse_count("after", v)?),
            Some(("every", v)) if every.is_none() => {
                let n = parse_count("every", v)?;
                if n == 0 {
                    return Err("every=0 would never fire".into());
                }
                every = Some(n);
            }
            _ => return Err(format!("unknown or repeated option '{opt}' (times=N, after=N, every=N)")),
        }
    }
    Ok(FaultRule {
        method,
        pattern,
        action,
        times,
        after: after.unwrap_or(0),
        every,
        seen: AtomicU64::new(0),
        fired: AtomicU64::new(0),
    })
}

fn injected(rule: &FaultRule, op: Op, key: &str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: format!("injected {what} on {} '{key}' (fault rule '{rule}')", op.name()).into(),
    }
}

fn status_text(code: u16) -> &'static str {
    match code {
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Server Error",
    }
}

/// Runs `request` under `rule` (if one fired): every action but `truncate`, which the GET
/// paths apply to the result themselves.
async fn apply<T, F>(rule: Option<&FaultRule>, op: Op, key: &str, request: F) -> object_store::Result<T>
where
    F: Future<Output = object_store::Result<T>>,
{
    let Some(rule) = rule else {
        return request.await;
    };
    match rule.action {
        FaultAction::Status(code) => Err(injected(rule, op, key, &format!("HTTP {code} {}", status_text(code)))),
        FaultAction::Timeout(d) => {
            tokio::time::sleep(d).await;
            Err(injected(rule, op, key, &format!("timeout after {}", fmt_duration(d))))
        }
        FaultAction::ResetBefore => Err(injected(rule, op, key, "connection reset before the request was sent")),
        FaultAction::ResetAfter => {
            request.await?;
            Err(injected(rule, op, key, "connection reset after the store completed the request"))
        }
        FaultAction::Slow(d) => {
            tokio::time::sleep(d).await;
            request.await
        }
        FaultAction::Truncate(_) => request.await,
    }
}

fn truncate_len(keep: Option<u64>, len: u64) -> u64 {
    keep.unwrap_or(len / 2).min(len)
}

fn truncate_result(r: GetResult, keep: Option<u64>) -> GetResult {
    let keep = truncate_len(keep, r.range.end - r.range.start);
    let GetResult {
        payload,
        meta,
        range,
        attributes,
        extensions,
    } = r;
    let body = match payload {
        GetResultPayload::Stream(s) => s,
        file @ GetResultPayload::File(..) => GetResult {
            payload: file,
            meta: meta.clone(),
            range: range.clone(),
            attributes: Default::default(),
            extensions: Default::default(),
        }
        .into_stream(),
    };
    let cut = body
        .scan(keep, |left, chunk| {
            let item = match chunk {
                Ok(_) if *left == 0 => None,
                Ok(b) => {
                    let n = (*left).min(b.len() as u64);
                    *left -= n;
                    Some(Ok(b.slice(..n as usize)))
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(item)
        })
        .boxed();
    GetResult {
        payload: GetResultPayload::Stream(cut),
        meta,
        range,
        attributes,
        extensions,
    }
}

/// Injects the failures of a [`FaultPlan`] (see the [module documentation](self)).
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    plan: FaultPlan,
}

impl FaultStore {
    /// Wraps `inner`; `plan`'s counters are shared with the caller's clones of it.
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> FaultStore {
        FaultStore { inner, plan }
    }

    /// The plan, with its counters.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    fn list_faulty(
        &self,
        prefix: Option<&Path>,
        list: impl FnOnce(&Arc<dyn ObjectStore>, Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let key = list_key(prefix);
        let Some(rule) = self.plan.decide(Op::List, &key) else {
            return list(&self.inner, prefix);
        };
        let err = |what: &str| injected(rule, Op::List, &key, what);
        match rule.action {
            FaultAction::Slow(d) => {
                let inner = list(&self.inner, prefix);
                stream::once(async move {
                    tokio::time::sleep(d).await;
                    inner
                })
                .flatten()
                .boxed()
            }
            FaultAction::ResetAfter => {
                let inner = list(&self.inner, prefix);
                let e = err("connection reset after the store completed the request");
                stream::once(async move {
                    // The whole listing happens; the caller gets only the error.
                    let _ = inner.collect::<Vec<_>>().await;
                    Err(e)
                })
                .boxed()
            }
            FaultAction::Status(code) => stream::iter([Err(err(&format!("HTTP {code} {}", status_text(code))))]).boxed(),
            FaultAction::ResetBefore => stream::iter([Err(err("connection reset before the request was sent"))]).boxed(),
            FaultAction::Timeout(d) => {
                let e = err(&format!("timeout after {}", fmt_duration(d)));
                stream::once(async move {
                    tokio::time::sleep(d).await;
                    Err(e)
                })
                .boxed()
            }
            FaultAction::Truncate(_) => list(&self.inner, prefix),
        }
    }
}

fn list_key(prefix: Option<&Path>) -> String {
    match prefix.map(|p| p.as_ref()) {
        None | Some("") => String::new(),
        Some(p) => format!("{p}/"),
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({}, {})", self.plan, self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for FaultStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        let key = location.as_ref();
        let rule = self.plan.decide(Op::Put, key);
        apply(rule, Op::Put, key, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultUpload {
            upload,
            plan: self.plan.clone(),
            key: location.to_string(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let key = location.as_ref();
        let op = if options.head { Op::Head } else { Op::Get };
        let rule = self.plan.decide(op, key);
        let r = apply(rule, op, key, self.inner.get_opts(location, options)).await?;
        Ok(match rule.map(|r| r.action) {
            Some(FaultAction::Truncate(keep)) => truncate_result(r, keep),
            _ => r,
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        let key = location.as_ref();
        let rule = self.plan.decide(Op::Get, key);
        let r = apply(rule, Op::Get, key, self.inner.get_ranges(location, ranges)).await?;
        Ok(match rule.map(|r| r.action) {
            Some(FaultAction::Truncate(keep)) => r
                .into_iter()
                .map(|b| b.slice(..truncate_len(keep, b.len() as u64) as usize))
                .collect(),
            _ => r,
        })
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        if !self.plan.has_delete_rules() {
            return self.inner.delete_stream(locations);
        }
        // One location at a time, so that each can fail on its own.
        let inner = Arc::clone(&self.inner);
        let plan = self.plan.clone();
        locations
            .then(move |location| {
                let inner = Arc::clone(&inner);
                let plan = plan.clone();
                async move {
                    let location = location?;
                    let key = location.to_string();
                    let rule = plan.decide(Op::Delete, &key);
                    apply(rule, Op::Delete, &key, inner.delete(&location)).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_faulty(prefix, |inner, prefix| inner.list(prefix))
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_faulty(prefix, |inner, prefix| inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let key = list_key(prefix);
        let rule = self.plan.decide(Op::List, &key);
        apply(rule, Op::List, &key, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        let key = to.as_ref();
        let rule = self.plan.decide(Op::Copy, key);
        apply(rule, Op::Copy, key, self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        let key = to.as_ref();
        let rule = self.plan.decide(Op::Rename, key);
        apply(rule, Op::Rename, key, self.inner.rename_opts(from, to, options)).await
    }
}

/// A multipart upload whose completion is subject to the plan's `put` rules.
#[derive(Debug)]
struct FaultUpload {
    upload: Box<dyn MultipartUpload>,
    plan: FaultPlan,
    key: String,
}

#[async_trait]
impl MultipartUpload for FaultUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.upload.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let rule = self.plan.decide(Op::Put, &self.key);
        apply(rule, Op::Put, &self.key, self.upload.complete()).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.upload.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use std::time::Instant;

    fn faulty(plan: &str) -> (FaultStore, Arc<InMemory>, FaultPlan) {
        let mem = Arc::new(InMemory::new());
        let plan = FaultPlan::parse(plan).unwrap();
        (FaultStore::new(mem.clone(), plan.clone()), mem, plan)
    }

    fn p(s: &str) -> Path {
        Path::from(s)
    }

    fn is_injected(e: &object_store::Error, what: &str) -> bool {
        matches!(e, object_store::Error::Generic { store: "FaultStore", .. }) && e.to_string().contains(what)
    }

    #[test]
    fn parses_the_documented_example() {
        let text = "put:chunks/*:reset-after:times=1;get:*:status=503:times=3;get:volumes/*:slow=200ms";
        let plan = FaultPlan::parse(text).unwrap();
        let r = plan.rules();
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].method(), r[0].pattern(), r[0].action(), r[0].times()),
            (FaultMethod::Put, "chunks/*", FaultAction::ResetAfter, Some(1))
        );
        assert_eq!((r[1].action(), r[1].times(), r[1].after()), (FaultAction::Status(503), Some(3), 0));
        assert_eq!(r[2].action(), FaultAction::Slow(Duration::from_millis(200)));
        assert_eq!(plan.to_string(), text);
        let plan = FaultPlan::parse("\n ANY:config:timeout\n\nget:keys/:truncate=5:after=2:times=1 ;").unwrap();
        assert_eq!(plan.to_string(), "any:config:timeout=1s;get:keys/:truncate=5:times=1:after=2");
        assert!(FaultPlan::parse("").unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_rules() {
        for (bad, why) in [
            ("put:chunks/*", "expected METHOD"),
            ("post:*:status=503", "unknown method"),
            ("put::status=503", "empty key pattern"),
            ("put:*:status=404", "only 429 and 500-599"),
            ("put:*:status=abc", "not a number"),
            ("put:*:explode", "unknown action"),
            ("put:*:slow", "unknown action"),
            ("put:*:slow=200", "needs a unit"),
            ("put:*:slow=2h", "bad duration"),
            ("put:*:truncate", "GETs only"),
            ("get:*:status=503:times=0", "never fire"),
            ("get:*:status=503:times=1:times=2", "repeated option"),
            ("get:*:status=503:often", "unknown or repeated option"),
        ] {
            let e = FaultPlan::parse(&format!("get:*:slow=1ms;{bad}")).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn globs_and_substrings() {
        assert!(pattern_matches("*", ""));
        assert!(pattern_matches("*", "chunks/ab/abcd"));
        assert!(pattern_matches("chunks/*", "chunks/ab/abcd"));
        assert!(!pattern_matches("chunks/*", "xchunks/ab"));
        assert!(pattern_matches("volumes/*/backups/*", "volumes/v1/backups/2024-x"));
        assert!(!pattern_matches("volumes/*/backups/*", "volumes/v1/other/2024-x"));
        assert!(pattern_matches("chunks/a?/*", "chunks/ab/abcd"));
        assert!(!pattern_matches("chunks/a?/*", "chunks/b/abcd"));
        assert!(pattern_matches("*cd", "chunks/ab/abcd"));
        assert!(pattern_matches("a*b*c", "aXbYbZc"));
        assert!(!pattern_matches("a*b*c", "aXbYbZ"));
        assert!(pattern_matches("keys/", "keys/slot1"), "no wildcard = substring");
        assert!(pattern_matches("config", "config"));
        assert!(!pattern_matches("config", "keys/x"));
    }

    #[tokio::test]
    async fn status_fires_exactly_times_then_passes() {
        let (s, _, plan) = faulty("get:*:status=503:times=3");
        s.put(&p("a"), "hello".into()).await.unwrap();
        for _ in 0..3 {
            let e = s.get(&p("a")).await.unwrap_err();
            assert!(is_injected(&e, "injected HTTP 503 Service Unavailable on GET 'a'"), "{e}");
        }
        assert_eq!(s.get(&p("a")).await.unwrap().bytes().await.unwrap(), "hello");
        assert_eq!(s.get(&p("a")).await.unwrap().bytes().await.unwrap(), "hello");
        assert_eq!(plan.fired(), vec![3]);
        assert_eq!(plan.rules()[0].seen(), 5);
        // HEAD is not GET.
        s.head(&p("a")).await.unwrap();
    }

    #[tokio::test]
    async fn every_fires_on_every_nth_match() {
        let (s, _, plan) = faulty("get:*:status=503:every=3");
        s.put(&p("a"), "hello".into()).await.unwrap();
        let outcomes: Vec<bool> = futures::future::join_all((0..9).map(|_| async { s.get(&p("a")).await.is_err() }))
            .await
            .into_iter()
            .collect();
        assert_eq!(outcomes.iter().filter(|&&e| e).count(), 3);
        assert_eq!(plan.fired(), vec![3]);
        assert_eq!(plan.to_string(), "get:*:status=503:every=3");
        assert!(FaultPlan::parse("get:*:status=503:every=0").unwrap_err().contains("never fire"));
    }

    #[tokio::test]
    async fn after_skips_the_first_matches() {
        let (s, _, plan) = faulty("put:chunks/*:reset-before:after=2:times=2");
        let mut results = Vec::new();
        for i in 0..6 {
            results.push(s.put(&p(&format!("chunks/{i}")), "x".into()).await.is_ok());
        }
        // Other keys neither fire nor count.
        s.put(&p("config"), "x".into()).await.unwrap();
        assert_eq!(results, [true, true, false, false, true, true]);
        assert_eq!(plan.fired(), vec![2]);
        assert_eq!(plan.rules()[0].seen(), 6);
    }

    #[tokio::test]
    async fn reset_before_stores_nothing_and_reset_after_stores() {
        let (s, mem, plan) = faulty("put:chunks/*:reset-before:times=1;put:volumes/*:reset-after:times=1");
        let e = s.put(&p("chunks/aa/1"), "data".into()).await.unwrap_err();
        assert!(is_injected(&e, "before the request was sent"), "{e}");
        assert!(matches!(
            mem.head(&p("chunks/aa/1")).await,
            Err(object_store::Error::NotFound { .. })
        ));

        let e = s.put(&p("volumes/v/backups/1"), "manifest".into()).await.unwrap_err();
        assert!(is_injected(&e, "after the store completed the request"), "{e}");
        // The object really is there, with the full content.
        assert_eq!(mem.get(&p("volumes/v/backups/1")).await.unwrap().bytes().await.unwrap(), "manifest");
        assert_eq!(plan.fired(), vec![1, 1]);
        // Both rules are spent: the retries go through.
        s.put(&p("chunks/aa/1"), "data".into()).await.unwrap();
        s.put(&p("volumes/v/backups/2"), "m2".into()).await.unwrap();
        assert_eq!(plan.fired(), vec![1, 1]);
    }

    #[tokio::test]
    async fn first_open_rule_decides() {
        let (s, _, plan) = faulty("put:*:status=500:times=1;put:chunks/*:status=503:times=2");
        let errs: Vec<String> = futures::future::join_all((0..4).map(|i| {
            let s = &s;
            async move {
                match s.put(&p(&format!("chunks/{i}")), "x".into()).await {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.to_string().split(" on ").next().unwrap().to_string(),
                }
            }
        }))
        .await;
        let count = |w: &str| errs.iter().filter(|e| e.contains(w)).count();
        // Request 1 is rule 1's (rule 2 never sees it); rule 2 takes the next two.
        assert_eq!((count("HTTP 500"), count("HTTP 503"), count("ok")), (1, 2, 1), "{errs:?}");
        assert_eq!(plan.fired(), vec![1, 2]);
        assert_eq!(plan.rules()[1].seen(), 3);
    }

    #[tokio::test]
    async fn truncated_body_is_shorter() {
        let (s, _, _) = faulty("get:chunks/*:truncate:times=1;get:volumes/*:truncate=3");
        let data = vec![9u8; 1000];
        s.put(&p("chunks/x"), data.clone().into()).await.unwrap();
        s.put(&p("volumes/x"), data.clone().into()).await.unwrap();
        let r = s.get(&p("chunks/x")).await.unwrap();
        assert_eq!(r.meta.size, 1000, "the metadata still claims the full size");
        assert_eq!(r.bytes().await.unwrap().len(), 500);
        assert_eq!(s.get(&p("chunks/x")).await.unwrap().bytes().await.unwrap().len(), 1000);
        assert_eq!(s.get(&p("volumes/x")).await.unwrap().bytes().await.unwrap(), &data[..3]);
        assert_eq!(s.get_range(&p("volumes/x"), 10..20).await.unwrap().len(), 3);
        // HEAD is untouched by truncate, even for `any`.
        let (s, _, plan) = faulty("any:*:truncate=1");
        s.put(&p("a"), "abc".into()).await.unwrap();
        assert_eq!(s.head(&p("a")).await.unwrap().size, 3);
        assert_eq!(plan.rules()[0].seen(), 0);
    }

    #[tokio::test]
    async fn truncates_local_files_too() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let s = FaultStore::new(local, FaultPlan::parse("get:*:truncate=10").unwrap());
        s.put(&p("f"), vec![1u8; 100].into()).await.unwrap();
        assert_eq!(s.get(&p("f")).await.unwrap().bytes().await.unwrap().len(), 10);
    }

    #[tokio::test]
    async fn slow_and_timeout_sleep() {
        let (s, _, _) = faulty("get:volumes/*:slow=150ms;head:*:timeout=100ms:times=1");
        s.put(&p("volumes/a"), "m".into()).await.unwrap();
        let t = Instant::now();
        assert_eq!(s.get(&p("volumes/a")).await.unwrap().bytes().await.unwrap(), "m");
        assert!(t.elapsed() >= Duration::from_millis(150));
        let t = Instant::now();
        let e = s.head(&p("volumes/a")).await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(is_injected(&e, "injected timeout after 100ms on HEAD"), "{e}");
        s.head(&p("volumes/a")).await.unwrap();
    }

    #[tokio::test]
    async fn delete_and_list_rules() {
        let (s, mem, plan) = faulty("delete:chunks/b*:reset-after;delete:chunks/c*:status=500;list:volumes/*:status=503:times=1");
        for k in ["chunks/a", "chunks/b", "chunks/c", "volumes/v/backups/1"] {
            s.put(&p(k), "x".into()).await.unwrap();
        }
        let out: Vec<_> = s
            .delete_stream(stream::iter(["chunks/a", "chunks/b", "chunks/c"].map(|k| Ok(p(k)))).boxed())
            .collect()
            .await;
        assert!(out[0].is_ok());
        assert!(is_injected(out[1].as_ref().unwrap_err(), "after the store completed"));
        assert!(is_injected(out[2].as_ref().unwrap_err(), "HTTP 500"));
        // reset-after deleted; status=500 did not.
        let left: Vec<_> = mem
            .list(Some(&p("chunks")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(left, vec!["chunks/c".to_string()]);

        let e = s.list(Some(&p("volumes"))).try_collect::<Vec<_>>().await.unwrap_err();
        assert!(is_injected(&e, "HTTP 503 Service Unavailable on LIST 'volumes/'"), "{e}");
        assert_eq!(s.list(Some(&p("volumes"))).try_collect::<Vec<_>>().await.unwrap().len(), 1);
        // The root listing's key is "", which `volumes/*` does not match.
        assert_eq!(s.list(None).try_collect::<Vec<_>>().await.unwrap().len(), 2);
        assert_eq!(plan.fired(), vec![1, 1, 1]);
    }

    #[tokio::test]
    async fn multipart_completion_is_a_put() {
        let (s, mem, plan) = faulty("put:big:reset-after:times=1");
        let mut up = s.put_multipart(&p("big")).await.unwrap();
        up.put_part(vec![1u8; 10].into()).await.unwrap();
        let e = up.complete().await.unwrap_err();
        assert!(is_injected(&e, "after the store completed"), "{e}");
        assert_eq!(mem.head(&p("big")).await.unwrap().size, 10);
        assert_eq!(plan.fired(), vec![1]);
    }

    #[tokio::test]
    async fn plan_clones_share_counters() {
        let plan = FaultPlan::parse("put:*:status=503:times=1").unwrap();
        let s1 = FaultStore::new(Arc::new(InMemory::new()), plan.clone());
        let s2 = FaultStore::new(Arc::new(InMemory::new()), plan.clone());
        assert!(s1.put(&p("a"), "x".into()).await.is_err());
        assert!(s2.put(&p("a"), "x".into()).await.is_ok());
        assert_eq!(plan.fired(), vec![1]);
    }
}

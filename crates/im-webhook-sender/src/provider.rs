//! The [`ProviderClient`] port on reqwest: every call to a provider's API goes through it.
//!
//! It connects the way webhook delivery does: the URL is judged by
//! [`UrlPolicy::check_destination`] before anything is sent, names are resolved by the
//! [`SafeResolver`] (refused addresses are dropped, the connection uses a checked address),
//! redirects are never followed and proxy variables are ignored.
//!
//! On top of that it
//! - builds the URL from the target's base URL, the template's path (each `{placeholder}` value
//!   percent-encoded as one path segment) and query, and adds the target's default headers;
//! - puts the [`AuthMaterial`] on the request (API key in a header or the query, bearer, basic)
//!   and, once per call, asks the [`CredentialSource`] for newer credentials after a 401;
//! - pages in every style ([`Pagination`]) behind an opaque [`PageToken`];
//! - limits each connection's concurrency (a semaphore) and rate (a token bucket), and holds a
//!   connection's requests back until the reset a provider announced (`X-RateLimit-Reset`,
//!   `RateLimit-Reset`) when it said nothing is left;
//! - retries 429, 502/503/504 and 500, timeouts and connection failures with bounded exponential
//!   backoff and jitter ([`im_domain::retry`]), waiting at least what `Retry-After` or a rate-limit
//!   reset asks, and gives up at once when that is longer than [`ProviderClientSettings::max_retry_wait`];
//! - caps the size of an answer and times out each attempt.
//!
//! Credentials never reach a log line, a span or an error: spans record the connection, the
//! method and the path template (never the URL, which may carry an API key), and error texts
//! are built without the URL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use im_domain::custom::{ApiKeyLocation, HttpMethod, Pagination};
use im_domain::provider_client::{
    ApiTarget, AuthMaterial, CredentialSource, PageToken, ProviderClient, ProviderPage, ProviderRequest, ProviderResponse,
};
use im_domain::retry::{Backoff, Failure, retry};
use im_domain::webhooks::endpoint::UrlPolicy;
use im_domain::{DomainError, HumanDuration};
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::{SafeResolver, describe};

/// The `provider_client` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderClientSettings {
    /// Longest wait for a connection to be established.
    pub connect_timeout: HumanDuration,
    /// Longest wait for one attempt, the answer's body included.
    pub request_timeout: HumanDuration,
    /// Largest answer read; a bigger one is an error.
    pub max_response_bytes: u64,
    /// Attempts of one request (the first included) before a 429, 5xx or timeout is given up.
    pub retry_attempts: u32,
    /// Wait after the first failed attempt; doubled after each, up to `retry_max_delay`.
    pub retry_first_delay: HumanDuration,
    pub retry_max_delay: HumanDuration,
    /// Longest wait a provider may ask for (`Retry-After`, a rate-limit reset) within one call;
    /// a longer one ends the call as unavailable, with the wait as its retry-after.
    pub max_retry_wait: HumanDuration,
    /// Requests in flight at once per connection.
    pub max_concurrency_per_connection: u32,
    /// Sustained requests per second per connection.
    pub requests_per_second: f64,
    /// Requests a connection may send at once after being idle (the bucket's size).
    pub burst: u32,
    /// The `User-Agent` of every request.
    pub user_agent: String,
}

impl Default for ProviderClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            max_response_bytes: 10 * 1024 * 1024,
            retry_attempts: 4,
            retry_first_delay: HumanDuration(Duration::from_millis(500)),
            retry_max_delay: HumanDuration(Duration::from_secs(10)),
            max_retry_wait: HumanDuration(Duration::from_secs(60)),
            max_concurrency_per_connection: 8,
            requests_per_second: 10.0,
            burst: 20,
            user_agent: "integration-manager".to_owned(),
        }
    }
}

impl ProviderClientSettings {
    /// What types alone cannot check: every problem, as (key within the section, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (key, d) in [("connect_timeout", self.connect_timeout), ("request_timeout", self.request_timeout)] {
            if d.get().is_zero() {
                problems.push((key, "must be positive".to_owned()));
            }
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_response_bytes) {
            problems.push(("max_response_bytes", "must be between 1024 and 1073741824".to_owned()));
        }
        if !(1..=20).contains(&self.retry_attempts) {
            problems.push(("retry_attempts", "must be between 1 and 20".to_owned()));
        }
        if self.retry_max_delay.get() < self.retry_first_delay.get() {
            problems.push(("retry_max_delay", "must be at least retry_first_delay".to_owned()));
        }
        if !(1..=1000).contains(&self.max_concurrency_per_connection) {
            problems.push(("max_concurrency_per_connection", "must be between 1 and 1000".to_owned()));
        }
        if !(self.requests_per_second.is_finite() && self.requests_per_second > 0.0 && self.requests_per_second <= 10_000.0) {
            problems.push(("requests_per_second", "must be more than 0 and at most 10000".to_owned()));
        }
        if !(1..=10_000).contains(&self.burst) {
            problems.push(("burst", "must be between 1 and 10000".to_owned()));
        }
        if self.user_agent.is_empty() || HeaderValue::from_str(&self.user_agent).is_err() {
            problems.push(("user_agent", "must be a non-empty header value".to_owned()));
        }
        problems
    }
}

/// The HTTP client of calls to providers (their APIs and token endpoints): no proxy, no
/// redirects, names resolved by the [`SafeResolver`], the settings' timeouts and user agent.
pub(crate) fn http_client(settings: &ProviderClientSettings, policy: &Arc<UrlPolicy>) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(settings.connect_timeout.get())
        .timeout(settings.request_timeout.get())
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(SafeResolver { policy: policy.clone() }))
        .user_agent(settings.user_agent.clone())
        .pool_max_idle_per_host(16)
        .build()
        .map_err(|e| e.to_string())
}

/// A token bucket that lends tokens ahead (the balance may go negative: each caller waits for
/// its own token), plus a pause until a provider's announced rate-limit reset.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

/// The limits of one connection.
#[derive(Debug)]
struct Limits {
    permits: Semaphore,
    bucket: Mutex<Bucket>,
}

impl Limits {
    /// How long the caller must wait before sending (its token is taken now).
    fn reserve(&self, rate: f64, burst: f64) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.refilled).as_secs_f64() * rate).min(burst);
        b.refilled = now;
        b.tokens -= 1.0;
        let mut wait = if b.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-b.tokens / rate) };
        if let Some(until) = b.paused_until {
            wait = wait.max(until.saturating_duration_since(now));
        }
        wait
    }

    fn pause_until(&self, until: Instant) {
        let mut b = self.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.paused_until.is_none_or(|p| p < until) {
            b.paused_until = Some(until);
        }
    }
}

/// Calls provider APIs. Cheap to clone; clones share connections and per-connection limits.
#[derive(Debug, Clone)]
pub struct HttpProviderClient {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
    settings: Arc<ProviderClientSettings>,
    limits: Arc<Mutex<HashMap<String, Arc<Limits>>>>,
}

/// Most connections whose limits are kept while idle.
const KEPT_LIMITS: usize = 10_000;

/// What one attempt came to.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The URL asked, without its query (to resolve a relative `Link`).
    url: Url,
    /// The query parameter that carried an API key, if one did (never kept in a page token).
    key_param: Option<String>,
}

fn unavailable(reason: impl Into<String>, retry_after: Option<Duration>) -> DomainError {
    DomainError::Unavailable { reason: reason.into(), retry_after }
}

fn method_of(method: HttpMethod) -> reqwest::Method {
    match method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
    }
}

/// Where a listing continues, as kept in a [`PageToken`]: a style letter and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    Cursor(String),
    Page(u64),
    Offset(u64),
    Link(String),
}

impl Position {
    fn token(&self) -> PageToken {
        PageToken(match self {
            Position::Cursor(c) => format!("c:{c}"),
            Position::Page(p) => format!("p:{p}"),
            Position::Offset(o) => format!("o:{o}"),
            Position::Link(url) => format!("l:{url}"),
        })
    }

    fn parse(token: &PageToken, pagination: &Pagination) -> Result<Self, DomainError> {
        let refused = || DomainError::invalid("page", "is not a page token of this listing");
        let (style, value) = token.0.split_once(':').ok_or_else(refused)?;
        let position = match (style, pagination) {
            ("c", Pagination::Cursor { .. }) if !value.is_empty() => Position::Cursor(value.to_owned()),
            ("p", Pagination::Page { .. }) => Position::Page(value.parse().map_err(|_| refused())?),
            ("o", Pagination::Offset { .. }) => Position::Offset(value.parse().map_err(|_| refused())?),
            ("l", Pagination::Link { .. }) => Position::Link(value.to_owned()),
            _ => return Err(refused()),
        };
        Ok(position)
    }
}

/// Follows a dotted path (`meta.next`) into a JSON value.
fn at_path<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(value, |v, key| match v {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// The `rel="next"` target of RFC 8288 `Link` headers.
fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(text) = value.to_str() else { continue };
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else { break };
            let target = &rest[open + 1..open + close];
            let after = &rest[open + close + 1..];
            let params = after.find('<').map_or(after, |next| &after[..next]);
            let is_next = params.split(';').any(|p| {
                let p = p.trim().trim_end_matches(',').trim();
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim().trim_matches('"').split_whitespace().any(|r| r.eq_ignore_ascii_case("next"))
                })
            });
            if is_next {
                return Some(target.to_owned());
            }
            rest = &rest[open + close + 1..];
        }
    }
    None
}

/// How long a rate-limited answer asks to wait: `Retry-After` (seconds or an HTTP date), else
/// `RateLimit-Reset` / `X-RateLimit-Reset` (seconds from now, or a Unix time when larger than a
/// year's worth of seconds, as GitHub sends it).
fn requested_wait(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(value) = text("retry-after") {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(date) = httpdate_seconds(value) {
            return Some(Duration::from_secs(date.saturating_sub(unix_now())));
        }
    }
    let reset = text("ratelimit-reset").or_else(|| text("x-ratelimit-reset"))?;
    let value = reset.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)?;
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    let secs = if value > YEAR { value - unix_now() as f64 } else { value };
    Some(Duration::from_secs_f64(secs.max(0.0)))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into Unix seconds.
fn httpdate_seconds(text: &str) -> Result<u64, ()> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, clock, "GMT"] = parts.as_slice() else { return Err(()) };
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| m == month).ok_or(())? + 1;
    let (day, year): (u64, i64) = (day.parse().map_err(|_| ())?, year.parse().map_err(|_| ())?);
    let hms: Vec<u64> = clock.split(':').map(|p| p.parse().map_err(|_| ())).collect::<Result<_, _>>()?;
    let [h, m, s] = hms.as_slice() else { return Err(()) };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 { (year - 1, month as i64 + 9) } else { (year, month as i64 - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).map(|d| d + h * 3600 + m * 60 + s).map_err(|_| ())
}

/// Whether the answer says the connection has no requests left until the reset.
fn exhausted(headers: &HeaderMap) -> bool {
    ["x-ratelimit-remaining", "ratelimit-remaining"]
        .iter()
        .any(|name| headers.get(*name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "0"))
}

impl HttpProviderClient {
    /// A client for `settings`, connecting only where `policy` allows.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: ProviderClientSettings, policy: UrlPolicy) -> Result<Self, String> {
        let policy = Arc::new(policy);
        let client = http_client(&settings, &policy)?;
        Ok(Self { client, policy, settings: Arc::new(settings), limits: Arc::new(Mutex::new(HashMap::new())) })
    }

    fn limits(&self, connection: &str) -> Arc<Limits> {
        let mut all = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if all.len() >= KEPT_LIMITS && !all.contains_key(connection) {
            all.retain(|_, l| Arc::strong_count(l) > 1);
        }
        all.entry(connection.to_owned())
            .or_insert_with(|| {
                Arc::new(Limits {
                    permits: Semaphore::new(self.settings.max_concurrency_per_connection as usize),
                    bucket: Mutex::new(Bucket { tokens: f64::from(self.settings.burst), refilled: Instant::now(), paused_until: None }),
                })
            })
            .clone()
    }

    /// The URL of `request` against `target`; for a list request (`paging`), with the pagination
    /// parameters of the position (`None`: the first page) and page size.
    fn url(
        &self,
        target: &ApiTarget,
        request: &ProviderRequest,
        paging: Option<(Option<&Position>, Option<u32>)>,
    ) -> Result<Url, DomainError> {
        let (position, page_size) = paging.unwrap_or((None, None));
        if let Some(Position::Link(next)) = position {
            let url = Url::parse(next).map_err(|_| DomainError::invalid("page", "is not a page token of this listing"))?;
            let base = Url::parse(&target.base_url).map_err(|_| DomainError::invalid("baseUrl", "is not a valid URL"))?;
            if url.origin() != base.origin() {
                return Err(DomainError::invalid("page", "names a page on another origin than the API's"));
            }
            return Ok(url);
        }
        let mut url = Url::parse(&target.base_url).map_err(|_| DomainError::invalid("baseUrl", "is not a valid URL"))?;
        if url.cannot_be_a_base() || url.query().is_some() || url.fragment().is_some() {
            return Err(DomainError::invalid("baseUrl", "must be an absolute URL without query or fragment"));
        }
        {
            let mut segments = url.path_segments_mut().map_err(|()| DomainError::invalid("baseUrl", "is not a valid URL"))?;
            segments.pop_if_empty();
            let path = request.template.path.trim_start_matches('/');
            // `/` is the base URL itself (a GraphQL endpoint), not a trailing slash.
            for raw in path.split('/').filter(|_| !path.is_empty()) {
                segments.push(&fill(raw, &request.path_params)?);
            }
        }
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in request.template.query.iter().chain(&request.extra_query) {
                query.append_pair(k, v);
            }
            let size = |own: &Option<u32>| page_size.or(*own).map(|s| s.to_string());
            let pagination = if paging.is_some() { &target.pagination } else { &Pagination::None };
            match (pagination, position) {
                (Pagination::Cursor { cursor_param, limit_param, page_size: own, .. }, position) => {
                    if let (Some(l), Some(s)) = (limit_param, size(own)) {
                        query.append_pair(l, &s);
                    }
                    if let Some(Position::Cursor(c)) = position {
                        query.append_pair(cursor_param, c);
                    }
                }
                (Pagination::Page { page_param, start_page, limit_param, page_size: own }, position) => {
                    if let (Some(l), Some(s)) = (limit_param, size(own)) {
                        query.append_pair(l, &s);
                    }
                    let page = match position {
                        Some(Position::Page(p)) => *p,
                        _ => u64::from(*start_page),
                    };
                    query.append_pair(page_param, &page.to_string());
                }
                (Pagination::Offset { offset_param, limit_param, page_size: own }, position) => {
                    query.append_pair(limit_param, &page_size.unwrap_or(*own).to_string());
                    let offset = match position {
                        Some(Position::Offset(o)) => *o,
                        _ => 0,
                    };
                    query.append_pair(offset_param, &offset.to_string());
                }
                (Pagination::Link { limit_param, page_size: own }, _) => {
                    if let (Some(l), Some(s)) = (limit_param, size(own)) {
                        query.append_pair(l, &s);
                    }
                }
                (Pagination::None, _) => {}
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        Ok(url)
    }

    /// One attempt with `auth`, within the connection's limits.
    async fn attempt(
        &self,
        limits: &Limits,
        method: &reqwest::Method,
        url: &Url,
        target: &ApiTarget,
        body: Option<&Value>,
        auth: &AuthMaterial,
    ) -> Result<Answer, Failure<DomainError>> {
        let wait = limits.reserve(self.settings.requests_per_second, f64::from(self.settings.burst));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let _permit = limits.permits.acquire().await.map_err(|_| Failure::Permanent(unavailable("the client is shutting down", None)))?;
        let mut url = url.clone();
        if let AuthMaterial::ApiKey { location: ApiKeyLocation::Query, name, value } = auth {
            let kept: Vec<(String, String)> =
                url.query_pairs().filter(|(k, _)| k != name).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            url.query_pairs_mut().clear().extend_pairs(kept).append_pair(name, value);
        }
        let mut builder = self.client.request(method.clone(), url.clone());
        if !target.default_headers.keys().any(|k| k.eq_ignore_ascii_case("accept")) {
            builder = builder.header(reqwest::header::ACCEPT, "application/json");
        }
        for (name, value) in &target.default_headers {
            builder = builder.header(name, value);
        }
        builder = match auth {
            AuthMaterial::None => builder,
            AuthMaterial::Bearer(token) => builder.bearer_auth(token),
            AuthMaterial::Basic { username, password } => builder.basic_auth(username, Some(password)),
            AuthMaterial::ApiKey { location: ApiKeyLocation::Header, name, value } => {
                let name = HeaderName::try_from(name.as_str())
                    .map_err(|_| Failure::Permanent(DomainError::invalid("auth.name", "is not a header name")))?;
                let mut value = HeaderValue::from_str(value)
                    .map_err(|_| Failure::Permanent(DomainError::Conflict("the API key is not a valid header value".into())))?;
                value.set_sensitive(true);
                builder.header(name, value)
            }
            AuthMaterial::ApiKey { location: ApiKeyLocation::Query, .. } => builder,
        };
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let started = Instant::now();
        let sent = builder.send().await;
        // The provider's host names the series: bounded by the providers in use, never a path or a tenant.
        let provider = url.host_str().unwrap_or("unknown").to_owned();
        let status_label = sent.as_ref().map_or_else(|_| "error".to_owned(), |r| r.status().as_u16().to_string());
        metrics::histogram!("im_provider_request_duration_seconds", "provider" => provider, "status" => status_label)
            .record(started.elapsed().as_secs_f64());
        let mut response = sent.map_err(|e| Failure::Transient(unavailable(describe(&e.without_url()), None)))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let cap = self.settings.max_response_bytes;
        let too_big = || Failure::Permanent(DomainError::Unexpected(anyhow::anyhow!("the provider's answer is larger than {cap} bytes")));
        if response.content_length().is_some_and(|l| l > cap) {
            return Err(too_big());
        }
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (bytes.len() + chunk.len()) as u64 > cap {
                        return Err(too_big());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::Transient(unavailable(describe(&e.without_url()), None))),
            }
        }
        url.set_query(None);
        let key_param = match auth {
            AuthMaterial::ApiKey { location: ApiKeyLocation::Query, name, .. } => Some(name.clone()),
            _ => None,
        };
        Ok(Answer { status, headers, body: bytes, url, key_param })
    }

    /// Sends with retries and the one refresh after a 401; the last answer whatever its status.
    async fn exchange(
        &self,
        connection: &str,
        url: &Url,
        target: &ApiTarget,
        method: HttpMethod,
        body: Option<&Value>,
        credentials: &dyn CredentialSource,
    ) -> Result<(Answer, Duration), DomainError> {
        self.policy.check_destination(url.as_str()).map_err(|refusal| DomainError::invalid("baseUrl", refusal.redacted()))?;
        let limits = self.limits(connection);
        let method = method_of(method);
        let settings = &self.settings;
        let backoff =
            Backoff { attempts: settings.retry_attempts, first: settings.retry_first_delay.get(), max: settings.retry_max_delay.get() };
        let mut auth = credentials.current().await?;
        let started = Instant::now();
        for refreshed in [false, true] {
            let asked: Mutex<Option<Duration>> = Mutex::new(None);
            let answer = retry(
                backoff,
                |number| {
                    let (limits, method, auth, asked) = (&limits, &method, &auth, &asked);
                    async move {
                        let answer = self.attempt(limits, method, url, target, body, auth).await;
                        let answer = match answer {
                            Ok(answer) => answer,
                            Err(failure) => {
                                tracing::debug!(attempt = number, "provider request failed");
                                return Err(failure);
                            }
                        };
                        let wait = requested_wait(&answer.headers);
                        let limited = answer.status == 429 || answer.status == 503 || (answer.status == 403 && exhausted(&answer.headers));
                        if let Some(wait) = wait.filter(|_| limited || exhausted(&answer.headers)) {
                            limits.pause_until(Instant::now() + wait);
                        }
                        let transient = limited || matches!(answer.status, 500 | 502 | 504);
                        if !transient {
                            return Ok(answer);
                        }
                        tracing::debug!(attempt = number, status = answer.status, "provider asked to retry");
                        let reason = format!("the provider answered {}", answer.status);
                        if let Some(wait) = wait.filter(|w| *w > settings.max_retry_wait.get()) {
                            return Err(Failure::Permanent(unavailable(reason, Some(wait))));
                        }
                        *asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = wait;
                        Err(Failure::Transient(unavailable(reason, wait)))
                    }
                },
                |delay| {
                    let asked = asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    // Equal jitter: half the backoff, plus a random part of the other half.
                    let half = delay / 2;
                    let jittered = half + half.mul_f64(fastrand::f64());
                    tokio::time::sleep(asked.map_or(jittered, |a| a.max(jittered)))
                },
            )
            .await?;
            if answer.status != 401 || refreshed {
                return Ok((answer, started.elapsed()));
            }
            tracing::debug!("provider answered 401; asking for newer credentials once");
            auth = credentials.after_unauthorized(&auth).await?;
        }
        unreachable!("the loop returns on its second pass")
    }
}

/// A path segment with its `{placeholders}` replaced.
fn fill(raw: &str, params: &BTreeMap<String, String>) -> Result<String, DomainError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| DomainError::invalid("path", "has an unbalanced '{'"))? + open;
        let name = &rest[open + 1..close];
        let value = params.get(name).ok_or_else(|| DomainError::invalid(format!("pathParams.{name}"), "is required by the path"))?;
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn json_body(bytes: &[u8]) -> Option<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) { None } else { serde_json::from_slice(bytes).ok() }
}

#[async_trait]
impl ProviderClient for HttpProviderClient {
    #[tracing::instrument(skip_all, name = "provider.send", fields(connection, method = ?request.template.method, path = %request.template.path, status))]
    async fn send(
        &self,
        connection: &str,
        target: &ApiTarget,
        request: &ProviderRequest,
        credentials: &dyn CredentialSource,
    ) -> Result<ProviderResponse, DomainError> {
        tracing::Span::current().record("connection", connection);
        let url = self.url(target, request, None)?;
        let (answer, latency) =
            self.exchange(connection, &url, target, request.template.method, request.body.as_ref(), credentials).await?;
        tracing::Span::current().record("status", answer.status);
        Ok(ProviderResponse { status: answer.status, body: json_body(&answer.body), latency })
    }

    #[tracing::instrument(skip_all, name = "provider.list_page", fields(connection, path = %request.template.path, status, records))]
    async fn list_page(
        &self,
        connection: &str,
        target: &ApiTarget,
        request: &ProviderRequest,
        page: Option<&PageToken>,
        page_size: Option<u32>,
        credentials: &dyn CredentialSource,
    ) -> Result<ProviderPage, DomainError> {
        tracing::Span::current().record("connection", connection);
        let position = page.map(|p| Position::parse(p, &target.pagination)).transpose()?;
        let url = self.url(target, request, Some((position.as_ref(), page_size)))?;
        let (answer, _) = self.exchange(connection, &url, target, request.template.method, request.body.as_ref(), credentials).await?;
        let status = answer.status;
        tracing::Span::current().record("status", status);
        match status {
            200..=299 => {}
            401 | 403 => return Err(DomainError::Conflict(format!("the provider refused the credentials ({status})"))),
            _ => return Err(unavailable(format!("the provider answered {status}"), None)),
        }
        let body = json_body(&answer.body).ok_or_else(|| anyhow::anyhow!("the provider's answer is not JSON"))?;
        let items = match &request.template.items_path {
            Some(path) => at_path(&body, path),
            None => Some(&body),
        };
        let Some(Value::Array(records)) = items else {
            return Err(DomainError::Unexpected(anyhow::anyhow!(
                "the provider's answer has no records array at '{}'",
                request.template.items_path.as_deref().unwrap_or("(the body)")
            )));
        };
        let records = records.clone();
        tracing::Span::current().record("records", records.len());
        let count = records.len() as u64;
        let full = |own: &Option<u32>| match page_size.or(*own) {
            Some(size) => count >= u64::from(size),
            None => count > 0,
        };
        let next = match &target.pagination {
            Pagination::Cursor { next_cursor_path, .. } => match at_path(&body, next_cursor_path) {
                Some(Value::String(s)) if !s.is_empty() => Some(Position::Cursor(s.clone())),
                Some(Value::Number(n)) => Some(Position::Cursor(n.to_string())),
                _ => None,
            },
            Pagination::Page { start_page, page_size: own, .. } => full(own).then(|| {
                let current = match position {
                    Some(Position::Page(p)) => p,
                    _ => u64::from(*start_page),
                };
                Position::Page(current + 1)
            }),
            Pagination::Offset { page_size: own, .. } => full(&Some(*own)).then(|| {
                let current = match position {
                    Some(Position::Offset(o)) => o,
                    _ => 0,
                };
                Position::Offset(current + count)
            }),
            Pagination::Link { .. } => match next_link(&answer.headers) {
                None => None,
                Some(link) => {
                    let mut next = answer.url.join(&link).map_err(|_| anyhow::anyhow!("the provider's next link is not a URL"))?;
                    if let Some(key) = &answer.key_param {
                        let kept: Vec<(String, String)> =
                            next.query_pairs().filter(|(k, _)| k != key).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                        next.query_pairs_mut().clear().extend_pairs(kept);
                    }
                    let base = Url::parse(&target.base_url).map_err(|_| DomainError::invalid("baseUrl", "is not a valid URL"))?;
                    if next.origin() != base.origin() {
                        return Err(DomainError::Unexpected(anyhow::anyhow!(
                            "the provider's next link leaves the API's origin; the listing stops here"
                        )));
                    }
                    Some(Position::Link(next.to_string()))
                }
            },
            Pagination::None => None,
        };
        Ok(ProviderPage { records, next: next.map(|p| p.token()), status })
    }
}

#[cfg(test)]
mod tests;

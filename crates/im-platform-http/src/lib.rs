//! What the clients of the platform's services share: the settings every one of them reads
//! (`url`, `token`, `timeout`, `connect_timeout`, `attempts` of its configuration section), the
//! HTTP client built from them, error texts without the request's URL, and the passive health
//! check (judged from the last request, no probe of its own).
//!
//! The Secret Management (`im-secrets-http`), Shard Manager (`im-shard-http`) and Logging
//! Service (`im-logging-http`) adapters each embed [`PlatformHttpSettings`] as their settings
//! and keep only what their contract adds.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use im_domain::ports::DependencyHealth;
use im_domain::retry::Backoff;
use im_domain::{DomainError, HumanDuration};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// How to reach one platform service: the `url`, `token`, `timeout`, `connect_timeout` and
/// `attempts` keys of its section of the configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct PlatformHttpSettings {
    /// Base URL, e.g. `https://secrets.platform.internal`; may carry a path prefix.
    pub url: String,
    /// Service token sent as `Authorization: Bearer`; a secret, never logged.
    pub token: SecretString,
    /// Timeout of one attempt, the answer's body included.
    pub timeout: HumanDuration,
    /// Timeout of establishing a connection.
    pub connect_timeout: HumanDuration,
    /// Attempts for a request that fails with a retryable error (1 to 10).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one (not configurable).
    #[serde(skip, default = "default_backoff")]
    pub backoff: Duration,
}

fn default_backoff() -> Duration {
    Duration::from_millis(100)
}

impl PlatformHttpSettings {
    /// The service at `url` with `token`, and the configuration's defaults for the rest: 5 s a
    /// try, 3 s to connect, 3 attempts 100 ms apart (then doubled).
    #[must_use]
    pub fn new(url: impl Into<String>, token: impl Into<SecretString>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            timeout: HumanDuration(Duration::from_secs(5)),
            connect_timeout: HumanDuration(Duration::from_secs(3)),
            attempts: 3,
            backoff: default_backoff(),
        }
    }

    /// The service at `url` on loopback, as the adapters' tests reach it: token `service-token`,
    /// 300 ms a try and to connect, 3 attempts 10 ms apart (then doubled).
    #[cfg(feature = "test-support")]
    #[must_use]
    pub fn for_tests(url: impl Into<String>) -> Self {
        Self {
            timeout: HumanDuration(Duration::from_millis(300)),
            connect_timeout: HumanDuration(Duration::from_millis(300)),
            backoff: Duration::from_millis(10),
            ..Self::new(url, "service-token")
        }
    }

    /// What types alone cannot check when the service is used (`section.backend` is `http`):
    /// every problem, as (key within the section, message).
    #[must_use]
    pub fn problems(&self, section: &str) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.base_url().is_none() {
            problems.push(("url", format!("is required (an http(s) URL) when {section}.backend is 'http'")));
        }
        if self.token.expose_secret().is_empty() {
            problems.push(("token", format!("is required when {section}.backend is 'http'")));
        }
        if self.timeout.is_zero() {
            problems.push(("timeout", "must be positive".to_owned()));
        }
        if self.connect_timeout.is_zero() {
            problems.push(("connect_timeout", "must be positive".to_owned()));
        }
        if !(1..=10).contains(&self.attempts) {
            problems.push(("attempts", "must be between 1 and 10".to_owned()));
        }
        problems
    }

    /// The `url` as the client will use it: an http(s) URL that can carry paths.
    #[must_use]
    pub fn base_url(&self) -> Option<url::Url> {
        url::Url::parse(&self.url).ok().filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
    }

    /// `{url}/{path}` with `path` appended to the base URL's own path (segments as given).
    #[must_use]
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}/{}", self.url.trim_end_matches('/'), path.trim_start_matches('/'))
    }

    /// The HTTP client: both timeouts, no redirects followed (a service that redirects is
    /// misconfigured, and a redirect would carry the token elsewhere).
    ///
    /// # Errors
    /// When the client cannot be built.
    pub fn client(&self) -> Result<reqwest::Client, DomainError> {
        reqwest::Client::builder()
            .timeout(self.timeout.get())
            .connect_timeout(self.connect_timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DomainError::Unexpected(e.into()))
    }

    /// The retry schedule: `attempts` tries, the first wait `backoff`, doubled up to `max`.
    #[must_use]
    pub fn retries(&self, max: Duration) -> Backoff {
        Backoff { attempts: self.attempts.max(1), first: self.backoff, max }
    }

    /// The service token, for `Authorization: Bearer`.
    #[must_use]
    pub fn token(&self) -> &str {
        self.token.expose_secret()
    }
}

/// A transport error's text without its URL: paths name tenants and secrets.
#[must_use]
pub fn without_url(error: reqwest::Error) -> String {
    error.without_url().to_string()
}

/// Why a request failed when it never got an answer: `timed out` or `cannot be reached: ...`.
#[must_use]
pub fn transport_reason(error: reqwest::Error) -> String {
    if error.is_timeout() { "timed out".to_owned() } else { format!("cannot be reached: {}", without_url(error)) }
}

/// The passive health of one service: ready until a request fails for the service's sake
/// (retries exhausted, the token refused), and ready again after the next success.
#[derive(Debug)]
pub struct PassiveHealth {
    name: &'static str,
    /// What the last request did, in the words of this service's contract: (succeeded, failed).
    details: (&'static str, &'static str),
    failing: Mutex<Option<String>>,
}

impl PassiveHealth {
    /// A service named `name` in `/health/ready`; `details` describe the last request
    /// when it succeeded and when it failed. The services are never critical: what needs them
    /// waits or answers 503, and nothing is lost.
    #[must_use]
    pub fn new(name: &'static str, details: (&'static str, &'static str)) -> Self {
        Self { name, details, failing: Mutex::default() }
    }

    /// Records the outcome of the last request: `None` after a success, else why it failed.
    pub fn record(&self, failing: Option<String>) {
        *self.failing.lock().unwrap_or_else(PoisonError::into_inner) = failing;
    }

    /// The service's name in `/health/ready`; never critical.
    #[must_use]
    pub fn describe(&self) -> (&'static str, bool) {
        (self.name, false)
    }

    /// The service's entry in `/health/ready`.
    #[must_use]
    pub fn report(&self) -> DependencyHealth {
        let failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner).clone();
        DependencyHealth {
            name: self.name.into(),
            ready: failing.is_none(),
            critical: false,
            detail: if failing.is_some() { self.details.1 } else { self.details.0 }.into(),
            diagnostic: failing.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> PlatformHttpSettings {
        PlatformHttpSettings { attempts: 1, ..PlatformHttpSettings::new(url, "t") }
    }

    #[test]
    fn problems_name_their_keys_and_the_section() {
        let mut bad = settings("shards.internal");
        bad.token = "".into();
        bad.attempts = 0;
        bad.connect_timeout = HumanDuration(Duration::ZERO);
        let problems = bad.problems("shard_manager");
        let keys: Vec<_> = problems.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["url", "token", "connect_timeout", "attempts"]);
        assert!(problems[0].1.contains("shard_manager.backend"), "{problems:?}");
        assert!(settings("http://127.0.0.1:9000/prefix").problems("logging").is_empty());
        for url in ["mailto:a@b.c", "ftp://files.internal", "", "https://"] {
            assert_eq!(settings(url).problems("secrets")[0].0, "url", "{url}");
        }
    }

    #[test]
    fn endpoints_keep_the_base_path() {
        assert_eq!(
            settings("https://logging.internal/base/").endpoint("/api/v1/audit-events"),
            "https://logging.internal/base/api/v1/audit-events"
        );
        assert_eq!(settings("https://logging.internal").endpoint("api/v1/x"), "https://logging.internal/api/v1/x");
    }

    #[test]
    fn health_follows_the_last_request() {
        let health = PassiveHealth::new("shard_manager", ("the last request succeeded", "the last request failed"));
        assert!(health.report().ready);
        health.record(Some("the Shard Manager timed out".into()));
        let report = health.report();
        assert!(!report.ready && !report.critical);
        assert_eq!((report.detail.as_str(), report.diagnostic.as_str()), ("the last request failed", "the Shard Manager timed out"));
        health.record(None);
        assert!(health.report().ready);
    }
}

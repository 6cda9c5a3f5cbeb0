//! Configuration: embedded commented defaults, then an optional TOML file, then environment
//! variables (`IM_` prefix, `__` between levels), then validation that names the bad key.
//!
//! Each adapter owns the settings of its section (`cosmos_db`: [`CosmosSettings`], `rabbitmq`:
//! [`RabbitSettings`], `auth`: [`AuthSettings`], the HTTP keys of `secrets`:
//! [`HttpSecretSettings`], its local key: [`LocalSecretSettings`], the sender's keys of
//! `webhooks`: [`WebhookSenderSettings`], `provider_client`: [`ProviderClientSettings`], the HTTP
//! keys of `shard_manager`: [`HttpShardSettings`] and of `logging`: [`HttpLoggingSettings`]); this
//! module only embeds them. Every section is read on its own and every problem is collected, so
//! one run reports every invalid key at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
pub use im_auth::{AuthMode, AuthSettings};
pub use im_bus_rabbitmq::RabbitSettings;
pub use im_domain::HumanDuration;
pub use im_logging_http::HttpLoggingSettings;
pub use im_secrets_http::HttpSecretSettings;
pub use im_secrets_local::LocalSecretSettings;
pub use im_shard_http::HttpShardSettings;
pub use im_store_cosmos::CosmosSettings;
pub use im_webhook_sender::WebhookSenderSettings;
pub use im_webhook_sender::provider::ProviderClientSettings;
pub use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The built-in defaults, every key commented.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub cosmos_db: CosmosSettings,
    pub events: EventSettings,
    pub rabbitmq: RabbitSettings,
    pub secrets: SecretSettings,
    pub webhooks: WebhookSettings,
    pub provider_client: ProviderClientSettings,
    pub auth: AuthSettings,
    pub oauth2: OAuth2Config,
    pub shard_manager: ShardManagerSettings,
    pub logging: LoggingSettings,
    pub metrics: MetricsSettings,
    pub rate_limits: RateLimitSettings,
    pub log: LogSettings,
    pub sync: SyncSettings,
}

/// The `sync` section: the sync worker (in roles `worker` and `all`) and its engine.
#[derive(Debug, Clone, Deserialize)]
pub struct SyncSettings {
    /// How often an instance looks for due sync tasks.
    pub poll_interval: HumanDuration,
    /// How long a claimed task stays held without a heartbeat (one per page); a run whose
    /// instance died is marked expired after it and resumed from its checkpoint.
    pub lease: HumanDuration,
    /// Runs at once on one instance.
    pub concurrency: usize,
    /// Consecutive failed runs after which a task is paused.
    pub failure_limit: u32,
    /// Records per provider page and per Shard Manager changes page.
    pub page_size: u32,
    /// How far before its checkpoint an incremental read starts again.
    pub lookback: HumanDuration,
}

/// The `oauth2` section: OAuth2 connections (authorizations and token refreshes).
#[derive(Debug, Clone, Deserialize)]
pub struct OAuth2Config {
    /// The public URL of `GET /api/v1/oauth2/callback`; empty: authorizations are refused.
    pub redirect_url: String,
    pub refresh_skew: HumanDuration,
    pub refresh_lease: HumanDuration,
    /// How long an authorization's `state` is accepted.
    pub state_ttl: HumanDuration,
    pub allow_http_return_url: bool,
    /// Base64 of at least 32 bytes; empty: a key file in the data directory. A secret.
    pub state_key: SecretString,
}

impl OAuth2Config {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let url = &self.redirect_url;
        if !url.is_empty() && im_domain::common::validate_redirect_url(url, true).is_err() {
            problems.push(("redirect_url", "must be empty or an absolute http(s) URL".to_owned()));
        }
        if self.refresh_skew.get() > std::time::Duration::from_secs(3600) {
            problems.push(("refresh_skew", "must be at most 1h".to_owned()));
        }
        if !(1..=600).contains(&self.refresh_lease.get().as_secs()) {
            problems.push(("refresh_lease", "must be between 1s and 10m".to_owned()));
        }
        if !(1..=3600).contains(&self.state_ttl.get().as_secs()) {
            problems.push(("state_ttl", "must be between 1s and 1h".to_owned()));
        }
        let key = secrecy::ExposeSecret::expose_secret(&self.state_key);
        if !key.is_empty() {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD.decode(key.trim());
            if !decoded.is_ok_and(|k| k.len() >= im_domain::oauth2::MIN_STATE_KEY_BYTES) {
                problems.push(("state_key", "must be empty or base64 of at least 32 bytes".to_owned()));
            }
        }
        problems
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformBackend {
    Embedded,
    Http,
}

/// The `shard_manager` section: `backend`, and the HTTP adapter's keys ([`HttpShardSettings`]).
#[derive(Debug, Clone)]
pub struct ShardManagerSettings {
    pub backend: PlatformBackend,
    pub http: HttpShardSettings,
}

#[derive(Deserialize)]
struct BackendChoice {
    backend: PlatformBackend,
}

/// The `logging` section: `backend`, the shipper's keys, and the HTTP sink's keys ([`HttpLoggingSettings`]).
#[derive(Debug, Clone)]
pub struct LoggingSettings {
    pub backend: PlatformBackend,
    pub shipper: AuditShipperSettings,
    pub http: HttpLoggingSettings,
}

/// The keys of `logging` for the buffer and its shipper.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditShipperSettings {
    pub batch_size: u32,
    pub interval: HumanDuration,
    pub max_backlog_age: HumanDuration,
}

/// The `rate_limits` section: API requests each tenant may make, per instance.
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub per_tenant: TenantRateLimit,
}

/// A token bucket: `rate` requests a second on average, up to `burst` at once (0: `rate`).
/// `rate = 0` turns the limit off.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct TenantRateLimit {
    pub rate: u32,
    pub burst: u32,
}

/// The `metrics` section: Prometheus metrics at `/metrics`.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    pub enabled: bool,
    /// When not empty, a scrape must send `Authorization: Bearer <token>`. A secret.
    pub token: SecretString,
    /// When not 0, `/metrics` is served on this port of `server.host` only, not on the API port.
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub body_limit_bytes: usize,
    /// What in-flight requests and background work get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: HumanDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Embedded,
    Cosmos,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    pub data_dir: PathBuf,
    pub ttl_sweep_interval: HumanDuration,
    /// The embedded database's WAL size, in MiB, past which it is copied back with writes held
    /// for a moment so that it starts over.
    pub wal_restart_mb: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretsBackend {
    Local,
    Http,
}

/// The `secrets` section: which store, the local store's key (`local_key`, read by
/// [`LocalSecretSettings`]), and the HTTP store's settings (the `url`, `token`, `timeout` and
/// `attempts` keys, read by [`HttpSecretSettings`]).
#[derive(Debug, Clone)]
pub struct SecretSettings {
    pub backend: SecretsBackend,
    pub local: LocalSecretSettings,
    /// With `storage.backend = "cosmos"`: every instance runs on the same `storage.data_dir`
    /// (one instance, or a shared volume), so the local secret store is the same for all.
    pub local_shared_data_dir: bool,
    pub http: HttpSecretSettings,
}

/// The keys of `secrets` that pick the store.
#[derive(Deserialize)]
struct SecretsChoice {
    backend: SecretsBackend,
    local_shared_data_dir: bool,
}

/// The `webhooks` section: the sender's keys (timeouts, destination policy, proxy: read by
/// [`WebhookSenderSettings`]) and those of endpoints and deliveries.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub sender: WebhookSenderSettings,
    pub service: WebhookServiceSettings,
}

/// The keys of `webhooks` for endpoints and deliveries.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookServiceSettings {
    pub retry_schedule: Vec<HumanDuration>,
    pub concurrency: usize,
    pub previous_secret_grace: HumanDuration,
    pub disable_after: HumanDuration,
    pub disable_min_failures: u32,
    pub max_endpoints_per_tenant: usize,
    pub manual_sends_per_minute: u32,
    pub first_attempt_in_fan_out: bool,
    pub hold_sweep_interval: HumanDuration,
}

impl EventSettings {
    /// Relay rounds that may be under way at once: as set, else 2 with RabbitMQ, whose rounds
    /// wait for the broker's confirms (the events written meanwhile then go in a round of their
    /// own, at light load), and 1 with the embedded bus, whose rounds wait for nothing of the
    /// kind (a second lane there only made rounds smaller).
    pub fn relay_lanes(&self) -> u32 {
        self.relay_lanes.unwrap_or(match self.backend {
            EventsBackend::Rabbitmq => 2,
            EventsBackend::Embedded => 1,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsBackend {
    Embedded,
    Rabbitmq,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventSettings {
    pub backend: EventsBackend,
    pub relay_batch_size: u32,
    /// Relay rounds that may be under way at once; unset: 2 with RabbitMQ (a round waits for
    /// the broker's confirms), 1 with the embedded bus ([`EventSettings::relay_lanes`]).
    #[serde(default)]
    pub relay_lanes: Option<u32>,
    /// Embedded store: events are handed to this process's relay at commit, claimed for it
    /// ([`crate::events::spawn_handoff`]).
    pub handoff: bool,
    pub outbox_max_age: HumanDuration,
    pub max_publish_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() { write!(f, "{}", self.message) } else { write!(f, "{}: {}", self.key, self.message) }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem of a configuration (at least one), in the order of the sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The keys named, in order.
    pub fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.key.as_str()).collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems", all.len())?;
                all.iter().try_for_each(|e| write!(f, "\n  {e}"))
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), message: message.into() }
}

/// Keys that were renamed, with their new names (their values became durations with a unit).
const RENAMED: [(&str, &str); 7] = [
    ("server.shutdown_timeout_secs", "server.shutdown_timeout"),
    ("storage.ttl_sweep_interval_secs", "storage.ttl_sweep_interval"),
    ("cosmos_db.request_timeout_secs", "cosmos_db.request_timeout"),
    ("events.outbox_max_age_secs", "events.outbox_max_age"),
    ("rabbitmq.confirm_timeout_secs", "rabbitmq.confirm_timeout"),
    ("auth.leeway_secs", "auth.leeway"),
    ("auth.token_ttl_secs", "auth.token_ttl"),
];

/// The layered configuration sources. `file` is `--config`, else `IM_CONFIG`.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Toml::string(DEFAULTS));
    let file = file.map(Path::to_owned).or_else(|| std::env::var_os("IM_CONFIG").map(PathBuf::from));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment.merge(Env::prefixed("IM_").split("__").ignore(&["config"]))
}

/// Reads sections one type at a time and collects every problem: a key whose value does not
/// deserialize is reported and read again as its built-in default, so the keys after it are
/// still checked; keys that no type of their section reads are reported at the end.
struct Reader {
    figment: Figment,
    defaults: Figment,
    read: BTreeMap<&'static str, BTreeSet<&'static str>>,
    errors: Vec<ConfigError>,
}

impl Reader {
    fn new(figment: Figment) -> Self {
        Self { figment, defaults: Figment::from(Toml::string(DEFAULTS)), read: BTreeMap::new(), errors: Vec::new() }
    }

    fn section<T: DeserializeOwned>(&mut self, section: &'static str) -> T {
        self.read.entry(section).or_default().extend(keys_of::<T>());
        let mut figment = self.figment.clone();
        for _ in 0..=keys_of::<T>().len() {
            match figment.focus(section).extract::<T>() {
                Ok(value) => return value,
                Err(error) => {
                    let Some(field) = error.path.first().cloned() else {
                        self.errors.push(describe(section, &error));
                        break;
                    };
                    let key = format!("{section}.{field}");
                    self.errors.push(describe(&key, &error));
                    match self.defaults.find_value(&key) {
                        Ok(default) => figment = figment.merge((key, default)),
                        Err(_) => break,
                    }
                }
            }
        }
        self.defaults.focus(section).extract().expect("the built-in defaults are valid")
    }

    /// Reports the sections and keys that nothing reads, naming the new key of a renamed one.
    fn unknown_keys(&mut self) {
        let Ok(root) = self.figment.extract::<figment::value::Dict>() else { return };
        for (section, value) in root {
            let Some(known) = self.read.get(section.as_str()) else {
                self.errors.push(err(&section, format!("unknown section '{section}'{}", self.source_of(&section))));
                continue;
            };
            let Some(dict) = value.into_dict() else { continue };
            for field in dict.keys().filter(|k| !known.contains(k.as_str())) {
                let key = format!("{section}.{field}");
                let hint = match RENAMED.iter().find(|(old, _)| *old == key) {
                    Some((_, new)) => format!(": renamed to '{new}', a duration such as 30s"),
                    None => String::new(),
                };
                let source = self.source_of(&key);
                self.errors.push(err(&key, format!("unknown key '{field}'{hint}{source}")));
            }
        }
    }

    fn source_of(&self, key: &str) -> String {
        self.figment.find_metadata(key).map(from).unwrap_or_default()
    }
}

/// Where a value came from, for people: ` (from TOML file /etc/im.toml)`.
fn from(metadata: &figment::Metadata) -> String {
    match &metadata.source {
        Some(figment::Source::File(path)) => format!(" (from {} {})", metadata.name, path.display()),
        _ => format!(" (from {})", metadata.name),
    }
}

/// An adapter's problems, named by their full keys.
fn section<K: fmt::Display>(problems: &mut Vec<ConfigError>, section: &str, found: Vec<(K, String)>) {
    problems.extend(found.into_iter().map(|(key, message)| err(&format!("{section}.{key}"), message)));
}

fn describe(key: &str, error: &figment::Error) -> ConfigError {
    let message = match &error.kind {
        figment::error::Kind::MissingField(field) => format!("missing key '{field}'"),
        kind => kind.to_string(),
    };
    let source = error.metadata.as_ref().map(from).unwrap_or_default();
    err(key, format!("{message}{source}"))
}

/// The keys a settings type reads, as its `Deserialize` implementation names them.
fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);
    impl fmt::Display for Fields {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }
    impl std::error::Error for Fields {}
    impl serde::de::Error for Fields {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Self(&[])
        }
    }
    struct Probe;
    impl<'de> serde::Deserializer<'de> for Probe {
        type Error = Fields;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit unit_struct
            newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Fields(fields)) => fields,
        Ok(_) => &[],
    }
}

impl Settings {
    /// Loads and validates the configuration.
    ///
    /// # Errors
    /// Every problem found, each naming its key.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        Self::from_figment(figment(file))
    }

    /// The built-in defaults alone (no file, no environment): a base for tests.
    ///
    /// # Panics
    /// Never: the defaults are checked by a test.
    pub fn defaults() -> Self {
        Self::from_figment(Figment::from(Toml::string(DEFAULTS))).expect("the built-in defaults are valid")
    }

    /// # Errors
    /// Every problem found, each naming its key.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigErrors> {
        let mut reader = Reader::new(figment);
        let settings = Settings {
            server: reader.section("server"),
            storage: reader.section("storage"),
            cosmos_db: reader.section("cosmos_db"),
            events: reader.section("events"),
            rabbitmq: reader.section("rabbitmq"),
            secrets: {
                let choice: SecretsChoice = reader.section("secrets");
                SecretSettings {
                    backend: choice.backend,
                    local: reader.section("secrets"),
                    local_shared_data_dir: choice.local_shared_data_dir,
                    http: reader.section("secrets"),
                }
            },
            webhooks: WebhookSettings { sender: reader.section("webhooks"), service: reader.section("webhooks") },
            provider_client: reader.section("provider_client"),
            auth: reader.section("auth"),
            oauth2: reader.section("oauth2"),
            shard_manager: {
                let choice: BackendChoice = reader.section("shard_manager");
                ShardManagerSettings { backend: choice.backend, http: reader.section("shard_manager") }
            },
            logging: {
                let choice: BackendChoice = reader.section("logging");
                LoggingSettings { backend: choice.backend, shipper: reader.section("logging"), http: reader.section("logging") }
            },
            metrics: reader.section("metrics"),
            rate_limits: reader.section("rate_limits"),
            log: reader.section("log"),
            sync: reader.section("sync"),
        };
        reader.unknown_keys();
        let mut errors = reader.errors;
        errors.extend(settings.validate());
        if errors.is_empty() { Ok(settings) } else { Err(ConfigErrors(errors)) }
    }

    /// Checks the values that types alone cannot; returns every problem found.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        fn check(problems: &mut Vec<ConfigError>, ok: bool, key: &str, message: &dyn Fn() -> String) {
            if !ok {
                problems.push(err(key, message()));
            }
        }
        let server = &self.server;
        check(&mut problems, server.host == "localhost" || server.host.parse::<IpAddr>().is_ok(), "server.host", &|| {
            format!("'{}' is not an IP address or 'localhost'", server.host)
        });
        check(&mut problems, (1024..=64 * 1024 * 1024).contains(&server.body_limit_bytes), "server.body_limit_bytes", &|| {
            "must be between 1024 and 67108864".into()
        });
        check(&mut problems, server.workers <= 1024, "server.workers", &|| "must be at most 1024".into());
        if self.storage.backend == StorageBackend::Cosmos {
            section(&mut problems, "cosmos_db", self.cosmos_db.problems());
        }
        check(&mut problems, !self.storage.data_dir.as_os_str().is_empty(), "storage.data_dir", &|| "must not be empty".into());
        check(&mut problems, self.storage.ttl_sweep_interval.get().as_secs() >= 1, "storage.ttl_sweep_interval", &|| {
            "must be at least 1s".into()
        });
        check(&mut problems, (8..=4096).contains(&self.storage.wal_restart_mb), "storage.wal_restart_mb", &|| {
            "must be between 8 and 4096".into()
        });
        check(&mut problems, (1..=10_000).contains(&self.events.relay_batch_size), "events.relay_batch_size", &|| {
            "must be between 1 and 10000".into()
        });
        check(&mut problems, self.events.relay_lanes.is_none_or(|lanes| (1..=16).contains(&lanes)), "events.relay_lanes", &|| {
            "must be between 1 and 16".into()
        });
        check(&mut problems, self.events.outbox_max_age.get().as_secs() >= 1, "events.outbox_max_age", &|| "must be at least 1s".into());
        check(&mut problems, (1..=1000).contains(&self.events.max_publish_attempts), "events.max_publish_attempts", &|| {
            "must be between 1 and 1000".into()
        });
        if self.events.backend == EventsBackend::Rabbitmq {
            section(&mut problems, "rabbitmq", self.rabbitmq.problems());
        }
        section(&mut problems, "provider_client", self.provider_client.problems());
        let sync = &self.sync;
        check(&mut problems, sync.poll_interval.get() >= std::time::Duration::from_millis(100), "sync.poll_interval", &|| {
            "must be at least 100ms".into()
        });
        check(&mut problems, sync.lease.get().as_secs() >= 5, "sync.lease", &|| "must be at least 5s".into());
        check(&mut problems, (1..=256).contains(&sync.concurrency), "sync.concurrency", &|| "must be between 1 and 256".into());
        check(&mut problems, (1..=1000).contains(&sync.failure_limit), "sync.failure_limit", &|| "must be between 1 and 1000".into());
        check(&mut problems, (1..=1000).contains(&sync.page_size), "sync.page_size", &|| "must be between 1 and 1000".into());
        check(
            &mut problems,
            (std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(3600))
                .contains(&self.webhooks.service.hold_sweep_interval.get()),
            "webhooks.hold_sweep_interval",
            &|| "must be between 100ms and 1h".into(),
        );
        check(
            &mut problems,
            (1..=10_000).contains(&self.webhooks.service.max_endpoints_per_tenant),
            "webhooks.max_endpoints_per_tenant",
            &|| "must be between 1 and 10000".into(),
        );
        check(
            &mut problems,
            (1..=10_000).contains(&self.webhooks.service.manual_sends_per_minute),
            "webhooks.manual_sends_per_minute",
            &|| "must be between 1 and 10000".into(),
        );
        let secrets = &self.secrets;
        check(
            &mut problems,
            !(self.storage.backend == StorageBackend::Cosmos && secrets.backend == SecretsBackend::Local && !secrets.local_shared_data_dir),
            "secrets.backend",
            &|| {
                "is 'local' while storage.backend is 'cosmos': every instance would keep signing secrets in its own data directory, \
                 so another instance could not sign for an endpoint created here. Set secrets.backend = 'http', or \
                 secrets.local_shared_data_dir = true when every instance runs on the same storage.data_dir"
                    .into()
            },
        );
        match secrets.backend {
            SecretsBackend::Local => {
                section(&mut problems, "secrets", secrets.local.problems());
                // Unused until the backend is switched, but never valid.
                check(&mut problems, !secrets.http.timeout.is_zero(), "secrets.timeout", &|| "must be positive".into());
            }
            SecretsBackend::Http => section(&mut problems, "secrets", secrets.http.problems("secrets")),
        }
        let webhooks = &self.webhooks.service;
        section(&mut problems, "webhooks", self.webhooks.sender.problems());
        check(&mut problems, webhooks.retry_schedule.len() <= 50, "webhooks.retry_schedule", &|| "must have at most 50 entries".into());
        check(&mut problems, (1..=10_000).contains(&webhooks.concurrency), "webhooks.concurrency", &|| {
            "must be between 1 and 10000".into()
        });
        section(&mut problems, "auth", self.auth.problems());
        section(&mut problems, "oauth2", self.oauth2.problems());
        if self.shard_manager.backend == PlatformBackend::Http {
            section(&mut problems, "shard_manager", self.shard_manager.http.problems("shard_manager"));
        }
        if self.logging.backend == PlatformBackend::Http {
            section(&mut problems, "logging", self.logging.http.problems("logging"));
        }
        let shipper = &self.logging.shipper;
        check(&mut problems, (1..=1000).contains(&shipper.batch_size), "logging.batch_size", &|| "must be between 1 and 1000".into());
        check(&mut problems, !shipper.interval.is_zero(), "logging.interval", &|| "must be positive".into());
        check(&mut problems, !shipper.max_backlog_age.is_zero(), "logging.max_backlog_age", &|| "must be positive".into());
        check(&mut problems, self.metrics.port == 0 || self.metrics.port != self.server.port, "metrics.port", &|| {
            "must differ from server.port (0: serve /metrics on the API port)".into()
        });
        let limit = self.rate_limits.per_tenant;
        check(&mut problems, limit.rate <= 1_000_000, "rate_limits.per_tenant.rate", &|| "must be at most 1000000".into());
        check(&mut problems, limit.burst <= 1_000_000, "rate_limits.per_tenant.burst", &|| "must be at most 1000000".into());
        check(&mut problems, tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(), "log.level", &|| {
            format!("'{}' is not a valid filter", self.log.level)
        });
        problems
    }

    /// The key file of the local secret store when `secrets.local_key` is empty.
    pub fn secrets_key_file(&self) -> PathBuf {
        self.storage.data_dir.join("secrets.key")
    }

    /// The key file used when `oauth2.state_key` is empty.
    pub fn oauth2_key_file(&self) -> PathBuf {
        self.storage.data_dir.join("oauth2-state.key")
    }

    /// The key file used when `auth.hs256_key` is empty.
    pub fn auth_key_file(&self) -> PathBuf {
        self.storage.data_dir.join("auth-hs256.key")
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;
    use secrecy::ExposeSecret as _;
    use std::time::Duration;

    fn set_all(jail: &mut Jail, variables: &[(&str, &str)]) {
        for (name, value) in variables {
            jail.set_env(name, value);
        }
    }

    fn keys(result: Result<Settings, ConfigErrors>) -> Vec<String> {
        result.expect_err("the configuration is refused").keys().into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn defaults_load() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.server.port, 3026);
            assert_eq!(s.server.shutdown_timeout.get(), Duration::from_secs(30));
            assert_eq!(s.storage.backend, StorageBackend::Embedded);
            assert_eq!(s.log.format, LogFormat::Pretty);
            assert_eq!(s.auth.mode, AuthMode::Local);
            assert_eq!(s.auth.token_ttl.get(), Duration::from_secs(3600));
            assert_eq!(s.cosmos_db.request_timeout.get(), Duration::from_secs(10));
            assert_eq!(s.rabbitmq.confirm_timeout.get(), Duration::from_secs(10));
            assert_eq!(s.secrets.http.timeout.get(), Duration::from_secs(5));
            Ok(())
        });
    }

    #[test]
    fn relay_lanes_default_by_backend_and_are_bounded() {
        Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.events.relay_lanes(), 1, "the embedded bus");
            set_all(jail, &[("IM_EVENTS__BACKEND", "rabbitmq"), ("IM_RABBITMQ__URL", "amqp://guest:guest@127.0.0.1:5672/%2f")]);
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.events.relay_lanes(), 2, "a broker");
            jail.set_env("IM_EVENTS__RELAY_LANES", "3");
            assert_eq!(Settings::load(None).map_err(|e| e.to_string())?.events.relay_lanes(), 3);
            jail.set_env("IM_EVENTS__RELAY_LANES", "0");
            assert_eq!(keys(Settings::load(None)), vec!["events.relay_lanes"]);
            Ok(())
        });
    }

    #[test]
    fn file_then_environment() {
        Jail::expect_with(|jail| {
            jail.create_file("im.toml", "[server]\nport = 4000\nhost = \"0.0.0.0\"\n[log]\nformat = \"json\"")?;
            jail.set_env("IM_SERVER__PORT", "5000");
            let s = Settings::load(Some(Path::new("im.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.port, 5000, "environment wins over the file");
            assert_eq!(s.server.host, "0.0.0.0", "the file wins over the defaults");
            assert_eq!(s.log.format, LogFormat::Json);
            jail.set_env("IM_CONFIG", "im.toml");
            jail.set_env("IM_SERVER__PORT", "5001");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!((s.server.port, s.server.host.as_str()), (5001, "0.0.0.0"), "IM_CONFIG names the file");
            Ok(())
        });
    }

    #[test]
    fn cosmos_with_local_secrets_needs_a_shared_data_dir() {
        Jail::expect_with(|jail| {
            jail.set_env("IM_STORAGE__BACKEND", "cosmos");
            jail.set_env("IM_COSMOS_DB__ENDPOINT", "https://localhost:8081");
            jail.set_env("IM_COSMOS_DB__KEY", "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==");
            let errors = Settings::load(None).unwrap_err();
            assert_eq!(errors.keys(), vec!["secrets.backend"]);
            let message = &errors.0[0].message;
            assert!(message.contains("storage.backend") && message.contains("local_shared_data_dir"), "{errors}");
            jail.set_env("IM_SECRETS__LOCAL_SHARED_DATA_DIR", "true");
            Settings::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn jwks_mode_needs_a_key_set_an_issuer_and_an_audience() {
        Jail::expect_with(|jail| {
            jail.set_env("IM_AUTH__MODE", "jwks");
            jail.set_env("IM_AUTH__ISSUER", "");
            let mut missing = keys(Settings::load(None));
            missing.sort_unstable();
            assert_eq!(missing, ["auth.audience", "auth.issuer", "auth.jwks_url"]);
            jail.set_env("IM_AUTH__ISSUER", "https://users.example");
            jail.set_env("IM_AUTH__AUDIENCE", "integration-manager");
            jail.set_env("IM_AUTH__JWKS_URL", "https://users.example/.well-known/jwks.json");
            jail.set_env("IM_AUTH__TENANT_CLAIM", "org");
            let s = Settings::load(None).expect("complete jwks settings load");
            assert_eq!((s.auth.mode, s.auth.jwks().tenant_claim.as_str()), (AuthMode::Jwks, "org"));
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("IM_SERVER__PORT", "not-a-port");
            assert_eq!(keys(Settings::load(None)), ["server.port"]);
            jail.set_env("IM_SERVER__PORT", "3026");
            jail.set_env("IM_LOG__FORMAT", "xml");
            assert_eq!(keys(Settings::load(None)), ["log.format"]);
            jail.set_env("IM_LOG__FORMAT", "json");
            jail.set_env("IM_SERVER__HOST", "not an address");
            assert_eq!(keys(Settings::load(None)), ["server.host"]);
            jail.set_env("IM_SERVER__HOST", "127.0.0.1");
            jail.set_env("IM_STORAGE__WAL_RESTART_MB", "4");
            assert_eq!(keys(Settings::load(None)), ["storage.wal_restart_mb"]);
            jail.set_env("IM_STORAGE__WAL_RESTART_MB", "8");
            assert!(Settings::load(None).is_ok());
            jail.set_env("IM_AUTH__HS256_KEY", "c2hvcnQ=");
            assert_eq!(keys(Settings::load(None)), ["auth.hs256_key"]);
            jail.set_env("IM_AUTH__HS256_KEY", "");
            jail.set_env("IM_SERVER__PROT", "1");
            let e = Settings::load(None).unwrap_err();
            assert_eq!(e.keys(), ["server.prot"]);
            assert!(e.to_string().contains("unknown key 'prot'") && e.to_string().contains("IM_"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn every_invalid_key_is_reported_at_once() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "bad.toml",
                r#"
                [server]
                port = "high"
                workers = "many"
                body_limit_bytes = 10
                [storage]
                backend = "cosmos"
                [cosmos_db]
                request_timeout = "soon"
                [secrets]
                timeout = "0s"
                surprise = true
                local_key = "c2hvcnQ="
                [webhooks]
                proxy = "egress:3128"
                connect_timeout = "0s"
                allowed_private_cidrs = ["10.0.0.0/8", "10.0.0.0/40"]
                [auth]
                mode = "ldap"
                leeway_secs = 30
                [nonsense]
                x = 1
                "#,
            )?;
            jail.set_env("IM_LOG__FORMAT", "xml");
            let e = Settings::load(Some(Path::new("bad.toml"))).unwrap_err();
            let mut found = e.keys();
            found.sort_unstable();
            assert_eq!(
                found,
                [
                    "auth.leeway_secs",
                    "auth.mode",
                    "cosmos_db.endpoint",
                    "cosmos_db.key",
                    "cosmos_db.request_timeout",
                    "log.format",
                    "nonsense",
                    "secrets.backend",
                    "secrets.local_key",
                    "secrets.surprise",
                    "secrets.timeout",
                    "server.body_limit_bytes",
                    "server.port",
                    "server.workers",
                    "webhooks.allowed_private_cidrs[1]",
                    "webhooks.connect_timeout",
                    "webhooks.proxy",
                ],
                "{e}"
            );
            let text = e.to_string();
            assert!(text.starts_with("17 problems"), "{text}");
            assert!(text.contains("auth.leeway_secs: unknown key 'leeway_secs': renamed to 'auth.leeway'"), "{text}");
            assert!(text.contains("server.port: invalid type") && text.contains("bad.toml"), "the source is named: {text}");
            assert!(text.contains("cosmos_db.request_timeout: 'soon' is not a duration"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn durations() {
        Jail::expect_with(|jail| {
            jail.set_env("IM_WEBHOOKS__PREVIOUS_SECRET_GRACE", "90m");
            jail.set_env("IM_AUTH__LEEWAY", "250ms");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.webhooks.service.previous_secret_grace.get(), Duration::from_secs(5400));
            assert_eq!(s.auth.leeway.get(), Duration::from_millis(250));
            jail.set_env("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/88\"]");
            assert_eq!(keys(Settings::load(None)), ["webhooks.allowed_private_cidrs[0]"]);
            jail.set_env("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[]");
            jail.set_env("IM_WEBHOOKS__PROXY", "egress:3128");
            assert_eq!(Settings::load(None).unwrap_err().keys(), vec!["webhooks.proxy"]);
            jail.set_env("IM_WEBHOOKS__PROXY", "http://egress.internal:3128");
            assert_eq!(
                Settings::load(None).map_err(|e| e.to_string())?.webhooks.sender.proxy.expose_secret(),
                "http://egress.internal:3128"
            );
            jail.set_env("IM_SECRETS__TIMEOUT", "soon");
            assert_eq!(keys(Settings::load(None)), ["secrets.timeout"]);
            jail.set_env("IM_SECRETS__TIMEOUT", "5s");
            jail.set_env("IM_SERVER__SHUTDOWN_TIMEOUT_SECS", "5");
            assert_eq!(keys(Settings::load(None)), ["server.shutdown_timeout_secs"]);
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        Jail::expect_with(|jail| {
            set_all(
                jail,
                &[
                    ("IM_STORAGE__BACKEND", "cosmos"),
                    ("IM_SECRETS__LOCAL_SHARED_DATA_DIR", "true"),
                    ("IM_COSMOS_DB__ENDPOINT", "https://localhost:8081/"),
                    ("IM_COSMOS_DB__KEY", "aHVudGVyMmh1bnRlcjI="),
                    ("IM_RABBITMQ__URL", "amqp://user:hunter3@localhost/"),
                    ("IM_SECRETS__TOKEN", "hunter4"),
                    ("IM_AUTH__HS256_KEY", "aHVudGVyNWh1bnRlcjVodW50ZXI1aHVudGVyNWh1bnRlcjU="),
                    ("IM_SECRETS__LOCAL_KEY", "aHVudGVyNmh1bnRlcjZodW50ZXI2aHVudGVyNmh1bnQ="),
                    ("IM_WEBHOOKS__PROXY", "http://egress:hunter7@proxy.internal:3128"),
                    ("IM_SHARD_MANAGER__TOKEN", "hunter8"),
                    ("IM_LOGGING__TOKEN", "hunter9"),
                ],
            );
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            let printed = format!("{s:?}");
            for secret in [
                "aHVudGVyMmh1bnRlcjI=",
                "hunter3",
                "hunter4",
                "aHVudGVyNWh1bnRlcjVodW50ZXI1aHVudGVyNWh1bnRlcjU=",
                "aHVudGVyNmh1bnRlcjZodW50ZXI2aHVudGVyNmh1bnQ=",
                "hunter7",
                "hunter8",
                "hunter9",
            ] {
                assert!(!printed.contains(secret), "{secret} printed in {printed}");
            }
            Ok(())
        });
    }

    #[test]
    fn adapter_checks_name_their_keys() {
        Jail::expect_with(|jail| {
            set_all(
                jail,
                &[
                    ("IM_EVENTS__BACKEND", "rabbitmq"),
                    ("IM_RABBITMQ__URL", "http://broker"),
                    ("IM_RABBITMQ__EXCHANGE", "amq.topic"),
                    ("IM_RABBITMQ__CONFIRM_TIMEOUT", "500ms"),
                    ("IM_RABBITMQ__OPERATION_TIMEOUT", "0s"),
                    ("IM_RABBITMQ__JOBS_PER_MESSAGE", "0"),
                    ("IM_SECRETS__BACKEND", "http"),
                    ("IM_SECRETS__ATTEMPTS", "0"),
                    ("IM_AUTH__TOKEN_TTL", "0s"),
                ],
            );
            assert_eq!(
                keys(Settings::load(None)),
                [
                    "rabbitmq.url",
                    "rabbitmq.exchange",
                    "rabbitmq.jobs_per_message",
                    "rabbitmq.confirm_timeout",
                    "rabbitmq.operation_timeout",
                    "secrets.url",
                    "secrets.token",
                    "secrets.attempts",
                    "auth.token_ttl"
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn platform_services_need_a_url_and_a_token_over_http() {
        Jail::expect_with(|jail| {
            set_all(jail, &[("IM_SHARD_MANAGER__BACKEND", "http"), ("IM_LOGGING__BACKEND", "http"), ("IM_LOGGING__BATCH_SIZE", "0")]);
            assert_eq!(
                keys(Settings::load(None)),
                ["shard_manager.url", "shard_manager.token", "logging.url", "logging.token", "logging.batch_size"]
            );
            set_all(
                jail,
                &[
                    ("IM_SHARD_MANAGER__URL", "https://shards.internal"),
                    ("IM_SHARD_MANAGER__TOKEN", "s"),
                    ("IM_SHARD_MANAGER__CONNECT_TIMEOUT", "250ms"),
                    ("IM_LOGGING__URL", "https://logging.internal"),
                    ("IM_LOGGING__TOKEN", "l"),
                    ("IM_LOGGING__BATCH_SIZE", "50"),
                ],
            );
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!((s.shard_manager.backend, s.logging.backend), (PlatformBackend::Http, PlatformBackend::Http));
            assert_eq!(s.shard_manager.http.connect_timeout.get(), Duration::from_millis(250));
            assert_eq!(s.logging.shipper.batch_size, 50);
            Ok(())
        });
    }

    #[test]
    fn keys_of_names_what_a_section_reads() {
        assert_eq!(keys_of::<LogSettings>(), ["format", "level"]);
        assert!(keys_of::<HttpSecretSettings>().contains(&"token") && !keys_of::<HttpSecretSettings>().contains(&"backoff"));
    }
}

//! Configuration: embedded commented defaults, then an optional TOML file, then environment
//! variables (`IM_` prefix, `__` between levels), then validation that names the bad key.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// The built-in defaults, every key commented.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub cosmos_db: CosmosDbSettings,
    pub events: EventSettings,
    pub rabbitmq: RabbitSettings,
    pub secrets: SecretSettings,
    pub webhooks: WebhookSettings,
    pub auth: AuthSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub workers: usize,
    pub body_limit_bytes: usize,
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Embedded,
    Cosmos,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    pub data_dir: PathBuf,
    pub ttl_sweep_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosmosDbSettings {
    pub endpoint: String,
    pub key: Secret,
    pub database: String,
    pub emulator: bool,
    pub request_timeout_secs: u64,
    pub preferred_regions: Vec<String>,
    pub max_throttle_retries: u32,
    pub auto_provision: bool,
}

/// A duration written with a unit: `250ms`, `5s`, `30m`, `2h`, `5d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub std::time::Duration);

impl HumanDuration {
    /// # Errors
    /// A message when the text is not a number followed by ms, s, m, h or d.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("'{text}' is not a duration such as 500ms, 5s, 30m, 2h or 5d"))?;
        let millis = match unit {
            "ms" => n,
            "s" => n * 1000,
            "m" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            _ => return Err(format!("'{text}' is not a duration such as 500ms, 5s, 30m, 2h or 5d")),
        };
        Ok(Self(std::time::Duration::from_millis(millis)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretsBackend {
    Local,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSettings {
    pub backend: SecretsBackend,
    pub local_key: Secret,
    pub url: String,
    pub token: Secret,
    pub timeout: HumanDuration,
    pub attempts: u32,
    /// With `storage.backend = "cosmos"`: every instance runs on the same `storage.data_dir`
    /// (one instance, or a shared volume), so the local secret store is the same for all.
    pub local_shared_data_dir: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub retry_schedule: Vec<HumanDuration>,
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    pub concurrency: usize,
    pub allowed_private_cidrs: Vec<String>,
    pub allow_http: bool,
    pub previous_secret_grace: HumanDuration,
    pub disable_after: HumanDuration,
    pub disable_min_failures: u32,
    pub max_endpoints_per_tenant: usize,
}

impl WebhookSettings {
    /// The destination policy of endpoint URLs and delivery connections.
    pub fn url_policy(&self) -> im_domain::webhooks::endpoint::UrlPolicy {
        im_domain::webhooks::endpoint::UrlPolicy {
            allow_http: self.allow_http,
            allowed_private: self.allowed_private_cidrs.iter().filter_map(|c| im_domain::webhooks::endpoint::Cidr::parse(c).ok()).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsBackend {
    Embedded,
    Rabbitmq,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub backend: EventsBackend,
    pub relay_batch_size: u32,
    pub outbox_max_age_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSettings {
    pub url: Secret,
    pub exchange: String,
    pub confirm_timeout_secs: u64,
    pub delivery_queue_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Local,
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(<empty>)" } else { "Secret(<redacted>)" })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    pub hs256_key: Secret,
    pub issuer: String,
    pub audience: String,
    pub leeway_secs: u64,
    pub token_ttl_secs: i64,
}

impl AuthSettings {
    pub fn issuer(&self) -> Option<String> {
        Some(self.issuer.clone()).filter(|s| !s.is_empty())
    }

    pub fn audience(&self) -> Option<String> {
        Some(self.audience.clone()).filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
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

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), message: message.into() }
}

/// The layered configuration sources. `file` is `--config`, else `IM_CONFIG`.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Toml::string(DEFAULTS));
    let file = file.map(Path::to_owned).or_else(|| std::env::var_os("IM_CONFIG").map(PathBuf::from));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment.merge(Env::prefixed("IM_").split("__").ignore(&["config"]))
}

impl Settings {
    /// Loads and validates the configuration.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
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
    /// The first problem found, naming its key.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let message = match &e.kind {
                figment::error::Kind::UnknownField(field, _) => format!("unknown key '{field}'"),
                figment::error::Kind::MissingField(field) => format!("missing key '{field}'"),
                _ => e.kind.to_string(),
            };
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            err(&key, format!("{message}{source}"))
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that types alone cannot.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.host != "localhost" && self.server.host.parse::<IpAddr>().is_err() {
            return Err(err("server.host", format!("'{}' is not an IP address or 'localhost'", self.server.host)));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.server.body_limit_bytes) {
            return Err(err("server.body_limit_bytes", "must be between 1024 and 67108864"));
        }
        if self.server.workers > 1024 {
            return Err(err("server.workers", "must be at most 1024"));
        }
        if self.storage.backend == StorageBackend::Cosmos {
            let endpoint = &self.cosmos_db.endpoint;
            if endpoint.is_empty() {
                return Err(err("cosmos_db.endpoint", "is required when storage.backend is 'cosmos'"));
            }
            if !endpoint.starts_with("https://") || endpoint.contains(char::is_whitespace) {
                return Err(err("cosmos_db.endpoint", format!("'{endpoint}' is not an https:// account endpoint")));
            }
            use base64::Engine as _;
            if self.cosmos_db.key.is_empty() || base64::engine::general_purpose::STANDARD.decode(self.cosmos_db.key.expose()).is_err() {
                return Err(err("cosmos_db.key", "is required (the account key, base64) when storage.backend is 'cosmos'"));
            }
            let db = &self.cosmos_db.database;
            if db.is_empty() || db.len() > 255 || db.contains(['/', '\\', '?', '#']) {
                return Err(err("cosmos_db.database", "must be 1 to 255 characters without '/', '\\', '?' or '#'"));
            }
            if self.cosmos_db.request_timeout_secs == 0 {
                return Err(err("cosmos_db.request_timeout_secs", "must be at least 1"));
            }
            if self.cosmos_db.max_throttle_retries > 20 {
                return Err(err("cosmos_db.max_throttle_retries", "must be at most 20"));
            }
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(err("storage.data_dir", "must not be empty"));
        }
        if self.storage.ttl_sweep_interval_secs == 0 {
            return Err(err("storage.ttl_sweep_interval_secs", "must be at least 1"));
        }
        if !(1..=10_000).contains(&self.events.relay_batch_size) {
            return Err(err("events.relay_batch_size", "must be between 1 and 10000"));
        }
        if self.events.backend == EventsBackend::Rabbitmq {
            let url = self.rabbitmq.url.expose();
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(err("rabbitmq.url", "must be an amqp:// or amqps:// URL"));
            }
            let valid_name =
                |n: &str| !n.is_empty() && n.len() <= 255 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !valid_name(&self.rabbitmq.exchange) || self.rabbitmq.exchange.starts_with("amq.") {
                return Err(err("rabbitmq.exchange", "must be 1 to 255 of letters, digits, '-', '_', '.', ':' and not start with 'amq.'"));
            }
            if !valid_name(&self.rabbitmq.delivery_queue_prefix) || self.rabbitmq.delivery_queue_prefix.starts_with("amq.") {
                return Err(err(
                    "rabbitmq.delivery_queue_prefix",
                    "must be 1 to 255 of letters, digits, '-', '_', '.', ':' and not start with 'amq.'",
                ));
            }
            if self.rabbitmq.confirm_timeout_secs == 0 {
                return Err(err("rabbitmq.confirm_timeout_secs", "must be at least 1"));
            }
        }
        if !(1..=10_000).contains(&self.webhooks.max_endpoints_per_tenant) {
            return Err(err("webhooks.max_endpoints_per_tenant", "must be between 1 and 10000"));
        }
        if self.storage.backend == StorageBackend::Cosmos
            && self.secrets.backend == SecretsBackend::Local
            && !self.secrets.local_shared_data_dir
        {
            return Err(err(
                "secrets.backend",
                "is 'local' while storage.backend is 'cosmos': every instance would keep signing secrets in its own data directory, \
                 so another instance could not sign for an endpoint created here. Set secrets.backend = 'http', or \
                 secrets.local_shared_data_dir = true when every instance runs on the same storage.data_dir",
            ));
        }
        match self.secrets.backend {
            SecretsBackend::Local if !self.secrets.local_key.is_empty() => {
                if im_secrets_local::parse_key(self.secrets.local_key.expose()).is_err() {
                    return Err(err("secrets.local_key", "must be base64 of 32 bytes"));
                }
            }
            SecretsBackend::Http => {
                if !(self.secrets.url.starts_with("https://") || self.secrets.url.starts_with("http://")) {
                    return Err(err("secrets.url", "is required (an http(s) URL) when secrets.backend is 'http'"));
                }
                if self.secrets.token.is_empty() {
                    return Err(err("secrets.token", "is required when secrets.backend is 'http'"));
                }
                if !(1..=10).contains(&self.secrets.attempts) {
                    return Err(err("secrets.attempts", "must be between 1 and 10"));
                }
            }
            SecretsBackend::Local => {}
        }
        for (i, cidr) in self.webhooks.allowed_private_cidrs.iter().enumerate() {
            if let Err(reason) = im_domain::webhooks::endpoint::Cidr::parse(cidr) {
                return Err(err(&format!("webhooks.allowed_private_cidrs[{i}]"), reason));
            }
        }
        if self.webhooks.retry_schedule.len() > 50 {
            return Err(err("webhooks.retry_schedule", "must have at most 50 entries"));
        }
        if self.webhooks.request_timeout.0.is_zero() {
            return Err(err("webhooks.request_timeout", "must be positive"));
        }
        if self.webhooks.connect_timeout.0.is_zero() {
            return Err(err("webhooks.connect_timeout", "must be positive"));
        }
        if !(1..=10_000).contains(&self.webhooks.concurrency) {
            return Err(err("webhooks.concurrency", "must be between 1 and 10000"));
        }
        if self.secrets.timeout.0.is_zero() {
            return Err(err("secrets.timeout", "must be positive"));
        }
        if !self.auth.hs256_key.is_empty() {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(self.auth.hs256_key.expose()) {
                Ok(key) if key.len() >= im_auth::MIN_KEY_BYTES => {}
                _ => return Err(err("auth.hs256_key", format!("must be base64 of at least {} bytes", im_auth::MIN_KEY_BYTES))),
            }
        }
        if self.auth.token_ttl_secs <= 0 {
            return Err(err("auth.token_ttl_secs", "must be positive"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(err("log.level", format!("'{}' is not a valid filter", self.log.level)));
        }
        Ok(())
    }

    /// The key file of the local secret store when `secrets.local_key` is empty.
    pub fn secrets_key_file(&self) -> PathBuf {
        self.storage.data_dir.join("secrets.key")
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

    #[test]
    fn defaults_load() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.server.port, 3026);
            assert_eq!(s.storage.backend, StorageBackend::Embedded);
            assert_eq!(s.log.format, LogFormat::Pretty);
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
            let error = Settings::load(None).unwrap_err();
            assert_eq!(error.key, "secrets.backend");
            assert!(error.message.contains("storage.backend") && error.message.contains("local_shared_data_dir"), "{error}");
            jail.set_env("IM_SECRETS__LOCAL_SHARED_DATA_DIR", "true");
            Settings::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("IM_SERVER__PORT", "not-a-port");
            assert_eq!(Settings::load(None).unwrap_err().key, "server.port");
            jail.set_env("IM_SERVER__PORT", "3026");
            jail.set_env("IM_LOG__FORMAT", "xml");
            assert_eq!(Settings::load(None).unwrap_err().key, "log.format");
            jail.set_env("IM_LOG__FORMAT", "json");
            jail.set_env("IM_SERVER__HOST", "not an address");
            assert_eq!(Settings::load(None).unwrap_err().key, "server.host");
            jail.set_env("IM_SERVER__HOST", "127.0.0.1");
            jail.set_env("IM_AUTH__HS256_KEY", "c2hvcnQ=");
            assert_eq!(Settings::load(None).unwrap_err().key, "auth.hs256_key");
            jail.set_env("IM_AUTH__HS256_KEY", "");
            jail.set_env("IM_SERVER__PROT", "1");
            let e = Settings::load(None).unwrap_err();
            assert!(e.to_string().contains("prot"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn durations() {
        assert_eq!(HumanDuration::parse("250ms").unwrap().0, std::time::Duration::from_millis(250));
        assert_eq!(HumanDuration::parse("5d").unwrap().0, std::time::Duration::from_secs(5 * 86_400));
        assert!(HumanDuration::parse("5 parsecs").is_err());
        Jail::expect_with(|jail| {
            jail.set_env("IM_WEBHOOKS__PREVIOUS_SECRET_GRACE", "90m");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.webhooks.previous_secret_grace.0, std::time::Duration::from_secs(5400));
            jail.set_env("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[\"127.0.0.0/88\"]");
            assert_eq!(Settings::load(None).unwrap_err().key, "webhooks.allowed_private_cidrs[0]");
            jail.set_env("IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS", "[]");
            jail.set_env("IM_SECRETS__TIMEOUT", "soon");
            assert_eq!(Settings::load(None).unwrap_err().key, "secrets.timeout");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}

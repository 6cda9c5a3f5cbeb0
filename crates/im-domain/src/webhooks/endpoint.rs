//! Webhook endpoints: where a tenant receives the service's events.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::{IntegrationId, TenantId, UserId, validate_text, validate_url};
use crate::error::{DomainError, FieldViolation, Violations};
use crate::events::{DomainEvent, EventType};
use crate::secrets::SecretRef;

/// Identifier of a webhook endpoint (UUID v7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookId(pub Uuid);

impl WebhookId {
    pub fn parse(value: &str) -> Option<Self> {
        Uuid::try_parse(value).ok().map(Self)
    }
}

impl fmt::Display for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    Enabled,
    Disabled,
}

/// Event types an endpoint may subscribe to. `webhook.delivered` and `webhook.failed` are
/// published on the bus but never delivered to webhooks (no loops).
pub const DELIVERABLE: [EventType; 4] =
    [EventType::IntegrationCreated, EventType::IntegrationUpdated, EventType::IntegrationDeleted, EventType::SyncTaskCompleted];

/// The test event of `POST /webhooks/{id}/test`, delivered whatever the filters.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// Headers the service sets itself; an endpoint's custom headers cannot override them.
pub const RESERVED_HEADERS: [&str; 9] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "transfer-encoding",
    "connection",
];

/// Whether a filter (`integration.created`, `integration.*`, `*`) matches an event type.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// Checks an event-type filter: an exact deliverable type, or a wildcard that matches one.
pub fn validate_event_pattern(pattern: &str) -> Result<(), FieldViolation> {
    let known = DELIVERABLE.iter().any(|t| pattern_matches(pattern, t.as_str()));
    let well_formed = pattern == "*" || pattern.strip_suffix(".*").map_or(!pattern.contains('*'), |p| !p.is_empty() && !p.contains('*'));
    if !well_formed || !known {
        let names: Vec<_> = DELIVERABLE.iter().map(|t| t.as_str()).collect();
        return Err(FieldViolation::invalid("", format!("must be one of {} or a wildcard such as integration.*", names.join(", "))));
    }
    Ok(())
}

/// Which destinations are acceptable: https only unless `allow_http`; literal private,
/// loopback, link-local... addresses only inside `allowed_private` (SSRF protection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    pub allow_http: bool,
    pub allowed_private: Vec<Cidr>,
}

/// An IP network, `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// # Errors
    /// A message when the text is not a CIDR.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = text.split_once('/').ok_or_else(|| format!("'{text}' is not a CIDR such as 127.0.0.0/8"))?;
        let network: IpAddr = ip.parse().map_err(|_| format!("'{ip}' is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 =
            prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| format!("'/{prefix}' is not a prefix length up to {max}"))?;
        Ok(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                    IpAddr::V4(std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
                } else {
                    ip
                }
            }
        },
        v4 => v4,
    }
}

/// Why an address may not be a webhook destination, or `None` when it is a public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if o[0] == 100 && (64..128).contains(&o[1]) {
                Some("carrier-grade NAT")
            } else if v4.is_multicast() || o[0] >= 224 {
                Some("multicast or reserved")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast()
                || v4.is_documentation()
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
            {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("reserved")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                Some("NAT64")
            } else {
                None
            }
        }
    }
}

impl UrlPolicy {
    /// Whether the policy lets a request go to `ip`.
    ///
    /// # Errors
    /// The reason the address is refused.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        match forbidden_reason(ip) {
            None => Ok(()),
            Some(_) if self.allowed_private.iter().any(|c| c.contains(ip)) => Ok(()),
            Some(reason) => Err(format!("{ip} is a {reason} address")),
        }
    }

    /// Checks an endpoint URL: scheme, shape, and a literal address against the policy.
    pub fn check_url(&self, url: &str) -> Result<(), FieldViolation> {
        validate_url(url, self.allow_http)?;
        if let Some(ip) = literal_host(url) {
            self.check_ip(ip).map_err(|reason| FieldViolation::invalid("", format!("is not an allowed destination: {reason}")))?;
        }
        Ok(())
    }
}

/// The host of a URL when it is a literal IP address.
pub fn literal_host(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h).parse().ok()
}

/// What a tenant states about an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSpec {
    pub url: String,
    pub description: String,
    /// Empty: every deliverable event.
    pub event_types: Vec<String>,
    /// Empty: events of every integration.
    pub integration_ids: Vec<IntegrationId>,
    /// `None`: enabled for a new endpoint, unchanged on update.
    pub status: Option<WebhookStatus>,
    pub headers: BTreeMap<String, String>,
    pub rate_limit_per_second: Option<u32>,
}

impl WebhookSpec {
    /// Checks every rule; `policy` decides which destinations are acceptable.
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing every offending field.
    pub fn validate(&self, policy: &UrlPolicy) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.check("url", policy.check_url(&self.url));
        v.check("description", validate_text(&self.description, 0, 1000));
        if self.event_types.len() > 50 {
            v.invalid("eventTypes", "must have at most 50 entries");
        }
        for (i, pattern) in self.event_types.iter().enumerate() {
            v.check(&format!("eventTypes[{i}]"), validate_event_pattern(pattern));
        }
        if self.integration_ids.len() > 100 {
            v.invalid("integrationIds", "must have at most 100 entries");
        }
        if self.headers.len() > 20 {
            v.invalid("headers", "must have at most 20 headers");
        }
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            let lower = name.to_ascii_lowercase();
            if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)) {
                v.invalid(field, "is not a valid header name");
            } else if RESERVED_HEADERS.contains(&lower.as_str()) {
                v.invalid(field, "is set by the service and cannot be overridden");
            } else if value.len() > 4096 || value.chars().any(|c| c.is_control() && c != '\t') {
                v.invalid(field, "must be at most 4096 characters without control characters");
            }
        }
        if let Some(rate) = self.rate_limit_per_second
            && !(1..=10_000).contains(&rate)
        {
            v.invalid("rateLimitPerSecond", "must be between 1 and 10000");
        }
        v.finish(|| ())
    }
}

/// A signing secret that still signs after a rotation, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousSecret {
    pub secret: SecretRef,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// An endpoint as stored. The signing secret is only referenced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: WebhookId,
    pub tenant_id: TenantId,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub integration_ids: Vec<IntegrationId>,
    pub status: WebhookStatus,
    pub disabled_reason: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub rate_limit_per_second: Option<u32>,
    pub secret: SecretRef,
    pub previous_secret: Option<PreviousSecret>,
    /// Since when every attempt has failed (none succeeded since); `None` while healthy.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub failing_since: Option<OffsetDateTime>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: UserId,
    pub updated_by: UserId,
}

impl Webhook {
    /// Whether this endpoint wants `event` (status aside: a disabled endpoint records it as skipped).
    pub fn wants(&self, event: &DomainEvent) -> bool {
        let type_ok = self.event_types.is_empty() || self.event_types.iter().any(|p| pattern_matches(p, event.event_type.as_str()));
        let deliverable = DELIVERABLE.contains(&event.event_type);
        let integration_ok = self.integration_ids.is_empty()
            || event
                .data
                .get("integrationId")
                .or_else(|| event.data.get("id"))
                .and_then(|v| v.as_str())
                .is_some_and(|id| self.integration_ids.iter().any(|i| i.to_string() == id));
        deliverable && type_ok && integration_ok && event.tenant_id == self.tenant_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("integration.*", "integration.created"));
        assert!(pattern_matches("*", "sync.task.completed"));
        assert!(!pattern_matches("integration.created", "integration.updated"));
        for ok in ["integration.created", "integration.*", "*", "sync.*", "sync.task.completed"] {
            assert!(validate_event_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["webhook.delivered", "webhook.*", "integration", "integ*ration", "nothing.*", ""] {
            assert!(validate_event_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssrf_classes() {
        for (ip, class) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("224.0.0.1", "multicast or reserved"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("::10.0.0.1", "private"),
        ] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), Some(class), "{ip}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert_eq!(forbidden_reason(public.parse().unwrap()), None, "{public}");
        }
    }

    #[test]
    fn allowlists_open_exceptions() {
        let policy = UrlPolicy { allow_http: true, allowed_private: vec![Cidr::parse("127.0.0.0/8").unwrap()] };
        assert!(policy.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(policy.check_ip("::ffff:127.0.0.2".parse().unwrap()).is_ok());
        assert!(policy.check_ip("10.0.0.1".parse().unwrap()).is_err());
        assert!(policy.check_url("http://127.0.0.1:8080/hook").is_ok());
        let strict = UrlPolicy::default();
        assert!(strict.check_url("https://127.0.0.1/hook").is_err());
        assert!(strict.check_url("https://[::1]/hook").is_err());
        assert!(strict.check_url("https://169.254.169.254/latest").is_err());
        assert!(strict.check_url("http://example.com/hook").is_err());
        assert!(strict.check_url("https://example.com/hook").is_ok());
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }
}

//! Webhook endpoints: where a tenant receives the service's events.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::{IntegrationId, TenantId, UserId, validate_text};
use crate::error::{DomainError, FieldViolation, Violations};
use crate::events::{DomainEvent, EventType};
use crate::secrets::SecretRef;

crate::common::uuid_id!(
    /// Identifier of a webhook endpoint (UUID v7).
    WebhookId
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    Enabled,
    Disabled,
}

/// Event types an endpoint may subscribe to. `webhook.delivered` and `webhook.failed` are
/// published on the bus but never delivered to webhooks (no loops).
pub const DELIVERABLE: [EventType; 8] = [
    EventType::IntegrationCreated,
    EventType::IntegrationUpdated,
    EventType::IntegrationDeleted,
    EventType::SyncTaskCompleted,
    EventType::SyncTaskPaused,
    EventType::ConnectionCreated,
    EventType::ConnectionDeleted,
    EventType::ConnectionFailed,
];

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

/// How a custom header value is shown on every read. Header values are secrets (an
/// `Authorization` header, say): they live in the secret store, the endpoint's document keeps the
/// names with this mask, and an update that sends the mask back keeps the stored value.
pub const HEADER_MASK: &str = "••••";

/// The URL without a user name or password (such URLs are refused now, but an endpoint stored
/// earlier may have one): what events and logs may show.
pub fn without_credentials(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.into()
        }
        Ok(_) => url.to_owned(),
        Err(_) => String::new(),
    }
}

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

/// Which destinations are acceptable: https only unless `allow_http`; no user name or password
/// in the URL; addresses that are not public (loopback, private, link-local and metadata, ...)
/// only inside `allowed_private` (SSRF protection).
///
/// The host is judged exactly as the sender will connect to it: the URL is parsed with the
/// `url` crate (the WHATWG URL rules reqwest follows), so `127.1`, `2130706433`, `0x7f.1`,
/// `0177.0.0.1`, `0` and `127.0.0.1.` are all the IPv4 address the sender would use. Host names
/// are checked after resolution, by the sender's resolver, with [`UrlPolicy::check_ip`].
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

fn v4_of(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

/// IPv6 addresses that carry an IPv4 address the packet ends up at (IPv4-mapped `::ffff:a.b.c.d`,
/// IPv4-compatible `::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`) as that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let mapped = s[..5] == [0; 5] && s[5] == 0xffff;
            let compatible = s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
            let translated = s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0;
            if mapped || compatible || translated { IpAddr::V4(v4_of(s[6], s[7])) } else { ip }
        }
        v4 => v4,
    }
}

/// Why an IPv4 address may not be a webhook destination.
fn forbidden_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private")
    } else if v4.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("carrier-grade NAT")
    } else if v4.is_broadcast() {
        Some("broadcast")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 0 {
        Some("unspecified")
    } else if v4.is_documentation() {
        Some("documentation")
    } else if (o[0] == 198 && (o[1] == 18 || o[1] == 19))
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 192 && o[1] == 88 && o[2] == 99)
    {
        Some("reserved")
    } else {
        None
    }
}

/// Why an address may not be a webhook destination, or `None` when it is a public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    let v6 = match canonical(ip) {
        IpAddr::V4(v4) => return forbidden_v4(v4),
        IpAddr::V6(v6) => v6,
    };
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
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1) {
        Some("NAT64")
    } else if s[0] == 0x2002 {
        // 6to4: the relay forwards to the IPv4 address in bits 16..48.
        forbidden_v4(v4_of(s[1], s[2])).map(|_| "6to4 embedding a non-public")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("Teredo")
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || s[0] & 0xfff0 == 0x3ff0 {
        Some("documentation")
    } else if s[0] == 0x0100 && s[1..4] == [0; 3] {
        Some("discard-only")
    } else if s[0] & 0xe000 != 0x2000 {
        // Outside 2000::/3, the only globally routed unicast space.
        Some("reserved")
    } else {
        None
    }
}

/// Why a URL cannot be a webhook destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlRefusal {
    /// Not an absolute http(s) URL the sender can use; the message says why.
    Malformed(String),
    /// The URL carries a user name or password (credentials would be stored and shown).
    Credentials,
    /// The host is an address the policy refuses.
    Destination { address: IpAddr, class: &'static str },
}

impl UrlRefusal {
    /// The reason without the address: safe to store in a delivery attempt.
    pub fn redacted(&self) -> String {
        match self {
            Self::Malformed(reason) => format!("invalid URL: {reason}"),
            Self::Credentials => "the URL carries credentials".to_owned(),
            Self::Destination { class, .. } => format!("destination refused: {class} address"),
        }
    }
}

impl UrlPolicy {
    /// Whether the policy lets a request go to `ip`.
    ///
    /// # Errors
    /// The class of the refused address (`loopback`, `private`...), without the address.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), &'static str> {
        match forbidden_reason(ip) {
            None => Ok(()),
            Some(_) if self.allowed_private.iter().any(|c| c.contains(ip)) => Ok(()),
            Some(class) => Err(class),
        }
    }

    /// Parses `url` as the sender will (WHATWG rules) and checks scheme, credentials and, when
    /// the host is an address in any spelling, that address. Host names are left to the resolver.
    ///
    /// # Errors
    /// Why the URL is refused.
    pub fn check_destination(&self, url: &str) -> Result<(), UrlRefusal> {
        self.destination(url).map(drop)
    }

    /// [`UrlPolicy::check_destination`], answering the URL it judged, parsed: a sender that
    /// calls that very URL neither parses it again nor calls anything but what was judged.
    ///
    /// # Errors
    /// Why the URL is refused.
    pub fn destination(&self, url: &str) -> Result<url::Url, UrlRefusal> {
        let parsed = url::Url::parse(url).map_err(|e| UrlRefusal::Malformed(e.to_string()))?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            _ => return Err(UrlRefusal::Malformed(if self.allow_http { "not http(s)" } else { "not https" }.to_owned())),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlRefusal::Credentials);
        }
        let address = match parsed.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(url::Host::Domain(name)) => {
                // Names that always mean this machine (RFC 6761), with or without the root dot.
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    return Ok(parsed);
                }
            }
            None => return Err(UrlRefusal::Malformed("no host".to_owned())),
        };
        self.check_ip(address).map_err(|class| UrlRefusal::Destination { address, class })?;
        Ok(parsed)
    }

    /// Checks a URL the service will call (a webhook endpoint, a custom API's base or token URL)
    /// exactly as the senders will: parsed with the WHATWG rules ([`UrlPolicy::check_destination`]),
    /// at most [`MAX_URL_CHARS`] characters, https (or http where allowed), no credentials, a host
    /// name made of DNS labels or an address the policy allows.
    ///
    /// # Errors
    /// The violation, without a field name (the caller names it).
    pub fn check_url(&self, url: &str) -> Result<(), FieldViolation> {
        if url.chars().count() > MAX_URL_CHARS {
            return Err(FieldViolation::invalid("", format!("must be at most {MAX_URL_CHARS} characters")));
        }
        let wanted = if self.allow_http { "an absolute http(s) URL" } else { "an absolute https URL" };
        // The parser would drop these silently; the stored text would not be what is sent.
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FieldViolation::invalid("", format!("must be {wanted} without spaces or control characters")));
        }
        self.check_destination(url).map_err(|refusal| match refusal {
            UrlRefusal::Malformed(reason) => FieldViolation::invalid("", format!("must be {wanted}: {reason}")),
            UrlRefusal::Credentials => {
                FieldViolation::invalid("", "must not contain a user name or password; send credentials in a custom header")
            }
            UrlRefusal::Destination { address, class } => {
                FieldViolation::invalid("", format!("is not an allowed destination: {address} is a {class} address"))
            }
        })?;
        // The parser accepts host names no resolver can look up (`a..b`, `{x}.example.com`).
        if let Ok(parsed) = url::Url::parse(url)
            && let Some(url::Host::Domain(name)) = parsed.host()
            && !is_dns_name(name)
        {
            return Err(FieldViolation::invalid("", format!("must be {wanted}: the host is not a DNS name")));
        }
        Ok(())
    }
}

/// Longest URL the service stores, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// Whether a (parsed, so lowercase ASCII) host name is made of DNS labels: 1 to 63 letters,
/// digits, '-' or '_' each, at most 253 characters, with an optional root dot.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
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
    /// Custom header names, each with [`HEADER_MASK`] as value; the values are in `headers_secret`.
    /// (An endpoint stored before values were kept in the secret store has them here, and no
    /// `headers_secret`, until its next update.)
    pub headers: BTreeMap<String, String>,
    /// The custom header values (`{"headers": {name: value}}`); `None` when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret: Option<SecretRef>,
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

/// The header names of `headers`, each with the mask.
pub fn masked(headers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    headers.keys().map(|name| (name.clone(), HEADER_MASK.to_owned())).collect()
}

impl Webhook {
    /// The endpoint as shown to callers: custom header values masked.
    #[must_use]
    pub fn with_masked_headers(mut self) -> Self {
        self.headers = masked(&self.headers);
        self
    }
    /// Whether this endpoint wants `event` (status aside: a disabled endpoint records it as skipped).
    pub fn wants(&self, event: &DomainEvent) -> bool {
        let type_ok = self.event_types.is_empty() || self.event_types.iter().any(|p| pattern_matches(p, event.event_type.as_str()));
        let deliverable = DELIVERABLE.contains(&event.event_type);
        // The event's data is read last, only when everything else matches.
        let integration_ok = || {
            self.integration_ids.is_empty()
                || event
                    .data
                    .str_member(&["integrationId", "id"])
                    .is_some_and(|id| self.integration_ids.iter().any(|i| i.to_string() == id))
        };
        deliverable && type_ok && event.tenant_id == self.tenant_id && integration_ok()
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
            ("127.255.255.254", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.100.100.200", "carrier-grade NAT"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "reserved"),
            ("192.0.0.8", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("ff02::1", "multicast"),
            ("fd00::1", "private (unique local)"),
            ("fc00::1", "private (unique local)"),
            ("fd00:ec2::254", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("100::1", "discard-only"),
            ("4000::1", "reserved"),
            // IPv4-mapped, -compatible and -translated forms judge the IPv4 address they carry.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:7f00:1", "loopback"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("::10.0.0.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("::ffff:0:127.0.0.1", "loopback"),
            // NAT64 (well-known and local-use prefixes), whatever the IPv4 address.
            ("64:ff9b::7f00:1", "NAT64"),
            ("64:ff9b::808:808", "NAT64"),
            ("64:ff9b:1::a00:1", "NAT64"),
            // 6to4 embedding a non-public IPv4 address; Teredo.
            ("2002:7f00:1::1", "6to4 embedding a non-public"),
            ("2002:a9fe:a9fe::", "6to4 embedding a non-public"),
            ("2002:c0a8:101::1", "6to4 embedding a non-public"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), Some(class), "{ip}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700:4700::1111", "2002:808:808::1", "2a00:1450:4001::200e"] {
            assert_eq!(forbidden_reason(public.parse().unwrap()), None, "{public}");
        }
    }

    /// Every spelling the WHATWG parser (and so the sender) reads as a refused address.
    #[test]
    fn every_spelling_of_a_refused_address_is_refused() {
        let policy = UrlPolicy { allow_http: true, allowed_private: Vec::new() };
        for url in [
            "http://127.0.0.1:8080/",
            "http://127.1:8080/",
            "http://2130706433:8080/",
            "http://0x7f.1:8080/",
            "http://0x7f000001/",
            "http://0177.0.0.1:8080/",
            "http://0177.1/",
            "http://0:8080/",
            "http://0.0.0.0/",
            "http://127.0.0.1./",
            "http://0x7f.0.0.1./",
            "http://%31%32%37.0.0.1/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9fea9fe/",
            "http://10.0.0.1/",
            "http://012.1/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::127.0.0.1]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[2002:7f00:1::]/",
            "http://[2001::1]/",
            "http://[fe80::1]/",
            "http://[fec0::1]/",
            "http://[fd00::1]/",
            "http://100.64.0.1/",
            "http://255.255.255.255/",
            "http://224.0.0.1/",
            "http://192.0.2.1/",
        ] {
            assert!(policy.check_url(url).is_err(), "accepted {url}");
            assert!(policy.check_destination(url).is_err(), "the send-time check accepted {url}");
        }
        for url in ["http://example.com/hook", "http://8.8.8.8/", "http://134744072/", "https://[2606:4700:4700::1111]/x"] {
            assert_eq!(policy.check_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn the_destination_answered_is_the_url_judged_as_the_sender_reads_it() {
        let policy = UrlPolicy { allow_http: true, allowed_private: vec![Cidr::parse("127.0.0.0/8").unwrap()] };
        // Another spelling of an allowed address, a host in capitals, a path with dot segments:
        // what is answered is the parsed URL, the one a client would have made of the text.
        for (url, called) in [
            ("http://0x7f.1:8080/a/../hook?x=1", "http://127.0.0.1:8080/hook?x=1"),
            ("HTTPS://Hooks.Example.COM./in", "https://hooks.example.com./in"),
            ("http://localhost.:9/h", "http://localhost.:9/h"),
        ] {
            let destination = policy.destination(url).unwrap_or_else(|e| panic!("{url}: {e:?}"));
            assert_eq!(destination.as_str(), called, "{url}");
            assert_eq!(destination, url::Url::parse(url).unwrap(), "{url}");
        }
        let strict = UrlPolicy::default();
        for url in ["http://0x7f.1/", "https://localhost/", "https://u:p@example.com/", "https://[::1]/", "not a url"] {
            assert_eq!(strict.destination(url).err(), strict.check_destination(url).err(), "{url}");
            assert!(strict.destination(url).is_err(), "{url}");
        }
    }

    #[test]
    fn events_show_urls_without_credentials() {
        assert_eq!(without_credentials("https://user:pw@hooks.example.com/a?b=c"), "https://hooks.example.com/a?b=c");
        assert_eq!(without_credentials("https://hooks.example.com/a"), "https://hooks.example.com/a");
        assert_eq!(without_credentials("not a url"), "");
    }

    #[test]
    fn credentials_in_urls_are_refused() {
        let policy = UrlPolicy::default();
        for url in ["https://user:pass@example.com/", "https://user@example.com/", "https://:pass@example.com/"] {
            assert_eq!(policy.check_destination(url), Err(UrlRefusal::Credentials), "{url}");
            assert!(policy.check_url(url).unwrap_err().message.contains("user name or password"), "{url}");
        }
    }

    #[test]
    fn refusals_stored_in_attempts_name_the_class_but_not_the_address() {
        let policy = UrlPolicy { allow_http: true, allowed_private: Vec::new() };
        let refusal = policy.check_destination("http://0x7f.1/").unwrap_err();
        assert_eq!(refusal.redacted(), "destination refused: loopback address");
        assert!(!refusal.redacted().contains("127"));
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

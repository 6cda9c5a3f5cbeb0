//! Value objects shared by every aggregate: identifiers, concurrency tokens, paging, time.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{DomainError, FieldViolation, ViolationKind};

/// Checks an identifier token: 1 to 128 characters of `[A-Za-z0-9-_.:@]`; `what` names it.
fn check_token(value: &str, what: &str) -> Result<(), FieldViolation> {
    let token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@');
    if value.is_empty() || value.len() > 128 || !value.chars().all(token_char) {
        return Err(FieldViolation::invalid(
            "",
            format!("{what} must be 1 to 128 characters of letters, digits, '-', '_', '.', ':' or '@'"),
        ));
    }
    Ok(())
}

/// A string value type whose every value passed `$check` (a `fn(&str) -> Result<(),
/// FieldViolation>`): built by `new`, parsed from and serialised as the string.
macro_rules! checked_string {
    ($(#[$meta:meta])* $name:ident, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        /// Written as the string it holds, borrowed (`serde(into)` would clone it at every write).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            /// # Errors
            /// The violation (without a field name) when the value is not acceptable.
            pub fn new(value: impl Into<String>) -> Result<Self, $crate::error::FieldViolation> {
                let value = value.into();
                let check: fn(&str) -> Result<(), $crate::error::FieldViolation> = $check;
                check(&value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value).map_err(|v| v.message)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
pub(crate) use checked_string;

checked_string!(
    /// The tenant that owns a resource; every tenant-scoped read and write is confined to it.
    TenantId,
    |v| check_token(v, "a tenant id")
);
checked_string!(
    /// The user (JWT `sub`) who made a change.
    UserId,
    |v| check_token(v, "a user id")
);

/// A UUID identifier type: serialised as the UUID, parsed leniently (anything that is not a
/// UUID is `None`, which the API answers with 404).
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Parses the textual form; anything that is not a UUID is `None` (the API answers 404).
            pub fn parse(value: &str) -> Option<Self> {
                Uuid::try_parse(value).ok().map(Self)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
pub(crate) use uuid_id;

uuid_id!(
    /// Identifier of an integration: a UUID (version 7, so ids sort by creation time).
    IntegrationId
);

/// The token a write is conditional on, for adapters that check a document (its tenant, say)
/// before writing it: the caller's `If-Match` when it names the version checked, else that
/// version, so a document that changed in between is never written.
///
/// # Errors
/// [`DomainError::PreconditionFailed`] when `if_match` names another version.
pub fn write_condition(if_match: Option<ETag>, checked: ETag) -> Result<ETag, DomainError> {
    match if_match {
        Some(token) if token != checked => Err(DomainError::PreconditionFailed),
        _ => Ok(checked),
    }
}

/// Opaque optimistic-concurrency token of a stored document (the HTTP `ETag`, unquoted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(String);

impl ETag {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value as stored, with the concurrency token of that version.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    pub value: T,
    pub etag: ETag,
}

/// The JSON text of a `T`, exactly as `T`'s `Serialize` writes it, kept as text: what a store
/// hands out when the reader only passes the value on (no parse, no re-encoding). Only
/// [`JsonText::encode`], an adapter that stores values as this very text, and a writer that
/// wrote the same bytes otherwise ([`crate::events::payloads::IntegrationEventData::with_text`],
/// tested against `encode`) make one.
pub struct JsonText<T> {
    text: String,
    of: std::marker::PhantomData<fn() -> T>,
}

impl<T> JsonText<T> {
    /// Text an adapter read back from where it stored [`JsonText::encode`]'s output unchanged,
    /// or the same bytes written otherwise. The caller vouches that it is `T`'s current encoding.
    pub fn stored(text: String) -> Self {
        Self { text, of: std::marker::PhantomData }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn into_string(self) -> String {
        self.text
    }
}

impl<T: Serialize> JsonText<T> {
    /// # Errors
    /// `Unexpected` when `value` cannot be encoded (a defect).
    pub fn encode(value: &T) -> Result<Self, DomainError> {
        serde_json::to_string(value)
            .map(Self::stored)
            .map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("encoding a value as JSON")))
    }
}

/// A page of [`JsonText`]s of `T` kept in one buffer: what a store that keeps values as their
/// JSON text hands out for a list, without an allocation per item.
pub struct JsonTexts<T> {
    text: String,
    /// Where each item ends in `text`.
    ends: Vec<usize>,
    of: std::marker::PhantomData<fn() -> T>,
}

impl<T> JsonTexts<T> {
    /// Room for `items` texts of `bytes` in all.
    pub fn with_capacity(items: usize, bytes: usize) -> Self {
        Self { text: String::with_capacity(bytes), ends: Vec::with_capacity(items), of: std::marker::PhantomData }
    }

    /// Appends text an adapter read back from where it stored [`JsonText::encode`]'s output
    /// unchanged. The caller vouches that it is `T`'s current encoding.
    pub fn push_stored(&mut self, text: &str) {
        self.text.push_str(text);
        self.ends.push(self.text.len());
    }

    pub fn push(&mut self, text: &JsonText<T>) {
        self.push_stored(text.as_str());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The texts, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.ends.iter().scan(0, |start, &end| {
            let text = &self.text[*start..end];
            *start = end;
            Some(text)
        })
    }

    /// Every text's bytes together.
    pub fn total_len(&self) -> usize {
        self.text.len()
    }
}

impl<T> fmt::Debug for JsonTexts<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A page of JSON texts of `T`: [`Page`] with its items in one buffer.
#[derive(Debug)]
pub struct TextPage<T> {
    pub items: JsonTexts<T>,
    pub continuation: Option<String>,
}

impl<T> Clone for JsonText<T> {
    fn clone(&self) -> Self {
        Self::stored(self.text.clone())
    }
}

impl<T> fmt::Debug for JsonText<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JsonText").field(&self.text).finish()
    }
}

impl<T> PartialEq for JsonText<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// Largest page a caller may ask for.
pub const MAX_PAGE_SIZE: u32 = 200;
/// Page size when the caller names none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Which page of a listing to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    /// The opaque token of the previous page, exactly as the store returned it.
    pub continuation: Option<String>,
}

impl PageRequest {
    /// Validates a caller's paging input (`limit` 1..=200, default 50).
    pub fn new(limit: Option<u32>, continuation: Option<String>) -> Result<Self, DomainError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if limit == 0 || limit > MAX_PAGE_SIZE {
            return Err(DomainError::invalid("limit", format!("must be between 1 and {MAX_PAGE_SIZE}")));
        }
        let continuation = continuation.filter(|c| !c.is_empty());
        if continuation.as_ref().is_some_and(|c| c.len() > 4096) {
            return Err(invalid_continuation());
        }
        Ok(Self { limit, continuation })
    }

    pub fn first(limit: u32) -> Self {
        Self { limit, continuation: None }
    }
}

/// One page of a listing. `continuation` is `None` on the last page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub continuation: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page { items: self.items.into_iter().map(f).collect(), continuation: self.continuation }
    }
}

/// The error every store adapter returns for a continuation token it did not issue.
///
/// A token is opaque to the caller, so one the store cannot read is a malformed request
/// (a structural violation, answered 400), not a rule broken by a well-formed value.
pub fn invalid_continuation() -> DomainError {
    DomainError::Validation(vec![FieldViolation::new("continuationToken", ViolationKind::WrongType, "is not a valid continuation token")])
}

/// Source of the current time, injected so tests are deterministic.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

/// The wall clock, truncated to milliseconds so that stored and returned timestamps agree.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(now.millisecond() as u32 * 1_000_000).unwrap_or(now)
    }
}

/// Source of new identifiers, injected so tests are deterministic.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
pub trait IdGenerator: Send + Sync {
    fn new_uuid(&self) -> Uuid;
}

/// UUID version 7: unique, and ordered by creation time.
#[derive(Debug, Default, Clone, Copy)]
pub struct UuidV7;

impl IdGenerator for UuidV7 {
    fn new_uuid(&self) -> Uuid {
        Uuid::now_v7()
    }
}

/// Checks an absolute `https` URL of at most 2048 characters (or `http` when `allow_http`).
pub fn validate_url(value: &str, allow_http: bool) -> Result<(), FieldViolation> {
    if value.len() > 2048 {
        return Err(FieldViolation::invalid("", "must be at most 2048 characters"));
    }
    let rest = if let Some(rest) = value.strip_prefix("https://") {
        rest
    } else if let Some(rest) = value.strip_prefix("http://").filter(|_| allow_http) {
        rest
    } else {
        let wanted = if allow_http { "an absolute http(s) URL" } else { "an absolute https URL" };
        return Err(FieldViolation::invalid("", format!("must be {wanted}")));
    };
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..host_end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(inner) = host.strip_prefix('[') {
        match inner.split_once(']') {
            Some((ip, rest)) => (ip, rest.strip_prefix(':')),
            None => return Err(FieldViolation::invalid("", "is not a valid URL")),
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(FieldViolation::invalid("", "has an invalid port"));
    }
    let is_ip6 = authority.contains('[');
    let valid_host = !host.is_empty()
        && (is_ip6 && host.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            || !is_ip6
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '{' | '}'))
                }));
    if !valid_host || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldViolation::invalid("", "is not a valid URL"));
    }
    // Then as it will be used: its placeholders filled as the provider client fills them, and
    // the WHATWG parse of the client.
    let filled = fill_placeholders(value, |_| Ok::<_, ()>("x")).map_err(|_| FieldViolation::invalid("", "is not a valid URL"))?;
    match url::Url::parse(&filled) {
        Ok(parsed) if parsed.host().is_some() => Ok(()),
        _ => Err(FieldViolation::invalid("", "is not a valid URL")),
    }
}

/// `template` with every `{name}` replaced by `value_of(name)`.
///
/// # Errors
/// `value_of`'s error, or `None` when a `{` is not closed.
pub(crate) fn fill_placeholders<'a, E>(template: &str, mut value_of: impl FnMut(&str) -> Result<&'a str, E>) -> Result<String, Option<E>> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map(|c| c + open).ok_or(None)?;
        out.push_str(value_of(&rest[open + 1..close]).map_err(Some)?);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a URL a browser is sent to (an OAuth2 redirect or return URL): [`validate_url`], and
/// then the WHATWG parse the `oauth2` crate and browsers apply, with no credentials in it.
pub fn validate_redirect_url(value: &str, allow_http: bool) -> Result<(), FieldViolation> {
    validate_url(value, allow_http)?;
    match url::Url::parse(value) {
        Ok(parsed) if parsed.username().is_empty() && parsed.password().is_none() && parsed.host().is_some() => Ok(()),
        Ok(_) => Err(FieldViolation::invalid("", "must name a host and carry no credentials")),
        Err(_) => Err(FieldViolation::invalid("", "is not a valid URL")),
    }
}

/// The length in bytes of `value`'s JSON text, counted as it is written out and kept nowhere
/// (`usize::MAX` if it cannot be written out): a size limit is judged on the text the value is
/// stored and sent as, without allocating it.
pub fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(usize::MAX, |()| count.0)
}

/// Checks a human-readable text: trimmed, within `max` characters and free of control characters.
pub fn validate_text(value: &str, min: usize, max: usize) -> Result<(), FieldViolation> {
    let chars = value.chars().count();
    if chars < min || value.trim().chars().count() < min {
        return Err(FieldViolation::invalid(
            "",
            if min == 1 { "must not be empty".to_owned() } else { format!("must have at least {min} characters") },
        ));
    }
    if chars > max {
        return Err(FieldViolation::invalid("", format!("must be at most {max} characters")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(FieldViolation::invalid("", "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_length_is_that_of_the_text_written_out() {
        let values = [
            serde_json::json!({}),
            serde_json::json!({"organization": "acme", "repositories": ["acme/api", "acme/web"], "n": 1.5, "none": null}),
            serde_json::json!("quote \" backslash \\ control \u{1} é 😀"),
            serde_json::json!([true, false, -12, 18_446_744_073_709_551_615_u64]),
        ];
        for value in values {
            assert_eq!(json_len(&value), serde_json::to_string(&value).unwrap().len(), "{value}");
        }
        /// A value that cannot be written out is beyond every limit.
        struct Unwritable;
        impl Serialize for Unwritable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        assert_eq!(json_len(&Unwritable), usize::MAX);
    }

    #[test]
    fn json_texts_keep_each_text_apart() {
        let mut texts = JsonTexts::<u32>::with_capacity(1, 0);
        assert!(texts.is_empty());
        for t in ["1", "{\"a\":[2,3]}", "\"\"", "45"] {
            texts.push_stored(t);
        }
        assert_eq!(texts.iter().collect::<Vec<_>>(), ["1", "{\"a\":[2,3]}", "\"\"", "45"]);
        assert_eq!((texts.len(), texts.total_len()), (4, 1 + 11 + 2 + 2));
        texts.push(&JsonText::encode(&7).unwrap());
        assert_eq!(texts.iter().collect::<Vec<_>>(), ["1", "{\"a\":[2,3]}", "\"\"", "45", "7"]);
        assert!(JsonTexts::<u32>::with_capacity(0, 0).iter().next().is_none());
    }

    #[test]
    fn urls() {
        for ok in
            ["https://api.github.com", "https://x.example.com:8443/a?b=c", "https://{subdomain}.zendesk.com/api/v2", "https://[::1]:443/x"]
        {
            assert!(validate_url(ok, false).is_ok(), "{ok}");
        }
        // Also judged as the client uses it: placeholders filled, then the WHATWG parse.
        for bad in [
            "http://api.github.com",
            "ftp://x",
            "https://",
            "https:// x.com",
            "not a url",
            "https://a..b",
            "https://x.com:99999",
            "https://[d]/",
            "https://{subdomain.zendesk.com/",
        ] {
            assert!(validate_url(bad, false).is_err(), "{bad}");
        }
        assert!(validate_url("http://localhost:8080", true).is_ok());
    }

    #[test]
    fn redirect_urls_are_parsed_as_browsers_parse_them() {
        assert!(validate_redirect_url("https://app.example.com/done?x=1", false).is_ok());
        for bad in ["https://app.example.com@evil.example/", "https://u:p@app.example.com/", "http://a.com"] {
            assert!(validate_redirect_url(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn texts() {
        assert!(validate_text("ok", 1, 10).is_ok());
        assert!(validate_text("  ", 1, 10).is_err());
        assert!(validate_text("elevenchars", 1, 10).is_err());
        assert!(validate_text("a\u{0}b", 1, 10).is_err());
    }

    #[test]
    fn page_limits() {
        assert_eq!(PageRequest::new(None, None).unwrap().limit, 50);
        assert!(PageRequest::new(Some(0), None).is_err());
        assert!(PageRequest::new(Some(201), None).is_err());
        assert!(PageRequest::new(Some(200), Some(String::new())).unwrap().continuation.is_none());
    }

    #[test]
    fn tenant_ids() {
        assert!(TenantId::new("acme-01").is_ok());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a b").is_err());
        assert!(TenantId::new("x".repeat(129)).is_err());
    }
}

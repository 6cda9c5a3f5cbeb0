//! Custom API integrations: a tenant describes an HTTP API inline instead of picking a catalog
//! provider. Every field is validated, and every problem is reported with its path.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};
use crate::provider::is_entity_name;
use crate::webhooks::endpoint::UrlPolicy;

/// Most entities one custom definition may describe.
pub const MAX_ENTITIES: usize = 50;
/// Most default headers one custom definition may carry.
pub const MAX_HEADERS: usize = 50;

/// An inline API definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomApiDefinition {
    /// Base URL of every request (https).
    pub base_url: String,
    pub auth: CustomAuth,
    /// Headers sent with every request (never `Authorization`: the auth scheme sets it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_headers: BTreeMap<String, String>,
    pub pagination: Pagination,
    pub entities: Vec<EntityDefinition>,
}

/// How requests to a custom API authenticate. Credentials themselves live in the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum CustomAuth {
    /// An API key sent in a header or a query parameter.
    ApiKey {
        #[serde(rename = "in")]
        location: ApiKeyLocation,
        /// The header or query parameter name.
        name: String,
        /// Text sent before the key in a header value (`Token token=`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// HTTP basic authentication.
    Basic,
    /// OAuth 2.0 client credentials grant.
    Oauth2ClientCredentials {
        token_url: String,
        #[serde(default)]
        scopes: Vec<String>,
    },
}

impl CustomAuth {
    /// The one connection mode this scheme supports.
    pub fn auth_mode(&self) -> crate::provider::AuthMode {
        use crate::provider::AuthMode;
        match self {
            CustomAuth::ApiKey { .. } => AuthMode::ApiKey,
            CustomAuth::Bearer => AuthMode::Bearer,
            CustomAuth::Basic => AuthMode::Basic,
            CustomAuth::Oauth2ClientCredentials { .. } => AuthMode::Oauth2ClientCredentials,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyLocation {
    Header,
    Query,
}

/// How a list endpoint pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "style", rename_all = "snake_case", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum Pagination {
    /// The response carries the next cursor; the request sends it back in `cursorParam`.
    Cursor {
        cursor_param: String,
        /// Dotted path of the next cursor in the response body (`meta.next_cursor`).
        next_cursor_path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_size: Option<u32>,
    },
    /// Numbered pages.
    Page {
        page_param: String,
        #[serde(default = "one")]
        start_page: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_size: Option<u32>,
    },
    /// Offset and limit.
    Offset { offset_param: String, limit_param: String, page_size: u32 },
    /// RFC 8288 `Link: <...>; rel="next"` headers.
    Link { limit_param: Option<String>, page_size: Option<u32> },
    /// Everything comes in one response.
    None,
}

fn one() -> u32 {
    1
}

/// One kind of record the API exposes, and the requests that read and write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityDefinition {
    /// snake_case entity name (`ticket`).
    pub name: String,
    /// Dotted path of the record's id in a record (`id`).
    pub id_field: String,
    /// Dotted path of the record's last-modified timestamp, used for incremental sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_field: Option<String>,
    /// The list request's query parameter that keeps records updated at or after an RFC 3339
    /// time (`since`, `updated_after`); without it an incremental sync reads every page and
    /// skips older records itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_since_param: Option<String>,
    pub list: RequestTemplate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub get: Option<RequestTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsert: Option<RequestTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<RequestTemplate>,
    /// How a record deleted at the provider shows up in the list (a soft delete), so an
    /// incremental sync sees deletions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<DeletedMarker>,
}

/// A listed record is deleted when the value at `field` equals `value` (HubSpot's
/// `archived: true`, Zendesk's `status: "deleted"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeletedMarker {
    /// Dotted path in a record (`archived`, `properties.status`).
    pub field: String,
    /// A string, number or boolean.
    pub value: serde_json::Value,
}

impl DeletedMarker {
    /// Whether `record` is marked deleted.
    pub fn marks(&self, record: &serde_json::Value) -> bool {
        self.field.split('.').try_fold(record, |v, key| v.get(key)) == Some(&self.value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// A request: method, path template relative to the base URL (`/tickets/{id}`), fixed query
/// parameters, and where the records are in the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestTemplate {
    pub method: HttpMethod,
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    /// Dotted path of the records array in a list response (`data.items`); absent = the body is the array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items_path: Option<String>,
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn is_dotted_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 256
        && path.split('.').all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
}

pub(crate) fn is_param_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.[]".contains(c))
}

/// Checks a path template: starts with `/`, no spaces, braces balanced around identifiers.
fn check_path(path: &str) -> Result<Vec<String>, &'static str> {
    if !path.starts_with('/') || path.chars().count() > 1024 {
        return Err("must start with '/' and be at most 1024 characters");
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err("must not contain spaces, '?' or '#'; put query parameters in 'query'");
    }
    placeholders(path)
}

/// The `{name}` placeholders of a template, braces balanced around identifiers.
pub(crate) fn placeholders(template: &str) -> Result<Vec<String>, &'static str> {
    let mut placeholders = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err("has an unbalanced '}'");
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { return Err("has an unbalanced '{'") };
        let name = &after[..close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("placeholders must be names like {id}");
        }
        placeholders.push(name.to_owned());
        rest = &after[close + 1..];
    }
    Ok(placeholders)
}

impl RequestTemplate {
    /// The problems of this template for a request of one kind, paths relative to the template.
    pub(crate) fn violations(&self, allowed: &[HttpMethod], needs_id: bool, is_list: bool) -> Violations {
        let mut v = Violations::new();
        if !allowed.contains(&self.method) {
            let names: Vec<_> = allowed.iter().map(|m| format!("{m:?}").to_uppercase()).collect();
            v.invalid("method", format!("must be one of {}", names.join(", ")));
        }
        match check_path(&self.path) {
            Ok(placeholders) if needs_id && !placeholders.iter().any(|p| p == "id") => {
                v.invalid("path", "must contain the {id} placeholder")
            }
            Ok(_) => {}
            Err(reason) => v.invalid("path", reason),
        }
        if self.query.len() > 50 {
            v.invalid("query", "must have at most 50 parameters");
        }
        for (name, value) in &self.query {
            if !is_param_name(name) || value.chars().count() > 1024 || value.chars().any(char::is_control) {
                v.invalid(format!("query.{name}"), "must be a parameter name with a value of at most 1024 characters");
            }
        }
        match &self.items_path {
            Some(_) if !is_list => v.invalid("itemsPath", "is only used by list requests"),
            Some(p) if !is_dotted_path(p) => v.invalid("itemsPath", "must be a dotted path such as data.items"),
            _ => {}
        }
        v
    }
}

impl CustomApiDefinition {
    /// Checks every field and returns every problem, paths relative to the definition.
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing each offending field.
    pub fn validate(&self) -> Result<(), DomainError> {
        self.validate_with(&UrlPolicy::default())
    }

    /// [`CustomApiDefinition::validate`], judging the base and token URLs with the destination
    /// `policy` that judges every provider request (WHATWG parsing, `http` only where the policy
    /// allows it, no credentials, addresses only where allowed): a definition is refused at
    /// creation exactly where its requests would be.
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing each offending field.
    pub fn validate_with(&self, policy: &UrlPolicy) -> Result<(), DomainError> {
        let mut v = Violations::new();
        v.check("baseUrl", policy.check_url(&self.base_url));
        if self.base_url.contains(['?', '#']) {
            v.invalid("baseUrl", "must not contain a query or fragment");
        }
        match &self.auth {
            CustomAuth::ApiKey { location, name, prefix } => {
                if !is_header_name(name) {
                    v.invalid("auth.name", "must be a header or parameter name of 1 to 128 characters");
                }
                let placement = crate::provider::ApiKeyPlacement { location: *location, name: name.clone(), prefix: prefix.clone() };
                v.extend_nested("auth", placement.violations().into_vec().into_iter().filter(|x| x.field == "prefix").collect::<Vec<_>>());
            }
            CustomAuth::Oauth2ClientCredentials { token_url, scopes } => {
                v.check("auth.tokenUrl", policy.check_url(token_url));
                for (i, scope) in scopes.iter().enumerate() {
                    if !crate::connection::is_scope(scope) {
                        v.invalid(format!("auth.scopes[{i}]"), "must be 1 to 200 characters without spaces");
                    }
                }
            }
            CustomAuth::Bearer | CustomAuth::Basic => {}
        }
        header_violations(&self.default_headers, &mut v);
        pagination_violations(&self.pagination, &mut v);
        if self.entities.is_empty() || self.entities.len() > MAX_ENTITIES {
            v.invalid("entities", format!("must describe 1 to {MAX_ENTITIES} entities"));
        }
        entity_violations(&self.entities, &mut v);
        v.finish(|| ())
    }
}

/// The problems of default headers, each under `defaultHeaders`.
pub(crate) fn header_violations(headers: &BTreeMap<String, String>, v: &mut Violations) {
    if headers.len() > MAX_HEADERS {
        v.invalid("defaultHeaders", format!("must have at most {MAX_HEADERS} headers"));
    }
    for (name, value) in headers {
        let field = format!("defaultHeaders.{name}");
        if !is_header_name(name) {
            v.invalid(field, "is not a valid header name");
        } else if name.eq_ignore_ascii_case("authorization") {
            v.invalid(field, "must not be set: the auth scheme sets Authorization");
        } else if value.len() > 4096 || value.chars().any(|c| c.is_control() && c != '\t') {
            v.invalid(field, "must be at most 4096 characters without control characters");
        }
    }
}

/// The problems of the entities of a definition (or of a catalog provider), each under
/// `entities[i]`.
pub(crate) fn entity_violations(entities: &[EntityDefinition], v: &mut Violations) {
    let mut seen = HashSet::new();
    for (i, entity) in entities.iter().enumerate() {
        let at = format!("entities[{i}]");
        if !is_entity_name(&entity.name) {
            v.invalid(format!("{at}.name"), "must be a snake_case name of 1 to 64 characters");
        } else if !seen.insert(entity.name.as_str()) {
            v.invalid(format!("{at}.name"), format!("'{}' is described twice", entity.name));
        }
        if !is_dotted_path(&entity.id_field) {
            v.invalid(format!("{at}.idField"), "must be a dotted path such as id");
        }
        if entity.updated_at_field.as_deref().is_some_and(|p| !is_dotted_path(p)) {
            v.invalid(format!("{at}.updatedAtField"), "must be a dotted path such as updated_at");
        }
        if let Some(param) = &entity.updated_since_param {
            if !is_param_name(param) {
                v.invalid(format!("{at}.updatedSinceParam"), "must be a query parameter name");
            } else if entity.updated_at_field.is_none() {
                v.invalid(format!("{at}.updatedSinceParam"), "needs updatedAtField");
            }
        }
        use HttpMethod::*;
        v.extend_nested(&format!("{at}.list"), entity.list.violations(&[Get, Post], false, true).into_vec());
        if let Some(get) = &entity.get {
            v.extend_nested(&format!("{at}.get"), get.violations(&[Get], true, false).into_vec());
        }
        if let Some(upsert) = &entity.upsert {
            v.extend_nested(&format!("{at}.upsert"), upsert.violations(&[Post, Put, Patch], false, false).into_vec());
        }
        if let Some(delete) = &entity.delete {
            v.extend_nested(&format!("{at}.delete"), delete.violations(&[Delete, Post], true, false).into_vec());
        }
        if let Some(deleted) = &entity.deleted {
            if !is_dotted_path(&deleted.field) {
                v.invalid(format!("{at}.deleted.field"), "must be a dotted path such as archived");
            }
            let scalar = matches!(&deleted.value, serde_json::Value::Bool(_) | serde_json::Value::Number(_))
                || deleted.value.as_str().is_some_and(|t| (1..=256).contains(&t.chars().count()));
            if !scalar {
                v.invalid(format!("{at}.deleted.value"), "must be a boolean, a number or a string of 1 to 256 characters");
            }
        }
    }
}

/// The problems of a pagination, each under `pagination`.
pub(crate) fn pagination_violations(pagination: &Pagination, v: &mut Violations) {
    let size_ok = |size: &Option<u32>| size.is_none_or(|s| (1..=10_000).contains(&s));
    let param = |v: &mut Violations, field: &str, name: &str| {
        if !is_param_name(name) {
            v.invalid(format!("pagination.{field}"), "must be a query parameter name");
        }
    };
    match pagination {
        Pagination::Cursor { cursor_param, next_cursor_path, limit_param, page_size } => {
            param(v, "cursorParam", cursor_param);
            if !is_dotted_path(next_cursor_path) {
                v.invalid("pagination.nextCursorPath", "must be a dotted path such as meta.next_cursor");
            }
            if let Some(l) = limit_param {
                param(v, "limitParam", l);
            }
            if !size_ok(page_size) {
                v.invalid("pagination.pageSize", "must be between 1 and 10000");
            }
        }
        Pagination::Page { page_param, limit_param, page_size, start_page } => {
            param(v, "pageParam", page_param);
            if let Some(l) = limit_param {
                param(v, "limitParam", l);
            }
            if !size_ok(page_size) {
                v.invalid("pagination.pageSize", "must be between 1 and 10000");
            }
            if *start_page > 1 {
                v.invalid("pagination.startPage", "must be 0 or 1");
            }
        }
        Pagination::Offset { offset_param, limit_param, page_size } => {
            param(v, "offsetParam", offset_param);
            param(v, "limitParam", limit_param);
            if !size_ok(&Some(*page_size)) {
                v.invalid("pagination.pageSize", "must be between 1 and 10000");
            }
        }
        Pagination::Link { limit_param, page_size } => {
            if let Some(l) = limit_param {
                param(v, "limitParam", l);
            }
            if !size_ok(page_size) {
                v.invalid("pagination.pageSize", "must be between 1 and 10000");
            }
        }
        Pagination::None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn definition() -> serde_json::Value {
        json!({
            "baseUrl": "https://api.example.com/v2",
            "auth": {"type": "api_key", "in": "header", "name": "X-Api-Key"},
            "defaultHeaders": {"Accept": "application/json"},
            "pagination": {"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit", "pageSize": 100},
            "entities": [{
                "name": "ticket", "idField": "id", "updatedAtField": "updated_at",
                "list": {"method": "GET", "path": "/tickets", "itemsPath": "data"},
                "get": {"method": "GET", "path": "/tickets/{id}"},
                "upsert": {"method": "PUT", "path": "/tickets/{id}"},
                "delete": {"method": "DELETE", "path": "/tickets/{id}"}
            }]
        })
    }

    #[test]
    fn a_complete_definition_is_valid() {
        let d: CustomApiDefinition = serde_json::from_value(definition()).unwrap();
        d.validate().unwrap();
        assert_eq!(serde_json::to_value(&d).unwrap()["auth"]["in"], "header");
    }

    #[test]
    fn all_auth_and_pagination_styles_parse() {
        for auth in [
            json!({"type": "bearer"}),
            json!({"type": "basic"}),
            json!({"type": "oauth2_client_credentials", "tokenUrl": "https://auth.example.com/token", "scopes": ["read"]}),
        ] {
            for pagination in [
                json!({"style": "page", "pageParam": "page"}),
                json!({"style": "offset", "offsetParam": "offset", "limitParam": "limit", "pageSize": 50}),
                json!({"style": "link"}),
                json!({"style": "none"}),
            ] {
                let mut d = definition();
                d["auth"] = auth.clone();
                d["pagination"] = pagination;
                let d: CustomApiDefinition = serde_json::from_value(d).unwrap();
                d.validate().unwrap();
            }
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut d = definition();
        d["baseUrl"] = json!("http://api.example.com");
        d["defaultHeaders"] = json!({"Authorization": "x", "bad header": "y"});
        d["entities"][0]["get"]["path"] = json!("/tickets");
        d["entities"][0]["delete"]["method"] = json!("GET");
        d["entities"][0]["list"]["path"] = json!("tickets");
        let d: CustomApiDefinition = serde_json::from_value(d).unwrap();
        let Err(DomainError::Validation(v)) = d.validate() else { panic!() };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        for f in [
            "baseUrl",
            "defaultHeaders.Authorization",
            "defaultHeaders.bad header",
            "entities[0].get.path",
            "entities[0].delete.method",
            "entities[0].list.path",
        ] {
            assert!(fields.contains(&f), "{f} not in {fields:?}");
        }
    }

    /// The URLs are judged as the provider client parses and sends them (WHATWG rules), not by
    /// their text: spellings the text check refused are accepted, and spellings that reach a
    /// refused address or carry credentials are refused, each under its JSON path.
    #[test]
    fn urls_are_judged_as_the_client_will_send_them() {
        let judged = |base: &str, token: &str, policy: &UrlPolicy| {
            let mut d = definition();
            d["baseUrl"] = json!(base);
            d["auth"] = json!({"type": "oauth2_client_credentials", "tokenUrl": token});
            let d: CustomApiDefinition = serde_json::from_value(d).unwrap();
            match d.validate_with(policy) {
                Ok(()) => Vec::new(),
                Err(DomainError::Validation(v)) => v.into_iter().map(|v| v.field).collect(),
                Err(other) => panic!("{other}"),
            }
        };
        let strict = UrlPolicy::default();
        for fine in [
            "HTTPS://API.Example.COM/v2",
            "https://api.example.com./v2",
            "https://bücher.example/api",
            "https://api.example.com:443/v2",
            "https://[2606:4700:4700::1111]/v2",
        ] {
            assert_eq!(judged(fine, fine, &strict), Vec::<String>::new(), "{fine}");
        }
        for refused in [
            "https://user:secret@api.example.com/v2",
            "https://127.0.0.1/v2",
            "https://0x7f.1/v2",
            "https://2130706433/v2",
            "https://[::ffff:169.254.169.254]/latest",
            "https://localhost/v2",
            "https://{tenant}.example.com/v2",
            "https://a..b/v2",
            "http://api.example.com/v2",
            "https://x.example.com:99999",
            "not a url",
        ] {
            assert_eq!(judged(refused, refused, &strict), ["baseUrl", "auth.tokenUrl"], "{refused}");
        }
        let local = UrlPolicy { allow_http: true, allowed_private: vec![crate::webhooks::endpoint::Cidr::parse("127.0.0.0/8").unwrap()] };
        assert_eq!(judged("http://localhost:8080/api", "http://127.0.0.1:9000/token", &local), Vec::<String>::new());
        assert_eq!(judged("http://10.0.0.8/api", "ftp://127.0.0.1/token", &local), ["baseUrl", "auth.tokenUrl"]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut d = definition();
        d["auth"]["extra"] = json!(1);
        assert!(serde_json::from_value::<CustomApiDefinition>(d).is_err());
    }

    #[test]
    fn path_templates() {
        assert_eq!(check_path("/a/{id}/b/{sub_id}").unwrap(), vec!["id", "sub_id"]);
        assert!(check_path("/a/{id").is_err());
        assert!(check_path("/a/}").is_err());
        assert!(check_path("/a/{}").is_err());
        assert!(check_path("/a b").is_err());
    }
}

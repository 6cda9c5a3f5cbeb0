//! The wire form of a custom API definition (`customDefinition` of an integration): one set of
//! DTOs that parses, documents (every constraint the domain enforces) and renders it, converted
//! to and from the domain's value objects.

use std::collections::BTreeMap;

use im_domain::custom::{
    ApiKeyLocation, CustomApiDefinition, CustomAuth, DeletedMarker, EntityDefinition, HttpMethod, Pagination, RequestTemplate,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An inline description of an HTTP API, used instead of a catalog provider.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = CustomDefinition)]
pub struct CustomDefinitionDto {
    /// Base URL of every request: an absolute https URL without query or fragment (a host name
    /// in ASCII, `xn--` for international names, or an IP address), judged as the provider
    /// client sends it (WHATWG URL parsing; `http` only where the service's destination policy allows it, `webhooks.allow_http`; no user name or password; an address host only
    /// where `webhooks.allowed_private_cidrs` allows it).
    #[schema(
        max_length = 2048,
        pattern = r"^[Hh][Tt][Tt][Pp][Ss]?://(([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?|(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/[^\s\x00-\x1F\x7F-\x9F?#]*)?$",
        example = "https://api.example.com/v2"
    )]
    pub base_url: String,
    pub auth: CustomAuthDto,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = super::schemas::default_headers)]
    pub default_headers: BTreeMap<String, String>,
    pub pagination: PaginationDto,
    /// 1 to 50 entities with distinct names.
    #[schema(min_items = 1, max_items = 50)]
    pub entities: Vec<EntityDto>,
}

/// How requests to the API authenticate; the credentials themselves belong to a connection.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[schema(as = CustomAuth)]
pub enum CustomAuthDto {
    /// An API key sent in a header or a query parameter.
    ApiKey {
        #[serde(rename = "in")]
        location: ApiKeyLocationDto,
        /// The header or query parameter name.
        #[schema(min_length = 1, max_length = 128, pattern = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]
        name: String,
        /// Text sent before the key in a header value (`Token token=`); only with `in: header`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_length = 1, max_length = 64, pattern = r"^[ -~]+$")]
        prefix: Option<String>,
    },
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// HTTP basic authentication.
    Basic,
    /// OAuth 2.0 client credentials grant.
    #[serde(rename_all = "camelCase")]
    Oauth2ClientCredentials {
        /// An absolute https URL, judged as `baseUrl` is (`http` only where `webhooks.allow_http`).
        #[schema(
            max_length = 2048,
            pattern = r"^[Hh][Tt][Tt][Pp][Ss]?://(([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?|(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/[^\s\x00-\x1F\x7F-\x9F?#]*)?$"
        )]
        token_url: String,
        #[serde(default)]
        #[schema(schema_with = super::schemas::scopes)]
        scopes: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ApiKeyLocation)]
pub enum ApiKeyLocationDto {
    Header,
    Query,
}

impl From<ApiKeyLocationDto> for ApiKeyLocation {
    fn from(dto: ApiKeyLocationDto) -> Self {
        match dto {
            ApiKeyLocationDto::Header => ApiKeyLocation::Header,
            ApiKeyLocationDto::Query => ApiKeyLocation::Query,
        }
    }
}

impl From<ApiKeyLocation> for ApiKeyLocationDto {
    fn from(location: ApiKeyLocation) -> Self {
        match location {
            ApiKeyLocation::Header => ApiKeyLocationDto::Header,
            ApiKeyLocation::Query => ApiKeyLocationDto::Query,
        }
    }
}

/// How a list request pages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "style", rename_all = "snake_case", deny_unknown_fields)]
#[schema(as = Pagination)]
pub enum PaginationDto {
    /// The response carries the next cursor; the request sends it back in `cursorParam`.
    #[serde(rename_all = "camelCase")]
    Cursor {
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        cursor_param: String,
        /// Dotted path of the next cursor in the response body (`meta.next_cursor`).
        #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
        next_cursor_path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1, maximum = 10000)]
        page_size: Option<u32>,
    },
    /// Numbered pages, from `startPage` (0 or 1).
    #[serde(rename_all = "camelCase")]
    Page {
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        page_param: String,
        #[serde(default = "one")]
        #[schema(minimum = 0, maximum = 1, default = 1)]
        start_page: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1, maximum = 10000)]
        page_size: Option<u32>,
    },
    /// Offset and limit.
    #[serde(rename_all = "camelCase")]
    Offset {
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        offset_param: String,
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        limit_param: String,
        #[schema(minimum = 1, maximum = 10000)]
        page_size: u32,
    },
    /// RFC 8288 `Link: <...>; rel="next"` headers.
    #[serde(rename_all = "camelCase")]
    Link {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
        limit_param: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1, maximum = 10000)]
        page_size: Option<u32>,
    },
    /// Everything comes in one response.
    None,
}

fn one() -> u32 {
    1
}

/// A path template (as `RequestTemplate.path`) with an `{id}` placeholder.
const PATH_WITH_ID: &str = r"^/([^\s\x00-\x1F\x7F-\x9F?#{}]|\{[A-Za-z0-9_]+\})*\{id\}([^\s\x00-\x1F\x7F-\x9F?#{}]|\{[A-Za-z0-9_]+\})*$";

/// The rules of `CustomAuth` beside its fields: an API key's `prefix` only with `in: header`.
pub fn auth_rules() -> serde_json::Value {
    serde_json::json!({
        "if": {"required": ["type", "in"], "properties": {"type": {"const": "api_key"}, "in": {"const": "query"}}},
        "then": {"properties": {"prefix": super::body::refused()}},
    })
}

impl EntityDto {
    /// The rules of `Entity` beside its fields: `updatedSinceParam` needs `updatedAtField`; what
    /// each of its requests may be (the methods, an `{id}` in the path of `get` and `delete`,
    /// `itemsPath` only on `list`).
    pub fn rules() -> serde_json::Value {
        let request = |name: &str, methods: &[&str], needs_id: bool, list: bool| {
            let mut rule = serde_json::json!({"method": {"enum": methods}});
            if needs_id {
                rule["path"] = serde_json::json!({"pattern": PATH_WITH_ID});
            }
            if !list {
                rule["itemsPath"] = super::body::refused();
            }
            serde_json::json!({
                "if": {"required": [name], "properties": {name: {"type": "object"}}},
                "then": {"properties": {name: {"properties": rule}}},
            })
        };
        let since_needs_updated_at = serde_json::json!({
            "if": {"required": ["updatedSinceParam"], "properties": {"updatedSinceParam": {"type": "string"}}},
            "then": {"required": ["updatedAtField"], "properties": {"updatedAtField": {"type": "string"}}},
        });
        serde_json::json!({"allOf": [
            since_needs_updated_at,
            request("list", &["GET", "POST"], false, true),
            request("get", &["GET"], true, false),
            request("upsert", &["POST", "PUT", "PATCH"], false, false),
            request("delete", &["DELETE", "POST"], true, false),
        ]})
    }
}

/// One kind of record the API exposes, and the requests that read and write it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = Entity)]
pub struct EntityDto {
    /// snake_case entity name (`ticket`), unique in the definition.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[a-z][a-z0-9_]*$")]
    pub name: String,
    /// Dotted path of the record's id in a record (`id`).
    #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
    pub id_field: String,
    /// Dotted path of the record's last-modified timestamp, used for incremental sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
    pub updated_at_field: Option<String>,
    /// The list request's query parameter that keeps records updated at or after an RFC 3339
    /// time (`since`); needs `updatedAtField`. Without it an incremental sync reads every page
    /// and skips older records itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9_\-.\[\]]+$")]
    pub updated_since_param: Option<String>,
    /// The list request: `GET` or `POST`; `itemsPath` locates the records.
    pub list: RequestTemplateDto,
    /// Reads one record: `GET`, path with `{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub get: Option<RequestTemplateDto>,
    /// Creates or updates a record: `POST`, `PUT` or `PATCH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsert: Option<RequestTemplateDto>,
    /// Deletes a record: `DELETE` or `POST`, path with `{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<RequestTemplateDto>,
    /// How a record deleted at the provider shows up in the list (a soft delete such as
    /// HubSpot's `archived: true`): an incremental sync then applies the task's `deletes` to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<DeletedMarkerDto>,
}

/// A listed record is deleted when the value at `field` equals `value`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = DeletedMarker)]
pub struct DeletedMarkerDto {
    /// Dotted path in a record (`archived`, `properties.status`).
    #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
    pub field: String,
    #[schema(schema_with = super::schemas::deleted_value)]
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
#[schema(as = HttpMethod)]
pub enum HttpMethodDto {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// A request: method, path template relative to the base URL (`/tickets/{id}`), fixed query
/// parameters (at most 50, values at most 1024 characters), and where the records are in a list
/// response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = RequestTemplate)]
pub struct RequestTemplateDto {
    pub method: HttpMethodDto,
    /// Starts with `/`; no spaces, control characters, `?` or `#`; placeholders such as `{id}`.
    #[schema(min_length = 1, max_length = 1024, pattern = r"^/([^\s\x00-\x1F\x7F-\x9F?#{}]|\{[A-Za-z0-9_]+\})*$")]
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = super::schemas::query_parameters)]
    pub query: BTreeMap<String, String>,
    /// Dotted path of the records array in a list response (`data.items`); absent: the body is the array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
    pub items_path: Option<String>,
}

impl From<CustomDefinitionDto> for CustomApiDefinition {
    fn from(dto: CustomDefinitionDto) -> Self {
        Self {
            base_url: dto.base_url,
            auth: dto.auth.into(),
            default_headers: dto.default_headers,
            pagination: dto.pagination.into(),
            entities: dto.entities.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<&CustomApiDefinition> for CustomDefinitionDto {
    fn from(d: &CustomApiDefinition) -> Self {
        Self {
            base_url: d.base_url.clone(),
            auth: (&d.auth).into(),
            default_headers: d.default_headers.clone(),
            pagination: (&d.pagination).into(),
            entities: d.entities.iter().map(Into::into).collect(),
        }
    }
}

impl From<CustomAuthDto> for CustomAuth {
    fn from(dto: CustomAuthDto) -> Self {
        match dto {
            CustomAuthDto::ApiKey { location, name, prefix } => CustomAuth::ApiKey { location: location.into(), name, prefix },
            CustomAuthDto::Bearer => CustomAuth::Bearer,
            CustomAuthDto::Basic => CustomAuth::Basic,
            CustomAuthDto::Oauth2ClientCredentials { token_url, scopes } => CustomAuth::Oauth2ClientCredentials { token_url, scopes },
        }
    }
}

impl From<&CustomAuth> for CustomAuthDto {
    fn from(auth: &CustomAuth) -> Self {
        match auth {
            CustomAuth::ApiKey { location, name, prefix } => {
                CustomAuthDto::ApiKey { location: (*location).into(), name: name.clone(), prefix: prefix.clone() }
            }
            CustomAuth::Bearer => CustomAuthDto::Bearer,
            CustomAuth::Basic => CustomAuthDto::Basic,
            CustomAuth::Oauth2ClientCredentials { token_url, scopes } => {
                CustomAuthDto::Oauth2ClientCredentials { token_url: token_url.clone(), scopes: scopes.clone() }
            }
        }
    }
}

impl From<PaginationDto> for Pagination {
    fn from(dto: PaginationDto) -> Self {
        match dto {
            PaginationDto::Cursor { cursor_param, next_cursor_path, limit_param, page_size } => {
                Pagination::Cursor { cursor_param, next_cursor_path, limit_param, page_size }
            }
            PaginationDto::Page { page_param, start_page, limit_param, page_size } => {
                Pagination::Page { page_param, start_page, limit_param, page_size }
            }
            PaginationDto::Offset { offset_param, limit_param, page_size } => Pagination::Offset { offset_param, limit_param, page_size },
            PaginationDto::Link { limit_param, page_size } => Pagination::Link { limit_param, page_size },
            PaginationDto::None => Pagination::None,
        }
    }
}

impl From<&Pagination> for PaginationDto {
    fn from(p: &Pagination) -> Self {
        match p.clone() {
            Pagination::Cursor { cursor_param, next_cursor_path, limit_param, page_size } => {
                PaginationDto::Cursor { cursor_param, next_cursor_path, limit_param, page_size }
            }
            Pagination::Page { page_param, start_page, limit_param, page_size } => {
                PaginationDto::Page { page_param, start_page, limit_param, page_size }
            }
            Pagination::Offset { offset_param, limit_param, page_size } => PaginationDto::Offset { offset_param, limit_param, page_size },
            Pagination::Link { limit_param, page_size } => PaginationDto::Link { limit_param, page_size },
            Pagination::None => PaginationDto::None,
        }
    }
}

impl From<EntityDto> for EntityDefinition {
    fn from(dto: EntityDto) -> Self {
        Self {
            name: dto.name,
            id_field: dto.id_field,
            updated_at_field: dto.updated_at_field,
            updated_since_param: dto.updated_since_param,
            list: dto.list.into(),
            get: dto.get.map(Into::into),
            upsert: dto.upsert.map(Into::into),
            delete: dto.delete.map(Into::into),
            deleted: dto.deleted.map(|d| DeletedMarker { field: d.field, value: d.value }),
        }
    }
}

impl From<&EntityDefinition> for EntityDto {
    fn from(e: &EntityDefinition) -> Self {
        Self {
            name: e.name.clone(),
            id_field: e.id_field.clone(),
            updated_at_field: e.updated_at_field.clone(),
            updated_since_param: e.updated_since_param.clone(),
            list: (&e.list).into(),
            get: e.get.as_ref().map(Into::into),
            upsert: e.upsert.as_ref().map(Into::into),
            delete: e.delete.as_ref().map(Into::into),
            deleted: e.deleted.as_ref().map(|d| DeletedMarkerDto { field: d.field.clone(), value: d.value.clone() }),
        }
    }
}

impl From<HttpMethodDto> for HttpMethod {
    fn from(dto: HttpMethodDto) -> Self {
        match dto {
            HttpMethodDto::Get => HttpMethod::Get,
            HttpMethodDto::Post => HttpMethod::Post,
            HttpMethodDto::Put => HttpMethod::Put,
            HttpMethodDto::Patch => HttpMethod::Patch,
            HttpMethodDto::Delete => HttpMethod::Delete,
        }
    }
}

impl From<HttpMethod> for HttpMethodDto {
    fn from(method: HttpMethod) -> Self {
        match method {
            HttpMethod::Get => HttpMethodDto::Get,
            HttpMethod::Post => HttpMethodDto::Post,
            HttpMethod::Put => HttpMethodDto::Put,
            HttpMethod::Patch => HttpMethodDto::Patch,
            HttpMethod::Delete => HttpMethodDto::Delete,
        }
    }
}

impl From<RequestTemplateDto> for RequestTemplate {
    fn from(dto: RequestTemplateDto) -> Self {
        Self { method: dto.method.into(), path: dto.path, query: dto.query, items_path: dto.items_path }
    }
}

impl From<&RequestTemplate> for RequestTemplateDto {
    fn from(t: &RequestTemplate) -> Self {
        Self { method: t.method.into(), path: t.path.clone(), query: t.query.clone(), items_path: t.items_path.clone() }
    }
}

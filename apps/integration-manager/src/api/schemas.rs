//! Schemas of collection fields whose item or key constraints the derive cannot state
//! (`#[schema(schema_with = ...)]`), so the document still names every rule the API enforces.

use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{Array, Object};

/// A header or parameter name (RFC 9110 token), 1 to 128 characters.
pub const HEADER_NAME: &str = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}$";

fn string(min: usize, max: usize, pattern: Option<&str>) -> Object {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(min)).max_length(Some(max)).pattern(pattern).build()
}

fn array_of(item: Object, max_items: usize, description: &str) -> Array {
    ArrayBuilder::new()
        .items(utoipa::openapi::RefOr::T(Schema::Object(item)))
        .max_items(Some(max_items))
        .description(Some(description))
        .build()
}

/// Header values: no control characters but tab (as `char::is_control` judges them).
const HEADER_VALUE: &str = r"^[^\x00-\x08\x0A-\x1F\x7F-\x9F]*$";

fn map_of(max_properties: usize, value_max: usize, description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(Schema::Object(string(1, 128, Some(HEADER_NAME)))))
        .additional_properties(Some(AdditionalProperties::RefOr(string(0, value_max, Some(HEADER_VALUE)).into())))
        .max_properties(Some(max_properties))
        .description(Some(description))
        .build()
}

/// OAuth 2.0 scopes: at most 100, each 1 to 200 characters without spaces or control characters.
pub fn scopes() -> Array {
    array_of(string(1, 200, Some(r"^[^\s\x00-\x1F\x7F-\x9F]+$")), 100, "OAuth 2.0 scopes, each 1 to 200 characters without spaces")
}

/// Text without control characters (as `char::is_control` judges them).
pub const TEXT: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";

/// What a soft-deleted record's field equals: a boolean, a number or a string of 1 to 256
/// characters; a value rule (`x-rule`), so any other value is a value problem (422) worded as
/// the domain words it.
pub fn deleted_value() -> Schema {
    let of = |kind: Type| ObjectBuilder::new().schema_type(kind);
    let any_of = utoipa::openapi::schema::AnyOfBuilder::new()
        .item(of(Type::Boolean).build())
        .item(of(Type::Number).build())
        .item(of(Type::String).min_length(Some(1)).max_length(Some(256)).build())
        .description(Some("A boolean, a number or a string of 1 to 256 characters (`true`, `\"deleted\"`)"))
        .extensions(Some(
            utoipa::openapi::extensions::ExtensionsBuilder::new()
                .add(super::body::RULE, serde_json::json!({"message": "must be a boolean, a number or a string of 1 to 256 characters"}))
                .build(),
        ))
        .build();
    Schema::AnyOf(any_of)
}

/// A five-field cron expression as the scheduler parses it: minute, hour, day of month, month,
/// day of week; each `*` (with an optional `/step`) or a list of values and ranges (a range
/// with an optional `/step`); month and day names in any case; `L` in the day of month, `?`
/// alone as the day of month or week. A range goes upwards (`1-5`, not `5-1`).
pub fn cron() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]))
        .max_length(Some(256))
        .pattern(Some(CRON.as_str()))
        .examples([serde_json::json!("*/15 * * * *"), serde_json::json!("0 9 * * MON-FRI")])
        .description(Some("A five-field cron expression: minute hour day-of-month month day-of-week"))
        .build()
}

static CRON: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let any_case = |words: &str| -> Vec<String> {
        words.split(' ').map(|w| w.chars().map(|c| format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())).collect()).collect()
    };
    let months = any_case("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC").join("|");
    let days = any_case("SUN MON TUE WED THU FRI SAT").join("|");
    // `*` (with a step) or `?` stand alone; a list has values and ranges (a step only on a range).
    let field = |value: &str, alone: &str, item: &str| {
        let range = format!(r"({value})(-({value})(/[1-9][0-9]?)?)?");
        let range = if item.is_empty() { range } else { format!("({range}|{item})") };
        format!(r"(\*(/[1-9][0-9]?)?{alone}|{range}(,{range})*)")
    };
    let fields = [
        field("[1-5]?[0-9]", "", ""),
        field("1?[0-9]|2[0-3]", "", ""),
        field("[1-9]|[12][0-9]|3[01]", "|[?]", "[Ll]"),
        field(&format!("[1-9]|1[0-2]|{months}"), "", ""),
        field(&format!("[0-7]|{days}"), "|[?]", ""),
    ];
    format!("^ *{} *$", fields.join(" +"))
});

/// An interval of 1 minute to 365 days: a whole number of `s`, `m`, `h` or `d`.
pub fn every() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]))
        .max_length(Some(32))
        .pattern(Some(concat!(
            r"^(([1-9]|[1-9][0-9]|[12][0-9]{2}|3[0-5][0-9]|36[0-5])d",
            r"|([1-9][0-9]{0,2}|[1-7][0-9]{3}|8[0-6][0-9]{2}|87[0-5][0-9]|8760)h",
            r"|([1-9][0-9]{0,4}|[1-4][0-9]{5}|5[01][0-9]{4}|52[0-4][0-9]{3}|525[0-5][0-9]{2}|525600)m",
            r"|([6-9][0-9]|[1-9][0-9]{2,6}|[12][0-9]{7}|30[0-9]{6}|31[0-4][0-9]{5}|315[0-2][0-9]{4}|3153[0-5][0-9]{3}|31536000)s)$"
        )))
        .examples([serde_json::json!("10m")])
        .description(Some("An interval of `1m` to `365d`: a whole number of `s`, `m`, `h` or `d`"))
        .build()
}

/// The auth modes of a provider: 1 to 5, each once.
pub fn auth_modes() -> Array {
    ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name("AuthMode"))
        .min_items(Some(1))
        .max_items(Some(5))
        .unique_items(true)
        .description(Some("The modes a connection may use, each once"))
        .build()
}

/// Entity names: at most 100 snake_case names.
pub fn entity_names() -> Array {
    array_of(string(1, 64, Some("^[a-z][a-z0-9_]*$")), 100, "snake_case entity names, 1 to 64 characters")
}

/// Event-type filters: at most 50 exact deliverable types or wildcards.
pub fn event_type_filters() -> Array {
    array_of(
        string(1, 100, Some(&event_type_filter_pattern())),
        50,
        "Exact event types or wildcards (`integration.*`, `*`); empty: every deliverable event",
    )
}

/// The states of an integration a client may set: `error` is the service's to set (a body
/// that sends it is refused for its value, 422).
pub fn settable_integration_status() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]))
        // A pattern, not an enum: `error` is a known state the client may not set, a value
        // problem (422), where an unknown word is a shape problem (400).
        .pattern(Some("^(active|inactive)$"))
        .description(Some("`active` (default for new integrations) or `inactive`; absent on update keeps the current status"))
        .build()
}

/// What `validate_event_pattern` accepts: `*`, a deliverable event type, or a prefix of one
/// that ends at a dot followed by `*` (`integration.*`, `sync.task.*`).
fn event_type_filter_pattern() -> String {
    let mut filters = vec!["*".to_owned()];
    for event_type in im_domain::webhooks::endpoint::DELIVERABLE {
        let name = event_type.as_str();
        filters.push(name.to_owned());
        filters.extend(name.match_indices('.').map(|(dot, _)| format!("{}*", &name[..=dot])));
    }
    filters.sort();
    filters.dedup();
    let escaped: Vec<String> = filters.iter().map(|f| f.replace('.', r"\.").replace('*', r"\*")).collect();
    format!("^({})$", escaped.join("|"))
}

/// Request headers of a webhook endpoint: at most 20.
pub fn webhook_headers() -> Object {
    map_of(20, 4096, "Extra request headers; not the signature headers, content-type, user-agent or host")
}

/// Default headers of a custom API: at most 50 (never `Authorization`).
pub fn default_headers() -> Object {
    map_of(50, 4096, "Headers sent with every request (never `Authorization`: the auth scheme sets it)")
}

/// A JSON scalar: a string, number, boolean or null.
pub fn json_scalar() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Number, Type::Boolean, Type::Null]))
        .description(Some("The value that must be there: a string, number, boolean or null (at most 256 bytes of JSON)"))
        .build()
}

/// Query parameters a provider sends with every request: at most 20, values with `{config}`
/// placeholders.
pub fn default_query() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(Schema::Object(string(1, 128, Some(r"^[A-Za-z0-9_\-.\[\]]+$")))))
        .additional_properties(Some(AdditionalProperties::RefOr(string(1, 1024, Some(r"^[^\x00-\x1F\x7F-\x9F]*$")).into())))
        .max_properties(Some(20))
        .description(Some("Query parameters sent with every request; `{name}` takes the integration's configuration value"))
        .build()
}

/// Fixed query parameters of a request template: at most 50.
pub fn query_parameters() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(Schema::Object(string(1, 128, Some(r"^[A-Za-z0-9_\-.\[\]]+$")))))
        .additional_properties(Some(AdditionalProperties::RefOr(string(0, 1024, Some(TEXT)).into())))
        .max_properties(Some(50))
        .description(Some("Fixed query parameters"))
        .build()
}

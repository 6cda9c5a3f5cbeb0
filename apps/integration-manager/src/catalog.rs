//! The built-in provider catalog, seeded on first start (`data/providers.json`).

use anyhow::Context as _;
use im_domain::provider::ProviderSpec;

const PROVIDERS: &str = include_str!("../data/providers.json");

/// The providers shipped with the service.
///
/// # Errors
/// When the shipped file does not parse (a defect caught by the tests).
pub fn builtin_providers() -> anyhow::Result<Vec<ProviderSpec>> {
    serde_json::from_str(PROVIDERS).context("data/providers.json does not parse")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use im_domain::custom::Pagination;

    use super::*;

    #[test]
    fn entities_ship_with_each_pagination_style() {
        let providers = builtin_providers().unwrap();
        let find = |id: &str| providers.iter().find(|p| p.id.as_str() == id).unwrap_or_else(|| panic!("{id} is missing"));
        let style = |p: &Pagination| match p {
            Pagination::Cursor { .. } => "cursor",
            Pagination::Page { .. } => "page",
            Pagination::Offset { .. } => "offset",
            Pagination::Link { .. } => "link",
            Pagination::None => "none",
        };
        for (id, entity, expected) in [
            ("github", "issue", "link"),
            ("gitlab", "issue", "page"),
            ("jira", "issue", "cursor"),
            ("zendesk", "ticket", "cursor"),
            ("hubspot", "contact", "cursor"),
            ("pagerduty", "incident", "offset"),
        ] {
            let p = find(id);
            assert!(p.entities.iter().any(|e| e.name == entity), "{id} has no {entity} entity");
            assert_eq!(style(p.pagination.as_ref().unwrap()), expected, "{id}");
        }
        let github = find("github");
        assert_eq!((github.verification.as_ref().unwrap().path.as_str()), "/user");
    }

    /// The `{name}` placeholders of a template.
    fn placeholders(template: &str) -> Vec<String> {
        template.split('{').skip(1).filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_owned())).collect()
    }

    /// Every placeholder the service fills from an integration's configuration (base URL,
    /// OAuth2 URLs, default query, verification path) names a required text property of the
    /// provider's config schema, so that no valid integration lacks it.
    #[test]
    fn every_placeholder_is_a_required_config_value() {
        for p in builtin_providers().unwrap() {
            let schema = &p.config_schema;
            let required: Vec<&str> = schema["required"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            let mut templates = vec![p.api_base_url.clone()];
            templates.extend(p.authorization_url.iter().chain(&p.token_url).cloned());
            templates.extend(p.default_query.values().cloned());
            templates.extend(p.verification.iter().map(|v| v.path.clone()));
            for name in templates.iter().flat_map(|t| placeholders(t)) {
                assert!(required.contains(&name.as_str()), "{}: {{{name}}} is not a required config property", p.id);
                assert_eq!(schema["properties"][&name]["type"], "string", "{}: {name} is not text", p.id);
            }
        }
    }

    /// What each provider's documentation says about authenticating, as the catalog states it.
    #[test]
    fn credentials_go_where_each_provider_documents() {
        use im_domain::custom::ApiKeyLocation;
        use serde_json::json;
        let providers = builtin_providers().unwrap();
        let find = |id: &str| providers.iter().find(|p| p.id.as_str() == id).unwrap_or_else(|| panic!("{id} is missing"));
        let key = |id: &str| find(id).api_key.clone().unwrap_or_else(|| panic!("{id} takes no API key"));
        // PagerDuty: `Authorization: Token token=<key>`; Opsgenie: `Authorization: GenieKey <key>`;
        // Discord bots: `Authorization: Bot <token>`.
        for (id, prefix) in [("pagerduty", "Token token="), ("opsgenie", "GenieKey "), ("discord", "Bot ")] {
            let placement = key(id);
            assert_eq!((placement.location, placement.name.as_str()), (ApiKeyLocation::Header, "Authorization"), "{id}");
            assert_eq!(placement.value("k"), format!("{prefix}k"), "{id}");
        }
        // Trello: the Power-Up's public key (config) as `key=`, the user's token as `token=`.
        let trello = find("trello");
        assert_eq!((key("trello").location, key("trello").name.as_str()), (ApiKeyLocation::Query, "token"));
        assert_eq!(trello.default_query.get("key").map(String::as_str), Some("{apiKey}"));
        // Slack answers 200 with `"ok": false` to a refused token.
        let expect = find("slack").verification.as_ref().and_then(|v| v.expect.clone()).expect("slack checks the body");
        assert!(expect.holds(Some(&json!({"ok": true}))) && !expect.holds(Some(&json!({"ok": false, "error": "invalid_auth"}))));
        // Salesforce: the My Domain name fills the base URL.
        assert_eq!(find("salesforce").api_base_url, "https://{myDomain}.my.salesforce.com/services/data");
    }

    #[test]
    fn every_builtin_provider_is_valid_and_unique() {
        let providers = builtin_providers().unwrap();
        assert!(providers.len() >= 20, "at least 20 providers ship");
        let mut ids = HashSet::new();
        for p in &providers {
            p.validate().unwrap_or_else(|e| panic!("{}: {e}", p.id));
            assert!(ids.insert(p.id.clone()), "{} is listed twice", p.id);
            assert!(p.verification.is_some(), "{} has no verification request", p.id);
        }
        for wanted in [
            "github",
            "gitlab",
            "bitbucket",
            "azure-devops",
            "jira",
            "linear",
            "asana",
            "slack",
            "microsoft-teams",
            "discord",
            "notion",
            "confluence",
            "google-drive",
            "dropbox",
            "salesforce",
            "hubspot",
            "zendesk",
            "stripe",
            "pagerduty",
            "sentry",
            "datadog",
        ] {
            assert!(ids.iter().any(|id| id.as_str() == wanted), "{wanted} is missing");
        }
    }
}

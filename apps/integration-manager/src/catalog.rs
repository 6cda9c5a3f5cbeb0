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

//! Tidy checks of the workspace's invariants (docs/architecture.md), run as ordinary tests.

use std::path::Path;

use crate::helpers::workspace;

fn manifest(path: &Path) -> toml::Table {
    std::fs::read_to_string(path).unwrap().parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn packages() -> Vec<(String, toml::Table)> {
    let root = workspace();
    let mut out = Vec::new();
    for dir in ["crates", "apps"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path().join("Cargo.toml");
            if path.exists() {
                let name = path.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
                out.push((name, manifest(&path)));
            }
        }
    }
    out.push(("tests".into(), manifest(&root.join("tests/Cargo.toml"))));
    out
}

fn deps(table: &toml::Table, section: &str) -> Vec<String> {
    table.get(section).and_then(|d| d.as_table()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn the_domain_depends_on_no_framework_runtime_client_or_driver() {
    let domain = manifest(&workspace().join("crates/im-domain/Cargo.toml"));
    let forbidden =
        ["actix", "tokio", "reqwest", "hyper", "rusqlite", "sqlx", "azure", "lapin", "axum", "async-std", "wiremock", "tracing-subscriber"];
    for dep in deps(&domain, "dependencies") {
        assert!(!forbidden.iter().any(|f| dep.starts_with(f)), "im-domain must not depend on {dep}");
        let internal = dep.starts_with("im-") || dep == "integration-manager";
        assert!(!internal, "im-domain must not depend on {dep}");
    }
}

/// Adapter-side libraries: shared by several adapters, depending on the domain only, holding no
/// port implementation of their own.
const SUPPORT_LIBRARIES: [&str; 1] = ["im-platform-http"];

#[test]
fn adapters_depend_on_the_domain_only() {
    for (name, table) in packages() {
        if name == "im-domain" || name == "integration-manager" || name == "tests" {
            continue;
        }
        let support = SUPPORT_LIBRARIES.contains(&name.as_str());
        for dep in deps(&table, "dependencies") {
            let internal = dep.starts_with("im-") || dep == "integration-manager";
            let allowed = dep == "im-domain" || (!support && SUPPORT_LIBRARIES.contains(&dep.as_str()));
            assert!(
                !internal || allowed,
                "{name} must not depend on {dep}: adapters depend on the domain (and its support libraries), never on each other or the app"
            );
        }
    }
}

#[test]
fn every_package_inherits_the_workspace_settings() {
    for (name, table) in packages() {
        let package = table["package"].as_table().unwrap();
        assert_eq!(
            package["name"].as_str(),
            Some(if name == "tests" { "im-system-tests" } else { name.as_str() }),
            "folder name = package name"
        );
        assert_eq!(package["edition"].get("workspace").and_then(|v| v.as_bool()), Some(true), "{name}: edition.workspace");
        assert_eq!(
            table.get("lints").and_then(|l| l.get("workspace")).and_then(|v| v.as_bool()),
            Some(true),
            "{name}: [lints] workspace = true"
        );
    }
}

#[test]
fn the_top_level_has_the_agreed_shape() {
    let root = workspace();
    for entry in [
        "Cargo.toml",
        "crates",
        "apps",
        "tests",
        "deploy",
        "docs",
        "Makefile",
        "README.md",
        ".ci/run",
        "docs/architecture.md",
        "docs/configuration.md",
        "deploy/config/production.toml",
    ] {
        assert!(root.join(entry).exists(), "{entry} is missing");
    }
}

/// Every key of the built-in defaults is documented in the configuration reference.
#[test]
fn every_configuration_key_is_documented() {
    let defaults: toml::Table = integration_manager::config::DEFAULTS.parse().unwrap();
    let reference = std::fs::read_to_string(workspace().join("docs/configuration.md")).unwrap();
    for (section, keys) in &defaults {
        for key in keys.as_table().unwrap().keys() {
            let full = format!("{section}.{key}");
            assert!(reference.contains(&format!("`{full}`")), "{full} is not in docs/configuration.md");
        }
    }
}

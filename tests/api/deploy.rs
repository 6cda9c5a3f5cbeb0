//! The deploy package: the Kubernetes manifests parse and carry the essentials (probes on the
//! service's health endpoints, a non-root user, resource requests and limits, a disruption
//! budget and an autoscaler per role), the Dockerfile runs as non-root with a health check, and
//! the production configuration loads.

use std::collections::BTreeMap;

use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::workspace;

/// Every document of every manifest in `deploy/k8s`, keyed by `kind/name`.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut all = BTreeMap::new();
    let dir = workspace().join("deploy/k8s");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without kind", path.display()));
            let name = doc["metadata"]["name"].as_str().unwrap_or("");
            all.insert(format!("{kind}/{name}"), doc);
        }
    }
    all
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str().unwrap_or_else(|| panic!("{what} is missing"))
}

#[test]
fn each_role_has_a_deployment_with_probes_non_root_and_resources() {
    let all = manifests();
    for role in ["api", "worker"] {
        let name = format!("integration-manager-{role}");
        let deployment = &all[&format!("Deployment/{name}")];
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "{role}: runAsNonRoot");
        assert!(pod["securityContext"]["runAsUser"].as_i64().is_some_and(|u| u > 0), "{role}: a non-root uid");
        let containers = pod["containers"].as_vec().expect("containers");
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        let args: Vec<&str> = c["args"].as_vec().unwrap().iter().filter_map(Yaml::as_str).collect();
        assert_eq!(args, ["serve", "--role", role]);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false), "{role}");
        assert_eq!(text(&c["livenessProbe"]["httpGet"]["path"], "livenessProbe"), "/health/live", "{role}");
        assert_eq!(text(&c["readinessProbe"]["httpGet"]["path"], "readinessProbe"), "/health/ready", "{role}");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(!c["resources"][bound][resource].is_badvalue(), "{role}: resources.{bound}.{resource}");
            }
        }
        // Configuration from the ConfigMap, secrets from the Secret.
        assert_eq!(text(&c["envFrom"][0]["secretRef"]["name"], "secretRef"), "integration-manager-secrets");
        let volumes = pod["volumes"].as_vec().unwrap();
        assert!(volumes.iter().any(|v| v["configMap"]["name"].as_str() == Some("integration-manager-config")), "{role}: the ConfigMap");
        // The grace period outlasts server.shutdown_timeout, so a stop cuts no work in half.
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 25, "{role}");

        let selector = &deployment["spec"]["selector"]["matchLabels"];
        let pdb = &all[&format!("PodDisruptionBudget/{name}")];
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector, "{role}: the PDB selects the Deployment's pods");
        let hpa = &all[&format!("HorizontalPodAutoscaler/{name}")];
        assert_eq!(text(&hpa["spec"]["scaleTargetRef"]["name"], "scaleTargetRef"), name);
        assert!(hpa["spec"]["maxReplicas"].as_i64() > hpa["spec"]["minReplicas"].as_i64(), "{role}: the HPA can scale");
    }
    assert!(all.contains_key("Service/integration-manager"));
    assert!(all.contains_key("Secret/integration-manager-secrets"));
}

/// The configuration file of the ConfigMap and `deploy/config/production.toml` load, and what
/// they leave unset is exactly what the Secret supplies.
#[test]
fn the_production_configuration_loads_with_the_secret() {
    use integration_manager::config::Settings;
    let all = manifests();
    let supplied: Vec<String> = all["Secret/integration-manager-secrets"]["stringData"]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| text(k, "a Secret key").trim_start_matches("IM_").to_lowercase().replace("__", "."))
        .collect();
    let embedded = text(&all["ConfigMap/integration-manager-config"]["data"]["production.toml"], "production.toml").to_owned();
    let file = std::fs::read_to_string(workspace().join("deploy/config/production.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [("configmap.toml", embedded), ("production.toml", file)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &content).unwrap();
        if let Err(e) = Settings::load(Some(&path)) {
            // The suite's own switches (`IM_TEST_BACKEND`, `IM_TEST_EVENTS`) are `IM_` variables too.
            for key in e.keys().into_iter().filter(|k| !k.starts_with("test_")) {
                assert!(supplied.iter().any(|s| s == key), "{name}: {key} is neither set nor supplied by the Secret: {e}");
            }
        }
        let table: toml::Table = content.parse().unwrap();
        assert_eq!(table["storage"]["backend"].as_str(), Some("cosmos"), "{name}: production runs on Cosmos DB");
        assert_eq!(table["events"]["backend"].as_str(), Some("rabbitmq"), "{name}");
        assert_eq!(table["secrets"]["backend"].as_str(), Some("http"), "{name}: Secret Management");
        assert_eq!(table["auth"]["mode"].as_str(), Some("jwks"), "{name}: User Management's tokens");
        assert_eq!(table["shard_manager"]["backend"].as_str(), Some("http"), "{name}: the Shard Manager");
        assert_eq!(table["logging"]["backend"].as_str(), Some("http"), "{name}: the Logging Service");
    }
}

#[test]
fn the_image_runs_as_non_root_with_a_health_check() {
    let dockerfile = std::fs::read_to_string(workspace().join("deploy/Dockerfile")).unwrap();
    let stages = dockerfile.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "a multi-stage build");
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = runtime.lines().find_map(|l| l.strip_prefix("USER ")).expect("the runtime stage sets USER");
    assert!(!user.starts_with("root") && !user.starts_with("0"), "USER {user}");
    assert!(runtime.contains("HEALTHCHECK") && runtime.contains("probe"), "a health check through the binary's probe");
    let compose = YamlLoader::load_from_str(&std::fs::read_to_string(workspace().join("deploy/docker-compose.yml")).unwrap()).unwrap();
    for service in ["api", "worker", "rabbitmq", "cosmos"] {
        assert!(!compose[0]["services"][service].is_badvalue(), "docker-compose.yml has {service}");
    }
    let definitions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("deploy/rabbitmq/definitions.json")).unwrap()).unwrap();
    assert_eq!(definitions["exchanges"][0]["name"], "integration-manager.events");
}

//! The README's examples run against the service, so the documentation cannot drift: every
//! `curl` call it shows (its method, path and body) and every request body it shows in a JSON
//! block are sent, and each must succeed. Every exchange is also checked against the OpenAPI
//! document (`crate::contract`), as all requests of this suite are.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{spawn_app, workspace};

/// A call the README shows: method, path (with its query) and body.
#[derive(Debug)]
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    /// The README sends it with `$ADMIN_TOKEN`.
    admin: bool,
}

/// The `curl` calls of the README's shell blocks (continuation lines joined); calls whose path
/// needs a value from an earlier answer (`$WEBHOOK`) are left out.
fn curl_calls(readme: &str) -> Vec<Call> {
    let joined = readme.replace("\\\n", " ");
    let mut calls = Vec::new();
    for line in joined.lines().map(str::trim).filter(|l| l.starts_with("curl ") || l.contains("$(") && l.contains("curl ")) {
        let Some(at) = line.find("http://127.0.0.1:3026") else { continue };
        let rest = &line[at + "http://127.0.0.1:3026".len()..];
        let path: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '"').collect();
        if path.contains('$') {
            continue;
        }
        let method = if line.contains("-X POST") { Method::POST } else { Method::GET };
        let body = line.find("-d '").map(|start| {
            let text = &line[start + 4..];
            let end = text.rfind('\'').expect("a quoted body");
            serde_json::from_str(&text[..end]).unwrap_or_else(|e| panic!("README body is not JSON ({e}): {}", &text[..end]))
        });
        calls.push(Call { method, path, body, admin: line.contains("$ADMIN_TOKEN") });
    }
    calls
}

/// The request bodies shown in JSON blocks: an integration body goes to `/api/v1/integrations`.
fn json_bodies(readme: &str) -> Vec<Call> {
    readme
        .split("```json\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter_map(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|value| value.get("providerId").is_some())
        .map(|body| Call { method: Method::POST, path: "/api/v1/integrations".into(), body: Some(body), admin: false })
        .collect()
}

#[tokio::test]
async fn the_readme_examples_work() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let mut calls = curl_calls(&readme);
    calls.extend(json_bodies(&readme));
    assert!(calls.len() >= 6, "the README's examples were found: {calls:?}");
    assert!(calls.iter().any(|c| c.path == "/api/v1/webhooks" && c.body.is_some()), "{calls:?}");
    assert!(calls.iter().any(|c| c.body.as_ref().is_some_and(|b| b["providerId"] == "custom")), "{calls:?}");

    let app = spawn_app().await;
    let (token, admin) = (app.member(), app.admin());
    assert!(calls.iter().any(|c| c.admin), "an admin example is sent as admin: {calls:?}");
    for call in calls {
        let mut request = app.request(call.method.clone(), &call.path, if call.admin { &admin } else { &token });
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "README example {} {} answered {status}: {text}", call.method, call.path);
    }
}

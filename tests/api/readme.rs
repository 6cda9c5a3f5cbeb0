//! The README's examples run against the service, so the documentation cannot drift: every
//! `curl` call it shows (its method, path and body) and every request body it shows in a JSON
//! block are sent, and each must succeed. The custom-API walkthrough runs as a whole, in order,
//! against a local server answering the file it creates; the sync walkthrough likewise, against
//! the fake provider, and its run must sync every record. Every exchange is also checked against
//! the OpenAPI document (`crate::contract`), as all requests of this suite are.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app, spawn_app_with, workspace};

/// The headings of the walkthroughs, which run on their own (each needs a local API and a
/// service that allows `http` and loopback destinations).
const WALKTHROUGH: &str = "## A custom API on your machine";
const SYNC_WALKTHROUGH: &str = "### Walkthrough: a local JSON API, both ways";

/// The README without the section under `heading` (up to the next heading of its level or
/// above, outside code blocks), and the section.
fn split_walkthrough(readme: &str, heading: &str) -> (String, String) {
    let start = readme.find(heading).unwrap_or_else(|| panic!("the README has the section {heading}"));
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut end = readme.len();
    let mut at = start + heading.len();
    let mut in_code = false;
    for line in readme[at..].split_inclusive('\n') {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && (1..=level).contains(&hashes) && line[hashes..].starts_with(' ') {
            end = at;
            break;
        }
        at += line.len();
    }
    (format!("{}{}", &readme[..start], &readme[end..]), readme[start..end].to_owned())
}

/// A body as the shell sends it: `'$NAME'` (a variable outside the single quotes) is `$NAME`.
fn shell_body(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("'$") {
        let after = &rest[at + 2..];
        let len = after.find('\'').expect("a variable between single quotes");
        out.push_str(&rest[..at]);
        out.push('$');
        out.push_str(&after[..len]);
        rest = &after[len + 1..];
    }
    out.push_str(rest);
    out
}

/// A call the README shows: method, path (with its query) and body.
#[derive(Debug)]
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    /// The README sends it with `$ADMIN_TOKEN`.
    admin: bool,
    /// The shell variable the README keeps the answer's `id` in (`INTEGRATION=$(curl ...)`).
    assigns: Option<String>,
}

/// The `curl` calls of the README's shell blocks (continuation lines joined), paths with
/// shell variables (`$WEBHOOK`) included.
fn all_curl_calls(readme: &str) -> Vec<Call> {
    let joined = readme.replace("\\\n", " ");
    let mut calls = Vec::new();
    for line in joined.lines().map(str::trim).filter(|l| l.starts_with("curl ") || l.contains("$(") && l.contains("curl ")) {
        let Some(at) = line.find("http://127.0.0.1:3026") else { continue };
        let rest = &line[at + "http://127.0.0.1:3026".len()..];
        let path: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '\'' && *c != '"').collect();
        let assigns =
            line.split_once("=$(").map(|(name, _)| name.to_owned()).filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        let method = if line.contains("-X POST") { Method::POST } else { Method::GET };
        let body = line.find("-d '").map(|start| {
            let text = &line[start + 4..];
            let end = text.rfind('\'').expect("a quoted body");
            let text = shell_body(&text[..end]);
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("README body is not JSON ({e}): {text}"))
        });
        calls.push(Call { method, path, body, admin: line.contains("$ADMIN_TOKEN"), assigns });
    }
    calls
}

/// The calls that need no value from an earlier answer.
fn curl_calls(readme: &str) -> Vec<Call> {
    all_curl_calls(readme).into_iter().filter(|c| !c.path.contains('$')).collect()
}

/// The request bodies shown in JSON blocks: an integration body goes to `/api/v1/integrations`.
fn json_bodies(readme: &str) -> Vec<Call> {
    readme
        .split("```json\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter_map(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|value| value.get("providerId").is_some())
        .map(|body| Call { method: Method::POST, path: "/api/v1/integrations".into(), body: Some(body), admin: false, assigns: None })
        .collect()
}

#[tokio::test]
async fn the_readme_examples_work() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let (readme, _) = split_walkthrough(&readme, WALKTHROUGH);
    let (readme, _) = split_walkthrough(&readme, SYNC_WALKTHROUGH);
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

/// The walkthrough, in order: the file it writes is served where it serves it (the port told
/// apart), the service allows what its `make run` line allows, each `$VARIABLE` takes the `id`
/// of the answer the README assigned it from, and the connection test passes, having sent the
/// README's key.
#[tokio::test]
async fn the_custom_api_walkthrough_works() {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let (_, walkthrough) = split_walkthrough(&readme, WALKTHROUGH);
    // `echo '<json>' > /tmp/tickets-api/v1/tickets`, served from `--directory /tmp/tickets-api`.
    let echo = walkthrough.lines().find(|l| l.starts_with("echo '")).expect("the walkthrough writes the API's file");
    let (content, file) = echo["echo '".len()..].split_once("' > ").expect("echo '...' > file");
    let root = walkthrough.split("--directory ").nth(1).and_then(|r| r.split_whitespace().next()).expect("the served directory");
    let served_path = file.strip_prefix(root).expect("the file is under the served directory");
    let records: Value = serde_json::from_str(content).expect("the API's file is JSON");
    assert!(walkthrough.contains("IM_WEBHOOKS__ALLOW_HTTP=true IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS='[\"127.0.0.0/8\"]'"));

    let api = MockServer::start().await;
    let key = "local-demo-key-0001";
    assert!(walkthrough.contains(key));
    Mock::given(method("GET"))
        .and(path(served_path))
        .and(header("X-Api-Key", key))
        .respond_with(ResponseTemplate::new(200).set_body_json(&records))
        .expect(1)
        .mount(&api)
        .await;
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allow_http = true;
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
    })
    .await;
    let token = app.member();
    let calls = all_curl_calls(&walkthrough);
    assert_eq!(calls.len(), 3, "create, connect, test: {calls:?}");
    let (last, _) = run_in_order(&app, &token, calls, &api.uri()).await;
    assert_eq!((last["ok"].clone(), last["status"].clone()), (serde_json::json!(true), serde_json::json!(200)), "{last}");
    api.verify().await;
}

/// Sends `calls` in order: each `$VARIABLE` (in a path or a body) takes the `id` of the answer
/// the README assigned it from, the local API's `http://127.0.0.1:8000` is `api`, and each call
/// must succeed. Returns the last answer and the variables.
async fn run_in_order(app: &TestApp, token: &str, calls: Vec<Call>, api: &str) -> (Value, HashMap<String, String>) {
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut last = Value::Null;
    let substitute = |text: &str, vars: &HashMap<String, String>| {
        vars.iter().fold(text.replace("http://127.0.0.1:8000", api), |t, (name, value)| t.replace(&format!("${name}"), value))
    };
    for call in calls {
        let path = substitute(&call.path, &vars);
        assert!(!path.contains('$'), "every variable was assigned before {path}");
        let mut request = app.request(call.method.clone(), &path, token);
        if let Some(body) = &call.body {
            let text = substitute(&body.to_string(), &vars);
            assert!(!text.contains('$'), "every variable was assigned before {text}");
            request = request.json(&serde_json::from_str(&text).unwrap());
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        last = response.json().await.unwrap_or_default();
        assert!(status.is_success(), "walkthrough {} {path} answered {status}: {last}", call.method);
        if let Some(name) = call.assigns {
            vars.insert(name, last["id"].as_str().expect("an id to keep").to_owned());
        }
    }
    (last, vars)
}

/// The sync walkthrough, in order, against the fake provider (serving the API it describes,
/// with its bearer token and the 120 records its sample answer shows): the run it queues syncs
/// every record both ways.
#[tokio::test]
async fn the_sync_walkthrough_works() {
    use im_testkit::fake_provider::{FakeAuth, FakeProvider};

    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let (_, walkthrough) = split_walkthrough(&readme, SYNC_WALKTHROUGH);
    assert!(walkthrough.contains("IM_WEBHOOKS__ALLOW_HTTP=true IM_WEBHOOKS__ALLOWED_PRIVATE_CIDRS='[\"127.0.0.0/8\"]'"));
    assert!(walkthrough.contains("\"read\": 120, \"created\": 120"), "the sample answer the test checks");
    let token_value = "local-api-token";
    assert!(walkthrough.contains(token_value));
    let fake = FakeProvider::start(120, FakeAuth::Bearer(token_value.into())).await;
    let app = spawn_app_with(|s| {
        s.webhooks.sender.allow_http = true;
        s.webhooks.sender.allowed_private_cidrs = vec!["127.0.0.0/8".into()];
        s.sync.poll_interval = integration_manager::config::HumanDuration::parse("100ms").unwrap();
    })
    .await;
    let token = app.member();
    let calls = all_curl_calls(&walkthrough);
    assert_eq!(calls.len(), 5, "create, connect, task, run, read the execution: {calls:?}");
    let (mut execution, vars) = run_in_order(&app, &token, calls, &fake.base_url()).await;
    let path = format!("/api/v1/sync-tasks/{}/executions/{}", vars["TASK"], vars["EXECUTION"]);
    for _ in 0..240 {
        if !["queued", "running"].contains(&execution["status"].as_str().unwrap_or_default()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        execution = app.get(&path, &token).await.json().await.unwrap();
    }
    assert_eq!(execution["status"], "succeeded", "{execution}");
    assert_eq!(
        (execution["counts"]["inbound"]["read"].clone(), execution["counts"]["inbound"]["created"].clone()),
        (120.into(), 120.into()),
        "{execution}"
    );
    assert!(execution["checkpointsTo"]["provider"].is_string() && execution["checkpointsTo"]["platform"].is_string(), "{execution}");
    let lists: Vec<_> = fake.requests().into_iter().filter(|r| r.path_and_query.starts_with("/records?")).collect();
    assert!(!lists.is_empty() && lists.iter().all(|r| r.authorized), "the API was listed with the connection's token: {lists:?}");
}

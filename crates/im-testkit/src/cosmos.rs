//! The Cosmos DB test server (`tests/cosmos-server`: `@vercel/cosmosdb-server` behind our
//! patching launcher), started once per test process on a free loopback port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::services::in_ci;

struct Server {
    endpoint: String,
    _child: Mutex<Child>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

fn launcher_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/cosmos-server")
}

fn start() -> Result<Server, String> {
    let dir = launcher_dir();
    if !dir.join("node_modules/@vercel/cosmosdb-server").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .map_err(|e| format!("npm is needed to install the Cosmos test server: {e}"))?;
        if !status.success() {
            return Err(format!("`npm ci` in {} failed", dir.display()));
        }
    }
    let mut child = Command::new("node")
        .arg(dir.join("launcher.js"))
        .arg("0")
        .env("COSMOS_LAUNCHER_EXIT_ON_STDIN_EOF", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("node is needed to run the Cosmos test server: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| format!("reading the launcher: {e}"))?;
    let port: u16 = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unexpected launcher output: {line:?}"))?;
    // The child's stdin stays open as long as this process lives; when the process ends, the
    // pipe closes and the launcher stops.
    Ok(Server { endpoint: format!("https://127.0.0.1:{port}/"), _child: Mutex::new(child) })
}

/// The endpoint of the shared test server (`IM_TEST_COSMOS_ENDPOINT` names an already running
/// one). When it cannot be had: in CI a panic saying why; elsewhere `None` and a line on
/// stderr saying the test was skipped.
///
/// # Panics
/// In CI, when the server cannot be started.
pub fn endpoint(test: &str) -> Option<String> {
    if let Ok(endpoint) = std::env::var("IM_TEST_COSMOS_ENDPOINT") {
        return Some(endpoint);
    }
    match SERVER.get_or_init(start) {
        Ok(server) => Some(server.endpoint.clone()),
        Err(e) if in_ci() => panic!("{test}: the Cosmos test server is required in CI: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: the Cosmos test server is not available ({e})");
            None
        }
    }
}

/// A database name no other test uses.
pub fn fresh_database() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

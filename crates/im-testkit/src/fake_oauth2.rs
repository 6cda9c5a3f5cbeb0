//! A fake OAuth2 authorization server on a loopback port, for tests of the token client and of
//! OAuth2 connections.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /authorize?response_type=code&client_id&redirect_uri&state&code_challenge&code_challenge_method=S256[&scope]` | `302` to `redirect_uri?code=...&state=...` (the code remembers the challenge) |
//! | `POST /token` `grant_type=authorization_code` | tokens when the code is known and unused, `redirect_uri` matches and `SHA-256(code_verifier)` is the challenge; else `400 invalid_grant` |
//! | `POST /token` `grant_type=refresh_token` | new tokens (the refresh token rotates); `400 invalid_grant` for an unknown one or while [`FakeOAuth2::refuse_refresh`] is on |
//! | `POST /token` `grant_type=client_credentials` | an access token (no refresh token) |
//!
//! The client authenticates with HTTP basic (`client_id:client_secret`) or in the form; anything
//! else is `401 invalid_client`. Access tokens are `access-1`, `access-2`... in the order issued;
//! every token request is counted by grant type.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use sha2::{Digest, Sha256};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

struct Grant {
    challenge: String,
    redirect_uri: String,
    scope: Option<String>,
}

struct State {
    client_id: String,
    client_secret: String,
    codes: HashMap<String, Grant>,
    refresh_tokens: HashSet<String>,
    issued: Vec<String>,
    expires_in: u64,
    refuse_refresh: bool,
    delay: Duration,
    requests: BTreeMap<String, usize>,
    serial: u64,
}

/// The running fake.
pub struct FakeOAuth2 {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn form(bytes: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(bytes).into_owned().collect()
}

fn error(status: u16, code: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({"error": code, "error_description": format!("the fake refused: {code}")}))
}

impl FakeOAuth2 {
    /// Starts a fake that knows one client.
    pub async fn start(client_id: &str, client_secret: &str) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            codes: HashMap::new(),
            refresh_tokens: HashSet::new(),
            issued: Vec::new(),
            expires_in: 3600,
            refuse_refresh: false,
            delay: Duration::ZERO,
            requests: BTreeMap::new(),
            serial: 0,
        }));
        Mock::given(method("GET")).and(path("/authorize")).respond_with(Authorize(state.clone())).mount(&server).await;
        Mock::given(method("POST")).and(path("/token")).respond_with(Token(state.clone())).mount(&server).await;
        Self { server, state }
    }

    pub fn authorization_url(&self) -> String {
        format!("{}/authorize", self.server.uri())
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.server.uri())
    }

    /// `expires_in` of the tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        lock(&self.state).expires_in = seconds;
    }

    /// Whether refresh requests are answered `invalid_grant`.
    pub fn refuse_refresh(&self, refuse: bool) {
        lock(&self.state).refuse_refresh = refuse;
    }

    /// A delay before every token answer (to widen race windows).
    pub fn set_token_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// Token requests received with this `grant_type` (well-formed or not).
    pub fn requests(&self, grant_type: &str) -> usize {
        lock(&self.state).requests.get(grant_type).copied().unwrap_or(0)
    }

    /// The access tokens issued so far, oldest first.
    pub fn issued(&self) -> Vec<String> {
        lock(&self.state).issued.clone()
    }
}

struct Authorize(Arc<Mutex<State>>);

impl Respond for Authorize {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let mut state = lock(&self.0);
        let get = |k: &str| query.get(k).cloned().unwrap_or_default();
        if get("response_type") != "code" || get("client_id") != state.client_id {
            return error(400, "unauthorized_client");
        }
        if get("code_challenge_method") != "S256" || get("code_challenge").is_empty() || get("redirect_uri").is_empty() {
            return error(400, "invalid_request");
        }
        state.serial += 1;
        let code = format!("code-{}", state.serial);
        state.codes.insert(
            code.clone(),
            Grant { challenge: get("code_challenge"), redirect_uri: get("redirect_uri"), scope: query.get("scope").cloned() },
        );
        let mut location = url::Url::parse(&get("redirect_uri")).expect("the redirect_uri was checked by the service");
        location.query_pairs_mut().append_pair("code", &code).append_pair("state", &get("state"));
        ResponseTemplate::new(302).insert_header("Location", location.as_str())
    }
}

struct Token(Arc<Mutex<State>>);

impl Token {
    fn issue(state: &mut State, refresh: bool, scope: Option<String>) -> ResponseTemplate {
        state.serial += 1;
        let access = format!("access-{}", state.issued.len() + 1);
        state.issued.push(access.clone());
        let mut body = json!({"access_token": access, "token_type": "bearer", "expires_in": state.expires_in});
        if refresh {
            let token = format!("refresh-{}", state.serial);
            state.refresh_tokens.insert(token.clone());
            body["refresh_token"] = json!(token);
        }
        if let Some(scope) = scope {
            body["scope"] = json!(scope);
        }
        ResponseTemplate::new(200).set_body_json(body).set_delay(state.delay)
    }
}

impl Respond for Token {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body = form(&request.body);
        let mut state = lock(&self.0);
        let grant_type = body.get("grant_type").cloned().unwrap_or_default();
        *state.requests.entry(grant_type.clone()).or_default() += 1;
        let delay = state.delay;
        // Client authentication: HTTP basic (form-encoded parts) or the form.
        let basic = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|pair| pair.split_once(':').map(|(i, s)| (decode(i), decode(s))));
        let client = basic.or_else(|| Some((body.get("client_id")?.clone(), body.get("client_secret")?.clone())));
        if client != Some((state.client_id.clone(), state.client_secret.clone())) {
            return error(401, "invalid_client").set_delay(delay);
        }
        match grant_type.as_str() {
            "authorization_code" => {
                let Some(grant) = body.get("code").and_then(|c| state.codes.remove(c)) else {
                    return error(400, "invalid_grant").set_delay(delay);
                };
                let verifier = body.get("code_verifier").cloned().unwrap_or_default();
                let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
                if challenge != grant.challenge || body.get("redirect_uri") != Some(&grant.redirect_uri) {
                    return error(400, "invalid_grant").set_delay(delay);
                }
                Self::issue(&mut state, true, grant.scope)
            }
            "refresh_token" => {
                let known = body.get("refresh_token").is_some_and(|t| state.refresh_tokens.remove(t));
                if state.refuse_refresh || !known {
                    return error(400, "invalid_grant").set_delay(delay);
                }
                Self::issue(&mut state, true, None)
            }
            "client_credentials" => Self::issue(&mut state, false, body.get("scope").cloned()),
            _ => error(400, "unsupported_grant_type").set_delay(delay),
        }
    }
}

fn decode(part: &str) -> String {
    url::form_urlencoded::parse(format!("x={part}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
}

//! The JWKS verifier against a fake User Management key set (wiremock): signatures, claims,
//! key rotation, an outage, the refetch rate limit and refused algorithms.
//!
//! The keys in `tests/keys` were generated for these tests only.

use std::time::Duration;

use im_auth::{JwksAuthenticator, JwksConfig};
use im_domain::auth::{AuthError, Authenticator};
use im_domain::{Caller, Role, TenantId, UserId};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const RSA_A: &[u8] = include_bytes!("keys/rsa-a.der");
const RSA_B: &[u8] = include_bytes!("keys/rsa-b.der");
const EC_A: &[u8] = include_bytes!("keys/ec-a.der");

fn jwk(name: &str) -> Value {
    let text = match name {
        "rsa-a" => include_str!("keys/rsa-a.jwk.json"),
        "rsa-b" => include_str!("keys/rsa-b.jwk.json"),
        "ec-a" => include_str!("keys/ec-a.jwk.json"),
        other => panic!("no key {other}"),
    };
    serde_json::from_str(text).unwrap()
}

fn key_set(names: &[&str]) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"keys": names.iter().map(|n| jwk(n)).collect::<Vec<_>>()}))
}

fn config(server: &MockServer) -> JwksConfig {
    JwksConfig {
        url: format!("{}/.well-known/jwks.json", server.uri()),
        issuer: "https://users.example".into(),
        audience: "integration-manager".into(),
        leeway_secs: 0,
        cache_ttl: Duration::from_secs(600),
        refetch_interval: Duration::from_secs(600),
        timeout: Duration::from_secs(2),
        tenant_claim: "tenant_id".into(),
        roles_claim: "roles".into(),
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({
        "sub": "alice", "tenant_id": "acme", "roles": ["member"],
        "iss": "https://users.example", "aud": "integration-manager", "exp": now() + 60,
    })
}

fn sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
    let key = match kid {
        "rsa-a" => EncodingKey::from_rsa_der(RSA_A),
        "ec-a" => EncodingKey::from_ec_der(EC_A),
        // rsa-b, and made-up key ids signed with it.
        _ => EncodingKey::from_rsa_der(RSA_B),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn serving(set: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET")).and(path("/.well-known/jwks.json")).respond_with(set).mount(&server).await;
    server
}

async fn fetches(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

fn alice() -> Caller {
    Caller::new(TenantId::new("acme").unwrap(), UserId::new("alice").unwrap(), vec![Role::Member])
}

fn invalid(result: &Result<Caller, AuthError>) -> bool {
    matches!(result, Err(AuthError::Invalid(_)))
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_one_fetch() {
    let server = serving(key_set(&["rsa-a", "ec-a"])).await;
    let jwks = JwksAuthenticator::new(config(&server)).unwrap();
    assert_eq!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await, Ok(alice()));
    assert_eq!(jwks.authenticate(&sign(Algorithm::ES256, "ec-a", &claims())).await, Ok(alice()));
    assert_eq!(fetches(&server).await, 1, "the key set is cached");
}

#[tokio::test]
async fn tenant_and_roles_are_read_from_the_configured_claims() {
    let server = serving(key_set(&["rsa-a"])).await;
    let jwks = JwksAuthenticator::new(JwksConfig { tenant_claim: "org".into(), roles_claim: "scope".into(), ..config(&server) }).unwrap();
    let mut c = claims();
    c["org"] = json!("globex");
    c["scope"] = json!("viewer admin unknown");
    let caller = jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &c)).await.unwrap();
    assert_eq!(caller, Caller::new(TenantId::new("globex").unwrap(), UserId::new("alice").unwrap(), vec![Role::Viewer, Role::Admin]));
    let mut without_tenant = claims();
    without_tenant["scope"] = json!("member");
    let result = jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &without_tenant)).await;
    assert_eq!(result, Err(AuthError::Invalid("claim 'org' is not a valid tenant id".into())));
    let mut bad_roles = claims();
    bad_roles["org"] = json!("globex");
    bad_roles["scope"] = json!(42);
    assert!(invalid(&jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &bad_roles)).await));
}

#[tokio::test]
async fn exp_nbf_iss_and_aud_are_checked_and_required() {
    let server = serving(key_set(&["rsa-a"])).await;
    let jwks = JwksAuthenticator::new(config(&server)).unwrap();
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        sign(Algorithm::RS256, "rsa-a", &c)
    };
    let without = |k: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(k);
        sign(Algorithm::RS256, "rsa-a", &c)
    };
    assert_eq!(jwks.authenticate(&with("exp", json!(now() - 120))).await, Err(AuthError::Expired));
    for (case, token) in [
        ("not valid yet", with("nbf", json!(now() + 120))),
        ("wrong issuer", with("iss", json!("https://elsewhere.example"))),
        ("wrong audience", with("aud", json!("another-service"))),
        ("no issuer", without("iss")),
        ("no audience", without("aud")),
        ("no expiry", without("exp")),
        ("no subject", without("sub")),
    ] {
        let result = jwks.authenticate(&token).await;
        assert!(invalid(&result), "{case}: {result:?}");
    }
    assert_eq!(jwks.authenticate(&with("nbf", json!(now() - 5))).await, Ok(alice()), "a past nbf is fine");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_its_first_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).respond_with(key_set(&["rsa-a"])).up_to_n_times(1).mount(&server).await;
    Mock::given(method("GET")).respond_with(key_set(&["rsa-b"])).mount(&server).await;
    let jwks = JwksAuthenticator::new(JwksConfig { refetch_interval: Duration::ZERO, ..config(&server) }).unwrap();
    assert_eq!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await, Ok(alice()));
    // User Management rotates: rsa-b signs from now on, rsa-a is retired.
    assert_eq!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-b", &claims())).await, Ok(alice()));
    assert_eq!(fetches(&server).await, 2);
    let retired = jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await;
    assert_eq!(retired, Err(AuthError::Invalid("unknown key id".into())), "a retired key is gone from the cache");
}

#[tokio::test]
async fn unknown_key_ids_fetch_at_most_once_per_interval() {
    let server = serving(key_set(&["rsa-a"])).await;
    let jwks = JwksAuthenticator::new(JwksConfig { refetch_interval: Duration::from_secs(1), ..config(&server) }).unwrap();
    // Signed up front: signing is slow in debug builds and would eat into the interval.
    let made_up: Vec<String> = (0..20).map(|i| sign(Algorithm::RS256, &format!("made-up-{i}"), &claims())).collect();
    let once_more = sign(Algorithm::RS256, "made-up-again", &claims());
    assert!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await.is_ok());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for token in &made_up {
        assert_eq!(jwks.authenticate(token).await, Err(AuthError::Invalid("unknown key id".into())));
    }
    assert_eq!(fetches(&server).await, 2, "twenty unknown key ids within the interval: one fetch");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(invalid(&jwks.authenticate(&once_more).await));
    assert_eq!(fetches(&server).await, 3, "the next interval allows one more");
}

#[tokio::test]
async fn the_last_good_keys_serve_through_an_outage() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).respond_with(key_set(&["rsa-a"])).up_to_n_times(1).mount(&server).await;
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(503)).mount(&server).await;
    let jwks =
        JwksAuthenticator::new(JwksConfig { cache_ttl: Duration::from_millis(100), refetch_interval: Duration::ZERO, ..config(&server) })
            .unwrap();
    assert_eq!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await, Ok(alice()));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await, Ok(alice()), "stale keys, service down: still served");
    assert!(fetches(&server).await >= 2, "the stale set was fetched again (and failed)");
    assert!(jwks.refresh().await.is_err());
}

#[tokio::test]
async fn no_key_set_ever_fetched_is_unavailable_not_invalid() {
    let server = serving(ResponseTemplate::new(500)).await;
    let jwks = JwksAuthenticator::new(config(&server)).unwrap();
    let result = jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await;
    assert!(matches!(result, Err(AuthError::Unavailable(_))), "{result:?}");
    let garbage = serving(ResponseTemplate::new(200).set_body_string("<html>")).await;
    let jwks = JwksAuthenticator::new(config(&garbage)).unwrap();
    assert!(matches!(jwks.authenticate(&sign(Algorithm::RS256, "rsa-a", &claims())).await, Err(AuthError::Unavailable(_))));
}

#[tokio::test]
async fn other_algorithms_are_refused() {
    let server = serving(key_set(&["rsa-a", "ec-a"])).await;
    let jwks = JwksAuthenticator::new(config(&server)).unwrap();
    // HS256 "signed" with the public key's text: the classic algorithm confusion.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-a".into());
    let confused =
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(jwk("rsa-a")["n"].as_str().unwrap().as_bytes())).unwrap();
    assert_eq!(jwks.authenticate(&confused).await, Err(AuthError::Invalid("unexpected algorithm".into())));
    // RS384 with a key the set publishes for RS256.
    let rs384 = sign(Algorithm::RS384, "rsa-a", &claims());
    assert_eq!(jwks.authenticate(&rs384).await, Err(AuthError::Invalid("unexpected algorithm".into())));
    // ES256 claimed for an RSA key id.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-a".into());
    let mismatched = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_ec_der(EC_A)).unwrap();
    assert_eq!(jwks.authenticate(&mismatched).await, Err(AuthError::Invalid("unexpected algorithm".into())));
    // An unsigned token.
    let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","kid":"rsa-a"}"#), b64(&claims().to_string()));
    assert!(invalid(&jwks.authenticate(&unsigned).await));
    // A token without a key id.
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(), &EncodingKey::from_rsa_der(RSA_A)).unwrap();
    assert_eq!(jwks.authenticate(&no_kid).await, Err(AuthError::Invalid("missing key id".into())));
}

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

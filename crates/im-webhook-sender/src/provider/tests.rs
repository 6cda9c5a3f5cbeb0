//! The provider client against the fake provider API of `im-testkit`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use im_domain::custom::RequestTemplate;
use im_domain::webhooks::endpoint::Cidr;
use im_testkit::fake_provider::{FakeAuth, FakeProvider, Fault};
use serde_json::json;

use super::*;

fn settings() -> ProviderClientSettings {
    ProviderClientSettings {
        connect_timeout: HumanDuration(Duration::from_secs(2)),
        request_timeout: HumanDuration(Duration::from_millis(700)),
        max_response_bytes: 64 * 1024,
        retry_attempts: 4,
        retry_first_delay: HumanDuration(Duration::from_millis(10)),
        retry_max_delay: HumanDuration(Duration::from_millis(40)),
        max_retry_wait: HumanDuration(Duration::from_secs(5)),
        max_concurrency_per_connection: 8,
        requests_per_second: 1000.0,
        burst: 1000,
        user_agent: "integration-manager-tests".into(),
    }
}

fn loopback() -> UrlPolicy {
    UrlPolicy { allow_http: true, allowed_private: vec![Cidr::parse("127.0.0.0/8").unwrap()] }
}

fn client_with(settings: ProviderClientSettings) -> HttpProviderClient {
    HttpProviderClient::new(settings, loopback()).unwrap()
}

fn client() -> HttpProviderClient {
    client_with(settings())
}

/// Hands out `current`, and `refreshed` (counting the calls) after a 401, or refuses to refresh.
struct Source {
    current: AuthMaterial,
    refreshed: Option<AuthMaterial>,
    refreshes: AtomicUsize,
}

impl Source {
    fn fixed(material: AuthMaterial) -> Self {
        Self { current: material, refreshed: None, refreshes: AtomicUsize::new(0) }
    }
}

#[async_trait]
impl CredentialSource for Source {
    async fn current(&self) -> Result<AuthMaterial, DomainError> {
        Ok(self.current.clone())
    }

    async fn after_unauthorized(&self, stale: &AuthMaterial) -> Result<AuthMaterial, DomainError> {
        assert_eq!(stale, &self.current, "the stale material is the one that was sent");
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        self.refreshed.clone().ok_or_else(|| DomainError::Conflict("the credentials cannot be refreshed".into()))
    }
}

fn none() -> Source {
    Source::fixed(AuthMaterial::None)
}

fn target(fake: &FakeProvider, pagination: Pagination) -> ApiTarget {
    ApiTarget { base_url: fake.base_url(), default_headers: BTreeMap::from([("X-Tenant".into(), "acme".into())]), pagination }
}

fn request(method: HttpMethod, path: &str, items_path: Option<&str>) -> ProviderRequest {
    ProviderRequest {
        template: RequestTemplate { method, path: path.into(), query: BTreeMap::new(), items_path: items_path.map(Into::into) },
        path_params: BTreeMap::new(),
        extra_query: BTreeMap::new(),
        body: None,
    }
}

fn styles() -> Vec<(&'static str, Pagination, Option<&'static str>)> {
    vec![
        (
            "cursor",
            Pagination::Cursor {
                cursor_param: "cursor".into(),
                next_cursor_path: "meta.next".into(),
                limit_param: Some("limit".into()),
                page_size: Some(5),
            },
            Some("data"),
        ),
        (
            "page",
            Pagination::Page { page_param: "page".into(), start_page: 1, limit_param: Some("per_page".into()), page_size: Some(5) },
            Some("data"),
        ),
        ("offset", Pagination::Offset { offset_param: "offset".into(), limit_param: "limit".into(), page_size: 5 }, Some("data")),
        ("link", Pagination::Link { limit_param: Some("per_page".into()), page_size: Some(5) }, None),
        ("none", Pagination::None, Some("data")),
    ]
}

/// Every record of a listing, page after page, each token sent back as a caller would keep it.
async fn list_all(
    client: &HttpProviderClient,
    target: &ApiTarget,
    request: &ProviderRequest,
    credentials: &dyn CredentialSource,
) -> Result<(Vec<String>, usize), DomainError> {
    let (mut ids, mut pages, mut token): (Vec<String>, usize, Option<PageToken>) = (Vec::new(), 0, None);
    loop {
        let page = client.list_page("conn-1", target, request, token.as_ref(), None, credentials).await?;
        pages += 1;
        ids.extend(page.records.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match page.next {
            Some(next) => token = Some(PageToken(next.0.clone())),
            None => return Ok((ids, pages)),
        }
        assert!(pages < 100, "the listing does not end");
    }
}

#[tokio::test]
async fn every_pagination_style_reads_every_record_once_in_order() {
    let fake = FakeProvider::start(23, FakeAuth::None).await;
    let all: Vec<String> = fake.records().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    for (style, pagination, items) in styles() {
        let (ids, pages) =
            list_all(&client(), &target(&fake, pagination), &request(HttpMethod::Get, &format!("/{style}/records"), items), &none())
                .await
                .unwrap_or_else(|e| panic!("{style}: {e}"));
        assert_eq!(ids, all, "{style}");
        let expected_pages = match style {
            "none" => 1,
            // Page and offset styles know the end by a short page: 23 = 4 full pages and 3.
            _ => 5,
        };
        assert_eq!(pages, expected_pages, "{style}");
    }
    let sent = fake.requests();
    assert!(sent.iter().any(|r| r.path_and_query.starts_with("/cursor/records?limit=5&cursor=r000005")), "{sent:?}");
    assert!(sent.iter().any(|r| r.path_and_query == "/offset/records?limit=5&offset=20"), "{sent:?}");
}

#[tokio::test]
async fn an_updated_since_filter_and_page_size_override_reach_the_provider() {
    let fake = FakeProvider::start(10, FakeAuth::None).await;
    let since = fake.now();
    fake.edit("r000003", json!({"name": "changed"}));
    fake.insert(json!({"name": "new"}));
    for (style, pagination, items) in styles() {
        let mut req = request(HttpMethod::Get, &format!("/{style}/records"), items);
        req.extra_query.insert("updated_since".into(), since.clone());
        let (ids, _) = list_all(&client(), &target(&fake, pagination), &req, &none()).await.unwrap();
        assert_eq!(ids, ["r000003", "r000011"], "{style}");
    }
    let (_, pagination, items) = styles().remove(1);
    let page = client()
        .list_page("c", &target(&fake, pagination), &request(HttpMethod::Get, "/page/records", items), None, Some(2), &none())
        .await
        .unwrap();
    assert_eq!(page.records.len(), 2);
}

#[tokio::test]
async fn page_tokens_of_another_style_or_origin_are_refused() {
    let fake = FakeProvider::start(12, FakeAuth::None).await;
    let (_, cursor, items) = styles().remove(0);
    let req = request(HttpMethod::Get, "/cursor/records", items);
    let err =
        client().list_page("c", &target(&fake, cursor.clone()), &req, Some(&PageToken("p:2".into())), None, &none()).await.unwrap_err();
    assert!(matches!(err, DomainError::Validation(_)), "{err:?}");

    let link = Pagination::Link { limit_param: Some("per_page".into()), page_size: Some(5) };
    let forged = PageToken("l:http://169.254.169.254/latest/meta-data".into());
    let err = client()
        .list_page("c", &target(&fake, link.clone()), &request(HttpMethod::Get, "/link/records", None), Some(&forged), None, &none())
        .await
        .unwrap_err();
    assert!(matches!(err, DomainError::Validation(_)), "{err:?}");

    fake.set_link_origin(Some("http://127.0.0.2:9".into()));
    let before = fake.request_count();
    let err = client()
        .list_page("c", &target(&fake, link), &request(HttpMethod::Get, "/link/records", None), None, None, &none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("leaves the API's origin"), "{err}");
    assert_eq!(fake.request_count(), before + 1, "nothing is sent to the other origin");
}

#[tokio::test]
async fn every_kind_of_credentials_is_put_on_the_request() {
    let kinds = [
        (
            FakeAuth::HeaderKey { name: "X-Api-Key".into(), value: "k-123".into() },
            AuthMaterial::ApiKey { location: ApiKeyLocation::Header, name: "X-Api-Key".into(), value: "k-123".into() },
        ),
        (
            FakeAuth::QueryKey { name: "api_key".into(), value: "q-456".into() },
            AuthMaterial::ApiKey { location: ApiKeyLocation::Query, name: "api_key".into(), value: "q-456".into() },
        ),
        (FakeAuth::Bearer("t-789".into()), AuthMaterial::Bearer("t-789".into())),
        (
            FakeAuth::Basic { username: "ann".into(), password: "pw-0".into() },
            AuthMaterial::Basic { username: "ann".into(), password: "pw-0".into() },
        ),
    ];
    for (expected, material) in kinds {
        let fake = FakeProvider::start(7, expected.clone()).await;
        let answer = client()
            .send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &Source::fixed(material.clone()))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{expected:?}");
        assert_eq!(answer.body, Some(json!({"login": "fake"})));
        // Link pages keep an API key in the query on every page, and out of the page token.
        let link = Pagination::Link { limit_param: Some("per_page".into()), page_size: Some(3) };
        let page = client()
            .list_page(
                "c",
                &target(&fake, link.clone()),
                &request(HttpMethod::Get, "/link/records", None),
                None,
                None,
                &Source::fixed(material.clone()),
            )
            .await
            .unwrap();
        let next = page.next.unwrap();
        assert!(!next.0.contains("q-456"), "{next:?}");
        let page = client()
            .list_page(
                "c",
                &target(&fake, link),
                &request(HttpMethod::Get, "/link/records", None),
                Some(&next),
                None,
                &Source::fixed(material.clone()),
            )
            .await
            .unwrap();
        assert_eq!(page.records.len(), 3);
        assert!(fake.requests().iter().all(|r| r.authorized), "{expected:?}");

        // Wrong credentials: the provider's 401, after the source was asked once for newer ones.
        fake.set_auth(FakeAuth::Bearer("other".into()));
        let source = Source::fixed(material);
        let err = client().send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &source).await.unwrap_err();
        assert!(matches!(err, DomainError::Conflict(_)), "{err:?}");
        assert_eq!(source.refreshes.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_401_asks_for_newer_credentials_once() {
    let fake = FakeProvider::start(1, FakeAuth::Bearer("fresh".into())).await;
    let source = Source {
        current: AuthMaterial::Bearer("stale".into()),
        refreshed: Some(AuthMaterial::Bearer("fresh".into())),
        refreshes: AtomicUsize::new(0),
    };
    let answer = client().send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &source).await.unwrap();
    assert_eq!((answer.status, source.refreshes.load(Ordering::SeqCst), fake.request_count()), (200, 1, 2));

    // Still refused with the new credentials: the 401 is the answer, with no second refresh.
    fake.set_auth(FakeAuth::Bearer("revoked-everything".into()));
    let source = Source {
        current: AuthMaterial::Bearer("stale".into()),
        refreshed: Some(AuthMaterial::Bearer("fresh".into())),
        refreshes: AtomicUsize::new(0),
    };
    let answer = client().send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &source).await.unwrap();
    assert_eq!((answer.status, source.refreshes.load(Ordering::SeqCst)), (401, 1));
    let page = client()
        .list_page("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/none/records", Some("data")), None, None, &source)
        .await;
    assert!(matches!(page, Err(DomainError::Conflict(_))), "{page:?}");
}

#[tokio::test]
async fn retry_after_and_rate_limit_resets_are_honoured() {
    let fake = FakeProvider::start(2, FakeAuth::None).await;
    let t = target(&fake, Pagination::None);
    let me = request(HttpMethod::Get, "/me", None);
    fake.fail_next([Fault::TooManyRequests { retry_after_secs: 1 }]);
    let started = Instant::now();
    assert_eq!(client().send("c", &t, &me, &none()).await.unwrap().status, 200);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was not honoured: {:?}", started.elapsed());
    assert_eq!(fake.request_count(), 2);

    fake.fail_next([Fault::RateLimitReset { reset_in_secs: 2 }]);
    let started = Instant::now();
    assert_eq!(client().send("c", &t, &me, &none()).await.unwrap().status, 200);
    assert!(started.elapsed() >= Duration::from_millis(900), "the reset was not honoured: {:?}", started.elapsed());

    // A wait longer than the client may spend ends the call at once, saying how long to wait.
    fake.fail_next([Fault::TooManyRequests { retry_after_secs: 120 }]);
    let before = fake.request_count();
    let err = client().send("c", &t, &me, &none()).await.unwrap_err();
    let DomainError::Unavailable { retry_after, .. } = err else { panic!("{err:?}") };
    assert_eq!(retry_after, Some(Duration::from_secs(120)));
    assert_eq!(fake.request_count(), before + 1);
}

#[tokio::test]
async fn server_errors_and_timeouts_are_retried_within_bounds() {
    let fake = FakeProvider::start(2, FakeAuth::None).await;
    let t = target(&fake, Pagination::None);
    let me = request(HttpMethod::Get, "/me", None);
    fake.fail_next([Fault::Status(500), Fault::Status(502), Fault::Slow(Duration::from_secs(2))]);
    assert_eq!(client().send("c", &t, &me, &none()).await.unwrap().status, 200);
    assert_eq!(fake.request_count(), 4);

    fake.fail_next(std::iter::repeat_n(Fault::Status(503), 4));
    let err = client().send("c", &t, &me, &none()).await.unwrap_err();
    assert!(matches!(err, DomainError::Unavailable { .. }), "{err:?}");
    assert_eq!(fake.request_count(), 8, "four attempts, then the error");

    fake.fail_next(std::iter::repeat_n(Fault::Slow(Duration::from_secs(2)), 4));
    let err = client().send("c", &t, &me, &none()).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");

    // A 404 or 400 is an answer, not retried.
    let before = fake.request_count();
    let answer = client().send("c", &t, &request(HttpMethod::Get, "/records/{id}", None).with_param("id", "nope"), &none()).await.unwrap();
    assert_eq!((answer.status, fake.request_count()), (404, before + 1));
}

trait WithParam {
    fn with_param(self, name: &str, value: &str) -> Self;
}

impl WithParam for ProviderRequest {
    fn with_param(mut self, name: &str, value: &str) -> Self {
        self.path_params.insert(name.into(), value.into());
        self
    }
}

#[tokio::test]
async fn answers_over_the_size_cap_are_refused() {
    let fake = FakeProvider::start(1, FakeAuth::None).await;
    fake.fail_next([Fault::Huge(200 * 1024)]);
    let err = client().send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &none()).await.unwrap_err();
    assert!(matches!(err, DomainError::Unexpected(_)) && err.to_string().contains("larger than 65536 bytes"), "{err:?}");
}

#[tokio::test]
async fn paths_are_built_with_encoded_segments_and_bodies_are_sent() {
    let fake = FakeProvider::start(3, FakeAuth::None).await;
    let t = target(&fake, Pagination::None);
    let odd = request(HttpMethod::Get, "/records/{id}", None).with_param("id", "a/b c?d");
    assert_eq!(client().send("c", &t, &odd, &none()).await.unwrap().status, 404);
    assert_eq!(fake.requests().last().unwrap().path_and_query, "/records/a%2Fb%20c%3Fd");

    let mut put = request(HttpMethod::Put, "/records/{id}", None).with_param("id", "r000002");
    put.body = Some(json!({"name": "renamed"}));
    let answer = client().send("c", &t, &put, &none()).await.unwrap();
    assert_eq!(answer.body.unwrap()["version"], 2);
    assert_eq!(fake.record("r000002").unwrap()["name"], "renamed");

    let missing = request(HttpMethod::Get, "/records/{id}", None);
    assert!(matches!(client().send("c", &t, &missing, &none()).await, Err(DomainError::Validation(_))));
}

#[tokio::test]
async fn default_headers_are_sent_once_and_may_replace_accept() {
    let fake = FakeProvider::start(1, FakeAuth::None).await;
    let me = request(HttpMethod::Get, "/me", None);
    client().send("c", &target(&fake, Pagination::None), &me, &none()).await.unwrap();
    let seen = fake.requests().pop().unwrap().headers;
    assert_eq!((seen["accept"].as_str(), seen["x-tenant"].as_str()), ("application/json", "acme"));
    assert_eq!(seen["user-agent"], "integration-manager-tests");
    let mut t = target(&fake, Pagination::None);
    t.default_headers.insert("Accept".into(), "application/vnd.github+json".into());
    client().send("c", &t, &me, &none()).await.unwrap();
    assert_eq!(fake.requests().pop().unwrap().headers["accept"], "application/vnd.github+json");
}

#[tokio::test]
async fn refused_destinations_get_no_request() {
    let fake = FakeProvider::start(1, FakeAuth::None).await;
    let strict = HttpProviderClient::new(settings(), UrlPolicy { allow_http: true, allowed_private: Vec::new() }).unwrap();
    let port = fake.base_url().rsplit(':').next().unwrap().to_owned();
    for base in [fake.base_url(), format!("http://localhost:{port}"), format!("http://2130706433:{port}")] {
        let t = ApiTarget { base_url: base.clone(), default_headers: BTreeMap::new(), pagination: Pagination::None };
        let err = strict.send("c", &t, &request(HttpMethod::Get, "/me", None), &none()).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DomainError::Validation(_) | DomainError::Unavailable { .. }), "{base}: {err:?}");
        assert!(text.contains("refused"), "{base}: {text}");
        assert!(!text.contains("127.0.0.1"), "{base}: the error reveals the address: {text}");
    }
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn concurrency_and_rate_are_limited_per_connection() {
    let fake = FakeProvider::start(1, FakeAuth::None).await;
    let t = target(&fake, Pagination::None);
    let me = request(HttpMethod::Get, "/me", None);
    let client = client_with(ProviderClientSettings { max_concurrency_per_connection: 2, ..settings() });
    fake.fail_next(std::iter::repeat_n(Fault::Slow(Duration::from_millis(300)), 6));
    let started = Instant::now();
    for answer in at_once(&client, "one", &t, 6).await {
        assert_eq!(answer.unwrap().status, 200);
    }
    assert!(started.elapsed() >= Duration::from_millis(900), "six slow calls, two at a time: {:?}", started.elapsed());

    // Another connection is not held back by the first one's limits.
    let client = client_with(ProviderClientSettings { requests_per_second: 4.0, burst: 1, ..settings() });
    let started = Instant::now();
    for answer in at_once(&client, "rated", &t, 5).await {
        answer.unwrap();
    }
    assert!(started.elapsed() >= Duration::from_millis(950), "five calls at 4/s after a burst of one: {:?}", started.elapsed());
    let started = Instant::now();
    client.send("other", &t, &me, &none()).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
}

/// `n` calls of `GET /me` at once on `connection`.
async fn at_once(client: &HttpProviderClient, connection: &str, t: &ApiTarget, n: usize) -> Vec<Result<ProviderResponse, DomainError>> {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, t, connection) = (client.clone(), t.clone(), connection.to_owned());
        calls.spawn(async move { client.send(&connection, &t, &request(HttpMethod::Get, "/me", None), &none()).await });
    }
    calls.join_all().await
}

/// Credentials never reach the log output (everything at TRACE), nor an error text. Runs in a
/// child process: tracing caches which call sites are enabled process-wide, so spans first hit
/// by a concurrent test would be missed by this test's subscriber.
#[tokio::test]
async fn credentials_never_reach_logs_spans_or_errors() {
    if std::env::var_os("IM_PROVIDER_LOG_CHILD").is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "provider::tests::credentials_never_reach_logs_spans_or_errors", "--test-threads=1"])
            .env("IM_PROVIDER_LOG_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success(), "the child run failed");
        return;
    }
    let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let buffer = buffer.clone();
        move || Capture(buffer.clone())
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(writer)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let secrets = ["hdr-secret-1", "query-secret-2", "bearer-secret-3", "basic-secret-4"];
    let materials = [
        AuthMaterial::ApiKey { location: ApiKeyLocation::Header, name: "X-Api-Key".into(), value: secrets[0].into() },
        AuthMaterial::ApiKey { location: ApiKeyLocation::Query, name: "api_key".into(), value: secrets[1].into() },
        AuthMaterial::Bearer(secrets[2].into()),
        AuthMaterial::Basic { username: "ann".into(), password: secrets[3].into() },
    ];
    let fake = FakeProvider::start(4, FakeAuth::Bearer("nothing-matches".into())).await;
    let mut errors = Vec::new();
    for material in materials {
        fake.fail_next([Fault::Status(500), Fault::TooManyRequests { retry_after_secs: 0 }, Fault::Slow(Duration::from_secs(2))]);
        let source = Source::fixed(material.clone());
        let link = Pagination::Link { limit_param: None, page_size: None };
        errors.push(format!(
            "{:?}",
            client().list_page("c", &target(&fake, link), &request(HttpMethod::Get, "/link/records", None), None, None, &source).await
        ));
        errors.push(format!(
            "{:?}",
            client().send("c", &target(&fake, Pagination::None), &request(HttpMethod::Get, "/me", None), &source).await
        ));
        errors.push(format!("{material:?}"));
        // A destination that refuses connections: the connect error names no URL.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t =
            ApiTarget { base_url: format!("http://127.0.0.1:{closed}"), default_headers: BTreeMap::new(), pagination: Pagination::None };
        errors.push(format!("{:?}", client().send("c", &t, &request(HttpMethod::Get, "/me", None), &source).await));
    }
    let logs = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("provider.send"), "the capture works: {logs}");
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} is in the log output");
        for e in &errors {
            assert!(!e.contains(secret), "{secret} is in an error: {e}");
        }
    }
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn link_headers_and_waits_are_parsed() {
    let mut headers = HeaderMap::new();
    headers.insert(
        "link",
        HeaderValue::from_static(r#"<https://api.github.com/x?page=1>; rel="prev", <https://api.github.com/x?page=3>; rel="next last""#),
    );
    assert_eq!(next_link(&headers).as_deref(), Some("https://api.github.com/x?page=3"));
    headers.insert("link", HeaderValue::from_static(r#"<https://a/x?page=1>; rel="first""#));
    assert_eq!(next_link(&headers), None);

    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("7"));
    assert_eq!(requested_wait(&h), Some(Duration::from_secs(7)));
    h.insert("retry-after", HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"));
    assert_eq!(httpdate_seconds("Sun, 06 Nov 1994 08:49:37 GMT"), Ok(784_111_777));
    assert_eq!(requested_wait(&h), Some(Duration::ZERO), "a date in the past: no wait");
    let mut h = HeaderMap::new();
    h.insert("ratelimit-reset", HeaderValue::from_static("30"));
    assert_eq!(requested_wait(&h), Some(Duration::from_secs(30)));
    let mut h = HeaderMap::new();
    let reset = (unix_now() + 60).to_string();
    h.insert("x-ratelimit-reset", HeaderValue::from_str(&reset).unwrap());
    let wait = requested_wait(&h).unwrap();
    assert!(wait <= Duration::from_secs(60) && wait >= Duration::from_secs(58), "{wait:?}");
}

#[test]
fn settings_problems_name_their_keys() {
    assert!(ProviderClientSettings::default().problems().is_empty());
    let bad =
        ProviderClientSettings { retry_attempts: 0, requests_per_second: 0.0, burst: 0, max_concurrency_per_connection: 0, ..settings() };
    let keys: Vec<_> = bad.problems().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["retry_attempts", "max_concurrency_per_connection", "requests_per_second", "burst"]);
}

/// The connection test of the domain, through this client, against the fake provider.
#[tokio::test]
async fn connection_tests_send_the_smallest_list_and_report_the_outcome() {
    use im_domain::SystemClock;
    use im_domain::custom::CustomApiDefinition;
    use im_domain::services::connection_test::{Verification, test_connection};

    let fake = FakeProvider::start(30, FakeAuth::HeaderKey { name: "X-Api-Key".into(), value: "good".into() }).await;
    let definition: CustomApiDefinition = serde_json::from_value(json!({
        "baseUrl": fake.base_url(),
        "auth": {"type": "api_key", "in": "header", "name": "X-Api-Key"},
        "pagination": {"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit", "pageSize": 100},
        "entities": [{"name": "record", "idField": "id", "list": {"method": "GET", "path": "/cursor/records", "itemsPath": "data"}}]
    }))
    .unwrap();
    let verification = Verification::for_custom(&definition).unwrap();
    let key = |value: &str| {
        Source::fixed(AuthMaterial::ApiKey { location: ApiKeyLocation::Header, name: "X-Api-Key".into(), value: value.into() })
    };

    let outcome = test_connection(&client(), "conn-1", &verification, &key("good"), &SystemClock).await;
    assert!(outcome.ok && outcome.status == Some(200) && outcome.error.is_none(), "{outcome:?}");
    assert_eq!(fake.requests().last().unwrap().path_and_query, "/cursor/records?limit=1");

    let outcome = test_connection(&client(), "conn-1", &verification, &key("bad"), &SystemClock).await;
    assert_eq!((outcome.ok, outcome.status), (false, None), "{outcome:?}");
    assert!(outcome.error.unwrap().contains("cannot authenticate"), "an API key cannot be refreshed");

    let refreshed = Source {
        current: AuthMaterial::Bearer("x".into()),
        refreshed: Some(AuthMaterial::Bearer("y".into())),
        refreshes: AtomicUsize::new(0),
    };
    let outcome = test_connection(&client(), "conn-1", &verification, &refreshed, &SystemClock).await;
    assert_eq!((outcome.ok, outcome.status), (false, Some(401)), "{outcome:?}");
    assert!(outcome.error.unwrap().contains("refused the credentials"));

    fake.fail_next(std::iter::repeat_n(Fault::Status(503), 4));
    let outcome = test_connection(&client(), "conn-1", &verification, &key("good"), &SystemClock).await;
    assert!(!outcome.ok && outcome.error.as_deref().unwrap().contains("503"), "{outcome:?}");

    let strict = HttpProviderClient::new(settings(), UrlPolicy { allow_http: true, allowed_private: Vec::new() }).unwrap();
    let outcome = test_connection(&strict, "conn-1", &verification, &key("good"), &SystemClock).await;
    assert!(!outcome.ok && outcome.error.as_deref().unwrap().contains("refused"), "{outcome:?}");
}

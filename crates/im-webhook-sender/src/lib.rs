//! The outbound HTTP adapter: the [`WebhookSender`] port on hyper's client ([`direct`]; on
//! reqwest through a configured proxy), and the provider client ([`provider::HttpProviderClient`],
//! the `ProviderClient` port) on reqwest, on the same SSRF-safe path.
//!
//! SSRF protection: the URL is judged by [`UrlPolicy::check_destination`], which parses it with
//! the same WHATWG parser reqwest uses, so an address host in any spelling (`127.1`, `0x7f.1`,
//! `2130706433`, `[::ffff:7f00:1]`...) is checked before any connection. Host names are resolved
//! by [`SafeResolver`], which drops every address the [`UrlPolicy`] refuses (loopback, private,
//! link-local and metadata, CGNAT, multicast, unspecified, NAT64, 6to4, Teredo...) unless an
//! allowed network contains it; the connection then goes to an address that was checked, so DNS
//! rebinding has no window. Redirects are never followed.
//!
//! Proxy environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`) are ignored: a proxy
//! would resolve and connect on the sender's behalf, past the resolver's checks. A proxy is used
//! only when configured explicitly ([`WebhookSenderSettings::proxy`]); it then resolves host names, so
//! it must apply its own egress rules (address hosts are still checked here).
//!
//! Errors stored in delivery attempts name the class of a refused address, never an address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_domain::HumanDuration;
use im_domain::cache::{self, BoundedCache};
use im_domain::webhooks::delivery::{ATTEMPT_LEASE, RESPONSE_EXCERPT_BYTES};
use im_domain::webhooks::endpoint::{Cidr, UrlPolicy};
use im_domain::webhooks::ports::{OutgoingRequest, SendResult, WebhookSender};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

mod direct;
pub mod oauth2;
pub mod provider;

/// Resolves names and keeps only the addresses the policy allows.
#[derive(Debug, Clone)]
pub struct SafeResolver {
    policy: Arc<UrlPolicy>,
}

impl SafeResolver {
    /// The addresses `host` resolves to that the policy allows; none: an error naming the
    /// classes refused, never an address.
    async fn allowed(&self, host: &str) -> Result<Vec<SocketAddr>, String> {
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await.map_err(|_| format!("{host} did not resolve"))?.collect();
        let mut refused: Vec<&'static str> = Vec::new();
        let allowed: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|addr| match self.policy.check_ip(addr.ip()) {
                Ok(()) => true,
                Err(class) => {
                    if !refused.contains(&class) {
                        refused.push(class);
                    }
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(if refused.is_empty() {
                format!("{host} did not resolve")
            } else {
                format!("destination refused: {host} resolves to {} addresses only", refused.join(", "))
            });
        }
        Ok(allowed)
    }
}

/// The resolver as reqwest's connector calls it (the provider client, a proxied sender).
impl Resolve for SafeResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.clone();
        Box::pin(async move { Ok(Box::new(resolver.allowed(name.as_str()).await?.into_iter()) as Addrs) })
    }
}

/// The sender's keys of the `webhooks` section: timeouts, the destination policy and the
/// proxy. The app reads the section's other keys itself.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookSenderSettings {
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    /// Networks whose private addresses may be destinations (`127.0.0.0/8` for local development).
    pub allowed_private_cidrs: Vec<String>,
    /// Whether plain `http://` URLs may be destinations.
    pub allow_http: bool,
    /// An explicit proxy for every webhook request (`http://proxy:3128`, a secret when it
    /// carries credentials); empty: direct connections, whatever the proxy environment
    /// variables say.
    pub proxy: SecretString,
}

impl WebhookSenderSettings {
    /// Problems of the values, each with its key in the section (`proxy`,
    /// `allowed_private_cidrs[1]`).
    #[must_use]
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, cidr) in self.allowed_private_cidrs.iter().enumerate() {
            if let Err(reason) = Cidr::parse(cidr) {
                problems.push((format!("allowed_private_cidrs[{i}]"), reason.to_string()));
            }
        }
        let proxy = self.proxy.expose_secret();
        if !(proxy.is_empty() || proxy.starts_with("http://") || proxy.starts_with("https://")) {
            problems.push(("proxy".into(), "must be empty or an http(s) URL such as http://proxy.internal:3128".into()));
        }
        for (key, timeout) in [("request_timeout", self.request_timeout), ("connect_timeout", self.connect_timeout)] {
            if timeout.is_zero() {
                problems.push((key.into(), "must be positive".into()));
            }
        }
        if self.request_timeout.get() > MAX_REQUEST_TIMEOUT {
            problems.push((
                "request_timeout".into(),
                format!(
                    "must be at most {}s: an attempt holds its delivery for {}s, and one that outlived its hold could be made twice",
                    MAX_REQUEST_TIMEOUT.as_secs(),
                    ATTEMPT_LEASE.as_secs()
                ),
            ));
        }
        problems
    }

    /// The destination policy of endpoint URLs and delivery connections (networks that do not
    /// parse are left out; [`Self::problems`] reports them).
    #[must_use]
    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_http: self.allow_http,
            allowed_private: self.allowed_private_cidrs.iter().filter_map(|c| Cidr::parse(c).ok()).collect(),
        }
    }
}

/// The longest `request_timeout`: half the time an attempt holds its delivery
/// ([`ATTEMPT_LEASE`]), the rest left for signing (a read of the secret store) and recording
/// the attempt, so that no attempt outlives its hold and another runs beside it.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(ATTEMPT_LEASE.as_secs() / 2);

/// Idle connections kept per destination host (closed after 90 s unused). As many as the
/// attempts in flight at once (`webhooks.concurrency`, 256 by default), so that endpoints on one
/// host do not close and open connections between bursts.
const IDLE_PER_HOST: usize = 256;

/// Endpoint URLs whose judgement a sender keeps ([`Judged`]); a full cache evicts the least
/// used. Each costs twice its text (the key and the parsed URI's): about 150 KB in all for URLs
/// of 60 characters, 4 MB at most ([`im_domain::webhooks::endpoint::MAX_URL_CHARS`]).
const JUDGED_URLS: usize = 1024;

/// Sends webhook requests.
#[derive(Debug, Clone)]
pub struct HttpWebhookSender {
    transport: Transport,
    policy: Arc<UrlPolicy>,
    judged: Arc<Judged>,
}

/// How attempts' requests go out.
#[derive(Debug, Clone)]
enum Transport {
    /// Straight to the destination, on hyper's client ([`direct`]).
    Direct(Box<direct::DirectClient>),
    /// Through the configured proxy, on reqwest (its `CONNECT` tunnels and absolute-form
    /// requests).
    Proxied(reqwest::Client),
}

/// The URLs the policy allowed, as the URIs requested, by their text: [`UrlPolicy::destination`]
/// answers the same for a URL as long as the policy is the same, which it is for the sender's
/// life, so a URL is judged and parsed once, not at every attempt to it (that WHATWG parse, with
/// the IDNA mapping of a host name, was about 1.5% of a delivery's instructions). The URI is the
/// parsed URL's serialization, parsed by `http`: what is requested is what was judged. A refused
/// URL is judged again each time (its attempts end there). At most [`JUDGED_URLS`]
/// ([`im_domain::cache`]); its `Debug` prints no URL (an endpoint's URL may carry a token in its
/// query).
#[derive(Debug)]
struct Judged(BoundedCache<String, hyper::Uri>);

impl Default for Judged {
    fn default() -> Self {
        Self(cache::bounded(JUDGED_URLS))
    }
}

impl Judged {
    fn destination(&self, policy: &UrlPolicy, url: &str) -> Result<hyper::Uri, String> {
        if let Some(uri) = self.0.get(url) {
            return Ok(uri);
        }
        let parsed = policy.destination(url).map_err(|refusal| refusal.redacted())?;
        let uri = hyper::Uri::try_from(parsed.as_str()).map_err(|_| "the URL cannot be requested".to_owned())?;
        self.0.insert(url.to_owned(), uri.clone());
        Ok(uri)
    }
}

impl HttpWebhookSender {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: &WebhookSenderSettings) -> Result<Self, String> {
        let policy = Arc::new(settings.url_policy());
        let resolver = SafeResolver { policy: policy.clone() };
        let transport = match settings.proxy.expose_secret() {
            "" => Transport::Direct(Box::new(direct::DirectClient::new(
                resolver,
                settings.connect_timeout.get(),
                settings.request_timeout.get(),
                IDLE_PER_HOST,
            )?)),
            proxy => Transport::Proxied(
                reqwest::Client::builder()
                    .proxy(reqwest::Proxy::all(proxy).map_err(|e| format!("webhooks.proxy: {e}"))?)
                    .connect_timeout(settings.connect_timeout.get())
                    .timeout(settings.request_timeout.get())
                    .redirect(reqwest::redirect::Policy::none())
                    // An attempt is one request: retries are the delivery schedule's to decide.
                    .retry(reqwest::retry::never().max_retries_per_request(0))
                    .dns_resolver(Arc::new(resolver))
                    .pool_max_idle_per_host(IDLE_PER_HOST)
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
        };
        Ok(Self { transport, policy, judged: Arc::default() })
    }

    /// An attempt through the proxy, on reqwest.
    async fn post_proxied(
        client: &reqwest::Client,
        uri: &hyper::Uri,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<direct::Answer, String> {
        let mut builder = client.post(uri.to_string()).body(body);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let mut response = builder.send().await.map_err(|e| describe(&e))?;
        let status = response.status().as_u16();
        let retry_after = direct::retry_after(response.headers());
        let mut excerpt = Vec::new();
        while excerpt.len() < RESPONSE_EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        excerpt.truncate(RESPONSE_EXCERPT_BYTES);
        Ok(direct::Answer { status, retry_after, excerpt })
    }
}

/// The error chain of a failed request, without the URL (it may carry credentials).
fn describe(error: &reqwest::Error) -> String {
    let head = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    error_chain(head, error, error.url().map(reqwest::Url::as_str))
}

/// `head`, then the texts of `error`'s sources (its own names the request), with `url` taken
/// out and then every address.
fn error_chain(head: &str, error: &(dyn std::error::Error + 'static), url: Option<&str>) -> String {
    let mut text = head.to_owned();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    if let Some(url) = url {
        text = text.replace(url, "<url>");
    }
    redact_addresses(&text)
}

/// Replaces every IP address or socket address in `text` with `<address>`: connection errors
/// must not reveal which internal address a name resolved to.
fn redact_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        let bare = token.trim_start_matches('[').trim_end_matches(']');
        if token.parse::<SocketAddr>().is_ok() || bare.parse::<std::net::IpAddr>().is_ok() {
            out.push_str("<address>");
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in text.chars() {
        if c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']' | '%') {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

#[async_trait]
impl WebhookSender for HttpWebhookSender {
    #[tracing::instrument(skip_all, name = "webhooks.send", fields(bytes = request.body.len()))]
    async fn send(&self, request: OutgoingRequest) -> SendResult {
        let started = Instant::now();
        let failed = |error: String, started: Instant| SendResult {
            status: None,
            retry_after: None,
            body_excerpt: None,
            error: Some(error),
            duration: started.elapsed(),
        };
        // The URL judged is the one called, parsed once.
        let uri = match self.judged.destination(&self.policy, &request.url) {
            Ok(uri) => uri,
            Err(refusal) => return failed(refusal, started),
        };
        let answer = match &self.transport {
            Transport::Direct(client) => client.post(uri, &request.headers, request.body).await,
            Transport::Proxied(client) => Self::post_proxied(client, &uri, &request.headers, request.body).await,
        };
        let direct::Answer { status, retry_after, excerpt } = match answer {
            Ok(answer) => answer,
            Err(error) => return failed(error, started),
        };
        let excerpt = (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned());
        let error = (!(200..300).contains(&status)).then(|| format!("the receiver answered {status}"));
        SendResult { status: Some(status), retry_after, body_excerpt: excerpt, error, duration: started.elapsed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{body_string, header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn settings(request_timeout: &str, allowed_private_cidrs: &[&str], proxy: &str) -> WebhookSenderSettings {
        WebhookSenderSettings {
            connect_timeout: HumanDuration::parse("2s").unwrap(),
            request_timeout: HumanDuration::parse(request_timeout).unwrap(),
            allowed_private_cidrs: allowed_private_cidrs.iter().map(|c| (*c).to_owned()).collect(),
            allow_http: true,
            proxy: proxy.into(),
        }
    }

    fn sender(allow_loopback: bool) -> HttpWebhookSender {
        let allowed: &[&str] = if allow_loopback { &["127.0.0.0/8"] } else { &[] };
        HttpWebhookSender::new(&settings("500ms", allowed, "")).unwrap()
    }

    #[test]
    fn settings_problems_name_every_bad_key() {
        let mut bad = settings("0s", &["127.0.0.0/8", "10.0.0.0/33"], "socks5://proxy");
        bad.connect_timeout = HumanDuration::parse("0s").unwrap();
        let keys: Vec<String> = bad.problems().into_iter().map(|(key, _)| key).collect();
        assert_eq!(keys, ["allowed_private_cidrs[1]", "proxy", "request_timeout", "connect_timeout"]);
        assert!(settings("1s", &["127.0.0.0/8"], "http://proxy:3128").problems().is_empty());
        assert!(settings("60s", &[], "").problems().is_empty());
        let too_long = settings("61s", &[], "").problems();
        assert_eq!(too_long.iter().map(|(key, _)| key.as_str()).collect::<Vec<_>>(), ["request_timeout"]);
        assert!(too_long[0].1.contains("at most 60s"), "{}", too_long[0].1);
        assert_eq!(settings("1s", &["127.0.0.0/8", "nope"], "").url_policy().allowed_private, [Cidr::parse("127.0.0.0/8").unwrap()]);
        assert!(!format!("{bad:?}").contains("socks5"), "the proxy URL may carry credentials: it never prints");
    }

    fn request(url: String) -> OutgoingRequest {
        OutgoingRequest { url, headers: vec![("webhook-id".into(), "msg_1".into())], body: b"{}".to_vec() }
    }

    #[test]
    fn a_url_is_judged_once_while_allowed_and_every_time_while_refused() {
        let policy = settings("1s", &["127.0.0.0/8"], "").url_policy();
        let judged = Judged::default();

        let url = "https://hooks.example.com:8443/a/b?c=d";
        assert_eq!(judged.destination(&policy, url).unwrap().to_string(), policy.destination(url).unwrap().as_str());
        assert_eq!(judged.destination(&policy, url).unwrap().to_string(), url, "the kept judgement answers the same URL");
        assert_eq!((judged.0.len(), judged.0.get(url).map(|u| u.to_string())), (1, Some(url.to_owned())));

        for refused in ["https://10.0.0.1/hook", "ftp://hooks.example.com/", "https://user:pw@hooks.example.com/"] {
            assert!(judged.destination(&policy, refused).is_err(), "{refused}");
            assert!(judged.destination(&policy, refused).is_err(), "{refused}: refused the second time too");
        }
        assert_eq!(judged.0.len(), 1, "refusals are not kept");

        let last = format!("https://hooks.example.com/{JUDGED_URLS}");
        for i in 1..=JUDGED_URLS {
            judged.destination(&policy, &format!("https://hooks.example.com/{i}")).unwrap();
        }
        assert!(judged.0.len() <= JUDGED_URLS, "bounded: {} kept", judged.0.len());
        assert!(judged.0.get(last.as_str()).is_some(), "a full cache keeps the URL judged last");
        let printed = format!("{judged:?}");
        assert!(!printed.contains("example.com"), "the URLs kept are never printed: {printed}");
    }

    #[tokio::test]
    async fn posts_and_records_status_body_and_retry_after() {
        let server = MockServer::start().await;
        // The endpoint's path and query reach the receiver as written (in origin form), with
        // the request's headers and its body.
        Mock::given(method("POST"))
            .and(path("/hook/a%20b"))
            .and(query_param("token", "t k"))
            .and(header("webhook-id", "msg_1"))
            .and(header("host", format!("127.0.0.1:{}", server.address().port())))
            .and(body_string("{}"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "7").set_body_string("x".repeat(10_000)))
            .expect(1)
            .mount(&server)
            .await;
        let result = sender(true).send(request(format!("{}/hook/a b?token=t%20k", server.uri()))).await;
        assert_eq!(result.status, Some(429));
        assert_eq!(result.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(result.body_excerpt.map(|b| b.len()), Some(RESPONSE_EXCERPT_BYTES));
    }

    /// A receiver that counts the connections it accepted and answers every request (after
    /// `delay`, so that concurrent requests need a connection each) with 204, keeping the
    /// connection open.
    async fn counting_receiver(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: its head, then a body of `content-length` bytes.
                        let head_end = loop {
                            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
                        let length: usize =
                            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                        while buffer.len() < head_end + length {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.drain(..head_end + length);
                        tokio::time::sleep(delay).await;
                        if stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    /// As many attempts at once as the dispatcher runs by default (64) to endpoints on one host,
    /// twice: the second burst reuses the first one's connections instead of opening new ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_to_one_host_reuse_their_connections() {
        let (url, accepted) = counting_receiver(Duration::from_millis(200)).await;
        let sender = HttpWebhookSender::new(&settings("5s", &["127.0.0.0/8"], "")).unwrap();
        for burst in 0..2 {
            let mut sends = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let (sender, url) = (sender.clone(), url.clone());
                sends.spawn(async move { sender.send(request(url)).await.status });
            }
            while let Some(status) = sends.join_next().await {
                assert_eq!(status.unwrap(), Some(204), "burst {burst}");
            }
        }
        let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(opened <= 64, "{opened} connections for two bursts of 64 requests: the second burst did not reuse the first one's");
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_hangs_time_out() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(302).insert_header("location", "https://elsewhere.example/"))
            .mount(&server)
            .await;
        assert_eq!(sender(true).send(request(format!("{}/r", server.uri()))).await.status, Some(302));

        let slow = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3))).mount(&slow).await;
        let result = sender(true).send(request(format!("{}/slow", slow.uri()))).await;
        assert_eq!(result.status, None);
        assert!(result.error.unwrap().contains("timed out"));
    }

    #[tokio::test]
    async fn refused_destinations_never_get_a_connection_in_any_spelling() {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).expect(0).mount(&server).await;
        let port = server.address().port();
        for host in [
            "127.0.0.1",
            "localhost",
            "[::ffff:127.0.0.1]",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "0",
            "127.0.0.1.",
            "[::ffff:7f00:1]",
        ] {
            let url = format!("http://{host}:{port}/h");
            let result = sender(false).send(request(url.clone())).await;
            assert_eq!(result.status, None, "{url}");
            let error = result.error.unwrap_or_default();
            assert!(error.starts_with("destination refused"), "{url}: {error}");
            assert!(!error.contains("127.0.0") && !error.contains("::1"), "{url}: the stored error reveals the address: {error}");
        }
    }

    #[tokio::test]
    async fn connection_errors_do_not_reveal_addresses() {
        // A port nothing listens on, on an allowed address.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let result = sender(true).send(request(format!("http://localhost:{port}/h"))).await;
        let error = result.error.unwrap();
        assert!(error.starts_with("could not connect"), "{error}");
        assert!(!error.contains("127.0.0.1") && !error.contains(&format!(":{port}")), "{error}");
    }

    /// `https` goes through TLS: a receiver that answers in plain HTTP (or with a certificate
    /// no public root signed) gets no request, and the error names no address.
    #[tokio::test]
    async fn https_destinations_are_reached_through_tls_only() {
        let server = MockServer::start().await;
        Mock::given(method("POST")).and(path("/tls")).respond_with(ResponseTemplate::new(200)).expect(0).mount(&server).await;
        let port = server.address().port();
        for host in ["127.0.0.1", "localhost"] {
            let result = sender(true).send(request(format!("https://{host}:{port}/tls"))).await;
            assert_eq!(result.status, None, "{host}");
            let error = result.error.unwrap();
            assert!(error.starts_with("could not connect"), "{host}: {error}");
            assert!(!error.contains("127.0.0.1") && !error.contains(&format!(":{port}")), "{host}: {error}");
        }
        let result = sender(true).send(request(format!("http://127.0.0.1:{port}/plain"))).await;
        assert_eq!(result.error.unwrap_or_default(), "the receiver answered 404", "plain http still reaches the same receiver");
    }

    /// The connect timeout bounds the whole connection, TLS handshake included: a receiver that
    /// accepts TCP and never answers the handshake fails the attempt at the connect timeout,
    /// not at the request timeout.
    #[tokio::test]
    async fn a_stalled_handshake_is_bounded_by_the_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut slow = settings("5s", &["127.0.0.0/8"], "");
        slow.connect_timeout = HumanDuration::parse("300ms").unwrap();
        let result = HttpWebhookSender::new(&slow).unwrap().send(request(format!("https://127.0.0.1:{port}/h"))).await;
        let error = result.error.unwrap();
        assert!(error.starts_with("could not connect") && error.contains("not made within 0.3s"), "{error}");
        assert!(result.duration < Duration::from_secs(3), "took {:?}: the request timeout, not the connect timeout", result.duration);
    }

    /// The resolver under hyper's connector keeps only the addresses the policy allows, and
    /// says which classes it refused without naming an address.
    #[tokio::test]
    async fn the_connectors_resolver_keeps_only_allowed_addresses() {
        use tower_service::Service as _;
        let name = || "localhost".parse::<hyper_util::client::legacy::connect::dns::Name>().unwrap();
        let mut strict = SafeResolver { policy: Arc::new(settings("1s", &[], "").url_policy()) };
        let refused = strict.call(name()).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.starts_with("destination refused: localhost resolves to loopback"), "{refused}");
        assert!(!refused.contains("127.0.0.1") && !refused.contains("::1"), "{refused}");
        let mut local = SafeResolver { policy: Arc::new(settings("1s", &["127.0.0.0/8"], "").url_policy()) };
        let allowed: Vec<SocketAddr> = local.call(name()).await.unwrap().collect();
        assert!(!allowed.is_empty() && allowed.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()), "{allowed:?}");
    }

    #[test]
    fn addresses_are_redacted_from_error_texts() {
        assert_eq!(
            redact_addresses("tcp connect error: 10.1.2.3:8080 refused, also [fd00::1]:443 and 169.254.169.254 (os error 111)"),
            "tcp connect error: <address> refused, also <address> and <address> (os error 111)"
        );
    }

    /// Proxy variables in the environment are ignored (run in a child process: the environment
    /// of this test process is shared by every test).
    #[tokio::test]
    async fn proxy_environment_variables_are_ignored() {
        if std::env::var_os("IM_SENDER_PROXY_CHILD").is_none() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "tests::proxy_environment_variables_are_ignored", "--test-threads=1"])
                .env("IM_SENDER_PROXY_CHILD", "1")
                .env("HTTP_PROXY", "http://127.0.0.1:9")
                .env("http_proxy", "http://127.0.0.1:9")
                .env("ALL_PROXY", "http://127.0.0.1:9")
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .status()
                .unwrap();
            assert!(status.success(), "the child run failed");
            return;
        }
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(204)).expect(1).mount(&server).await;
        let result = sender(true).send(request(format!("{}/direct", server.uri()))).await;
        assert_eq!(result.status, Some(204), "{:?}", result.error);
    }

    #[tokio::test]
    async fn a_configured_proxy_carries_every_request() {
        let proxy = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(202)).expect(1).mount(&proxy).await;
        let sender = HttpWebhookSender::new(&settings("2s", &[], &proxy.uri())).unwrap();
        // A public destination that never answers directly: only the proxy can answer 202.
        let result = sender.send(request("http://192.88.100.1/hook".into())).await;
        assert_eq!(result.status, Some(202), "{:?}", result.error);
    }
}

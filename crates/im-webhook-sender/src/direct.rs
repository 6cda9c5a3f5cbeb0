//! The webhook sender's direct transport: hyper's pooled HTTP/1.1 client (`hyper-util`'s), over
//! rustls for `https`, with names resolved by the [`SafeResolver`]; the connect timeout bounds
//! the whole connection (resolution, TCP, TLS handshake), the request timeout the whole exchange.
//!
//! reqwest runs the same hyper client under layers an attempt does not need: a retry layer, a
//! redirect layer that parses every request's URI into a URL again, a URL made again of each
//! response's URI, a boxed timeout per request. Straight through hyper, a request to a local
//! receiver costs about 40% less of the client's CPU, and ten endpoints take about a tenth more
//! deliveries a second (docs/benchmarks.md, "A forty-third machine"). The proxy, when one is
//! configured, stays reqwest's ([`crate::HttpWebhookSender`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::header::{HeaderMap, RETRY_AFTER};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use im_domain::webhooks::delivery::RESPONSE_EXCERPT_BYTES;
use tokio::time::Instant;

use crate::SafeResolver;

/// How long an idle connection is kept (reqwest's default too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// TCP keepalive of pooled connections (reqwest's defaults: first probe after 15 s idle, then
/// every 15 s, 3 probes).
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 3;

/// hyper's client with the [`SafeResolver`] and TLS; cheap to clone (one pool).
#[derive(Clone)]
pub(crate) struct DirectClient {
    client: Client<TimedConnect<HttpsConnector<HttpConnector<SafeResolver>>>, Full<Bytes>>,
    request_timeout: Duration,
}

/// A connector whose whole connection (the name resolved, TCP, the TLS handshake) must be
/// made within `timeout`: the TCP connector's own timeout bounds each address tried, not a
/// slow resolver or a handshake that stalls.
#[derive(Clone)]
pub(crate) struct TimedConnect<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower_service::Service<hyper::Uri> for TimedConnect<C>
where
    C: tower_service::Service<hyper::Uri>,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let (connecting, timeout) = (self.inner.call(uri), self.timeout);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(format!("the connection was not made within {}s", timeout.as_secs_f64()).into()),
            }
        })
    }
}

impl std::fmt::Debug for DirectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectClient").field("request_timeout", &self.request_timeout).finish_non_exhaustive()
    }
}

/// What came back: the status, `Retry-After`, and the start of the body.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub excerpt: Vec<u8>,
}

impl DirectClient {
    /// # Errors
    /// When the TLS configuration cannot be built.
    pub(crate) fn new(
        resolver: SafeResolver,
        connect_timeout: Duration,
        request_timeout: Duration,
        idle_per_host: usize,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(KEEPALIVE));
        http.set_keepalive_interval(Some(KEEPALIVE));
        http.set_keepalive_retries(Some(KEEPALIVE_PROBES));
        let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(idle_per_host)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(TimedConnect { inner: https, timeout: connect_timeout });
        Ok(Self { client, request_timeout })
    }

    /// POSTs `body` with `headers` to `uri` (judged already); the whole exchange, body
    /// excerpt included, within the request timeout. A body cut short by the timeout or an
    /// error keeps what was read.
    pub(crate) async fn post(&self, uri: hyper::Uri, headers: &[(String, String)], body: Vec<u8>) -> Result<Answer, String> {
        let deadline = Instant::now() + self.request_timeout;
        let mut request = Request::post(uri);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| format!("request failed: {e}"))?;
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Err(_) => return Err("timed out".to_owned()),
            Ok(Err(e)) => return Err(describe(&e)),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let mut body = response.into_body();
        let mut excerpt = Vec::new();
        while excerpt.len() < RESPONSE_EXCERPT_BYTES {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        excerpt.extend_from_slice(data);
                    }
                }
                Ok(None | Some(Err(_))) | Err(_) => break,
            }
        }
        excerpt.truncate(RESPONSE_EXCERPT_BYTES);
        Ok(Answer { status, retry_after, excerpt })
    }
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error chain of a failed request (hyper's errors carry no URL), addresses redacted.
fn describe(error: &hyper_util::client::legacy::Error) -> String {
    let head = if error.is_connect() { "could not connect" } else { "request failed" };
    crate::error_chain(head, error, None)
}

/// The resolver as hyper's connector calls it.
impl tower_service::Service<Name> for SafeResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.clone();
        Box::pin(async move { Ok(resolver.allowed(name.as_str()).await?.into_iter()) })
    }
}

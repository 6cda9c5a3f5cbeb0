//! The [`WebhookSender`] port on reqwest.
//!
//! SSRF protection: host names are resolved by [`SafeResolver`], which drops every address the
//! [`UrlPolicy`] refuses (loopback, private, link-local and metadata, CGNAT, multicast,
//! unspecified, and their IPv4-mapped IPv6 forms) unless an allowed network contains it; the
//! connection then goes to an address that was checked, so DNS rebinding has no window. Literal
//! addresses in URLs are checked before any connection. Redirects are never followed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_domain::webhooks::delivery::RESPONSE_EXCERPT_BYTES;
use im_domain::webhooks::endpoint::{UrlPolicy, literal_host};
use im_domain::webhooks::ports::{OutgoingRequest, SendResult, WebhookSender};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Resolves names and keeps only the addresses the policy allows.
#[derive(Debug, Clone)]
pub struct SafeResolver {
    policy: Arc<UrlPolicy>,
}

impl Resolve for SafeResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = Vec::new();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check_ip(addr.ip()) {
                    Ok(()) => true,
                    Err(reason) => {
                        refused.push(reason);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let reason = if refused.is_empty() {
                    format!("{host} did not resolve")
                } else {
                    format!("refused destination {host}: {}", refused.join(", "))
                };
                return Err(reason.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Timeouts and identity of the sender.
#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub policy: UrlPolicy,
}

/// Sends webhook requests.
#[derive(Debug, Clone)]
pub struct HttpWebhookSender {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
}

impl HttpWebhookSender {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: SenderSettings) -> Result<Self, String> {
        let policy = Arc::new(settings.policy);
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(SafeResolver { policy: policy.clone() }))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, policy })
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error chain of a failed request, without the URL (it may carry credentials).
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

#[async_trait]
impl WebhookSender for HttpWebhookSender {
    async fn send(&self, request: OutgoingRequest) -> SendResult {
        let started = Instant::now();
        let failed = |error: String, started: Instant| SendResult {
            status: None,
            retry_after: None,
            body_excerpt: None,
            error: Some(error),
            duration: started.elapsed(),
        };
        if let Some(ip) = literal_host(&request.url)
            && let Err(reason) = self.policy.check_ip(ip)
        {
            return failed(format!("refused destination: {reason}"), started);
        }
        let mut builder = self.client.post(&request.url).body(request.body);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let mut response = match builder.send().await {
            Ok(response) => response,
            Err(e) => return failed(describe(&e), started),
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        while body.len() < RESPONSE_EXCERPT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        body.truncate(RESPONSE_EXCERPT_BYTES);
        let excerpt = (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned());
        let error = (!(200..300).contains(&status)).then(|| format!("the receiver answered {status}"));
        SendResult { status: Some(status), retry_after, body_excerpt: excerpt, error, duration: started.elapsed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_domain::webhooks::endpoint::Cidr;
    use wiremock::matchers::{header, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn sender(allow_loopback: bool) -> HttpWebhookSender {
        let allowed_private = if allow_loopback { vec![Cidr::parse("127.0.0.0/8").unwrap()] } else { Vec::new() };
        HttpWebhookSender::new(SenderSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_millis(500),
            policy: UrlPolicy { allow_http: true, allowed_private },
        })
        .unwrap()
    }

    fn request(url: String) -> OutgoingRequest {
        OutgoingRequest { url, headers: vec![("webhook-id".into(), "msg_1".into())], body: b"{}".to_vec() }
    }

    #[tokio::test]
    async fn posts_and_records_status_body_and_retry_after() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("webhook-id", "msg_1"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "7").set_body_string("x".repeat(10_000)))
            .mount(&server)
            .await;
        let result = sender(true).send(request(format!("{}/hook", server.uri()))).await;
        assert_eq!(result.status, Some(429));
        assert_eq!(result.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(result.body_excerpt.map(|b| b.len()), Some(RESPONSE_EXCERPT_BYTES));
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
    async fn refused_destinations_never_get_a_connection() {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).expect(0).mount(&server).await;
        let port = server.address().port();
        for url in
            [format!("http://127.0.0.1:{port}/h"), format!("http://localhost:{port}/h"), format!("http://[::ffff:127.0.0.1]:{port}/h")]
        {
            let result = sender(false).send(request(url.clone())).await;
            assert_eq!(result.status, None, "{url}");
            assert!(result.error.as_deref().unwrap_or_default().contains("refused destination"), "{url}: {:?}", result.error);
        }
    }
}

//! The [`OAuth2Client`] port on the `oauth2` crate, sending through the provider client's
//! SSRF-safe reqwest client: token URLs are judged by [`UrlPolicy::check_destination`], names
//! resolved by the [`crate::SafeResolver`], redirects never followed, proxies ignored.
//!
//! Every refresh and client-credentials grant counts in `im_token_refreshes_total` with
//! `outcome="ok"` or `outcome="failed"`. Errors name the OAuth2 error code the server answered
//! (`invalid_grant`...) and never a URL, a token or a secret.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::DomainError;
use im_domain::oauth2::{AuthorizationRequest, OAuth2App, OAuth2Client, TokenGrant};
use im_domain::webhooks::endpoint::UrlPolicy;
use oauth2::basic::{BasicClient, BasicErrorResponse, BasicTokenResponse};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, HttpClientError, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, Scope, TokenResponse as _, TokenUrl,
};

use crate::provider::{ProviderClientSettings, http_client};

/// The metric of token refreshes (refresh-token and client-credentials grants).
pub const TOKEN_REFRESHES: &str = "im_token_refreshes_total";

/// Talks to token endpoints.
#[derive(Debug, Clone)]
pub struct HttpOAuth2Client {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
}

type TokenError = RequestTokenError<HttpClientError<reqwest::Error>, BasicErrorResponse>;

impl HttpOAuth2Client {
    /// A client with the provider client's timeouts and user agent and `policy` for token URLs.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: &ProviderClientSettings, policy: UrlPolicy) -> Result<Self, String> {
        let policy = Arc::new(policy);
        Ok(Self { client: http_client(settings, &policy)?, policy })
    }

    fn token_url(&self, url: &str) -> Result<TokenUrl, DomainError> {
        self.policy.check_destination(url).map_err(|refusal| DomainError::invalid("tokenUrl", refusal.redacted()))?;
        TokenUrl::new(url.to_owned()).map_err(|_| DomainError::invalid("tokenUrl", "is not a URL"))
    }
}

fn grant(response: &BasicTokenResponse) -> TokenGrant {
    TokenGrant {
        access_token: response.access_token().secret().clone(),
        refresh_token: response.refresh_token().map(|t| t.secret().clone()),
        expires_in: response.expires_in(),
        scopes: response.scopes().map(|scopes| scopes.iter().map(|s| s.to_string()).collect()),
    }
}

/// The domain error of a failed token request: a refusal names the OAuth2 error code; nothing
/// quotes the server's description (it may echo what was sent).
fn failure(error: &TokenError) -> DomainError {
    match error {
        RequestTokenError::ServerResponse(response) => DomainError::Conflict(response.error().as_ref().to_owned()),
        RequestTokenError::Request(e) => DomainError::Unavailable {
            reason: match e {
                HttpClientError::Reqwest(e) => format!("the token endpoint could not be reached: {}", crate::describe(e)),
                _ => "the token endpoint could not be reached".to_owned(),
            },
            retry_after: None,
        },
        RequestTokenError::Parse(_, _) | RequestTokenError::Other(_) => {
            DomainError::Unavailable { reason: "the token endpoint did not answer with a token".to_owned(), retry_after: None }
        }
    }
}

/// Counts a refresh by its outcome.
fn count<T>(result: Result<T, DomainError>) -> Result<T, DomainError> {
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    metrics::counter!(TOKEN_REFRESHES, "outcome" => outcome).increment(1);
    result
}

#[async_trait]
impl OAuth2Client for HttpOAuth2Client {
    fn authorization_url(&self, request: &AuthorizationRequest<'_>) -> Result<String, DomainError> {
        let auth_url =
            AuthUrl::new(request.authorization_url.to_owned()).map_err(|_| DomainError::invalid("authorizationUrl", "is not a URL"))?;
        let redirect =
            RedirectUrl::new(request.redirect_url.to_owned()).map_err(|_| DomainError::invalid("redirectUrl", "is not a URL"))?;
        let client = BasicClient::new(ClientId::new(request.client_id.to_owned())).set_auth_uri(auth_url).set_redirect_uri(redirect);
        let state = request.state.to_owned();
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(request.pkce_verifier.to_owned()));
        let (url, _) = client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(request.scopes.iter().map(|s| Scope::new(s.clone())))
            .set_pkce_challenge(challenge)
            .url();
        Ok(url.to_string())
    }

    async fn exchange_code(
        &self,
        app: &OAuth2App,
        token_url: &str,
        redirect_url: &str,
        code: &str,
        pkce_verifier: &str,
    ) -> Result<TokenGrant, DomainError> {
        let redirect = RedirectUrl::new(redirect_url.to_owned()).map_err(|_| DomainError::invalid("redirectUrl", "is not a URL"))?;
        let client = BasicClient::new(ClientId::new(app.client_id.clone()))
            .set_client_secret(ClientSecret::new(app.client_secret.clone()))
            .set_token_uri(self.token_url(token_url)?)
            .set_redirect_uri(redirect);
        client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_owned()))
            .request_async(&self.client)
            .await
            .map(|r| grant(&r))
            .map_err(|e| failure(&e))
    }

    async fn refresh(&self, app: &OAuth2App, token_url: &str, refresh_token: &str) -> Result<TokenGrant, DomainError> {
        let client = BasicClient::new(ClientId::new(app.client_id.clone()))
            .set_client_secret(ClientSecret::new(app.client_secret.clone()))
            .set_token_uri(self.token_url(token_url)?);
        let refresh = RefreshToken::new(refresh_token.to_owned());
        count(client.exchange_refresh_token(&refresh).request_async(&self.client).await.map(|r| grant(&r)).map_err(|e| failure(&e)))
    }

    async fn client_credentials(&self, app: &OAuth2App, token_url: &str, scopes: &[String]) -> Result<TokenGrant, DomainError> {
        let client = BasicClient::new(ClientId::new(app.client_id.clone()))
            .set_client_secret(ClientSecret::new(app.client_secret.clone()))
            .set_token_uri(self.token_url(token_url)?);
        count(
            client
                .exchange_client_credentials()
                .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
                .request_async(&self.client)
                .await
                .map(|r| grant(&r))
                .map_err(|e| failure(&e)),
        )
    }

    async fn pause(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

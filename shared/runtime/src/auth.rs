//! Bearer JWT authentication: who is calling and with which scopes.
//!
//! `sub` is the user; the space-separated `scope` claim may grant `admin` (admin RPCs) and
//! `service` (internal RPCs). Tokens are verified with an HS256 secret (dev, single tenant) or
//! against a JWKS (RS256 / ES256, any OIDC provider) that is refreshed in the background.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode,
    jwk::JwkSet,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, metadata::MetadataMap};

use crate::config::AuthConfig;

/// Subject used by services when they call each other.
pub const SERVICE_SUBJECT: &str = "stowage-internal";

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user_id: String,
    /// Whether the `admin` scope was granted.
    pub admin: bool,
    /// Whether the `service` scope was granted.
    pub service: bool,
}

impl Identity {
    /// The identity a service uses for in-process calls to another service.
    pub fn internal_service() -> Self {
        Self {
            user_id: SERVICE_SUBJECT.to_owned(),
            admin: false,
            service: true,
        }
    }

    /// PERMISSION_DENIED unless the caller has the admin scope.
    pub fn require_admin(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied("this call needs the admin scope"))
        }
    }

    /// PERMISSION_DENIED unless the caller has the service scope.
    pub fn require_service(&self) -> Result<(), Status> {
        if self.service {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this call needs the service scope",
            ))
        }
    }

    /// PERMISSION_DENIED unless the caller has the admin or the service scope.
    pub fn require_privileged(&self) -> Result<(), Status> {
        if self.is_privileged() {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this call needs the admin or service scope",
            ))
        }
    }

    /// Whether the caller may act on another user's data.
    pub fn is_privileged(&self) -> bool {
        self.admin || self.service
    }
}

/// Reads the identity the auth interceptor attached to a request.
pub fn identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

/// The `aud` claim: one audience or a list of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Claims of a Stowage token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Space-separated scopes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// Issuer, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when configured: one, or several (as identity providers may send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// Why a token was refused (the caller only ever sees UNAUTHENTICATED).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer …` metadata.
    #[error("missing bearer token")]
    Missing,
    /// Token present but not valid.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// JWKS could not be fetched.
    #[error("cannot fetch JWKS: {0}")]
    Jwks(String),
}

/// Verifies tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// The identity provider's keys, refreshed in the background: every ten minutes, and soon
/// after a token names a key not in the set (the provider rotated its keys), at most once per
/// [`JWKS_FORCED_GAP`] however many such tokens come.
#[derive(Clone)]
struct Jwks {
    set: Arc<RwLock<JwkSet>>,
    unknown_kid: Arc<tokio::sync::Notify>,
}

/// Shortest time between two fetches of the key set asked for by unknown key ids: tokens
/// naming random ids cannot make the service hammer the identity provider.
const JWKS_FORCED_GAP: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("jwks", &self.jwks.is_some())
            .finish()
    }
}

impl Verifier {
    /// Builds a verifier; with a JWKS URL, fetches the key set once (failing start-up if it
    /// cannot) and keeps refreshing it every ten minutes until `shutdown`.
    pub async fn new(config: &AuthConfig, shutdown: CancellationToken) -> Result<Self, AuthError> {
        let hs256 = config
            .hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let jwks = match &config.jwks_url {
            Some(url) => {
                let jwks = Jwks {
                    set: Arc::new(RwLock::new(fetch_jwks(url).await?)),
                    unknown_kid: Arc::new(tokio::sync::Notify::new()),
                };
                spawn_jwks_refresh(url.clone(), jwks.clone(), shutdown);
                Some(jwks)
            }
            None => None,
        };
        if hs256.is_some() && jwks.is_some() {
            tracing::warn!(
                "STOWAGE_AUTH__HS256_SECRET and STOWAGE_AUTH__JWKS_URL are both set: tokens signed \
                 with the secret are accepted beside the identity provider's, so whoever holds it \
                 can sign any user's token, an admin's too; unset the secret once every client \
                 uses the provider (services then present STOWAGE_SERVICE_TOKEN)"
            );
        }
        Ok(Self {
            hs256,
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// Verifies `token` and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .hs256
                .clone()
                .ok_or_else(|| AuthError::Invalid("HS256 tokens are not accepted".into()))?,
            Algorithm::RS256 | Algorithm::ES256 => {
                let jwks = self
                    .jwks
                    .as_ref()
                    .ok_or_else(|| AuthError::Invalid("no JWKS configured".into()))?;
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| AuthError::Invalid("token has no kid".into()))?;
                let set = jwks
                    .set
                    .read()
                    .map_err(|_| AuthError::Invalid("key set unavailable".into()))?;
                let Some(jwk) = set.find(kid) else {
                    // Perhaps a key the provider just added: fetched again soon.
                    jwks.unknown_kid.notify_one();
                    return Err(AuthError::Invalid(format!(
                        "unknown kid {kid:?} (the key set is fetched again; retry shortly)"
                    )));
                };
                DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Invalid(e.to_string()))?
            }
            other => return Err(AuthError::Invalid(format!("algorithm {other:?} refused"))),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        validation.validate_nbf = true;
        // A configured issuer or audience must be in the token, not only match when present:
        // a token of the same identity provider made for another application has no say here.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = decode::<Claims>(token, &key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty sub".into()));
        }
        let has = |s: &str| claims.scope.split_whitespace().any(|x| x == s);
        Ok(Identity {
            admin: has("admin"),
            service: has("service"),
            user_id: claims.sub,
        })
    }

    /// Verifies the bearer token in gRPC (or HTTP) metadata.
    pub fn verify_metadata(&self, metadata: &MetadataMap) -> Result<Identity, AuthError> {
        let value = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing)?;
        let token = bearer(value).ok_or(AuthError::Missing)?;
        self.verify(token)
    }

    /// A tonic interceptor that attaches the caller's [`Identity`] or answers UNAUTHENTICATED.
    pub fn interceptor(&self) -> AuthInterceptor {
        AuthInterceptor {
            verifier: self.clone(),
        }
    }
}

/// Strips the `Bearer ` prefix (case-insensitive).
pub fn bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Interceptor installed in front of every Stowage service (not health or reflection).
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    verifier: Verifier,
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.verifier.verify_metadata(request.metadata()) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                Ok(request)
            }
            Err(error) => {
                tracing::debug!(%error, "request refused");
                Err(Status::unauthenticated(error.to_string()))
            }
        }
    }
}

/// Mints HS256 tokens (dev tokens, and service tokens between processes in HS256 mode).
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    /// A minter for the configured HS256 secret; `None` in JWKS-only mode.
    pub fn from_config(config: &AuthConfig) -> Option<Self> {
        config.hs256_secret.as_ref().map(|secret| Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// A token for `user` with `scopes`, valid for `ttl`.
    pub fn mint(&self, user: &str, scopes: &[&str], ttl: Duration) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        self.mint_until(user, scopes, now + ttl.as_secs())
    }

    /// A token for `user` with `scopes` that expires at `exp` (seconds since the epoch).
    pub fn mint_until(&self, user: &str, scopes: &[&str], exp: u64) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user.to_owned(),
            iat: now.min(exp),
            exp,
            scope: scopes.join(" "),
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(Audience::One),
        };
        // Encoding an HS256 token over serialisable claims cannot fail.
        encode(&Header::new(Algorithm::HS256), &claims, &self.key).unwrap_or_default()
    }
}

async fn fetch_jwks(url: &str) -> Result<JwkSet, AuthError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| AuthError::Jwks(e.to_string()))?;
    client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| AuthError::Jwks(e.to_string()))?
        .json::<JwkSet>()
        .await
        .map_err(|e| AuthError::Jwks(e.to_string()))
}

fn spawn_jwks_refresh(url: String, jwks: Jwks, shutdown: CancellationToken) {
    crate::tasks::spawn("jwks-refresh", async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        tick.tick().await;
        let mut last_forced: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                () = jwks.unknown_kid.notified() => {
                    if let Some(at) = last_forced {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep_until(at + JWKS_FORCED_GAP) => {}
                        }
                    }
                    last_forced = Some(tokio::time::Instant::now());
                }
            }
            match fetch_jwks(&url).await {
                Ok(set) => {
                    if let Ok(mut guard) = jwks.set.write() {
                        *guard = set;
                    }
                }
                Err(error) => tracing::warn!(%error, "jwks refresh failed, keeping the old keys"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            hs256_secret: Some("0123456789abcdef0123".into()),
            ..AuthConfig::default()
        }
    }

    #[tokio::test]
    async fn minted_tokens_verify_with_their_scopes() {
        let verifier = Verifier::new(&config(), CancellationToken::new())
            .await
            .unwrap();
        let minter = Minter::from_config(&config()).unwrap();
        let token = minter.mint("alice", &["admin"], Duration::from_secs(60));
        let id = verifier.verify(&token).unwrap();
        assert_eq!(id.user_id, "alice");
        assert!(id.admin && !id.service);
    }

    #[tokio::test]
    async fn other_secrets_and_expired_tokens_are_refused() {
        let verifier = Verifier::new(&config(), CancellationToken::new())
            .await
            .unwrap();
        let other = Minter::from_config(&AuthConfig {
            hs256_secret: Some("another-secret-of-16b".into()),
            ..AuthConfig::default()
        })
        .unwrap();
        assert!(
            verifier
                .verify(&other.mint("alice", &[], Duration::from_secs(60)))
                .is_err()
        );
        let minter = Minter::from_config(&config()).unwrap();
        // Past the 30 s leeway.
        let expired = minter.mint_until("alice", &[], jsonwebtoken::get_current_timestamp() - 60);
        assert!(verifier.verify(&expired).is_err());
        let within_leeway =
            minter.mint_until("alice", &[], jsonwebtoken::get_current_timestamp() - 5);
        assert!(verifier.verify(&within_leeway).is_ok());
    }

    /// A token of the same key made for another application (no audience, another one, or
    /// no issuer) is refused once Stowage has an audience and an issuer; one that names
    /// Stowage among several audiences passes; one not valid yet is refused.
    #[tokio::test]
    async fn a_configured_audience_and_issuer_must_be_in_the_token() {
        let secret = "0123456789abcdef0123";
        let stowage = AuthConfig {
            hs256_secret: Some(secret.into()),
            issuer: Some("https://id.example".into()),
            audience: Some("stowage".into()),
            ..AuthConfig::default()
        };
        let verifier = Verifier::new(&stowage, CancellationToken::new())
            .await
            .unwrap();
        let key = EncodingKey::from_secret(secret.as_bytes());
        let now = jsonwebtoken::get_current_timestamp();
        let token = |claims: serde_json::Value| {
            encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let base = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({
                "sub": "alice", "exp": now + 60, "iat": now, "scope": "admin",
            });
            for (k, v) in extra.as_object().unwrap() {
                claims[k] = v.clone();
            }
            token(claims)
        };
        let iss = "https://id.example";
        assert!(
            verifier
                .verify(&base(serde_json::json!({"iss": iss, "aud": "stowage"})))
                .is_ok()
        );
        let several = base(serde_json::json!({"iss": iss, "aud": ["billing", "stowage"]}));
        assert!(verifier.verify(&several).is_ok());
        for refused in [
            serde_json::json!({"iss": iss}),
            serde_json::json!({"iss": iss, "aud": "billing"}),
            serde_json::json!({"aud": "stowage"}),
            serde_json::json!({"iss": iss, "aud": "stowage", "nbf": now + 3600}),
        ] {
            assert!(
                verifier.verify(&base(refused.clone())).is_err(),
                "{refused}"
            );
        }
        // Stowage's own tokens carry both.
        let minter = Minter::from_config(&stowage).unwrap();
        assert!(
            verifier
                .verify(&minter.mint("alice", &[], Duration::from_secs(60)))
                .is_ok()
        );
    }
}

//! Authentication and authorization.
//!
//! ```text
//! request ─► http::guard (middleware, whole router)
//!              auth off, or /health/*, /metrics ─► through, no Principal
//!              credential: Authorization: Bearer > ?access_token= > cookie
//!                none / invalid / expired ─► 401 + WWW-Authenticate
//!              /_admin… without the admin role ─► 403
//!              else: Principal into the request extensions
//!          ─► subscribe handler: Authenticator::authorize_stream (rules) ─► 403 before any
//!             worker starts; Principal::deadline() ends the feed with `auth_revoked`;
//!             Authenticator::watch_access ends it with `cancel` when a stored rule change
//!             withdraws the right
//! ```
//!
//! A credential is a JWT (see [`jwt`]; keys from a JWKS URL in [`jwks`]) when JWTs are
//! configured and it looks like one, else a static API key, compared by SHA-256 in constant
//! time. Stream permissions are in [`rules`]: static ones from the config, live ones from
//! MongoDB ([`store`], managed through `/_admin/rules`). The browser origin policy is in
//! [`cors`]; the client address behind trusted proxies in [`proxy`]; resume ids that cannot
//! be real are refused by [`resume`].

pub mod cors;
pub mod jwks;
pub mod jwt;
pub mod proxy;
pub mod resume;
pub mod rules;
pub mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, header};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::jwt::JwtVerifier;
use self::rules::{Rule, Rules};
use crate::config::AuthConfig;
use crate::metrics::Metrics;
use crate::streams::StreamKey;

/// The token firebase-admin sends in emulator mode (`Authorization: Bearer owner`): with auth
/// off every credential is ignored, so it works there; with auth on it gets a 401 that names it.
const EMULATOR_OWNER: &str = "owner";

/// The `cancel` message of a stream whose right a rule change withdrew.
pub const REVOKED_MESSAGE: &str = "security rules revoked read access";

/// Resolves when a client's right to its stream is withdrawn (see
/// [`Authenticator::watch_access`]).
pub type Revocation = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Who is making a request, once authenticated.
#[derive(Debug, Clone)]
pub struct Principal {
    /// JWT `sub`, or the API key's `name`; empty when a JWT has no `sub`.
    pub subject: String,
    /// Roles from the configured claim, or the API key's roles.
    pub roles: Vec<String>,
    /// Every claim of the JWT (`sub`, `name`, `roles` for an API key): the input of per-user
    /// document filtering.
    pub claims: Map<String, Value>,
    /// When the credential stops being valid (JWT `exp` + leeway); `None` for API keys.
    pub expires_at: Option<SystemTime>,
}

impl Principal {
    /// Whether the principal holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Who this principal is for `limits.per_user` and `limits.new_bindings_per_minute`: its
    /// subject (JWT `sub`, API key `name`); for a token without one, `claims:` and the SHA-256
    /// of its claims minus those that change with every token (`exp`, `iat`, `nbf`, `jti`,
    /// `auth_time`), so every token an issuer gives the same holder has the same key, and a
    /// token without `sub` is limited like any other (PROTOCOL.md §9).
    pub fn limit_key(&self) -> String {
        if !self.subject.is_empty() {
            return self.subject.clone();
        }
        const PER_TOKEN: [&str; 5] = ["exp", "iat", "nbf", "jti", "auth_time"];
        let mut digest = Sha256::new();
        let mut keys: Vec<&String> = self
            .claims
            .keys()
            .filter(|k| !PER_TOKEN.contains(&k.as_str()))
            .collect();
        keys.sort();
        for key in keys {
            canonical(&Value::String(key.clone()), &mut digest);
            canonical(&self.claims[key], &mut digest);
        }
        format!("claims:{}", hex::encode(digest.finalize()))
    }

    /// `expires_at` on tokio's clock, for the feed's revocation timer.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        let expires_at = self.expires_at?;
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Some(tokio::time::Instant::now() + left)
    }
}

/// Feeds `value` to `digest` as JSON with object keys sorted, so equal claims hash equally
/// whatever order the token wrote them in.
fn canonical(value: &Value, digest: &mut Sha256) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            digest.update(b"{");
            for key in keys {
                canonical(&Value::String(key.clone()), digest);
                digest.update(b":");
                canonical(&map[key], digest);
                digest.update(b",");
            }
            digest.update(b"}");
        }
        Value::Array(items) => {
            digest.update(b"[");
            for item in items {
                canonical(item, digest);
                digest.update(b",");
            }
            digest.update(b"]");
        }
        other => digest.update(other.to_string().as_bytes()),
    }
}

/// Why a request has no principal, or its principal may not do what it asked. The HTTP
/// layer answers it (401 with a challenge, 403, 503: `http::error`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential in the header, the query or the cookie.
    #[error("a credential is required")]
    Missing,
    /// The token's `exp` has passed.
    #[error("the access token expired")]
    Expired,
    /// Bad signature, wrong audience or issuer, unknown key…; the reason is logged only.
    #[error("invalid credential: {0}")]
    Invalid(String),
    /// `Bearer owner`, the Firebase emulator's admin credential that firebase-admin sends to an
    /// `http://` database URL, with auth on and no API key equal to it (401, saying so).
    #[error("`Bearer owner` is the Firebase emulator's credential, accepted only with auth off")]
    EmulatorOwner,
    /// The JWKS URL has not been fetched successfully yet: nothing can be verified (503).
    #[error("the token signing keys are not loaded yet")]
    KeysUnavailable,
    /// Authenticated, but without the right to what was asked (403); the detail says what.
    #[error("{0}")]
    Forbidden(String),
}

/// A configured API key: only its hash is kept.
struct ApiKey {
    name: String,
    sha256: [u8; 32],
    roles: Vec<String>,
}

/// Turns credentials into principals and decides what they may do.
pub struct Authenticator {
    enabled: bool,
    jwt: Option<JwtVerifier>,
    api_keys: Vec<ApiKey>,
    cookie_name: String,
    admin_role: String,
    /// `auth.metrics_role`: required for `/metrics` when set (and auth is on).
    metrics_role: Option<String>,
    /// Rules of the config file: never change.
    rules: Rules,
    /// Rules stored in MongoDB (`/_admin/rules`), replaced whole by [`store::RuleStore`] on
    /// every change; open streams watch it to end when their right goes.
    stored: watch::Sender<Arc<Rules>>,
}

impl Authenticator {
    /// Builds from the `[auth]` section, reading key files (a JWKS URL is fetched once
    /// [`start`](Self::start) runs). Called once at startup.
    pub fn from_config(config: &AuthConfig, metrics: &Metrics) -> Result<Authenticator, String> {
        check_auth(config)?;
        let jwt = match &config.jwt {
            Some(jwt) if config.enabled => Some(JwtVerifier::from_config(jwt, metrics)?),
            _ => None,
        };
        let mut api_keys = Vec::with_capacity(config.api_keys.len());
        for key in &config.api_keys {
            api_keys.push(ApiKey {
                name: key.name.clone(),
                sha256: parse_sha256(&key.sha256)
                    .ok_or_else(|| format!("auth.api_keys {:?}: bad sha256", key.name))?,
                roles: key.roles.clone(),
            });
        }
        let rules = config
            .rules
            .iter()
            .map(|r| Rule::new(&r.roles, &r.streams))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Authenticator {
            enabled: config.enabled,
            jwt,
            api_keys,
            cookie_name: config.cookie_name.clone(),
            admin_role: config.admin_role.clone(),
            metrics_role: config.metrics_role.clone().filter(|role| !role.is_empty()),
            rules: Rules::new(rules),
            stored: watch::channel(Arc::new(Rules::default())).0,
        })
    }

    /// Starts the background work: the JWKS URL's refresher, if one is configured.
    pub fn start(&self, tracker: &TaskTracker, cancel: CancellationToken) {
        if let Some(remote) = self.jwt.as_ref().and_then(JwtVerifier::remote) {
            remote.spawn_refresher(tracker, cancel);
        }
    }

    /// Whether tokens can be verified: false only while a JWKS URL's first fetch is pending
    /// (readiness waits for it).
    pub fn keys_ready(&self) -> bool {
        self.jwt
            .as_ref()
            .and_then(JwtVerifier::remote)
            .is_none_or(|remote| remote.is_loaded())
    }

    /// Waits up to `timeout` for [`keys_ready`](Self::keys_ready); returns it.
    pub async fn wait_keys_ready(&self, timeout: Duration) -> bool {
        match self.jwt.as_ref().and_then(JwtVerifier::remote) {
            Some(remote) => remote.wait_loaded(timeout).await,
            None => true,
        }
    }

    /// Whether credentials are required at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Finds and checks the request's credential.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        access_token: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let (token, _) = self
            .credential(headers, access_token)
            .ok_or(AuthError::Missing)?;
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => jwt.verify(token).await,
            _ => self.api_key(token),
        }
    }

    /// Replaces the stored rules (from [`store::RuleStore`]); open streams whose right this
    /// withdraws end with `cancel`.
    pub fn set_stored_rules(&self, rules: Rules) {
        self.stored.send_replace(Arc::new(rules));
    }

    /// Whether `roles` may subscribe to `key` under the config and stored rules.
    fn allows(&self, roles: &[String], key: &StreamKey) -> bool {
        self.rules.allows(roles, key) || self.stored.borrow().allows(roles, key)
    }

    /// A future that resolves when `principal` loses the right to `key` through a change of
    /// the stored rules; `None` when that cannot happen (auth off, or a config rule grants it,
    /// and config rules never change). It checks at once too, so a change between
    /// [`authorize_stream`](Self::authorize_stream) and this call is not missed.
    pub fn watch_access(
        &self,
        principal: Option<&Principal>,
        key: &StreamKey,
    ) -> Option<Revocation> {
        let principal = principal.filter(|_| self.enabled)?;
        if self.rules.allows(&principal.roles, key) {
            return None;
        }
        let mut stored = self.stored.subscribe();
        let roles = principal.roles.clone();
        let key = key.clone();
        Some(Box::pin(async move {
            loop {
                if !stored.borrow_and_update().allows(&roles, &key) {
                    return;
                }
                // The sender lives as long as the server: if it is gone, nothing can change.
                if stored.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }))
    }

    /// Whether the request is authenticated by the cookie: a browser sends it by itself,
    /// whichever page opens the connection. Always false with auth off.
    pub fn credential_is_cookie(&self, headers: &HeaderMap, access_token: Option<&str>) -> bool {
        self.enabled
            && self
                .credential(headers, access_token)
                .is_some_and(|(_, from_cookie)| from_cookie)
    }

    /// The token to check, and whether it came from the cookie: `Authorization: Bearer`, then
    /// `?access_token=`, then the cookie (the first found wins, valid or not).
    fn credential<'a>(
        &self,
        headers: &'a HeaderMap,
        access_token: Option<&'a str>,
    ) -> Option<(&'a str, bool)> {
        bearer(headers)
            .or(access_token.filter(|t| !t.is_empty()))
            .map(|token| (token, false))
            .or_else(|| cookie(headers, &self.cookie_name).map(|token| (token, true)))
    }

    fn api_key(&self, token: &str) -> Result<Principal, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Look at every key, whatever matches, so timing does not tell which one did.
        let mut found = None;
        for key in &self.api_keys {
            if bool::from(key.sha256.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| {
            if token == EMULATOR_OWNER {
                AuthError::EmulatorOwner
            } else {
                AuthError::Invalid("unknown API key".into())
            }
        })?;
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::String(key.name.clone()));
        claims.insert("name".into(), Value::String(key.name.clone()));
        claims.insert(
            "roles".into(),
            Value::Array(key.roles.iter().cloned().map(Value::String).collect()),
        );
        Ok(Principal {
            subject: key.name.clone(),
            roles: key.roles.clone(),
            claims,
            expires_at: None,
        })
    }

    /// May this request subscribe to `key`? Always yes when auth is off; with auth on, a
    /// request the guard did not authenticate is refused (fail closed).
    pub fn authorize_stream(
        &self,
        principal: Option<&Principal>,
        key: &StreamKey,
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let principal = principal.ok_or(AuthError::Missing)?;
        if self.allows(&principal.roles, key) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "you may not subscribe to {key}"
            )))
        }
    }

    /// Whether `/metrics` needs a credential (auth on and `auth.metrics_role` set).
    pub fn guards_metrics(&self) -> bool {
        self.enabled && self.metrics_role.is_some()
    }

    /// May this principal read `/metrics`? Yes unless `auth.metrics_role` is set and missing.
    pub fn authorize_metrics(&self, principal: &Principal) -> Result<(), AuthError> {
        match &self.metrics_role {
            Some(role) if !principal.has_role(role) => Err(AuthError::Forbidden(format!(
                "/metrics needs the {role:?} role"
            ))),
            _ => Ok(()),
        }
    }

    /// May this principal use `/_admin`?
    pub fn authorize_admin(&self, principal: &Principal) -> Result<(), AuthError> {
        if principal.has_role(&self.admin_role) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the admin API needs the {:?} role",
                self.admin_role
            )))
        }
    }
}

fn check_auth(config: &AuthConfig) -> Result<(), String> {
    if config.enabled && config.jwt.is_none() && config.api_keys.is_empty() {
        return Err("auth.enabled needs [auth.jwt] or at least one [[auth.api_keys]]".into());
    }
    if config.admin_role.is_empty() {
        return Err("auth.admin_role must not be empty".into());
    }
    if config.rules_collection.is_empty() {
        return Err("auth.rules_collection must not be empty".into());
    }
    let cookie_ok = !config.cookie_name.is_empty()
        && config
            .cookie_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !cookie_ok {
        return Err(format!(
            "auth.cookie_name {:?} is not a valid cookie name",
            config.cookie_name
        ));
    }
    if let Some(jwt) = &config.jwt {
        let sources = [
            jwt.hs256_secret.is_some(),
            jwt.public_key_pem_file.is_some(),
            jwt.jwks_file.is_some(),
            jwt.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(
                "auth.jwt: set exactly one of hs256_secret, public_key_pem_file, \
                        jwks_file, jwks_url"
                    .into(),
            );
        }
        if let Some(url) = &jwt.jwks_url {
            jwks::check_url(url)?;
            if jwt.jwks_min_refresh_secs == 0 || jwt.jwks_refresh_secs == 0 {
                return Err(
                    "auth.jwt.jwks_refresh_secs and jwks_min_refresh_secs must be at least 1"
                        .into(),
                );
            }
        }
        if jwt.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("auth.jwt.hs256_secret must be at least 32 bytes".into());
        }
        for name in &jwt.algorithms {
            name.parse::<jsonwebtoken::Algorithm>()
                .map_err(|_| format!("auth.jwt.algorithms: unknown algorithm {name:?}"))?;
        }
    }
    for (index, key) in config.api_keys.iter().enumerate() {
        if key.name.is_empty() {
            return Err(format!("auth.api_keys[{index}].name must not be empty"));
        }
        if parse_sha256(&key.sha256).is_none() {
            return Err(format!(
                "auth.api_keys[{index}].sha256 must be 64 hex digits (the SHA-256 of the key)"
            ));
        }
    }
    for (index, rule) in config.rules.iter().enumerate() {
        if rule.roles.is_empty() {
            return Err(format!("auth.rules[{index}].roles must not be empty"));
        }
        Rule::new(&rule.roles, &rule.streams).map_err(|e| format!("auth.rules[{index}]: {e}"))?;
    }
    Ok(())
}

fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out).ok()?;
    Some(out)
}

fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of cookie `name`, from any `Cookie` header.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use futures::FutureExt;

    fn claimed(subject: &str, claims: Value) -> Principal {
        Principal {
            subject: subject.into(),
            roles: Vec::new(),
            claims: claims.as_object().cloned().unwrap_or_default(),
            expires_at: None,
        }
    }

    #[test]
    fn a_token_without_sub_is_keyed_by_its_lasting_claims() {
        use serde_json::json;
        assert_eq!(
            claimed("alice", json!({ "sub": "alice" })).limit_key(),
            "alice"
        );
        let key = |claims| claimed("", claims).limit_key();
        let first =
            key(json!({ "client_id": "svc", "scope": { "a": 1, "b": [2] }, "exp": 1, "iat": 1 }));
        assert!(first.starts_with("claims:"), "{first}");
        // Another token of the same holder: other times, another order.
        let again = key(
            json!({ "iat": 9, "scope": { "b": [2], "a": 1 }, "jti": "x", "exp": 2, "client_id": "svc" }),
        );
        assert_eq!(first, again);
        assert_ne!(
            first,
            key(json!({ "client_id": "other", "scope": { "a": 1, "b": [2] } }))
        );
        assert_ne!(
            first,
            key(json!({ "client_id": "svc", "scope": { "a": 1, "b": [3] } }))
        );
    }

    #[test]
    fn credential_sources() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tok=\"c\"; b=2"),
        );
        assert_eq!(cookie(&headers, "tok"), Some("c"));
        assert_eq!(cookie(&headers, "zz"), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bEaReR  x.y.z "),
        );
        assert_eq!(bearer(&headers), Some("x.y.z"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }

    /// Auth on with one API key, `svc` (the key is `secret`), then `rest`: more members of
    /// the key, or further tables.
    fn with_api_key(rest: &str) -> AuthConfig {
        toml::from_str(&format!(
            r#"
            enabled = true
            [[api_keys]]
            name = "svc"
            sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
            {rest}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn api_keys_match_by_hash() {
        let config = with_api_key(r#"roles = ["reader"]"#);
        let auth = Authenticator::from_config(&config, &Metrics::new()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        let principal = auth
            .authenticate(&headers, None)
            .now_or_never()
            .unwrap()
            .unwrap();
        assert_eq!(principal.subject, "svc");
        assert!(principal.has_role("reader"));
        assert!(principal.expires_at.is_none());
        assert!(matches!(
            auth.authenticate(&HeaderMap::new(), Some("nope"))
                .now_or_never(),
            Some(Err(AuthError::Invalid(_)))
        ));
        assert!(matches!(
            auth.authenticate(&HeaderMap::new(), None).now_or_never(),
            Some(Err(AuthError::Missing))
        ));
    }

    #[test]
    fn example_security_block_parses_when_uncommented() {
        let text = include_str!("../../examples/streamgate.toml");
        let start = text.find("# [auth]").unwrap();
        let mut uncommented = text[..start].to_owned();
        for line in text[start..].lines() {
            uncommented.push_str(line.strip_prefix("# ").unwrap_or(line));
            uncommented.push('\n');
        }
        let uncommented =
            uncommented.replace(r#"<printf %s \"$KEY\" | sha256sum>"#, &"ab".repeat(32));
        let config = crate::config::Config::from_toml_str(&uncommented, "example").unwrap();
        config.validate().unwrap();
        assert!(config.auth.enabled);
        assert_eq!(config.auth.rules.len(), 2);
        assert_eq!(config.limits.per_user, Some(20));
        assert!(config.cors.allow_credentials);
        Authenticator::from_config(&config.auth, &Metrics::new()).unwrap();
    }

    #[test]
    fn config_mistakes_are_named() {
        let check = |text: &str| {
            let config: AuthConfig = toml::from_str(text).unwrap();
            check_auth(&config).unwrap_err()
        };
        assert!(check("enabled = true").contains("auth.jwt"));
        assert!(check("[[api_keys]]\nname='a'\nsha256='zz'").contains("sha256"));
        assert!(check("[[rules]]\nroles=['r']\nstreams=['/a/b']").contains("rules[0]"));
        assert!(check("[jwt]\nhs256_secret='short'").contains("32 bytes"));
        assert!(check("[jwt]").contains("exactly one"));
        assert!(check("[jwt]\njwks_url='http://idp.example.com/k'").contains("https://"));
        assert!(
            check("[jwt]\njwks_url='https://idp/k'\njwks_file='f.json'").contains("exactly one")
        );
    }

    fn principal(roles: &[&str]) -> Principal {
        Principal {
            subject: "u".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            claims: Map::new(),
            expires_at: None,
        }
    }

    #[test]
    fn stored_rules_add_to_config_rules_and_withdrawal_is_watched() {
        let config = with_api_key(
            r#"
            [[rules]]
            roles = ["static"]
            streams = ["/a/b/_streams/*"]
            "#,
        );
        let auth = Authenticator::from_config(&config, &Metrics::new()).unwrap();
        let key = StreamKey::new("a", "b", "s").unwrap();
        let reader = principal(&["reader"]);
        assert!(auth.authorize_stream(Some(&reader), &key).is_err());
        let grant = |streams: &[&str]| {
            let streams: Vec<String> = streams.iter().map(|s| s.to_string()).collect();
            Rules::new(vec![Rule::new(&["reader".to_string()], &streams).unwrap()])
        };
        auth.set_stored_rules(grant(&["/a/b/_streams/s"]));
        assert!(auth.authorize_stream(Some(&reader), &key).is_ok());
        // A statically granted principal has nothing to watch.
        assert!(
            auth.watch_access(Some(&principal(&["static"])), &key)
                .is_none()
        );
        let mut revoked = auth.watch_access(Some(&reader), &key).unwrap();
        assert!((&mut revoked).now_or_never().is_none());
        // Another grant for the same stream changes nothing for it.
        auth.set_stored_rules(grant(&["/a/b/_streams/s", "/a/c/_streams/*"]));
        assert!((&mut revoked).now_or_never().is_none());
        auth.set_stored_rules(grant(&["/a/c/_streams/*"]));
        assert!((&mut revoked).now_or_never().is_some());
        assert!(auth.authorize_stream(Some(&reader), &key).is_err());
    }
}

//! Bearer JWT verification with the `jsonwebtoken` crate.
//!
//! Keys come from one of: an HMAC shared secret, a PEM public key (RSA or EC), a JWKS file, or
//! a JWKS URL fetched and refreshed at runtime ([`super::jwks`]); a JWKS key is picked by the
//! token's `kid`. The accepted algorithms are always restricted to the key's family, so a token
//! can never choose how it is checked (no `none`, no HS256 signed with a public key; a JWKS
//! URL's symmetric keys are never used). `exp` is required; `nbf`, `iss` and `aud` are checked
//! when configured or present.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::RemoteJwks;
use super::{AuthError, Principal};
use crate::config::JwtConfig;
use crate::metrics::Metrics;

/// One verification key, with what it may verify.
pub(crate) struct Key {
    /// `kid` of a JWKS key.
    pub(crate) kid: Option<String>,
    /// The JWKS key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// Where the keys come from.
enum KeySource {
    /// Read once at startup; `by_kid` when they come from a JWKS (a token must then name its
    /// key with `kid` unless there is only one).
    Fixed { keys: Vec<Key>, by_kid: bool },
    /// `jwks_url`: the latest good set, refreshed in the background.
    Remote(Arc<RemoteJwks>),
}

/// Every asymmetric algorithm: what a JWKS URL's keys may verify when `algorithms` is empty.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Verifies bearer JWTs and turns their claims into a [`Principal`].
pub struct JwtVerifier {
    source: KeySource,
    /// One validation per key family, accepting that family's allowed algorithms:
    /// `jsonwebtoken` refuses a validation listing an algorithm of another family than the
    /// key, and a JWKS may mix families (RSA and EC keys during a migration).
    validations: Vec<(AlgorithmFamily, Validation)>,
    roles_claim: Vec<String>,
    leeway: Duration,
}

impl JwtVerifier {
    /// Loads the key (reading the PEM or JWKS file; a JWKS URL is only prepared, its first
    /// fetch is [`RemoteJwks::spawn_refresher`]'s) and prepares the validation.
    pub fn from_config(config: &JwtConfig, metrics: &Metrics) -> Result<JwtVerifier, String> {
        if let Some(url) = &config.jwks_url {
            let remote = RemoteJwks::new(config, url, metrics.jwks_fetches.clone())?;
            let mut algorithms = Vec::new();
            for name in &config.algorithms {
                let alg = Algorithm::from_str(name)
                    .map_err(|_| format!("auth.jwt.algorithms: unknown algorithm {name:?}"))?;
                if alg.family() == AlgorithmFamily::Hmac {
                    return Err(format!(
                        "auth.jwt.algorithms: {name} needs a shared secret, which a JWKS URL \
                         never provides"
                    ));
                }
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                algorithms = ASYMMETRIC.to_vec();
            }
            return Ok(Self::with_source(
                config,
                KeySource::Remote(remote),
                algorithms,
            ));
        }
        let (keys, by_kid) = load_keys(config)?;
        let families: Vec<AlgorithmFamily> = keys.iter().map(|k| k.family).collect();
        let algorithms = if config.algorithms.is_empty() {
            let mut all: Vec<Algorithm> = Vec::new();
            for family in &families {
                for alg in family.algorithms() {
                    if !all.contains(alg) {
                        all.push(*alg);
                    }
                }
            }
            all
        } else {
            let mut parsed = Vec::new();
            for name in &config.algorithms {
                let alg = Algorithm::from_str(name)
                    .map_err(|_| format!("auth.jwt.algorithms: unknown algorithm {name:?}"))?;
                if !families.contains(&alg.family()) {
                    return Err(format!(
                        "auth.jwt.algorithms: {name} does not fit the configured key \
                         ({:?} family)",
                        families.first().copied().unwrap_or(AlgorithmFamily::Hmac)
                    ));
                }
                parsed.push(alg);
            }
            parsed
        };
        if algorithms.is_empty() {
            return Err("auth.jwt: no usable algorithm for the configured key".into());
        }
        Ok(Self::with_source(
            config,
            KeySource::Fixed { keys, by_kid },
            algorithms,
        ))
    }

    fn with_source(
        config: &JwtConfig,
        source: KeySource,
        algorithms: Vec<Algorithm>,
    ) -> JwtVerifier {
        let mut validation = Validation::new(algorithms[0]);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // No audience configured: a token's `aud` is not ours to judge.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let mut validations: Vec<(AlgorithmFamily, Validation)> = Vec::new();
        for alg in algorithms {
            match validations.iter_mut().find(|(f, _)| *f == alg.family()) {
                Some((_, v)) => v.algorithms.push(alg),
                None => {
                    let mut v = validation.clone();
                    v.algorithms = vec![alg];
                    validations.push((alg.family(), v));
                }
            }
        }

        JwtVerifier {
            source,
            validations,
            roles_claim: config.roles_claim.split('.').map(str::to_owned).collect(),
            leeway: Duration::from_secs(config.leeway_secs),
        }
    }

    /// The JWKS URL's key set, when keys come from one.
    pub fn remote(&self) -> Option<&Arc<RemoteJwks>> {
        match &self.source {
            KeySource::Remote(remote) => Some(remote),
            KeySource::Fixed { .. } => None,
        }
    }

    /// Checks signature and claims; the principal's roles come from the configured claim.
    /// With a JWKS URL, an unknown `kid` may wait for one (rate-limited) fetch of the set.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed JWT: {e}")))?;
        let kid = header.kid.as_deref();
        match &self.source {
            KeySource::Fixed { keys, by_kid } => {
                let key = pick_key(keys, *by_kid, kid, header.alg)?;
                self.check(token, key)
            }
            KeySource::Remote(remote) => {
                let keys = remote.keys_for(kid).await?;
                let key = pick_key(&keys, true, kid, header.alg)?;
                self.check(token, key)
            }
        }
    }

    /// Signature and claims of `token` with `key`.
    fn check(&self, token: &str, key: &Key) -> Result<Principal, AuthError> {
        let validation = self
            .validations
            .iter()
            .find(|(family, _)| *family == key.family)
            .map(|(_, v)| v)
            .ok_or_else(|| AuthError::Invalid("no allowed algorithm fits the key".into()))?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(format!("JWT refused: {e}")),
            })?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let roles = roles_from(&claims, &self.roles_claim);
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|exp| exp.is_finite() && *exp >= 0.0)
            .map(|exp| UNIX_EPOCH + Duration::from_secs_f64(exp) + self.leeway);
        // `exp` is required and was checked, so a missing one here means a malformed value.
        let Some(expires_at) = expires_at else {
            return Err(AuthError::Invalid("JWT exp is not a number".into()));
        };
        if expires_at <= SystemTime::now() {
            return Err(AuthError::Expired);
        }
        Ok(Principal {
            subject,
            roles,
            claims,
            expires_at: Some(expires_at),
        })
    }
}

/// The key a token names (`kid`), or the only one; its family and `alg` must fit the token's.
fn pick_key<'a>(
    keys: &'a [Key],
    by_kid: bool,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'a Key, AuthError> {
    let key = match (by_kid, kid, keys) {
        (true, Some(kid), _) => keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or_else(|| AuthError::Invalid(format!("unknown JWT kid {kid:?}")))?,
        (_, _, [only]) => only,
        _ => {
            return Err(AuthError::Invalid(
                "JWT has no kid and the key set holds several keys".into(),
            ));
        }
    };
    if key.family != alg.family() || key.alg.is_some_and(|a| a != alg) {
        return Err(AuthError::Invalid(format!(
            "JWT alg {alg:?} does not fit its key"
        )));
    }
    Ok(key)
}

fn load_keys(config: &JwtConfig) -> Result<(Vec<Key>, bool), String> {
    match (
        &config.hs256_secret,
        &config.public_key_pem_file,
        &config.jwks_file,
    ) {
        (Some(secret), None, None) => {
            let key = DecodingKey::from_secret(secret.as_bytes());
            Ok((vec![single(key)], false))
        }
        (None, Some(path), None) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("auth.jwt.public_key_pem_file {}: {e}", path.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|e| {
                    format!(
                        "auth.jwt.public_key_pem_file {}: not an RSA, EC or Ed25519 public key: {e}",
                        path.display()
                    )
                })?;
            Ok((vec![single(key)], false))
        }
        (None, None, Some(path)) => Ok((load_jwks(path)?, true)),
        _ => Err(
            "auth.jwt: set exactly one of hs256_secret, public_key_pem_file, jwks_file, jwks_url"
                .into(),
        ),
    }
}

fn load_jwks(path: &std::path::Path) -> Result<Vec<Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.jwt.jwks_file {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("auth.jwt.jwks_file {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        keys.push(
            key_from_jwk(jwk)
                .map_err(|e| format!("auth.jwt.jwks_file {} key {index}: {e}", path.display()))?,
        );
    }
    if keys.is_empty() {
        return Err(format!(
            "auth.jwt.jwks_file {}: no keys in the set",
            path.display()
        ));
    }
    Ok(keys)
}

/// The verification keys of a JWKS fetched from a URL. Keys it cannot or must not use are
/// left out with a warning, not fatal (a provider may publish encryption keys beside signing
/// ones): symmetric (`oct`) keys, since a published secret is no secret; `use: enc` keys;
/// unsupported key types or algorithms (each key is parsed on its own, so one key of a kind
/// we do not know does not hide the others). An empty result is an error (the last good set
/// stays).
pub(crate) fn jwks_url_keys(set: &[Value]) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for (index, value) in set.iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value.clone()) {
            Ok(jwk) => jwk,
            Err(error) => {
                tracing::warn!(index, %error, "JWKS key skipped: not a key we can read");
                continue;
            }
        };
        let jwk = &jwk;
        let kid = jwk.common.key_id.as_deref().unwrap_or("");
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            tracing::warn!(index, kid, "JWKS key skipped: its use is encryption");
            continue;
        }
        match key_from_jwk(jwk) {
            Ok(key) if key.family == AlgorithmFamily::Hmac => {
                tracing::warn!(index, kid, "JWKS key skipped: a published symmetric key");
            }
            Ok(key) => keys.push(key),
            Err(error) => tracing::warn!(index, kid, %error, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signature key".into());
    }
    Ok(keys)
}

fn key_from_jwk(jwk: &Jwk) -> Result<Key, String> {
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let alg = match jwk.common.key_algorithm {
        Some(alg) => Some(
            Algorithm::from_str(&alg.to_string()).map_err(|_| format!("unsupported alg {alg}"))?,
        ),
        None => None,
    };
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        family: key.family(),
        key,
    })
}

fn single(key: DecodingKey) -> Key {
    Key {
        kid: None,
        alg: None,
        family: key.family(),
        key,
    }
}

/// Roles at `path` in `claims`: an array of strings, or one space-separated string.
fn roles_from(claims: &Map<String, Value>, path: &[String]) -> Vec<String> {
    let value = path
        .split_first()
        .and_then(|(first, rest)| crate::path::walk(claims.get(first)?, rest));
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_from_array_string_and_nested() {
        let claims = json!({
            "roles": ["a", "b", 3],
            "scope": "x y",
            "realm_access": { "roles": ["r"] }
        });
        let claims = claims.as_object().unwrap();
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(roles_from(claims, &path("roles")), ["a", "b"]);
        assert_eq!(roles_from(claims, &path("scope")), ["x", "y"]);
        assert_eq!(roles_from(claims, &path("realm_access.roles")), ["r"]);
        assert!(roles_from(claims, &path("missing.roles")).is_empty());
    }
}

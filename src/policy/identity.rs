//! Who is calling: the agent identity comes only from a verified credential — an API key whose
//! SHA-256 is in the policy, a JWT signed by a key in the configured JWKS, or a client
//! certificate the data plane's TLS verified against its client CAs — never from a header the
//! caller sets.
//!
//! API keys are looked up by their SHA-256 digest and the digest is then compared in constant
//! time. The lookup's timing depends only on the digest of what the caller sent, which the caller
//! already knows; it reveals nothing about stored keys.

use std::sync::Arc;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::decision::{Code, Reason, Stage};
use super::jwks::{Key, KeySource, RemoteKeys};
use crate::FastMap;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
const JWT_LEEWAY_SECS: u64 = 30;

/// `auth.jwt` in a policy file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss` claim; with neither `jwks_file` nor `jwks_url`, also where the keys are
    /// found (OpenID Connect discovery: `ISSUER/.well-known/openid-configuration`).
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// JSON Web Key Set with the issuer's public keys (RSA or EC; symmetric keys are refused),
    /// read with the policy.
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
    /// Or the key set's `https://` URL, fetched and cached (`policy::jwks`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Fetched keys are fetched again this often (default 300).
    #[serde(default = "default_refresh_seconds")]
    pub refresh_seconds: u64,
    /// The least time between two fetches asked for by tokens with an unknown key id, or while
    /// no keys were ever fetched (default 10).
    #[serde(default = "default_min_refetch_seconds")]
    pub min_refetch_seconds: u64,
}

fn default_refresh_seconds() -> u64 {
    super::jwks::REFRESH_EVERY
}
fn default_min_refetch_seconds() -> u64 {
    super::jwks::MIN_REFETCH
}

/// Where a verifier's keys are.
enum Keys {
    /// Read from `jwks_file` with the policy.
    Fixed(Arc<Vec<Key>>),
    /// Fetched from the provider, shared with the policies before and after a reload.
    Remote(Arc<RemoteKeys>),
}

/// Verifies JWTs against the provider's public keys.
pub struct JwtVerifier {
    keys: Keys,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Fixed(k) => format!("{} from a file", k.len()),
            Keys::Remote(r) => format!("{r:?}"),
        };
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("keys", &keys)
            .finish()
    }
}

/// The keys of a JWKS document. Every key must be RSA or EC with a usable algorithm.
pub fn parse_jwks(jwks_json: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| format!("not a valid JWK set: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = key_algorithm(jwk).map_err(|e| format!("key {i}: {e}"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
        keys.push((jwk.common.key_id.clone(), alg, key));
    }
    if keys.is_empty() {
        return Err("the key set holds no keys".to_owned());
    }
    Ok(keys)
}

impl JwtVerifier {
    /// A verifier with the keys of a JWKS file's text.
    pub fn new(config: &JwtConfig, jwks_json: &str) -> Result<Self, String> {
        let keys = parse_jwks(jwks_json).map_err(|e| format!("the JWKS file: {e}"))?;
        Ok(Self {
            keys: Keys::Fixed(Arc::new(keys)),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// A verifier whose keys are fetched from `source` (nothing is fetched here).
    pub fn remote(config: &JwtConfig, source: KeySource) -> Self {
        Self {
            keys: Keys::Remote(Arc::new(RemoteKeys::new(
                source,
                std::time::Duration::from_secs(config.refresh_seconds),
                std::time::Duration::from_secs(config.min_refetch_seconds),
            ))),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        }
    }

    /// The fetched keys' cache, when the keys are fetched rather than read from a file.
    pub fn remote_keys(&self) -> Option<&Arc<RemoteKeys>> {
        match &self.keys {
            Keys::Remote(remote) => Some(remote),
            Keys::Fixed(_) => None,
        }
    }

    /// Verifies a token and returns its subject.
    fn verify(&self, token: &str) -> Result<String, Reason> {
        #[derive(Deserialize, schemars::JsonSchema)]
        struct Subject {
            sub: String,
        }
        self.verify_claims::<Subject>(token).map(|c| c.sub)
    }

    /// Verifies a token (signature, `iss`, `aud`, `exp`, `nbf`, `iat`) and returns its claims
    /// as `C` (the admin plane reads a name and groups from them).
    pub fn verify_claims<C: serde::de::DeserializeOwned>(&self, token: &str) -> Result<C, Reason> {
        let deny = |m: &str| Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", m);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| deny("The token is malformed or uses an unsupported algorithm."))?;
        let keys = match &self.keys {
            Keys::Fixed(keys) => keys.clone(),
            Keys::Remote(remote) => remote.keys().ok_or_else(|| {
                Reason::new(
                    Code::Unavailable,
                    Stage::Authentication,
                    "authentication",
                    "The identity provider's keys have not been fetched yet, so no token can be verified. Try again later.",
                )
            })?,
        };
        // Only the algorithm bound to the key is accepted: a token cannot choose HS256 and have an
        // RSA public key used as an HMAC secret, and `none` never parses.
        let candidates: Vec<_> = keys
            .iter()
            .filter(|(kid, alg, _)| {
                *alg == header.alg && (header.kid.is_none() || kid.as_deref() == header.kid.as_deref())
            })
            .collect();
        let [(_, alg, key)] = candidates.as_slice() else {
            return Err(deny("The token was not signed by a key this gateway trusts."));
        };
        let mut v = Validation::new(*alg);
        v.leeway = JWT_LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        #[derive(Deserialize, schemars::JsonSchema)]
        struct Claims<C> {
            #[serde(default)]
            iat: Option<u64>,
            #[serde(flatten)]
            rest: C,
        }
        let data = jsonwebtoken::decode::<Claims<C>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as E;
            deny(match e.kind() {
                E::ExpiredSignature => "The token has expired.",
                E::ImmatureSignature => "The token is not valid yet.",
                E::InvalidIssuer | E::InvalidAudience => "The token was not issued for this gateway.",
                E::MissingRequiredClaim(_) => "The token lacks a required claim (exp, sub, iss, aud).",
                _ => "The token could not be verified.",
            })
        })?;
        // Issued in the future (beyond the skew allowed): minted with a wrong clock, or ahead of
        // its time to outlive a revocation. jsonwebtoken does not check `iat`.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if data.claims.iat.is_some_and(|iat| iat > now + JWT_LEEWAY_SECS) {
            return Err(deny("The token was issued in the future."));
        }
        Ok(data.claims.rest)
    }
}

fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve, KeyAlgorithm as KA};
    let declared = jwk.common.key_algorithm;
    let alg = match (&jwk.algorithm, declared) {
        (P::RSA(_), None | Some(KA::RS256)) => Algorithm::RS256,
        (P::RSA(_), Some(KA::RS384)) => Algorithm::RS384,
        (P::RSA(_), Some(KA::RS512)) => Algorithm::RS512,
        (P::RSA(_), Some(KA::PS256)) => Algorithm::PS256,
        (P::EllipticCurve(ec), None | Some(KA::ES256)) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
        (P::EllipticCurve(ec), None | Some(KA::ES384)) if ec.curve == EllipticCurve::P384 => Algorithm::ES384,
        (P::OctetKey(_), _) => return Err("symmetric (oct) keys are not accepted".to_owned()),
        _ => {
            return Err(
                "unsupported key type or algorithm (use RSA RS256/RS384/RS512/PS256 or EC ES256/ES384)".to_owned(),
            );
        }
    };
    Ok(alg)
}

/// What a verified client certificate says about the agent that presented it: the SPIFFE ID
/// in its URI SAN (`spiffe://trust-domain/path`; at most one, as an X.509-SVID carries) and its
/// subject's common name. Read by the listener after the handshake (`server::tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertificate {
    pub spiffe_id: Option<String>,
    pub common_name: Option<String>,
}

/// Maps credentials to agent ids. Built at policy load.
#[derive(Debug, Default)]
pub struct Authenticator {
    api_keys: FastMap<[u8; 32], Arc<str>>,
    jwt: Option<JwtVerifier>,
    jwt_subjects: FastMap<String, Arc<str>>,
    spiffe_ids: FastMap<String, Arc<str>>,
    common_names: FastMap<String, Arc<str>>,
}

impl Authenticator {
    pub fn new(jwt: Option<JwtVerifier>) -> Self {
        Self { jwt, ..Self::default() }
    }

    /// Registers an API key digest; `Err` names the agent that already holds it.
    pub fn add_api_key(&mut self, digest: [u8; 32], agent: Arc<str>) -> Result<(), Arc<str>> {
        match self.api_keys.insert(digest, agent) {
            Some(prev) => Err(prev),
            None => Ok(()),
        }
    }

    /// Registers a JWT subject; `Err` names the agent that already holds it.
    pub fn add_jwt_subject(&mut self, subject: String, agent: Arc<str>) -> Result<(), Arc<str>> {
        match self.jwt_subjects.insert(subject, agent) {
            Some(prev) => Err(prev),
            None => Ok(()),
        }
    }

    /// Registers a client certificate's SPIFFE ID; `Err` names the agent that already holds it.
    pub fn add_spiffe_id(&mut self, id: String, agent: Arc<str>) -> Result<(), Arc<str>> {
        match self.spiffe_ids.insert(id, agent) {
            Some(prev) => Err(prev),
            None => Ok(()),
        }
    }

    /// Registers a client certificate's subject CN; `Err` names the agent that already holds it.
    pub fn add_common_name(&mut self, cn: String, agent: Arc<str>) -> Result<(), Arc<str>> {
        match self.common_names.insert(cn, agent) {
            Some(prev) => Err(prev),
            None => Ok(()),
        }
    }

    /// The agent whose API key has this SHA-256 (an admin token that is also an agent's key
    /// must not approve that agent's calls).
    pub fn agent_of_key(&self, digest: &[u8; 32]) -> Option<&str> {
        self.api_keys.get(digest).map(|a| &**a)
    }

    pub fn has_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// The provider's cached keys, when they are fetched rather than read from a file.
    pub fn remote_keys(&self) -> Option<&Arc<RemoteKeys>> {
        self.jwt.as_ref()?.remote_keys()
    }

    /// The cached keys a bearer value needs fetched first: it is a JWT, the keys are fetched,
    /// and none are cached yet or none with its key id (the provider rotated its keys).
    pub fn keys_to_fetch(&self, authorization: Option<&str>) -> Option<&Arc<RemoteKeys>> {
        let remote = self.remote_keys()?;
        let token = authorization?.split_once(' ')?.1.trim();
        if !looks_like_jwt(token) {
            return None;
        }
        let kid = jsonwebtoken::decode_header(token).ok()?.kid;
        remote.lacks(kid.as_deref()).then_some(remote)
    }

    /// Takes over `previous`'s cached keys when both fetch them from the same place, so a
    /// policy reload does not empty the cache (and refuse every JWT until the next fetch).
    pub fn keep_keys_of(&mut self, previous: &Authenticator) {
        if let (Some(jwt), Some(old)) = (self.jwt.as_mut(), previous.remote_keys())
            && let Keys::Remote(new) = &jwt.keys
            && new.same_as(old)
        {
            jwt.keys = Keys::Remote(old.clone());
        }
    }

    /// The agent behind a request's credentials — its `Authorization` header value, the client
    /// certificate its connection presented — or why not. With both, they must name the same
    /// agent: a certificate is never overridden by a key, nor a key by a certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        client: Option<&ClientCertificate>,
    ) -> Result<&Arc<str>, Reason> {
        let deny = |m: &str| Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", m);
        // The SPIFFE ID first: it names a workload; a CN is whatever the CA put there.
        let by_certificate = client.and_then(|c| {
            (c.spiffe_id.as_ref().and_then(|id| self.spiffe_ids.get(id)))
                .or_else(|| c.common_name.as_ref().and_then(|cn| self.common_names.get(cn)))
        });
        let Some(value) = authorization else {
            return match (by_certificate, client) {
                (Some(agent), _) => Ok(agent),
                (None, Some(_)) => Err(deny(
                    "The client certificate does not identify a known agent: neither its SPIFFE ID nor \
                     its subject CN is an agent's `credentials` in the policy.",
                )),
                (None, None) => Err(deny(
                    "Missing credentials: send `Authorization: Bearer <API key or JWT>`.",
                )),
            };
        };
        let agent = self.by_authorization(value)?;
        match by_certificate {
            Some(other) if other != agent => Err(deny(
                "The client certificate and the Authorization header name different agents.",
            )),
            _ => Ok(agent),
        }
    }

    /// The agent behind an `Authorization` header value, or why not.
    fn by_authorization(&self, value: &str) -> Result<&Arc<str>, Reason> {
        let deny = |m: &str| Reason::new(Code::Unauthenticated, Stage::Authentication, "authentication", m);
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => return Err(deny("The Authorization header must be `Bearer <API key or JWT>`.")),
        };
        if let Some(jwt) = &self.jwt
            && looks_like_jwt(token)
        {
            let subject = jwt.verify(token)?;
            return self
                .jwt_subjects
                .get(&subject)
                .ok_or_else(|| deny("The token's subject is not a known agent."));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        match self.api_keys.get_key_value(&digest) {
            Some((stored, agent)) if bool::from(stored.ct_eq(&digest)) => Ok(agent),
            _ => Err(deny("The API key is not recognised.")),
        }
    }
}

fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
}

/// Parses a stored `api_key_sha256` entry (64 hex digits).
pub fn parse_key_digest(hex_digest: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out)
        .map_err(|_| "must be the 64-hex-digit SHA-256 of the key (e.g. `printf %s KEY | sha256sum`)".to_owned())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_with_key(key: &str, agent: &str) -> Authenticator {
        let mut a = Authenticator::new(None);
        a.add_api_key(Sha256::digest(key.as_bytes()).into(), agent.into())
            .unwrap();
        a
    }

    #[test]
    fn resolves_a_known_api_key_to_its_agent() {
        let a = auth_with_key("k-123", "support-bot");
        assert_eq!(&**a.authenticate(Some("Bearer k-123"), None).unwrap(), "support-bot");
        assert_eq!(&**a.authenticate(Some("bearer k-123"), None).unwrap(), "support-bot");
    }

    #[test]
    fn refuses_missing_malformed_and_unknown_credentials() {
        let a = auth_with_key("k-123", "support-bot");
        for h in [
            None,
            Some("k-123"),
            Some("Basic k-123"),
            Some("Bearer "),
            Some("Bearer k-124"),
        ] {
            let r = a.authenticate(h, None).unwrap_err();
            assert_eq!(r.code, Code::Unauthenticated, "{h:?}");
            assert!(!r.message.contains("k-12"), "message echoes the key: {}", r.message);
        }
    }

    #[test]
    fn parses_stored_digests_strictly() {
        assert!(parse_key_digest(&"ab".repeat(32)).is_ok());
        assert!(parse_key_digest("abc").is_err());
        assert!(parse_key_digest(&"zz".repeat(32)).is_err());
    }
}

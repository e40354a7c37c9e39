//! Bearer tokens: HS256-signed JWTs with an expiry and a list of permissions.
//!
//! Only HS256 is accepted (the `alg` header is checked, so `none` and key-confusion tricks are
//! refused); the signature is compared in constant time by `hmac`'s `verify_slice`.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a token says about its bearer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The tenant whose catalogue the user works on (the shard key).
    pub tenant: String,
    /// Permissions such as `products:write`, `products:delete`, `orders:create`.
    pub perms: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// Whether the token grants `perm`.
    pub fn can(&self, perm: &str) -> bool {
        self.perms.iter().any(|p| p == perm)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Well formed and correctly signed, but past its expiry.
    #[error("the token has expired")]
    Expired,
    /// Malformed, wrongly signed, or not HS256.
    #[error("the token is not valid")]
    Invalid,
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct Signer {
    mac: HmacSha256,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

impl Signer {
    /// A signer with `secret` (at least 32 bytes, refused otherwise).
    pub fn new(secret: &[u8]) -> Result<Self, crate::Error> {
        if secret.len() < 32 {
            return Err(crate::Error::Config(format!(
                "the token secret must be at least 32 bytes (got {})",
                secret.len()
            )));
        }
        let mac = HmacSha256::new_from_slice(secret)
            .map_err(|_| crate::Error::Config("unusable token secret".into()))?;
        Ok(Self { mac })
    }

    /// A signed token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(body));
        let mut mac = self.mac.clone();
        mac.update(signing_input.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!("{signing_input}.{}", B64.encode(sig))
    }

    /// The claims of `token` if it is HS256, correctly signed and not expired at `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(b), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let header: serde_json::Value = B64
            .decode(h)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or(TokenError::Invalid)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(TokenError::Invalid);
        }
        let sig = B64.decode(s).map_err(|_| TokenError::Invalid)?;
        let mut mac = self.mac.clone();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(b.as_bytes());
        mac.verify_slice(&sig).map_err(|_| TokenError::Invalid)?;
        let claims: Claims = B64
            .decode(b)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or(TokenError::Invalid)?;
        if claims.exp <= now_s {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u".into(),
            tenant: "t".into(),
            perms: vec!["products:write".into()],
            exp,
        }
    }

    #[test]
    fn round_trip_expiry_and_tampering() {
        let s = Signer::new(&[7; 32]).unwrap();
        let t = s.sign(&claims(2_000));
        assert_eq!(s.verify(&t, 1_999).unwrap(), claims(2_000));
        assert_eq!(s.verify(&t, 2_000), Err(TokenError::Expired));
        // Another key, a changed body, `alg: none`, garbage.
        assert_eq!(
            Signer::new(&[8; 32]).unwrap().verify(&t, 0),
            Err(TokenError::Invalid)
        );
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = B64.encode(serde_json::to_vec(&claims(9_999)).unwrap());
        parts[1] = &forged;
        assert_eq!(s.verify(&parts.join("."), 0), Err(TokenError::Invalid));
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), forged);
        assert_eq!(s.verify(&none, 0), Err(TokenError::Invalid));
        assert_eq!(s.verify("a.b", 0), Err(TokenError::Invalid));
        assert!(Signer::new(b"short").is_err());
    }
}

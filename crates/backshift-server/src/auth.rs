//! API tokens: generated on first start, shown once, stored as SHA-256.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new random token, `bs_` and 64 hex digits.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("bs_{}", hex::encode(bytes))
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token in an `Authorization` header value: `Bearer T`, or HTTP
/// Basic with the token as password (what git sends from a URL).
pub fn token_from_header(value: &str) -> Option<String> {
    let value = value.trim();
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.trim().to_owned());
    }
    let b64 = value.strip_prefix("Basic ")?;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, pass)| pass.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = generate_token();
        assert!(a.starts_with("bs_") && a.len() == 67);
        assert_ne!(a, generate_token());
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }

    #[test]
    fn tokens_are_read_from_bearer_and_basic() {
        assert_eq!(token_from_header("Bearer abc").as_deref(), Some("abc"));
        // "x:secret"
        assert_eq!(
            token_from_header("Basic eDpzZWNyZXQ=").as_deref(),
            Some("secret")
        );
        assert_eq!(token_from_header("Digest x"), None);
    }
}

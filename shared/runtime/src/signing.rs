//! HMAC-SHA256 signatures of what Stowage hands out to clients (download URLs, upload links),
//! with the key being rotated out still accepted.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The current signing key and, while it is being rotated in, the one it replaces.
#[derive(Clone)]
pub struct SigningKeys {
    key: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl SigningKeys {
    /// Signs with `key`; also accepts signatures made with `previous`.
    pub fn new(key: &[u8], previous: Option<&[u8]>) -> Self {
        Self {
            key: key.to_vec(),
            previous: previous.map(<[u8]>::to_vec),
        }
    }

    fn mac(key: &[u8], message: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(message.as_bytes());
        mac
    }

    /// The lowercase hex signature of `message` with the current key.
    pub fn sign(&self, message: &str) -> String {
        hex::encode(Self::mac(&self.key, message).finalize().into_bytes())
    }

    /// Whether `signature` (hex) is `message`'s with the current or the previous key (compared
    /// in constant time).
    pub fn verify(&self, message: &str, signature: &str) -> bool {
        let Ok(signature) = hex::decode(signature) else {
            return false;
        };
        std::iter::once(&self.key)
            .chain(&self.previous)
            .any(|key| Self::mac(key, message).verify_slice(&signature).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::SigningKeys;

    #[test]
    fn a_signature_passes_with_its_key_or_as_the_previous_one() {
        let old = SigningKeys::new(b"old", None);
        let sig = old.sign("message");
        assert!(old.verify("message", &sig));
        assert!(!old.verify("another message", &sig));
        assert!(!old.verify("message", "not hex"));
        assert!(SigningKeys::new(b"new", Some(b"old")).verify("message", &sig));
        assert!(!SigningKeys::new(b"new", None).verify("message", &sig));
    }
}

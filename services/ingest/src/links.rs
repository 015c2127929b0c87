//! Signed upload links: a tus URL of one session that works without a token until it expires,
//! for a client that should upload one file and hold no credentials (a browser handed the
//! link by its app's backend, a device). The link names the session, its owner and its expiry,
//! under an HMAC with the URL signing key (the one Files signs download links with, in
//! another domain: a download link's signature never passes here, nor the reverse).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// Longest lifetime of an upload link.
pub const MAX_LINK_SECONDS: u32 = 24 * 3600;

/// Signs and checks upload links.
#[derive(Clone)]
pub struct UploadLinks {
    key: Vec<u8>,
    /// The key before `key` while it is being rotated: links signed with it still pass.
    previous: Option<Vec<u8>>,
    /// URL of the tus endpoint (e.g. `https://files.example.com/tus`).
    base: String,
}

/// What a link's query carries.
#[derive(serde::Deserialize)]
pub struct LinkQuery {
    owner: String,
    exp: i64,
    sig: String,
}

impl UploadLinks {
    /// Links under the tus endpoint at `base`, signed with `key` (and also accepted when signed
    /// with `previous`).
    pub fn new(key: &[u8], previous: Option<&[u8]>, base: String) -> Self {
        Self {
            key: key.to_vec(),
            previous: previous.map(<[u8]>::to_vec),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    fn mac(key: &[u8], upload: &Uuid, owner: &str, expires: i64) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(format!("upload\n{upload}\n{owner}\n{expires}").as_bytes());
        mac
    }

    /// The link to session `upload` of `owner`, valid until `expires` (unix seconds).
    pub fn sign(&self, upload: &Uuid, owner: &str, expires: i64) -> String {
        let sig = hex::encode(
            Self::mac(&self.key, upload, owner, expires)
                .finalize()
                .into_bytes(),
        );
        let owner =
            percent_encoding::utf8_percent_encode(owner, percent_encoding::NON_ALPHANUMERIC);
        format!(
            "{}/{upload}?owner={owner}&exp={expires}&sig={sig}",
            self.base
        )
    }

    /// The owner a link to `upload` was signed for, if its signature holds and it has not
    /// expired at `now` (unix seconds).
    pub fn check(&self, upload: &Uuid, query: &LinkQuery, now: i64) -> Option<String> {
        if query.exp < now {
            return None;
        }
        let sig = hex::decode(&query.sig).ok()?;
        std::iter::once(&self.key)
            .chain(&self.previous)
            .any(|key| {
                Self::mac(key, upload, &query.owner, query.exp)
                    .verify_slice(&sig)
                    .is_ok()
            })
            .then(|| query.owner.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The query of `link`, as the tus endpoint reads it.
    fn query(link: &str) -> LinkQuery {
        let query = link.split_once('?').unwrap().1;
        axum::extract::Query::<LinkQuery>::try_from_uri(&format!("/?{query}").parse().unwrap())
            .unwrap()
            .0
    }

    #[test]
    fn a_link_opens_its_session_for_its_owner_until_it_expires() {
        let links = UploadLinks::new(b"k".repeat(32).as_slice(), None, "http://h/tus/".into());
        let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
        let link = links.sign(&id, "ann.o'neil", 1_000);
        assert!(link.starts_with(&format!(
            "http://h/tus/{id}?owner=ann%2Eo%27neil&exp=1000&sig="
        )));
        let q = query(&link);
        assert_eq!(links.check(&id, &q, 1_000).as_deref(), Some("ann.o'neil"));
        assert_eq!(links.check(&id, &q, 1_001), None, "expired");
        assert_eq!(links.check(&other, &q, 0), None, "another session");
        let forged = LinkQuery {
            owner: "bob".into(),
            ..query(&link)
        };
        assert_eq!(links.check(&id, &forged, 0), None, "another owner");
        let later = LinkQuery {
            exp: 2_000,
            ..query(&link)
        };
        assert_eq!(links.check(&id, &later, 0), None, "a later expiry");
        // Rotated: links of the previous key pass, those of an unknown key do not.
        let rotated = UploadLinks::new(
            b"n".repeat(32).as_slice(),
            Some(&b"k".repeat(32)),
            "http://h/tus".into(),
        );
        assert!(rotated.check(&id, &q, 0).is_some());
        let stranger = UploadLinks::new(b"x".repeat(32).as_slice(), None, "http://h/tus".into());
        assert_eq!(stranger.check(&id, &q, 0), None);
    }
}

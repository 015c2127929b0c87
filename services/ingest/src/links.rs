//! Signed upload links: a tus URL of one session that works without a token until it expires,
//! for a client that should upload one file and hold no credentials (a browser handed the
//! link by its app's backend, a device). The link names the session, its owner and its expiry,
//! under an HMAC with the URL signing key (the one Files signs download links with, in
//! another domain: a download link's signature never passes here, nor the reverse).

use stowage_runtime::signing::SigningKeys;
use uuid::Uuid;

/// Longest lifetime of an upload link.
pub const MAX_LINK_SECONDS: u32 = 24 * 3600;

/// Signs and checks upload links.
#[derive(Clone)]
pub struct UploadLinks {
    keys: SigningKeys,
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
    /// Links under the tus endpoint at `base`, signed with `keys`.
    pub fn new(keys: SigningKeys, base: String) -> Self {
        Self {
            keys,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// What a link's signature covers (its first line sets it apart from a download URL's,
    /// which starts with a file id).
    fn message(upload: &Uuid, owner: &str, expires: i64) -> String {
        format!("upload\n{upload}\n{owner}\n{expires}")
    }

    /// The link to session `upload` of `owner`, valid until `expires` (unix seconds).
    pub fn sign(&self, upload: &Uuid, owner: &str, expires: i64) -> String {
        let sig = self.keys.sign(&Self::message(upload, owner, expires));
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
        self.keys
            .verify(&Self::message(upload, &query.owner, query.exp), &query.sig)
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
        let keys = |key: &[u8], previous: Option<&[u8]>| SigningKeys::new(key, previous);
        let links = UploadLinks::new(keys(b"k", None), "http://h/tus/".into());
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
        let rotated = UploadLinks::new(keys(b"n", Some(b"k")), "http://h/tus".into());
        assert!(rotated.check(&id, &q, 0).is_some());
        let stranger = UploadLinks::new(keys(b"x", None), "http://h/tus".into());
        assert_eq!(stranger.check(&id, &q, 0), None);
    }
}

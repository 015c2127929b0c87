//! Opaque keyset page tokens, bound to the query that produced them.
//!
//! A token carries the last row's sort key and a fingerprint of the query's filters and sort;
//! presenting it with a different query is refused with INVALID_ARGUMENT (`page_token`)
//! instead of silently returning a wrong page.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::status::invalid_argument;

/// Longest page token accepted (they are ours, and short).
const MAX_TOKEN_LEN: usize = 2048;

/// A fingerprint of everything that defines a query except its position.
pub fn fingerprint(query: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(query).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<C> {
    q: String,
    c: C,
}

/// Encodes the position `cursor` of the query with fingerprint `query`.
pub fn encode<C: Serialize>(query: &str, cursor: &C) -> String {
    let envelope = Envelope {
        q: query.to_owned(),
        c: cursor,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&envelope).unwrap_or_default())
}

/// Decodes a token for the query with fingerprint `query`; `None` for an empty token.
pub fn decode<C: DeserializeOwned>(token: &str, query: &str) -> Result<Option<C>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid_argument("page_token", "is not a token of this query");
    if token.len() > MAX_TOKEN_LEN {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let envelope: Envelope<C> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if envelope.q != query {
        return Err(bad());
    }
    Ok(Some(envelope.c))
}

/// Cuts `rows` (fetched with one row more than `size`) to one page and returns the token of
/// the next page: empty when there is none.
pub fn finish_page<T, C: Serialize>(
    rows: &mut Vec<T>,
    size: i64,
    query: &str,
    cursor: impl Fn(&T) -> Option<C>,
) -> String {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if rows.len() <= size {
        return String::new();
    }
    rows.truncate(size);
    rows.last()
        .and_then(cursor)
        .map(|c| encode(query, &c))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_queries() {
        let q1 = fingerprint(&("kind", 1));
        let q2 = fingerprint(&("kind", 2));
        let token = encode(&q1, &("2026-01-01", 42));
        let back: Option<(String, i32)> = decode(&token, &q1).unwrap();
        assert_eq!(back, Some(("2026-01-01".to_owned(), 42)));
        assert!(decode::<(String, i32)>(&token, &q2).is_err());
        assert!(decode::<(String, i32)>("not-base64!", &q1).is_err());
        assert_eq!(decode::<(String, i32)>("", &q1).unwrap(), None);
    }
}

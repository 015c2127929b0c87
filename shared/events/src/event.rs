//! An event as consumers see it, and its encoding as a Redis stream entry.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique id, the same on every delivery (consumers dedupe on it).
    pub id: Uuid,
    /// Topic, e.g. `file.created`.
    pub topic: String,
    /// What the event is about, e.g. a file id.
    pub key: String,
    /// Topic-specific fields.
    pub payload: serde_json::Value,
    /// W3C trace context of the change that produced it.
    pub traceparent: Option<String>,
    /// When the change was committed.
    pub occurred_at: DateTime<Utc>,
}

/// The Redis stream that carries `topic` in `namespace`: `{<namespace>}:events:<topic>`, the
/// namespace in braces so that on Redis Cluster every stream of a namespace is in one hash
/// slot, and a consumer reads all of its topics in one `XREADGROUP` (streams in several slots
/// made every read fail with CROSSSLOT). Changing this name is taken for a Redis that lost its
/// data (`epoch_key` moves with it): relays publish the replay window again.
pub fn stream_key(namespace: &str, topic: &str) -> String {
    format!("{{{namespace}}}:events:{topic}")
}

/// The key whose absence tells the relay of `schema` that Redis lost its streams.
pub fn epoch_key(namespace: &str, schema: &str) -> String {
    format!("{{{namespace}}}:events:epoch:{schema}")
}

/// Namespace of the keys of a mesh when nothing else is configured.
pub const DEFAULT_NAMESPACE: &str = "stowage";

impl Event {
    /// The fields of its stream entry.
    pub(crate) fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.to_string()),
            ("topic", self.topic.clone()),
            ("key", self.key.clone()),
            ("payload", self.payload.to_string()),
            ("traceparent", self.traceparent.clone().unwrap_or_default()),
            ("at", self.occurred_at.to_rfc3339()),
        ]
    }

    /// Decodes a stream entry; `Err` names the field that is missing or malformed.
    pub(crate) fn from_fields(fields: &HashMap<String, String>) -> Result<Self, String> {
        let get = |name: &str| fields.get(name).ok_or_else(|| format!("{name}: missing"));
        Ok(Self {
            id: get("id")?.parse().map_err(|e| format!("id: {e}"))?,
            topic: get("topic")?.clone(),
            key: get("key")?.clone(),
            payload: serde_json::from_str(get("payload")?).map_err(|e| format!("payload: {e}"))?,
            traceparent: fields.get("traceparent").filter(|t| !t.is_empty()).cloned(),
            occurred_at: DateTime::parse_from_rfc3339(get("at")?)
                .map_err(|e| format!("at: {e}"))?
                .with_timezone(&Utc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stream of a namespace, and the relays' epoch keys, hash to one Redis Cluster slot
    /// (one `XREADGROUP` reads several topics); two namespaces may differ.
    #[test]
    fn a_namespace_s_keys_share_one_cluster_slot() {
        let slot = |key: String| fred::types::Key::from(key).cluster_hash();
        let topics = [
            crate::topics::FILE_CREATED,
            crate::topics::FILE_PURGED,
            crate::topics::MEDIA_READY,
            crate::topics::QUOTA_LIMIT_SET,
            crate::topics::BATCH_SEALED,
        ];
        let first = slot(stream_key("stowage", topics[0]));
        for topic in topics {
            assert_eq!(slot(stream_key("stowage", topic)), first, "{topic}");
        }
        assert_eq!(slot(epoch_key("stowage", "files")), first);
        assert_eq!(
            stream_key("stowage", "file.created"),
            "{stowage}:events:file.created"
        );
        assert_ne!(slot(stream_key("other", topics[0])), first);
    }

    #[test]
    fn fields_round_trip() {
        let event = Event {
            id: Uuid::new_v4(),
            topic: "file.created".into(),
            key: "k".into(),
            payload: serde_json::json!({ "a": 1 }),
            traceparent: None,
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        };
        let fields: HashMap<String, String> = event
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(Event::from_fields(&fields), Ok(event));
        let mut broken = fields.clone();
        broken.remove("payload");
        assert_eq!(Event::from_fields(&broken), Err("payload: missing".into()));
    }
}

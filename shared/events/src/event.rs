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

/// The Redis stream that carries `topic` in `namespace` (`{namespace}:events:{topic}`).
pub fn stream_key(namespace: &str, topic: &str) -> String {
    format!("{namespace}:events:{topic}")
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

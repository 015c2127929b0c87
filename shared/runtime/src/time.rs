//! Conversions between chrono and protobuf timestamps.

use chrono::{DateTime, Utc};

/// A protobuf timestamp of `at`.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// First and last second of a protobuf timestamp's range (0001-01-01 to 9999-12-31 UTC).
const SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// The instant a protobuf timestamp names; `None` outside the range protobuf gives it (years
/// 1 to 9999) or with nanoseconds outside 0..1e9. chrono takes far more, PostgreSQL less
/// (before 4713 BC it refuses the statement, and with it every row written alongside).
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !SECONDS.contains(&t.seconds) {
        return None;
    }
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// A protobuf timestamp of `at`, if any.
pub fn timestamp_opt(at: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    at.map(timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<DateTime<Utc>> {
        from_timestamp(&prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn only_timestamps_protobuf_allows_are_instants() {
        let first = at(-62_135_596_800, 0).unwrap();
        assert_eq!(first.to_rfc3339(), "0001-01-01T00:00:00+00:00");
        let last = at(253_402_300_799, 999_999_999).unwrap();
        assert_eq!(last.to_rfc3339(), "9999-12-31T23:59:59.999999999+00:00");
        assert_eq!(
            timestamp(last),
            prost_types::Timestamp {
                seconds: 253_402_300_799,
                nanos: 999_999_999
            }
        );
        // chrono would take these; PostgreSQL refuses the first.
        assert_eq!(at(-300_000_000_000, 0), None);
        assert_eq!(at(253_402_300_800, 0), None);
        assert_eq!(at(0, -1), None);
        assert_eq!(at(0, 1_000_000_000), None);
    }
}

//! The clean-up and retention policy: stored as one JSON row, defaults in code.

use serde::{Deserialize, Serialize};
use stowage_proto::v1 as pb;

/// What clean-up does after a user goes quiet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InactivityAction {
    /// Send a notice only.
    #[default]
    NotifyOnly,
    /// Move the user's files to trash after the grace window.
    Trash,
}

impl InactivityAction {
    /// The name it is stored and sent under.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotifyOnly => "notify_only",
            Self::Trash => "trash",
        }
    }
}

/// Thresholds of the scheduled jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Days a file stays in trash before it is purged.
    pub trash_retention_days: u32,
    /// Hours without a write after which an unfinished one-shot upload is abandoned
    /// (resumable sessions end at the expiry their clients were told).
    pub orphan_upload_hours: u32,
    /// Hours after which staging data without a live session, and a stored event screenshot
    /// no event names, is removed.
    pub staging_max_age_hours: u32,
    /// Days without activity after which a user gets a notice.
    pub inactivity_days: u32,
    /// Hours over which notices are spread.
    pub notice_grace_hours: u32,
    /// What happens after the notice and the grace window.
    pub inactivity_action: InactivityAction,
    /// Minutes an unreferenced blob must be old before GC may delete it.
    pub gc_safety_minutes: u32,
    /// Minutes a file may stay in processing before its media job is requested again.
    pub stuck_processing_minutes: u32,
    /// Ephemeral blobs kept per owner after acknowledgement or expiry (dev; 0 in production).
    pub ephemeral_keep_last: u32,
    /// Days history events are kept; 0 keeps them for good. A policy stored before this
    /// field existed keeps them for good too, as one set without it over the API does (the
    /// default, 730, is for installations with no policy set).
    #[serde(default)]
    pub history_retention_days: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            trash_retention_days: 30,
            orphan_upload_hours: 2,
            staging_max_age_hours: 24,
            inactivity_days: 365,
            notice_grace_hours: 72,
            inactivity_action: InactivityAction::NotifyOnly,
            gc_safety_minutes: 60,
            stuck_processing_minutes: 60,
            ephemeral_keep_last: 0,
            history_retention_days: 730,
        }
    }
}

impl Policy {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let checks = [
            (
                "policy.trash_retention_days",
                self.trash_retention_days,
                1,
                3650,
            ),
            (
                "policy.orphan_upload_hours",
                self.orphan_upload_hours,
                1,
                24 * 30,
            ),
            (
                "policy.staging_max_age_hours",
                self.staging_max_age_hours,
                1,
                24 * 30,
            ),
            ("policy.inactivity_days", self.inactivity_days, 1, 3650),
            (
                "policy.notice_grace_hours",
                self.notice_grace_hours,
                1,
                24 * 90,
            ),
            (
                "policy.gc_safety_minutes",
                self.gc_safety_minutes,
                10,
                60 * 24 * 30,
            ),
            // Shorter, and a file still being worked on would be started again on every run.
            (
                "policy.stuck_processing_minutes",
                self.stuck_processing_minutes,
                10,
                60 * 24 * 7,
            ),
            (
                "policy.ephemeral_keep_last",
                self.ephemeral_keep_last,
                0,
                1000,
            ),
        ];
        // Shorter than the grace or the trash retention, and the notice a user got, or the
        // record of why their files went to the trash, could be gone while it still matters.
        let days = self.history_retention_days;
        if days != 0
            && (!(30..=36500).contains(&days)
                || u64::from(days) * 24 <= u64::from(self.notice_grace_hours)
                || days < self.trash_retention_days)
        {
            return Err((
                "policy.history_retention_days",
                "must be 0 (kept for good) or between 30 and 36500, longer than the notice grace \
                 and at least the trash retention",
            ));
        }
        for (field, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err((field, "out of range (see the API documentation)"));
            }
        }
        Ok(())
    }

    /// The policy as sent over the API.
    pub fn to_proto(&self) -> pb::Policy {
        pb::Policy {
            trash_retention_days: self.trash_retention_days,
            orphan_upload_hours: self.orphan_upload_hours,
            staging_max_age_hours: self.staging_max_age_hours,
            inactivity_days: self.inactivity_days,
            notice_grace_hours: self.notice_grace_hours,
            inactivity_action: match self.inactivity_action {
                InactivityAction::NotifyOnly => pb::InactivityAction::NotifyOnly,
                InactivityAction::Trash => pb::InactivityAction::Trash,
            } as i32,
            gc_safety_minutes: self.gc_safety_minutes,
            stuck_processing_minutes: self.stuck_processing_minutes,
            ephemeral_keep_last: self.ephemeral_keep_last,
            history_retention_days: self.history_retention_days,
        }
    }

    /// A policy from the API; UNSPECIFIED action keeps notify-only.
    pub fn from_proto(p: &pb::Policy) -> Result<Self, (&'static str, &'static str)> {
        let inactivity_action = match pb::InactivityAction::try_from(p.inactivity_action) {
            Ok(pb::InactivityAction::Trash) => InactivityAction::Trash,
            Ok(pb::InactivityAction::NotifyOnly | pb::InactivityAction::Unspecified) => {
                InactivityAction::NotifyOnly
            }
            Err(_) => return Err(("policy.inactivity_action", "unknown action")),
        };
        let policy = Self {
            trash_retention_days: p.trash_retention_days,
            orphan_upload_hours: p.orphan_upload_hours,
            staging_max_age_hours: p.staging_max_age_hours,
            inactivity_days: p.inactivity_days,
            notice_grace_hours: p.notice_grace_hours,
            inactivity_action,
            gc_safety_minutes: p.gc_safety_minutes,
            stuck_processing_minutes: p.stuck_processing_minutes,
            ephemeral_keep_last: p.ephemeral_keep_last,
            history_retention_days: p.history_retention_days,
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let policy = Policy::default();
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(Policy::from_proto(&policy.to_proto()), Ok(policy));
    }

    #[test]
    fn history_retention_is_zero_for_good_or_at_least_thirty_days() {
        let mut p = Policy::default().to_proto();
        p.history_retention_days = 0;
        assert_eq!(
            Policy::from_proto(&p).map(|p| p.history_retention_days),
            Ok(0)
        );
        for (days, grace, trash) in [(29, 72, 30), (30, 24 * 30, 30), (60, 72, 90)] {
            p.history_retention_days = days;
            p.notice_grace_hours = grace;
            p.trash_retention_days = trash;
            assert_eq!(
                Policy::from_proto(&p).map(|_| ()).map_err(|(f, _)| f),
                Err("policy.history_retention_days"),
                "{days} days, grace {grace} h, trash {trash} days"
            );
        }
    }

    #[test]
    fn a_policy_stored_before_history_retention_keeps_history() {
        let stored = serde_json::json!({ "trash_retention_days": 30 });
        let policy: Policy = serde_json::from_value(stored).expect("reads");
        assert_eq!(policy.history_retention_days, 0);
        assert_eq!(policy.inactivity_days, Policy::default().inactivity_days);
    }

    #[test]
    fn zero_retention_is_refused_with_its_field() {
        let mut p = Policy::default().to_proto();
        p.trash_retention_days = 0;
        assert_eq!(
            Policy::from_proto(&p).map(|_| ()).map_err(|(f, _)| f),
            Err("policy.trash_retention_days")
        );
    }
}

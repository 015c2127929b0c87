//! The Lifecycle gRPC service (admin).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use stowage_proto::v1::{self as pb, lifecycle_server};
use stowage_runtime::{
    identity, paging,
    status::{invalid_argument, page_size},
    time::{from_timestamp, timestamp, timestamp_opt},
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{HistoryEvent, Lifecycle, Policy, RunRecord};

/// Earliest activity RecordActivity takes: 2000-01-01.
const EARLIEST_ACTIVITY: DateTime<Utc> = DateTime::from_timestamp_nanos(946_684_800_000_000_000);

/// A task or schedule name as a caller gives it: short and printable (it is echoed in
/// errors), else refused by `field` before any lookup.
fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name.len() > 64 || name.chars().any(char::is_control) {
        return Err(invalid_argument(
            field,
            "must be at most 64 bytes without control characters",
        ));
    }
    Ok(())
}

/// The tonic service of Lifecycle.
#[derive(Clone, Debug)]
pub struct LifecycleGrpc {
    lifecycle: Arc<Lifecycle>,
}

impl LifecycleGrpc {
    /// The API over `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self { lifecycle }
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> lifecycle_server::LifecycleServer<Self> {
        lifecycle_server::LifecycleServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

fn run_to_proto(run: &RunRecord) -> pb::Run {
    pb::Run {
        id: run.id.to_string(),
        name: run.name.clone(),
        started_at: Some(timestamp(run.started_at)),
        finished_at: timestamp_opt(run.finished_at),
        examined: run.tally.examined,
        acted: run.tally.acted,
        failed: run.tally.failed,
        dry_run: run.dry_run,
        error: run.error.clone(),
        report: run.tally.report.clone(),
    }
}

fn schedule_to_proto(s: stowage_jobs::ScheduleInfo) -> pb::Schedule {
    pb::Schedule {
        name: s.name,
        interval_seconds: s.interval.as_secs(),
        enabled: s.enabled,
        next_run_at: Some(timestamp(s.next_run_at)),
        last_run_at: timestamp_opt(s.last_run_at),
    }
}

/// The status for a queue error no caller answers itself: the database's as
/// [`database_failed`](stowage_runtime::status::database_failed) classes them (a retry may pass,
/// or not), anything else (a row this version cannot read, a value the queue refused) INTERNAL.
fn jobs_error(error: stowage_jobs::Error) -> Status {
    const WHAT: &str = "lifecycle schedules";
    use stowage_jobs::Error as E;
    match error {
        E::Pool(_) | E::Postgres(_) => stowage_runtime::status::database_failed(WHAT, &error),
        E::Invalid { .. }
        | E::JobNotFound(_)
        | E::NotRequeueable { .. }
        | E::ScheduleNotFound(_)
        | E::Corrupt { .. } => {
            tracing::error!(?error, what = WHAT, "the job queue failed");
            Status::internal(format!("{WHAT} failed"))
        }
    }
}

#[tonic::async_trait]
impl lifecycle_server::Lifecycle for LifecycleGrpc {
    async fn most_recent_events(
        &self,
        request: Request<pb::MostRecentEventsRequest>,
    ) -> Result<Response<pb::MostRecentEventsResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = paging::fingerprint(&"most_recent_events");
        let after: Option<String> = paging::decode(&req.page_token, &fingerprint)?;
        let mut events = self
            .lifecycle
            .most_recent_events(after.as_deref(), size + 1)
            .await?;
        let next_page_token =
            paging::finish_page(&mut events, size, &fingerprint, |e| Some(e.user_id.clone()));
        Ok(Response::new(pb::MostRecentEventsResponse {
            events: events.iter().map(HistoryEvent::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn user_events(
        &self,
        request: Request<pb::UserEventsRequest>,
    ) -> Result<Response<pb::UserEventsResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let user = if req.user_id.is_empty() || req.user_id == caller.user_id {
            caller.user_id.clone()
        } else {
            caller.require_admin()?;
            stowage_blob::keys::validate_user_id(&req.user_id)
                .map_err(|why| invalid_argument("user_id", why))?;
            req.user_id.clone()
        };
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = paging::fingerprint(&("user_events", &user));
        let before: Option<(DateTime<Utc>, i64)> = paging::decode(&req.page_token, &fingerprint)?;
        let mut events = self.lifecycle.user_events(&user, before, size + 1).await?;
        let next_page_token =
            paging::finish_page(&mut events, size, &fingerprint, |e| Some((e.at, e.id)));
        Ok(Response::new(pb::UserEventsResponse {
            events: events.iter().map(HistoryEvent::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn register_ephemeral(
        &self,
        request: Request<pb::RegisterEphemeralRequest>,
    ) -> Result<Response<pb::RegisterEphemeralResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        // The key as the store will read it must be the key as given: the store drops empty
        // segments, so "/users/x" would otherwise name a user's file.
        let plain = object_store::path::Path::parse(&req.storage_key)
            .is_ok_and(|path| path.as_ref() == req.storage_key);
        if !plain
            || req.storage_key.is_empty()
            || req.storage_key.len() > 1024
            || req.storage_key.chars().any(char::is_control)
            || req.storage_key == "users"
            || req.storage_key.starts_with("users/")
        {
            return Err(invalid_argument(
                "storage_key",
                "must be a plain store key (no empty, . or .. segments, no leading or trailing /) \
                 of 1..=1024 bytes without control characters, outside users/",
            ));
        }
        if req.owner.is_empty() || req.owner.len() > 200 || req.owner.chars().any(char::is_control)
        {
            return Err(invalid_argument(
                "owner",
                "must be 1..=200 bytes without control characters",
            ));
        }
        if !(1..=30 * 24 * 3600).contains(&req.ttl_seconds) {
            return Err(invalid_argument("ttl_seconds", "must be 1..=2592000"));
        }
        let expires_at = self
            .lifecycle
            .register_ephemeral(
                &req.storage_key,
                &req.owner,
                std::time::Duration::from_secs(req.ttl_seconds),
            )
            .await?;
        Ok(Response::new(pb::RegisterEphemeralResponse {
            expires_at: Some(timestamp(expires_at)),
        }))
    }

    async fn ack_ephemeral(
        &self,
        request: Request<pb::AckEphemeralRequest>,
    ) -> Result<Response<pb::AckEphemeralResponse>, Status> {
        identity(&request)?.require_service()?;
        let keys = request.into_inner().storage_keys;
        if keys.is_empty() || keys.len() > 1000 {
            return Err(invalid_argument("storage_keys", "must hold 1..=1000 keys"));
        }
        if keys
            .iter()
            .any(|k| k.is_empty() || k.len() > 1024 || k.chars().any(char::is_control))
        {
            return Err(invalid_argument(
                "storage_keys",
                "each key must be 1..=1024 bytes without control characters",
            ));
        }
        let acknowledged = self.lifecycle.ack_ephemeral(&keys).await?;
        Ok(Response::new(pb::AckEphemeralResponse { acknowledged }))
    }

    async fn record_activity(
        &self,
        request: Request<pb::RecordActivityRequest>,
    ) -> Result<Response<pb::RecordActivityResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        stowage_blob::keys::validate_user_id(&req.user_id)
            .map_err(|why| invalid_argument("user_id", why))?;
        let kind = pb::ActivityKind::try_from(req.kind)
            .map_err(|_| invalid_argument("kind", "unknown activity"))?;
        let at = match req.at {
            None => Utc::now(),
            Some(t) => from_timestamp(&t).ok_or_else(|| invalid_argument("at", "out of range"))?,
        };
        if at > Utc::now() + chrono::Duration::minutes(5) {
            return Err(invalid_argument("at", "is in the future"));
        }
        // A zero time (1970) or year 1 would make a user without activity inactive at once
        // (notices, their files trashed under that policy). Activity imported from an older
        // system may be years old, so only times before any such system are refused.
        if at < EARLIEST_ACTIVITY {
            return Err(invalid_argument(
                "at",
                "is before 2000 (a time left unset?)",
            ));
        }
        stowage_runtime::validate::idempotency_key(&req.idempotency_key)
            .map_err(|why| invalid_argument("idempotency_key", why))?;
        self.lifecycle
            .record_activity(&req.user_id, kind, at, &req.idempotency_key)
            .await?;
        Ok(Response::new(pb::RecordActivityResponse {}))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        identity(&request)?.require_admin()?;
        let schedules = self
            .lifecycle
            .queue()
            .list_schedules()
            .await
            .map_err(jobs_error)?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: schedules.into_iter().map(schedule_to_proto).collect(),
        }))
    }

    async fn set_schedule(
        &self,
        request: Request<pb::SetScheduleRequest>,
    ) -> Result<Response<pb::SetScheduleResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        check_name("name", &req.name)?;
        let queue = self.lifecycle.queue();
        let known = |e: stowage_jobs::Error| match e {
            stowage_jobs::Error::ScheduleNotFound(_) => {
                invalid_argument("name", "no such schedule")
            }
            stowage_jobs::Error::Invalid { reason, .. } => {
                invalid_argument("interval_seconds", reason)
            }
            other => jobs_error(other),
        };
        let mut changed = None;
        if req.interval_seconds > 0 {
            let interval = std::time::Duration::from_secs(req.interval_seconds);
            changed = Some(
                queue
                    .set_interval(&req.name, interval)
                    .await
                    .map_err(known)?,
            );
        }
        if let Some(enabled) = req.enabled {
            changed = Some(queue.set_enabled(&req.name, enabled).await.map_err(known)?);
        }
        let Some(s) = changed else {
            return Err(invalid_argument(
                "enabled",
                "nothing to change: give interval_seconds, enabled or both",
            ));
        };
        Ok(Response::new(pb::SetScheduleResponse {
            schedule: Some(schedule_to_proto(s)),
        }))
    }

    async fn run_now(
        &self,
        request: Request<pb::RunNowRequest>,
    ) -> Result<Response<pb::RunNowResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        check_name("name", &req.name)?;
        let run = self.lifecycle.execute(&req.name, req.dry_run).await?;
        Ok(Response::new(pb::RunNowResponse {
            run: Some(run_to_proto(&run)),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        check_name("name", &req.name)?;
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = paging::fingerprint(&("runs", &req.name));
        let before: Option<(DateTime<Utc>, Uuid)> = paging::decode(&req.page_token, &fingerprint)?;
        let name = (!req.name.is_empty()).then_some(req.name.as_str());
        let mut runs = self.lifecycle.runs(name, before, size + 1).await?;
        let next_page_token = paging::finish_page(&mut runs, size, &fingerprint, |r| {
            Some((r.started_at, r.id))
        });
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(run_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        identity(&request)?.require_admin()?;
        let policy = self.lifecycle.policy().await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy.to_proto()),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        let proto = req
            .policy
            .ok_or_else(|| invalid_argument("policy", "is required"))?;
        let policy =
            Policy::from_proto(&proto).map_err(|(field, why)| invalid_argument(field, why))?;
        let policy = self.lifecycle.set_policy(&policy).await?;
        Ok(Response::new(pb::SetPolicyResponse {
            policy: Some(policy.to_proto()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::jobs_error;

    #[test]
    fn queue_errors_say_whether_a_retry_can_help() {
        // No connection to be had: a retry may pass.
        let closed = stowage_jobs::Error::Pool(deadpool_postgres::PoolError::Closed);
        assert_eq!(jobs_error(closed).code(), Code::Unavailable);
        // A row this version cannot read stays unreadable.
        let corrupt = stowage_jobs::Error::Corrupt {
            column: "state",
            value: "paused".into(),
        };
        let status = jobs_error(corrupt);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "lifecycle schedules failed");
    }
}

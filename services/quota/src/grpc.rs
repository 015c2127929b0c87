//! The Quota gRPC service: thin handlers over [`Quota`].

use std::time::Duration;

use stowage_proto::v1::{self as pb, quota_server};
use stowage_runtime::{identity, paging, status::parse_uuid, time::timestamp};
use tonic::{Request, Response, Status};

use crate::{Account, Quota, Reservation, ReservationState};

/// The tonic service of Quota.
#[derive(Clone, Debug)]
pub struct QuotaGrpc {
    quota: Quota,
}

impl QuotaGrpc {
    /// Serves `quota`.
    pub fn new(quota: Quota) -> Self {
        Self { quota }
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> quota_server::QuotaServer<Self> {
        quota_server::QuotaServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

impl From<Account> for pb::Account {
    fn from(a: Account) -> Self {
        let available_bytes = a.available_bytes();
        let used_percent = if a.limit_bytes == 0 {
            100.0
        } else {
            a.used_bytes as f64 * 100.0 / a.limit_bytes as f64
        };
        Self {
            user_id: a.user_id,
            limit_bytes: a.limit_bytes,
            used_bytes: a.used_bytes,
            reserved_bytes: a.reserved_bytes,
            available_bytes,
            used_percent,
            created_at: Some(timestamp(a.created_at)),
            updated_at: Some(timestamp(a.updated_at)),
        }
    }
}

impl From<Reservation> for pb::Reservation {
    fn from(r: Reservation) -> Self {
        let state = match r.state {
            ReservationState::Held => pb::ReservationState::Held,
            ReservationState::Committed => pb::ReservationState::Committed,
            ReservationState::Released => pb::ReservationState::Released,
            ReservationState::Expired => pb::ReservationState::Expired,
        };
        Self {
            id: r.id.to_string(),
            user_id: r.user_id,
            bytes: r.bytes,
            state: state as i32,
            committed_bytes: r.committed_bytes.unwrap_or(0),
            expires_at: Some(timestamp(r.expires_at)),
        }
    }
}

#[tonic::async_trait]
impl quota_server::Quota for QuotaGrpc {
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let user = if req.user_id.is_empty() || req.user_id == caller.user_id {
            caller.user_id
        } else {
            if !caller.is_privileged() {
                return Err(Status::permission_denied(
                    "reading another user's usage needs the admin scope",
                ));
            }
            req.user_id
        };
        let (account, lapsed_bytes) = self.quota.usage(&user).await?;
        Ok(Response::new(pb::GetUsageResponse {
            account: Some(account.into()),
            lapsed_bytes,
        }))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(req.ttl_seconds)));
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key.as_str());
        let (reservation, account) = self
            .quota
            .reserve(&req.user_id, req.bytes, ttl, key)
            .await?;
        Ok(Response::new(pb::ReserveResponse {
            reservation: Some(reservation.into()),
            account: Some(account.into()),
        }))
    }

    async fn resize(
        &self,
        request: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let id = parse_uuid("reservation_id", &req.reservation_id)?;
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(u64::from(req.ttl_seconds)));
        let (reservation, account) = self
            .quota
            .resize(
                id,
                req.bytes,
                (req.fallback_bytes > 0).then_some(req.fallback_bytes),
                ttl,
            )
            .await?;
        Ok(Response::new(pb::ResizeResponse {
            reservation: Some(reservation.into()),
            account: Some(account.into()),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let id = parse_uuid("reservation_id", &req.reservation_id)?;
        let (reservation, account) = self.quota.commit(id, req.bytes).await?;
        Ok(Response::new(pb::CommitResponse {
            reservation: Some(reservation.into()),
            account: Some(account.into()),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let id = parse_uuid("reservation_id", &req.reservation_id)?;
        let reservation = self.quota.release(id).await?;
        Ok(Response::new(pb::ReleaseResponse {
            reservation: Some(reservation.into()),
        }))
    }

    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::DebitResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let account = self
            .quota
            .debit(&req.user_id, req.bytes, &req.idempotency_key, &req.reason)
            .await?;
        Ok(Response::new(pb::DebitResponse {
            account: Some(account.into()),
        }))
    }

    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let account = self
            .quota
            .charge(&req.user_id, req.bytes, &req.idempotency_key, &req.reason)
            .await?;
        Ok(Response::new(pb::ChargeResponse {
            account: Some(account.into()),
        }))
    }

    async fn expire_reservations(
        &self,
        request: Request<pb::ExpireReservationsRequest>,
    ) -> Result<Response<pb::ExpireReservationsResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let (ids, count) = self
            .quota
            .expire_reservations(request.get_ref().dry_run)
            .await?;
        Ok(Response::new(pb::ExpireReservationsResponse {
            reservation_ids: ids.iter().map(ToString::to_string).collect(),
            count,
        }))
    }

    async fn set_limit(
        &self,
        request: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        let caller = identity(&request)?;
        caller.require_admin()?;
        let req = request.into_inner();
        let account = self
            .quota
            .set_limit(&req.user_id, req.limit_bytes, &caller.user_id)
            .await?;
        Ok(Response::new(pb::SetLimitResponse {
            account: Some(account.into()),
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        let size = stowage_runtime::status::page_size(req.page_size, 100, 1000)?;
        let query = paging::fingerprint(&("accounts", req.min_used_percent.to_bits()));
        let after: Option<String> = paging::decode(&req.page_token, &query)?;
        let mut accounts = self
            .quota
            .list_accounts(req.min_used_percent, after.as_deref(), size + 1)
            .await?;
        let next_page_token =
            paging::finish_page(&mut accounts, size, &query, |a| Some(a.user_id.clone()));
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: accounts.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        identity(&request)?.require_admin()?;
        let s = self.quota.stats().await?;
        Ok(Response::new(pb::StatsResponse {
            account_count: s.accounts,
            total_used_bytes: s.used,
            total_reserved_bytes: s.reserved,
            total_limit_bytes: s.limits,
            accounts_above_80_percent: s.above_80,
            accounts_full: s.full,
            held_reservations: s.held,
        }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        let (drift_bytes, account) = self
            .quota
            .reconcile(
                &req.user_id,
                req.actual_bytes,
                req.expected_used_bytes,
                &req.idempotency_key,
            )
            .await?;
        Ok(Response::new(pb::ReconcileResponse {
            drift_bytes,
            account: Some(account.into()),
        }))
    }
}

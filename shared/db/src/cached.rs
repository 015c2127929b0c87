//! Statements through the connection's statement cache.
//!
//! `query("SQL", …)` on a client parses, plans and describes the text on every call (one round
//! trip) before it binds and executes it (another). The calls here prepare each text once per
//! connection and then cost one round trip: half the waits, and no parse per call, on the paths
//! every upload takes. Use them for fixed SQL texts (the cache keeps every text it has seen).

use std::future::Future;

use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row, types::ToSql};

/// Parameters of a statement.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Cached-statement forms of `execute`, `query`, `query_one` and `query_opt`, for pooled
/// connections and their transactions.
pub trait Cached: GenericClient {
    /// Runs `sql` and returns the number of rows it changed.
    fn execute_cached(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.execute(&statement, params).await
        }
    }

    /// Runs `sql` and returns its rows.
    fn query_cached(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query(&statement, params).await
        }
    }

    /// Runs `sql`, which must return exactly one row.
    fn query_one_cached(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query_one(&statement, params).await
        }
    }

    /// Runs `sql`, which returns at most one row.
    fn query_opt_cached(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query_opt(&statement, params).await
        }
    }
}

impl<C: GenericClient + ?Sized> Cached for C {}

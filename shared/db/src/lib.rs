//! PostgreSQL pools and per-schema migrations shared by every Stowage service.
//!
//! Each service owns one schema and embeds its numbered SQL migrations with
//! `refinery::embed_migrations!`; [`migrate`] applies them under an advisory lock so that
//! any number of replicas can start at once.

mod cached;
mod listen;
mod target;
pub mod tls;
pub use cached::{Cached, Params};
pub use listen::{LISTENER_APPLICATION_NAME, listen};
pub use target::{PgConnection, PgTarget};

use std::time::Duration;

pub use deadpool_postgres::{GenericClient, Object as Connection, Pool as PgPool, Transaction};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
pub use refinery::{Runner as MigrationRunner, Target as MigrationTarget};

/// Errors of pool creation and migrations.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database URL could not be parsed.
    #[error("invalid database url: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// The URL's TLS settings cannot be used.
    #[error("database TLS: {0}")]
    Tls(String),
    /// The pool could not be built.
    #[error("cannot build the connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    /// No connection could be taken from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A migration failed.
    #[error("migration of schema {schema} failed: {source}")]
    Migration {
        /// Schema being migrated.
        schema: String,
        /// What refinery reported.
        #[source]
        source: refinery::Error,
    },
}

/// Builds a pool for `url` with at most `max_size` connections, over TLS when the URL sets
/// `sslmode=require` (see [`PgTarget`]).
///
/// A connection its server closed (a restart) is not reused. One whose peer went silent (a
/// failover, a cut network) is found dead by TCP keepalives within about a minute, and a write
/// left unacknowledged for a minute drops it: a call or a background loop waiting on it fails
/// and tries again on a new connection instead of hanging for the kernel's two hours. Values
/// the URL sets itself are kept.
pub fn connect(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let (mut pg_config, tls) = PgTarget::parse(url)?.into_parts();
    watch_liveness(&mut pg_config);
    let manager = Manager::from_config(
        pg_config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()?)
}

/// Keepalives after 30 s of silence (every 10 s, 3 tries) and a 60 s bound on unacknowledged
/// writes, unless the URL set them (tokio-postgres' keepalive default is two hours).
fn watch_liveness(config: &mut tokio_postgres::Config) {
    if config.get_keepalives_idle() == Duration::from_secs(2 * 3600) {
        config
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(60));
    }
}

/// Applies `runner`'s migrations to `schema`, creating the schema first.
///
/// The history table lives inside the schema (`{schema}.schema_history`), so services never
/// share one. A session-level advisory lock serialises concurrent starters.
pub async fn migrate(pool: &Pool, schema: &str, runner: MigrationRunner) -> Result<(), DbError> {
    migrate_with_history(pool, schema, runner, "schema_history").await
}

/// Like [`migrate`], with the history kept in `{schema}.{history_table}`.
///
/// For a shared crate whose tables live in a service's schema (the job queue) and whose
/// migrations are numbered apart from the service's own.
pub async fn migrate_with_history(
    pool: &Pool,
    schema: &str,
    mut runner: MigrationRunner,
    history_table: &str,
) -> Result<(), DbError> {
    let mut conn = pool.get().await?;
    // One lock for all schemas: migrations are rare and short, and `CREATE SCHEMA IF NOT
    // EXISTS` itself races between sessions.
    conn.execute("SELECT pg_advisory_lock(7469347)", &[])
        .await?;
    let result = async {
        // Migrations name their tables without a schema; the search path puts them in ours.
        conn.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
        ))
        .await?;
        let client: &mut tokio_postgres::Client = &mut conn;
        runner
            .set_migration_table_name(format!("{schema}.{history_table}"))
            .run_async(client)
            .await
            .map_err(|source| DbError::Migration {
                schema: schema.to_owned(),
                source,
            })?;
        Ok::<_, DbError>(())
    }
    .await;
    conn.batch_execute("RESET search_path; SELECT pg_advisory_unlock(7469347)")
        .await?;
    result
}

/// Checks that the database answers, for readiness probes.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let conn = pool.get().await?;
    conn.simple_query("SELECT 1").await?;
    Ok(())
}

#[cfg(test)]
mod liveness_tests {
    use std::{str::FromStr, time::Duration};

    #[test]
    fn silent_connections_are_probed_unless_the_url_says_otherwise() {
        let mut plain = tokio_postgres::Config::from_str("postgres://u@h/db").expect("url");
        super::watch_liveness(&mut plain);
        assert_eq!(plain.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(plain.get_tcp_user_timeout(), Some(&Duration::from_secs(60)));
        let mut own = tokio_postgres::Config::from_str(
            "postgres://u@h/db?keepalives_idle=300&tcp_user_timeout=5",
        )
        .expect("url");
        super::watch_liveness(&mut own);
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(300));
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
    }
}

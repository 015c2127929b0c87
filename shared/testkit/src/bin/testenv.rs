//! Runs a command with a throwaway PostgreSQL and Redis shared by every test process:
//! `stowage-testenv -- cargo nextest run ...`. The servers are stopped when the command ends,
//! and its exit code is passed on.

use std::process::ExitCode;

use stowage_local::{LocalPostgres, LocalRedis};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).skip_while(|a| a == "--").collect();
    let Some((program, rest)) = args.split_first() else {
        eprintln!("usage: stowage-testenv -- <command> [args...]");
        return ExitCode::from(2);
    };
    let dir = match tempfile::Builder::new()
        .prefix("stowage-testenv-")
        .tempdir()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    // More server settings for a measurement (`name=value;name=value`), say
    // `shared_preload_libraries=pg_stat_statements` to see where a benchmark's time goes.
    let extra = std::env::var("STOWAGE_TESTENV_PG_SETTINGS").unwrap_or_default();
    let settings: Vec<&str> = extra.split(';').filter(|s| !s.is_empty()).collect();
    let pg = match LocalPostgres::start_with(&dir.path().join("pg"), false, &settings).await {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("cannot start PostgreSQL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let redis = match LocalRedis::start().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start Redis: {e}");
            pg.stop().await;
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "testenv: PostgreSQL on {}, Redis on {}",
        pg.port(),
        redis.port()
    );
    let status = tokio::process::Command::new(program)
        .args(rest)
        .env("STOWAGE_TEST_DATABASE_URL", pg.url("postgres"))
        .env("STOWAGE_TEST_REDIS_URL", redis.url())
        .status()
        .await;
    redis.stop().await;
    pg.stop().await;
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("cannot run {program}: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use figment::providers::Serialized;
use stowage_proto::v1 as pb;
use stowage_runtime::{Config, Minter, config::AuthConfig, telemetry};

use crate::{Role, client::Client, dev, roles_of};

/// Stowage: uploads, files, quotas, media and lifecycle.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (also `STOWAGE_CONFIG`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs all five services on one port with embedded defaults.
    Dev {
        /// Address to listen on (default: `STOWAGE_ADDR` or the configuration's `addr`, else
        /// 127.0.0.1:7070).
        #[arg(long)]
        addr: Option<String>,
        /// Where blobs, the dev database and the dev secret live.
        #[arg(long, default_value = ".stowage")]
        data_dir: PathBuf,
    },
    /// Runs one service, or all of them, from the configuration.
    Serve {
        /// ingest, files, quota, media, lifecycle or all.
        service: String,
    },
    /// Applies every service's database migrations and exits.
    Migrate,
    /// Mints a token (HS256 secret from the configuration, or the dev secret).
    Token {
        /// User id (`sub`).
        #[arg(long)]
        user: String,
        /// Scopes to grant (admin, service).
        #[arg(long)]
        scope: Vec<String>,
        /// Lifetime, e.g. `24h`, `30d`.
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// Data directory of `stowage dev`, for its secret.
        #[arg(long, default_value = ".stowage")]
        data_dir: PathBuf,
    },
    /// Uploads files.
    Upload {
        /// Files to upload.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Tags for every file.
        #[arg(long)]
        tag: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Lists files (or trash).
    Ls {
        /// Only this kind (video, image, audio, document, other).
        #[arg(long)]
        kind: Option<String>,
        /// Only files with this tag (repeat for any-of).
        #[arg(long)]
        tag: Vec<String>,
        /// Names containing this text.
        #[arg(long)]
        name: Option<String>,
        /// Sort by created, name or size.
        #[arg(long, default_value = "created")]
        sort: String,
        /// Ascending order.
        #[arg(long)]
        asc: bool,
        /// Show trash instead.
        #[arg(long)]
        trash: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Downloads a file, verifying its checksum.
    Get {
        /// File id.
        id: String,
        /// Output path (`-` for stdout; default: the file's name, in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Replace a file of the default name that exists already.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Moves a file to trash.
    Rm {
        /// File id.
        id: String,
        /// Remove it for good.
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Restores a file from trash.
    Restore {
        /// File id.
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Shows usage against the quota.
    Usage {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Event streams.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Shows storage totals and the largest files: yours, or everyone's (admins).
    Stats {
        /// Every user's files (needs the admin scope).
        #[arg(long)]
        all: bool,
        /// How many of the largest files to list (0..=100).
        #[arg(long, default_value_t = 10)]
        largest: u32,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Runs Lifecycle's clean-up jobs now, one after another, and prints what each did (needs
    /// the admin scope): by default those that remove data nobody needs any more.
    Cleanup {
        /// Jobs to run (any of `stowage cleanup --list`); default: orphan_uploads,
        /// staging_cleanup, reservations_expire, trash_purge, blob_gc, ephemeral_cleanup.
        jobs: Vec<String>,
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        /// List the jobs with their schedules instead.
        #[arg(long, conflicts_with_all = ["jobs", "dry_run"])]
        list: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// What `stowage cleanup` runs when no job is named: the jobs that remove what nobody needs
/// (not the reconcile, the notices or the reprocessing).
const CLEANUP_JOBS: [&str; 6] = [
    "orphan_uploads",
    "staging_cleanup",
    "reservations_expire",
    "trash_purge",
    "blob_gc",
    "ephemeral_cleanup",
];

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Prints the events of your streams as their windows are sealed, one line each, until
    /// stopped. It only watches: consumer groups get every batch as before, and screenshots
    /// are deleted as they would be without it.
    Tail {
        /// Only this stream (repeatable; admins name another user's `{user}/{stream}`).
        #[arg(long = "stream")]
        streams: Vec<String>,
        /// Start from the oldest batch kept instead of the next one sealed.
        #[arg(long, conflicts_with = "cursor")]
        from_start: bool,
        /// Start after this batch cursor.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, clap::Args)]
struct Endpoint {
    /// Stowage address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7070",
        env = "STOWAGE_ENDPOINT"
    )]
    addr: String,
    /// Bearer token.
    #[arg(long, env = "STOWAGE_TOKEN", hide_env_values = true)]
    token: String,
}

impl Endpoint {
    async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.addr, &self.token).await
    }
}

/// Runs a parsed command line; errors are printed, and the exit code says whether it worked.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // As a shell reports a command SIGINT ended: 128 + 2.
        Err(error) if error.is::<Interrupted>() => ExitCode::from(130),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command stopped by Ctrl-C (SIGINT) after it cleaned up.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let config_file = cli.config.as_deref();
    match cli.command {
        Command::Dev { addr, data_dir } => {
            let data_dir = dev::data_dir(&data_dir)?;
            let secret = dev::dev_secret(&data_dir)?;
            let mut config = Config::load_with(
                config_file,
                |f| f.merge(dev::defaults(&data_dir, &secret)),
                |f| match &addr {
                    Some(addr) => f.merge(Serialized::default("addr", addr)),
                    None => f,
                },
            )?;
            let telemetry = telemetry::init("stowage-dev", config.log_format);
            // The address first: taken, nothing else is started for nothing.
            let listener = tokio::net::TcpListener::bind(config.addr)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (is another `stowage dev` running? \
                         give another address: --addr 127.0.0.1:0 picks a free port)",
                        config.addr
                    )
                })?;
            // Listening for signals from here on: a Ctrl-C while the databases start is not
            // the default death that would leave them running.
            let shutdown = stowage_runtime::tasks::shutdown_on_signals();
            let servers = dev::start_servers(&mut config, &data_dir).await?;
            let token = Minter::from_config(&config.auth)
                .map(|m| m.mint("dev", &[], Duration::from_secs(30 * 24 * 3600)))
                .unwrap_or_default();
            let banner = Banner {
                addr: listener.local_addr()?,
                store: config.blob_url.clone(),
                data: data_dir.display().to_string(),
                token,
            };
            // Printed once the services answer, not before migrations have run.
            stowage_runtime::tasks::spawn("dev-banner", banner.print_when_ready());
            let result = crate::serve(&Role::ALL, config, listener, shutdown).await;
            servers.stop().await;
            telemetry.shutdown();
            result
        }
        Command::Serve { service } => {
            let roles = roles_of(&service)?;
            let config = Config::load(config_file)?;
            let telemetry = telemetry::init(&format!("stowage-{service}"), config.log_format);
            let listener = tokio::net::TcpListener::bind(config.addr)
                .await
                .with_context(|| format!("STOWAGE_ADDR: cannot listen on {}", config.addr))?;
            let shutdown = stowage_runtime::tasks::shutdown_on_signals();
            let result = crate::serve(&roles, config, listener, shutdown).await;
            telemetry.shutdown();
            result
        }
        Command::Migrate => {
            let config = Config::load_for_migrations(config_file)?;
            telemetry::init("stowage-migrate", config.log_format);
            let url = config
                .database_url
                .as_deref()
                .context("DATABASE_URL: required")?;
            let pool = stowage_db::connect(url, 2)?;
            crate::migrate(&pool, &Role::ALL).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Token {
            user,
            scope,
            ttl,
            data_dir,
        } => {
            stowage_blob::keys::validate_user_id(&user)
                .map_err(|why| anyhow::anyhow!("--user: {why}"))?;
            let ttl = humantime::parse_duration(&ttl)
                .with_context(|| format!("--ttl: {ttl:?} is not like 30d, 24h, 15m"))?;
            // The configuration's auth section (file and STOWAGE_AUTH__*), as the services
            // read it; without a secret there, the dev secret `stowage dev` made.
            let auth = Config::load_for_migrations(config_file)?.auth;
            let secret = match auth.hs256_secret {
                Some(secret) => secret,
                None => {
                    let path = data_dir.join("dev-secret");
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("no HS256 secret is configured (STOWAGE_AUTH__HS256_SECRET) and {} does not exist (run `stowage dev` first)", path.display()))?
                        .trim()
                        .to_owned()
                }
            };
            let minter = Minter::from_config(&AuthConfig {
                hs256_secret: Some(secret),
                issuer: auth.issuer,
                audience: auth.audience,
                ..AuthConfig::default()
            })
            .context("no secret")?;
            let scopes: Vec<&str> = scope.iter().map(String::as_str).collect();
            println!("{}", minter.mint(&user, &scopes, ttl));
            Ok(())
        }
        Command::Upload {
            paths,
            tag,
            endpoint,
        } => {
            let client = endpoint.client().await?;
            // Several files: those a failed run finished are not stored again when the same
            // command is run again (unless they are gone from the server since).
            let mut run = if paths.len() > 1 {
                Some(crate::client::UploadRun::open(&client, &paths, &tag)?)
            } else {
                None
            };
            for (index, path) in paths.iter().enumerate() {
                let earlier = run
                    .as_ref()
                    .and_then(|r| r.finished(index))
                    .map(|(id, line)| (id.to_owned(), line.to_owned()));
                if let Some((id, line)) = earlier
                    && client.still_stored(&id).await?
                {
                    eprintln!("{} was uploaded already, as {id}", path.display());
                    println!("{line}");
                    continue;
                }
                let file = client
                    .upload_then(path, &tag, false, |file| match run.as_mut() {
                        Some(run) => run.record(index, file, &crate::client::file_line(file)),
                        None => Ok(()),
                    })
                    .await?;
                println!("{}", crate::client::file_line(&file));
            }
            if let Some(run) = run {
                run.finish();
            }
            Ok(())
        }
        Command::Ls {
            kind,
            tag,
            name,
            sort,
            asc,
            trash,
            endpoint,
        } => {
            let client = endpoint.client().await?;
            if trash {
                // Trash is listed most recently deleted first, without filters.
                if kind.is_some() || !tag.is_empty() || name.is_some() || sort != "created" || asc {
                    anyhow::bail!(
                        "--trash lists all of the trash: it takes no --kind, --tag, --name, --sort or --asc"
                    );
                }
                return client.trash(crate::client::print_files).await;
            }
            let kind = match kind.as_deref() {
                None => pb::FileKind::Unspecified,
                Some(k) => pb::FileKind::from_str_name(&format!("FILE_KIND_{}", k.to_uppercase()))
                    .with_context(|| format!("--kind: unknown kind {k:?}"))?,
            };
            let sort_by = match sort.as_str() {
                "created" => pb::FileSortField::CreatedAt,
                "name" => pb::FileSortField::Name,
                "size" => pb::FileSortField::Size,
                other => anyhow::bail!("--sort: unknown field {other:?} (created, name, size)"),
            };
            let mut request = pb::ListFilesRequest {
                kind: kind as i32,
                any_tags: tag,
                name_contains: name.unwrap_or_default(),
                sort_by: sort_by as i32,
                direction: if asc {
                    pb::SortDirection::Asc
                } else {
                    pb::SortDirection::Desc
                } as i32,
                page_size: 200,
                ..Default::default()
            };
            loop {
                let page = client.list(request.clone()).await?;
                crate::client::print_files(&page.files);
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                request.page_token = page.next_page_token;
            }
        }
        Command::Get {
            id,
            output,
            force,
            endpoint,
        } => {
            let client = endpoint.client().await?;
            // Interrupted, the download is dropped, and with it its partial file (a signal
            // left to kill the process would leave it behind).
            let file = tokio::select! {
                file = client.get(&id, output.as_deref(), force) => file?,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted");
                    return Err(Interrupted.into());
                }
            };
            eprintln!(
                "{}  {}  sha256 ok",
                file.display_name,
                crate::client::human(file.size_bytes)
            );
            Ok(())
        }
        Command::Rm {
            id,
            purge,
            endpoint,
        } => {
            endpoint.client().await?.remove(&id, purge).await?;
            println!("{} {id}", if purge { "purged" } else { "moved to trash" });
            Ok(())
        }
        Command::Restore { id, endpoint } => {
            let file = endpoint.client().await?.restore(&id).await?;
            println!("restored {}  {}", file.id, file.display_name);
            Ok(())
        }
        Command::Events {
            command:
                EventsCommand::Tail {
                    streams,
                    from_start,
                    cursor,
                    endpoint,
                },
        } => {
            let cursor = match (from_start, cursor) {
                (true, _) => "0".to_owned(),
                (false, cursor) => cursor.unwrap_or_default(),
            };
            endpoint.client().await?.tail_events(streams, cursor).await
        }
        Command::Stats {
            all,
            largest,
            endpoint,
        } => {
            let stats = endpoint.client().await?.stats(all, largest).await?;
            print_stats(&stats);
            Ok(())
        }
        Command::Cleanup {
            jobs,
            dry_run,
            list,
            endpoint,
        } => {
            let client = endpoint.client().await?;
            if list {
                for schedule in client.schedules().await? {
                    println!(
                        "{:<20} every {:<10} {}",
                        schedule.name,
                        humantime::format_duration(std::time::Duration::from_secs(
                            schedule.interval_seconds
                        ))
                        .to_string(),
                        if schedule.enabled {
                            "enabled"
                        } else {
                            "disabled"
                        }
                    );
                }
                return Ok(());
            }
            let jobs = if jobs.is_empty() {
                CLEANUP_JOBS.map(str::to_owned).to_vec()
            } else {
                jobs
            };
            let mut failed = false;
            for job in jobs {
                let run = client.run_now(&job, dry_run).await?;
                println!(
                    "{job}: looked at {}, {} {}, {} failed{}",
                    run.examined,
                    run.acted,
                    if run.dry_run { "to act on" } else { "acted on" },
                    run.failed,
                    if run.error.is_empty() {
                        String::new()
                    } else {
                        format!(" (error: {})", run.error)
                    }
                );
                for line in &run.report {
                    println!("  {line}");
                }
                failed |= run.failed > 0 || !run.error.is_empty();
            }
            if failed {
                anyhow::bail!("some clean-up failed (see above; ListRuns keeps each run)");
            }
            Ok(())
        }
        Command::Usage { endpoint } => {
            let a = endpoint.client().await?.usage().await?;
            println!(
                "{}: {} used of {} ({:.1} %), {} reserved, {} available",
                a.user_id,
                crate::client::human(a.used_bytes),
                crate::client::human(a.limit_bytes),
                a.used_percent,
                crate::client::human(a.reserved_bytes),
                crate::client::human(a.available_bytes)
            );
            Ok(())
        }
    }
}

/// Prints StorageStats' figures, then its largest files with their owners.
fn print_stats(stats: &pb::StorageStatsResponse) {
    use crate::client::human;
    println!(
        "{} files, {} ({} in trash), variants {}",
        stats.file_count,
        human(stats.total_bytes),
        stats.trashed_count,
        human(stats.variant_bytes)
    );
    if let Some(free) = stats.available_bytes {
        println!("store free space: {}", human(free));
    }
    let mut kinds: Vec<_> = stats.count_by_kind.iter().collect();
    kinds.sort();
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    if !kinds.is_empty() {
        println!("by kind: {}", kinds.join(", "));
    }
    if !stats.largest_files.is_empty() {
        println!("largest files:");
        for f in &stats.largest_files {
            println!(
                "{}  {:>10}  {}  {}",
                f.id,
                human(f.size_bytes),
                f.owner_id,
                f.display_name
            );
        }
    }
}

/// What `stowage dev` tells the developer once it is ready.
struct Banner {
    addr: std::net::SocketAddr,
    store: String,
    data: String,
    token: String,
}

impl Banner {
    async fn print_when_ready(self) {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
        else {
            return;
        };
        let mut health = HealthClient::new(endpoint.connect_lazy());
        loop {
            let status = health
                .check(HealthCheckRequest {
                    service: stowage_proto::service_names::FILES.into(),
                })
                .await
                .map(|r| r.into_inner().status);
            if matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "Stowage dev is up: all five services on http://{}",
            self.addr
        );
        println!("  object store: {}", self.store);
        println!("  data:         {}", self.data);
        println!("  dev token (user \"dev\", 30 days):");
        println!("    export STOWAGE_TOKEN={}", self.token);
        // Client commands go to 127.0.0.1:7070 unless told otherwise.
        if self.addr.to_string() != "127.0.0.1:7070" {
            println!("    export STOWAGE_ENDPOINT=http://{}", self.addr);
        }
        println!("  try: stowage upload ./some-file && stowage ls && stowage usage");
    }
}

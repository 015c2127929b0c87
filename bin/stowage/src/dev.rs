//! `stowage dev`: everything on one laptop. Data lives under one directory (default
//! `./.stowage`): blobs, a PostgreSQL cluster started from the system's binaries when no
//! `DATABASE_URL` is given, and the dev signing secret. Redis is started throwaway when no
//! `REDIS_URL` is given (it holds nothing that must survive).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;
use stowage_local::{LocalPostgres, LocalRedis};
use stowage_runtime::Config;

/// Servers started for a dev session; stopped by [`DevServers::stop`].
#[derive(Debug, Default)]
pub struct DevServers {
    postgres: Option<LocalPostgres>,
    redis: Option<LocalRedis>,
}

impl DevServers {
    /// Stops what was started.
    pub async fn stop(self) {
        if let Some(redis) = self.redis {
            redis.stop().await;
        }
        if let Some(pg) = self.postgres {
            pg.stop().await;
        }
    }
}

/// Absolute form of `dir`, created if missing for its owner alone (700): it holds the dev
/// secret, the databases and every blob.
pub fn data_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("--data-dir: cannot create {}", dir.display()))?;
    Ok(std::fs::canonicalize(dir)?)
}

/// The dev HS256 secret, created once and kept in `{data_dir}/dev-secret`.
/// Readable by its owner alone (600): whoever reads it can mint any user's token.
pub fn dev_secret(data_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = data_dir.join("dev-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_owned();
        if secret.len() >= 16 {
            // Written by a version that left it readable to all.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
            return Ok(secret);
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| std::io::Write::write_all(&mut file, secret.as_bytes()));
    written.with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

/// The `file://` URL of the store under `data_dir`, its path escaped: a directory named
/// `C#` or `50%` must not end the path or change it.
fn blob_url(data_dir: &Path) -> String {
    let dir =
        std::path::absolute(data_dir.join("blobs")).unwrap_or_else(|_| data_dir.join("blobs"));
    url::Url::from_directory_path(&dir)
        .map(String::from)
        .unwrap_or_else(|()| format!("file://{}", dir.display()))
}

/// Dev defaults: loopback address, local-disk store under `data_dir`, the dev secret, any
/// grpc-web origin. Environment variables and flags still win.
pub fn defaults(data_dir: &Path, secret: &str) -> figment::Figment {
    use figment::providers::Serialized;
    figment::Figment::new()
        .merge(Serialized::default("addr", "127.0.0.1:7070"))
        .merge(Serialized::default("blob_url", blob_url(data_dir)))
        .merge(Serialized::default("auth.hs256_secret", secret))
        .merge(Serialized::default("cors_origins", vec!["*"]))
        // The last screenshots of each event stream stay for debugging.
        .merge(Serialized::default("ingest.streams.keep_screenshots", 5))
}

/// Starts PostgreSQL and Redis for whatever `config` has no URL for.
pub async fn start_servers(config: &mut Config, data_dir: &Path) -> anyhow::Result<DevServers> {
    let mut servers = DevServers::default();
    if config.database_url.is_none() {
        let pg = LocalPostgres::start_for_dev(&data_dir.join("postgres"))
            .await
            .context("starting PostgreSQL")?;
        pg.create_database("stowage").await?;
        config.database_url = Some(pg.url("stowage"));
        servers.postgres = Some(pg);
    }
    if config.redis_url.is_none() {
        let redis = LocalRedis::start_for_dev()
            .await
            .context("starting Redis")?;
        config.redis_url = Some(redis.url());
        servers.redis = Some(redis);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    /// The data directory and the secret in it are its owner's alone, also when an older
    /// version left the secret readable to all.
    #[test]
    fn the_data_dir_and_the_dev_secret_are_closed_to_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = super::data_dir(&parent.path().join("dev")).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir) & 0o077, 0, "{:o}", mode(&dir));
        let secret = super::dev_secret(&dir).unwrap();
        let path = dir.join("dev-secret");
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(super::dev_secret(&dir).unwrap(), secret, "the same secret");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_data_dir_with_url_characters_is_the_store_root() {
        for dir in ["/home/u/C#/app/.stowage", "/srv/50%/data", "/tmp/a?b c"] {
            let url = super::blob_url(std::path::Path::new(dir));
            let root = url::Url::parse(&url)
                .expect("a URL")
                .to_file_path()
                .expect("a path");
            assert_eq!(root, std::path::Path::new(dir).join("blobs"), "{url}");
        }
    }
}

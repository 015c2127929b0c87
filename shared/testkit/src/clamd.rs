//! A throwaway ClamAV daemon whose only signature is the EICAR test file, made on the spot:
//! no signature download, so it starts offline and in well under the time a real database
//! takes to load. The signature is in a `daily.cud` (ClamAV's own database format, unsigned),
//! so the daemon reports a signature version as it does with ClamAV's databases, and a test
//! can update its signatures as freshclam would ([`LocalClamd::update_signatures`]).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use md5::{Digest, Md5};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

/// The EICAR anti-virus test file (68 bytes): harmless, and detected by every scanner.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// Name of the signature [`LocalClamd`] loads for [`EICAR`]. clamd reports it with
/// `.UNOFFICIAL` appended, as it does every signature outside ClamAV's own databases.
pub const EICAR_SIGNATURE: &str = "Stowage-Test-EICAR";

/// Signature version of the database the daemon starts with.
pub const SIGNATURE_VERSION: u64 = 27000;

/// How long [`LocalClamd::start`] waits for the daemon to answer PING.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A `clamd` on 127.0.0.1 with its configuration, database, log and temporary files in a
/// directory of its own; killed when dropped.
#[derive(Debug)]
pub struct LocalClamd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl LocalClamd {
    /// Largest stream the daemon accepts (`StreamMaxLength`); it refuses longer ones with
    /// `INSTREAM size limit exceeded`.
    pub const STREAM_MAX_LENGTH: u64 = 64 * 1024 * 1024;

    /// Starts `clamd` on a free port and waits until it answers PING.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(stowage_local::free_port()?).await
    }

    /// Starts `clamd` on `port` (tests restart a daemon where clients expect it).
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let binary = clamd_binary().context(
            "clamd not found on PATH nor in /usr/sbin (scripts/setup installs clamav-daemon)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("stowage-clamd-")
            .tempdir()?;
        std::fs::write(
            dir.path().join("daily.cud"),
            daily_database(SIGNATURE_VERSION, &eicar_signature())?,
        )?;
        let config = dir.path().join("clamd.conf");
        std::fs::write(&config, config_text(dir.path(), port))?;
        let child = Command::new(&binary)
            .arg("--config-file")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log"))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let mut clamd = Self { child, port, dir };
        clamd.wait_ready().await?;
        Ok(clamd)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if ping(self.port).await {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "clamd exited with {status} before answering:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "clamd did not answer PING within {START_DEADLINE:?}:\n{}",
                    self.log()
                );
            }
            // clamd with one signature answers in about 10 ms; poll at that pace.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What clamd wrote to its log file and to stderr, for a failing test to show.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "--- clamd.log ---\n{}\n--- stderr ---\n{}",
            read("clamd.log").unwrap_or_default(),
            read("stderr.log").unwrap_or_default()
        )
    }

    /// URL of the daemon, `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Port the daemon listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the daemon answers to `zVERSION` (`ClamAV 1.4.6/27000/Sat Dec  5 00:00:00 2026`).
    pub async fn version(&self) -> anyhow::Result<String> {
        exchange(self.port, b"zVERSION\0").await
    }

    /// Updates the daemon's signatures as freshclam would: its database becomes `version`
    /// with EICAR's signature and one named `name` that matches exactly `data`. Returns once
    /// the daemon reports `version` and finds `name` in `data`.
    pub async fn update_signatures(
        &self,
        version: u64,
        name: &str,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let signatures = eicar_signature() + &hash_signature(name, data);
        std::fs::write(
            self.dir.path().join("daily.cud"),
            daily_database(version, &signatures)?,
        )?;
        self.reload_until_found(name, data).await?;
        let reported = self.version().await?;
        anyhow::ensure!(
            reported.contains(&format!("/{version}/")),
            "clamd reports {reported:?} after the update to {version}"
        );
        Ok(())
    }

    /// Adds a database of one's own (`.hdb`) with a signature named `name` (reported with
    /// `.UNOFFICIAL` appended) that matches exactly `data`, and returns once the daemon finds
    /// it in `data`. The version the daemon reports does not change.
    pub async fn add_signature(&self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        std::fs::write(
            self.dir.path().join(format!("{name}.hdb")),
            hash_signature(name, data),
        )?;
        self.reload_until_found(name, data).await
    }

    async fn reload_until_found(&self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        let reply = exchange(self.port, b"zRELOAD\0").await?;
        anyhow::ensure!(reply == "RELOADING", "clamd answered RELOAD with {reply:?}");
        let expected = format!("stream: {name}.UNOFFICIAL FOUND");
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // During the reload clamd scans with the old signatures, or answers an error.
            let mut command = b"zINSTREAM\0".to_vec();
            command.extend_from_slice(&u32::try_from(data.len())?.to_be_bytes());
            command.extend_from_slice(data);
            command.extend_from_slice(&0u32.to_be_bytes());
            if exchange(self.port, &command).await.ok().as_deref() == Some(expected.as_str()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "clamd did not find {name} within {START_DEADLINE:?} of its reload:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the daemon and waits for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

fn clamd_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("clamd"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/clamd");
        sbin.is_file().then_some(sbin)
    })
}

/// A hash signature (`.hdb`, `MD5:SIZE:NAME`) matching exactly the EICAR file.
fn eicar_signature() -> String {
    hash_signature(EICAR_SIGNATURE, EICAR)
}

/// A hash signature (`.hdb`, `MD5:SIZE:NAME`) matching exactly `data`.
fn hash_signature(name: &str, data: &[u8]) -> String {
    format!("{}:{}:{name}\n", hex::encode(Md5::digest(data)), data.len())
}

/// A `daily.cud`: ClamAV's database format unsigned (which clamd loads without ClamAV's
/// signature), of signature version `version`, holding the hash signatures `hdb`. A 512-byte
/// header (`ClamAV-VDB:date:version:signatures:engine level:MD5 of the rest:signature:
/// builder:time`), then a gzipped tar of the signatures and a `daily.info` that repeats the
/// header and gives each file's size and SHA-256.
fn daily_database(version: u64, hdb: &str) -> anyhow::Result<Vec<u8>> {
    let built = 1_796_428_800; // 2026-12-05 00:00 UTC
    let count = hdb.lines().count();
    let head = |md5: &str| {
        format!("ClamAV-VDB:05 Dec 2026 00-00 +0000:{version}:{count}:90:{md5}:X:stowage:{built}")
    };
    let info = format!(
        "{}\ndaily.hdb:{}:{}\n",
        head("X"),
        hdb.len(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(hdb.as_bytes()))
    );
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in [
        ("COPYING", "Stowage's test signatures\n".as_bytes()),
        ("daily.info", info.as_bytes()),
        ("daily.hdb", hdb.as_bytes()),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, data)?;
    }
    let body = archive.into_inner()?.finish()?;
    let mut database = format!("{:<512}", head(&hex::encode(Md5::digest(&body)))).into_bytes();
    anyhow::ensure!(
        database.len() == 512,
        "database header longer than 512 bytes"
    );
    database.extend_from_slice(&body);
    Ok(database)
}

/// Sends `command` on a connection of its own and returns the NUL-terminated answer.
async fn exchange(port: u16, command: &[u8]) -> anyhow::Result<String> {
    let talk = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(command).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), talk).await??;
    let end = reply
        .iter()
        .position(|&b| b == 0)
        .context("clamd's answer did not end with NUL")?;
    Ok(String::from_utf8(reply[..end].to_vec())?)
}

fn config_text(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    // No `User`: clamd then keeps the user that started it (root in containers), which owns
    // the directory. No `LocalSocket`: TCP only.
    format!(
        "Foreground yes\n\
         TCPSocket {port}\n\
         TCPAddr 127.0.0.1\n\
         DatabaseDirectory {dir}\n\
         TemporaryDirectory {dir}\n\
         PidFile {dir}/clamd.pid\n\
         LogFile {dir}/clamd.log\n\
         LogVerbose yes\n\
         LogTime yes\n\
         StreamMaxLength {max}\n\
         SelfCheck 0\n\
         MaxThreads 4\n",
        max = LocalClamd::STREAM_MAX_LENGTH
    )
}

async fn ping(port: u16) -> bool {
    exchange(port, b"zPING\0")
        .await
        .is_ok_and(|reply| reply == "PONG")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_eicar() {
        assert_eq!(EICAR.len(), 68);
        assert_eq!(
            eicar_signature(),
            "44d88612fea8a8f36de82e1278abb02f:68:Stowage-Test-EICAR\n"
        );
    }
}

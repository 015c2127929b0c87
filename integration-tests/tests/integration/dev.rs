//! `stowage dev`, the README's first command: starts its own PostgreSQL and Redis, prints the
//! address, the store and a token that works, refuses a second one on its address or its data
//! directory with the reason, and stops cleanly when its terminal hangs up.

use std::{process::Stdio, time::Duration};

use stowage_testkit::binary;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn stowage_dev_runs_everything_and_the_printed_token_works() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("stowage-dev-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let port = stowage_local::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut dev = tokio::process::Command::new(binary()?)
        .args(["dev", "--addr", &addr, "--data-dir"])
        .arg(dir.join("data"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(
        dev.stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    let mut banner = Vec::new();
    let token = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            banner.push(line.clone());
            if let Some(t) = line.trim().strip_prefix("export STOWAGE_TOKEN=") {
                return Ok::<_, anyhow::Error>(t.to_owned());
            }
        }
        anyhow::bail!("no token printed")
    })
    .await??;
    let text = banner.join("\n");
    assert!(text.contains(&format!("http://{addr}")), "{text}");
    // Not the address client commands take by default: the banner says how to point them.
    let endpoint = lines.next_line().await?.unwrap_or_default();
    assert_eq!(
        endpoint.trim(),
        format!("export STOWAGE_ENDPOINT=http://{addr}"),
        "{text}"
    );
    assert!(
        text.contains("object store: file://") && text.contains("/data/blobs"),
        "{text}"
    );

    let file = dir.join("hello.txt");
    std::fs::write(&file, b"hello from the quick start\n")?;
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(binary().expect("binary"));
        cmd.args(args)
            .args(["--addr", &addr])
            .env("STOWAGE_TOKEN", &token)
            .env("XDG_STATE_HOME", dir.join("state"));
        cmd
    };
    let up = cli(&["upload"]).arg(&file).output()?;
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let id = String::from_utf8_lossy(&up.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let back = dir.join("back.txt");
    let got = cli(&["get", &id, "-o", &back.display().to_string()]).output()?;
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        std::fs::read(dir.join("back.txt"))?,
        b"hello from the quick start\n"
    );
    let usage = cli(&["usage"]).output()?;
    let usage = String::from_utf8_lossy(&usage.stdout);
    assert!(usage.contains("27 B used of 10.0 GiB"), "{usage}");

    // A second one: on the same address it says the address is taken; on the same data
    // directory, that its PostgreSQL is already running there.
    let second = |addr: &str| {
        tokio::process::Command::new(binary().expect("binary"))
            .args(["dev", "--addr", addr, "--data-dir"])
            .arg(dir.join("data"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "off")
            .kill_on_drop(true)
            .output()
    };
    let same_addr = second(&addr).await?;
    assert!(!same_addr.status.success());
    let why = String::from_utf8_lossy(&same_addr.stderr);
    assert!(why.contains("another `stowage dev`"), "{why}");
    let same_dir = second("127.0.0.1:0").await?;
    assert!(!same_dir.status.success());
    let why = String::from_utf8_lossy(&same_dir.stderr);
    assert!(why.contains("postmaster"), "{why}");

    // The terminal closed: it drains and stops its servers as on SIGTERM.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(dev.id().unwrap_or_default())?),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait()).await??;
    assert!(status.success(), "clean exit after SIGHUP");
    // Its PostgreSQL stopped with it.
    assert!(
        !dir.join("data/postgres/postmaster.pid").exists(),
        "postgres still running"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! The CLI: `stowage upload` killed midway resumes from the server's offset on the next run.

use std::time::{Duration, Instant};

use stowage_integration_tests::{get_session, random_bytes, sha256};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, binary, token};

#[tokio::test]
async fn upload_resumes_after_the_cli_is_killed() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let dir = std::env::temp_dir().join(format!("stowage-cli-{}", uuid::Uuid::new_v4().simple()));
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let data = random_bytes(160 << 20);
    let path = dir.join("big.bin");
    std::fs::write(&path, &data)?;
    let run = || {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["upload", "--addr", &format!("http://{}", mesh.addr)])
            .arg(&path)
            .env("STOWAGE_TOKEN", &alice)
            .env("XDG_STATE_HOME", &state)
            .kill_on_drop(true);
        cmd
    };

    let mut first = run()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Wait until the server holds some of it, then kill the CLI without warning. The CLI is
    // stopped (SIGSTOP) while the offset is looked at, so that it cannot send the rest of the
    // file between that look and the kill (160 MiB take a fraction of a second here).
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.id().unwrap_or_default())?);
    let deadline = Instant::now() + Duration::from_secs(60);
    let session_id = loop {
        assert!(Instant::now() < deadline, "the first run never got going");
        let remembered = std::fs::read_dir(state.join("stowage/uploads"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_to_string(e.path()).ok());
        if let Some(id) = remembered {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
            if get_session(mesh.channel(), &alice, id.trim())
                .await
                .is_ok_and(|s| s.offset > 0)
            {
                break id.trim().to_owned();
            }
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.start_kill()?;
    first.wait().await?;
    let offset = get_session(mesh.channel(), &alice, &session_id)
        .await?
        .offset;
    assert!(
        offset > 0 && offset < data.len() as u64,
        "killed midway, at {offset}"
    );

    let second = run().output().await?;
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("resuming"),
        "the second run resumed: {stderr}"
    );
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(listed.files.len(), 1, "one file, not two");
    assert_eq!(listed.files[0].sha256, sha256(&data));
    assert!(
        std::fs::read_dir(state.join("stowage/uploads"))?
            .next()
            .is_none(),
        "state forgotten once done"
    );
    let _ = std::fs::remove_dir_all(&dir);
    mesh.stop().await
}

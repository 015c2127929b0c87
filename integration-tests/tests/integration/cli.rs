//! The CLI: `stowage upload` killed midway resumes from the server's offset on the next run.

use std::time::{Duration, Instant};

use stowage_integration_tests::{download, get_session, random_bytes, sha256, upload, usage};
use stowage_proto::v1 as pb;
use stowage_ratelimit::Rule;
use stowage_testkit::{Mesh, Setup, authed, binary, token};

/// Runs `cmd` (a `stowage upload`) until the server holds some of the file, then kills it
/// without warning; returns the session it remembered under `state`. The CLI is stopped
/// (SIGSTOP) while the offset is looked at, so that it cannot send the rest of the file between
/// that look and the kill (160 MiB take a fraction of a second here).
async fn kill_midway(
    mut cmd: tokio::process::Command,
    state: &std::path::Path,
    mesh: &Mesh,
    alice: &str,
) -> anyhow::Result<String> {
    let mut first = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.id().unwrap_or_default())?);
    let deadline = Instant::now() + Duration::from_secs(60);
    let session_id = loop {
        anyhow::ensure!(Instant::now() < deadline, "the first run never got going");
        let remembered = std::fs::read_dir(state.join("stowage/uploads"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_to_string(e.path()).ok());
        if let Some(id) = remembered {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
            if get_session(mesh.channel(), alice, id.trim())
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
    Ok(session_id)
}

/// `stowage upload path` against `mesh` as the holder of `token`, its resume state under
/// `state`.
fn upload_command(
    mesh: &Mesh,
    path: &std::path::Path,
    state: &std::path::Path,
    token: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary().expect("binary"));
    cmd.args(["upload", "--addr", &format!("http://{}", mesh.addr)])
        .arg(path)
        .env("STOWAGE_TOKEN", token)
        .env("XDG_STATE_HOME", state)
        .kill_on_drop(true);
    cmd
}

/// A throwaway directory with a state directory and a file of `size` random bytes.
fn workspace(size: usize) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, Vec<u8>)> {
    let dir = std::env::temp_dir().join(format!("stowage-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("state"))?;
    let data = random_bytes(size);
    std::fs::write(dir.join("big.bin"), &data)?;
    Ok((dir.clone(), dir.join("big.bin"), data))
}

#[tokio::test]
async fn upload_resumes_after_the_cli_is_killed() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let (dir, path, data) = workspace(160 << 20)?;
    let state = dir.join("state");
    let run = || upload_command(&mesh, &path, &state, &alice);

    let session_id = kill_midway(run(), &state, &mesh, &alice).await?;
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
    let (_, stored) = download(mesh.channel(), &alice, &listed.files[0].id, None).await?;
    assert!(stored == data, "the stored bytes are not the file's");
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (data.len() as u64, 0),
        "charged once, nothing held"
    );
    assert!(
        std::fs::read_dir(state.join("stowage/uploads"))?
            .next()
            .is_none(),
        "state forgotten once done"
    );
    let _ = std::fs::remove_dir_all(&dir);
    mesh.stop().await
}

/// Resume state is kept per server and user: the same file sent by another user is another
/// upload that leaves the first one's session in place; and a state file cut short (a crash
/// while it was written) starts a new upload instead of failing every run.
#[tokio::test]
async fn resume_state_is_per_user_and_a_broken_one_starts_afresh() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (alice, bob) = (token("alice", &[]), token("bob", &[]));
    let (dir, path, data) = workspace(160 << 20)?;
    let state = dir.join("state");
    let session_id = kill_midway(
        upload_command(&mesh, &path, &state, &alice),
        &state,
        &mesh,
        &alice,
    )
    .await?;

    let by_bob = upload_command(&mesh, &path, &state, &bob).output().await?;
    assert!(by_bob.status.success(), "{by_bob:?}");
    assert!(
        !String::from_utf8_lossy(&by_bob.stderr).contains("resuming"),
        "{by_bob:?}"
    );
    let remembered: Vec<String> = std::fs::read_dir(state.join("stowage/uploads"))?
        .map(|e| std::fs::read_to_string(e?.path()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(
        remembered,
        std::slice::from_ref(&session_id),
        "alice's session still remembered"
    );

    for entry in std::fs::read_dir(state.join("stowage/uploads"))? {
        std::fs::write(entry?.path(), "")?;
    }
    let again = upload_command(&mesh, &path, &state, &alice)
        .output()
        .await?;
    assert!(again.status.success(), "{again:?}");
    for who in [&alice, &bob] {
        let listed = stowage_integration_tests::files(mesh.channel())
            .list_files(authed(pb::ListFilesRequest::default(), who))
            .await?
            .into_inner();
        assert_eq!(listed.files.len(), 1);
        assert_eq!(listed.files[0].sha256, sha256(&data));
    }
    let _ = std::fs::remove_dir_all(&dir);
    mesh.stop().await
}

/// `stowage upload` of several files that fails part-way (here the second is over the
/// user's quota), run again, does not store the files the first run finished a second time;
/// once it succeeded, its record is gone.
#[tokio::test]
async fn several_files_run_again_after_a_failure_are_each_stored_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let limit = |bytes: u64| {
        let mut quota = stowage_integration_tests::quota(mesh.channel());
        let admin = admin.clone();
        async move {
            quota
                .set_limit(authed(
                    pb::SetLimitRequest {
                        user_id: "alice".into(),
                        limit_bytes: bytes,
                    },
                    &admin,
                ))
                .await
        }
    };
    limit(150_000).await?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let sizes = [("a.bin", 100_000), ("b.bin", 100_000), ("c.bin", 10_000)];
    for (name, size) in sizes {
        std::fs::write(dir.path().join(name), random_bytes(size))?;
    }
    let run = || {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["upload", "--addr", &format!("http://{}", mesh.addr)])
            .args(sizes.map(|(name, _)| dir.path().join(name)))
            .env("STOWAGE_TOKEN", &alice)
            .env("XDG_STATE_HOME", &state)
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let first = run().await?;
    assert!(!first.status.success(), "{first:?}");
    let printed = String::from_utf8(first.stdout)?;
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.contains("a.bin"), "{printed}");

    limit(1_000_000).await?;
    let second = run().await?;
    assert!(second.status.success(), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("a.bin was uploaded already"),
        "{second:?}"
    );
    let lines: Vec<String> = String::from_utf8(second.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0],
        printed.trim_end(),
        "the first file as the first run printed it"
    );
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    let mut names: Vec<&str> = listed
        .files
        .iter()
        .map(|f| f.display_name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a.bin", "b.bin", "c.bin"]);
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 210_000);
    assert_eq!(
        std::fs::read_dir(state.join("stowage/runs"))?.count(),
        0,
        "the run's record goes once it succeeded"
    );

    // A file the failed run finished and the user deleted since is uploaded again.
    limit(400_000).await?;
    std::fs::write(dir.path().join("d.bin"), random_bytes(1_000))?;
    std::fs::write(dir.path().join("e.bin"), random_bytes(300_000))?;
    let again = || {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["upload", "--addr", &format!("http://{}", mesh.addr)])
            .args(["d.bin", "e.bin"].map(|name| dir.path().join(name)))
            .env("STOWAGE_TOKEN", &alice)
            .env("XDG_STATE_HOME", &state)
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let failed = again().await?;
    assert!(!failed.status.success(), "{failed:?}");
    let first_d = String::from_utf8(failed.stdout)?;
    let first_d = first_d
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    stowage_integration_tests::files(mesh.channel())
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: first_d.clone(),
            },
            &alice,
        ))
        .await?;
    limit(1_000_000).await?;
    let done = again().await?;
    assert!(done.status.success(), "{done:?}");
    let printed = String::from_utf8(done.stdout)?;
    assert_eq!(printed.lines().count(), 2, "{printed}");
    assert!(!printed.contains(&first_d), "d.bin stored anew: {printed}");
    mesh.stop().await
}

/// A file changed between an interrupted run and the next (same size, same modification
/// time, so the next run takes it for the same file) is not stored spliced: the run fails
/// saying so, keeps nothing, and the one after uploads the new contents. And a session the
/// server completed while the CLI was gone (a lost reply) gives its one file, not a second.
#[tokio::test]
async fn a_file_changed_under_a_resumed_upload_is_refused_whole() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let (dir, path, data) = workspace(160 << 20)?;
    let state = dir.join("state");
    let run = || upload_command(&mesh, &path, &state, &alice);
    kill_midway(run(), &state, &mesh, &alice).await?;
    let modified = std::fs::metadata(&path)?.modified()?;
    let mut changed = data.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    std::fs::write(&path, &changed)?;
    std::fs::File::options()
        .write(true)
        .open(&path)?
        .set_modified(modified)?;
    let refused = run().output().await?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("changed while it was being uploaded"),
        "{stderr}"
    );
    let files = || stowage_integration_tests::listed_files(mesh.channel(), &alice);
    assert!(files().await?.is_empty(), "nothing spliced was kept");
    let account = stowage_integration_tests::usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));

    // Anew, interrupted again; meanwhile the server is told to finish the session (as if the
    // CLI's own Complete had gone through and its reply been lost).
    let id = kill_midway(run(), &state, &mesh, &alice).await?;
    let mut offset = get_session(mesh.channel(), &alice, &id).await?.offset as usize;
    let mut patience = 50;
    while offset < changed.len() {
        let piece = &changed[offset..(offset + (4 << 20)).min(changed.len())];
        match stowage_integration_tests::put_chunk(
            mesh.channel(),
            &alice,
            &id,
            offset as u64,
            piece,
        )
        .await
        {
            Ok(session) => offset = session.offset as usize,
            // The killed CLI's stream holds the session until the server sees its connection
            // gone (ABORTED), and a chunk it had in flight may be recorded after the offset
            // was read (FAILED_PRECONDITION): as a client does, read the offset again and go
            // on from there.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Aborted | tonic::Code::FailedPrecondition
                ) && patience > 0 =>
            {
                patience -= 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                offset = get_session(mesh.channel(), &alice, &id).await?.offset as usize;
            }
            Err(status) => return Err(status.into()),
        }
    }
    let finished = stowage_integration_tests::complete(mesh.channel(), &alice, &id).await?;
    let again = run().output().await?;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let listed = files().await?;
    assert_eq!(listed.len(), 1, "one file, not two");
    assert_eq!(
        (listed[0].id.as_str(), listed[0].sha256.as_str()),
        (finished.id.as_str(), sha256(&changed).as_str())
    );
    let _ = std::fs::remove_dir_all(&dir);
    mesh.stop().await
}

/// StorageStats lists the largest files with the totals: a user's own (her trash included), or,
/// for an admin, everyone's with their owners; `stowage stats` prints the same.
#[tokio::test]
async fn storage_stats_list_the_largest_files_of_one_user_or_of_everyone() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (alice, bob, root) = (
        token("alice", &[]),
        token("bob", &[]),
        token("root", &["admin"]),
    );
    let mut sizes = std::collections::HashMap::new();
    for (owner, name, size) in [
        (&alice, "small.bin", 10),
        (&alice, "big.bin", 3000),
        (&alice, "mid.bin", 200),
        (&bob, "huge.bin", 5000),
        (&bob, "tiny.bin", 50),
    ] {
        let file = upload(mesh.channel(), owner, name, &random_bytes(size), &[]).await?;
        sizes.insert(name, file.id);
    }
    let files = stowage_integration_tests::files(mesh.channel());
    files
        .clone()
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: sizes["mid.bin"].clone(),
            },
            &alice,
        ))
        .await?;
    let stats = |all_users: bool, largest: u32, who: &str| {
        let (mut files, request) = (
            files.clone(),
            authed(pb::StorageStatsRequest { all_users, largest }, who),
        );
        async move { files.storage_stats(request).await.map(|r| r.into_inner()) }
    };
    let names = |stats: &pb::StorageStatsResponse| -> Vec<(String, String)> {
        stats
            .largest_files
            .iter()
            .map(|f| (f.owner_id.clone(), f.display_name.clone()))
            .collect()
    };
    let pair = |owner: &str, name: &str| (owner.to_owned(), name.to_owned());

    let hers = stats(false, 2, &alice).await?;
    assert_eq!(
        (hers.file_count, hers.total_bytes, hers.trashed_count),
        (3, 3210, 1)
    );
    assert_eq!(
        names(&hers),
        [pair("alice", "big.bin"), pair("alice", "mid.bin")],
        "hers only, trash included"
    );
    assert!(stats(false, 0, &alice).await?.largest_files.is_empty());

    let everyone = stats(true, 3, &root).await?;
    assert_eq!((everyone.file_count, everyone.total_bytes), (5, 8260));
    assert_eq!(
        names(&everyone),
        [
            pair("bob", "huge.bin"),
            pair("alice", "big.bin"),
            pair("alice", "mid.bin")
        ]
    );
    let refused = stats(true, 101, &root).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("largest"),
        "{}",
        refused.message()
    );
    assert_eq!(
        stats(true, 1, &bob).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    let output = tokio::process::Command::new(binary().expect("binary"))
        .args(["stats", "--all", "--largest", "2", "--addr"])
        .arg(format!("http://{}", mesh.addr))
        .env("STOWAGE_TOKEN", &root)
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Vec<&str> = printed
        .lines()
        .skip_while(|l| *l != "largest files:")
        .skip(1)
        .collect();
    assert_eq!(listed.len(), 2, "{printed}");
    assert!(listed[0].starts_with(&sizes["huge.bin"]), "{printed}");
    assert!(listed[0].ends_with("bob  huge.bin"), "{printed}");
    assert!(listed[1].ends_with("alice  big.bin"), "{printed}");
    assert!(printed.starts_with("5 files"), "{printed}");
    mesh.stop().await
}

/// `stowage get` writes the file under its name in the current directory, byte-exact; a file
/// of that name is not replaced without `--force`, while `-o PATH` names the target outright.
/// Nothing but the file is left in the directory.
#[tokio::test]
async fn get_writes_the_file_and_replaces_one_only_when_told() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(300_000);
    let file = upload(mesh.channel(), &alice, "report.pdf", &data, &[]).await?;
    let dir = tempfile::tempdir()?;
    // tokio's Command: the mesh answers on this test's own runtime meanwhile.
    let get = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["get", &file.id, "--addr", &format!("http://{}", mesh.addr)])
            .args(args)
            .env("STOWAGE_TOKEN", &alice)
            .current_dir(dir.path())
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let first = get(&[]).await?;
    assert!(first.status.success(), "{first:?}");
    let target = dir.path().join("report.pdf");
    assert_eq!(sha256(&std::fs::read(&target)?), sha256(&data));

    std::fs::write(&target, b"mine")?;
    let refused = get(&[]).await?;
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{refused:?}"
    );
    assert_eq!(std::fs::read(&target)?, b"mine", "left as it was");

    let forced = get(&["--force"]).await?;
    assert!(forced.status.success(), "{forced:?}");
    assert_eq!(sha256(&std::fs::read(&target)?), sha256(&data));
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    // A private file replaced stays private.
    std::fs::write(dir.path().join("named.bin"), b"old")?;
    std::fs::set_permissions(
        dir.path().join("named.bin"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let named = get(&["-o", "named.bin"]).await?;
    assert!(named.status.success(), "{named:?}");
    assert_eq!(std::fs::read(dir.path().join("named.bin"))?, data);
    assert_eq!(
        std::fs::metadata(dir.path().join("named.bin"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Made with the mode any new file gets here (the umask's), not a temporary file's 0600.
    let reference = dir.path().join("reference");
    std::fs::File::create(&reference)?;
    let mode = |p: &std::path::Path| -> std::io::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&target)?, mode(&reference)?);
    std::fs::remove_file(&reference)?;
    // Through a link, the file it names gets the bytes and the link stays; a device is
    // written to, not replaced.
    std::os::unix::fs::symlink("named.bin", dir.path().join("link.bin"))?;
    std::fs::write(dir.path().join("named.bin"), b"old")?;
    let linked = get(&["-o", "link.bin"]).await?;
    assert!(linked.status.success(), "{linked:?}");
    assert!(std::fs::symlink_metadata(dir.path().join("link.bin"))?.is_symlink());
    assert_eq!(std::fs::read(dir.path().join("named.bin"))?, data);
    let discarded = get(&["-o", "/dev/null"]).await?;
    assert!(discarded.status.success(), "{discarded:?}");
    assert!(std::fs::metadata("/dev/null")?.file_type().is_char_device());
    let mut left: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    left.sort();
    assert_eq!(
        left,
        ["link.bin", "named.bin", "report.pdf"],
        "no partial files"
    );
    mesh.stop().await
}

/// `stowage get` stopped by Ctrl-C (SIGINT) midway leaves nothing behind: no partial file
/// (a hidden one beside the target stayed), no target; it exits as a shell reports SIGINT.
#[tokio::test]
async fn get_interrupted_leaves_no_partial_file() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(48 << 20);
    let file = upload(mesh.channel(), &alice, "film.mkv", &data, &[]).await?;
    let dir = tempfile::tempdir()?;
    let get = tokio::process::Command::new(binary()?)
        .args(["get", &file.id, "--addr", &format!("http://{}", mesh.addr)])
        .env("STOWAGE_TOKEN", &alice)
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(get.id().unwrap_or_default())?);
    let names = || -> std::io::Result<Vec<String>> {
        std::fs::read_dir(dir.path())?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Stopped as soon as its partial file is there, so that it cannot finish meanwhile.
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the download never began");
        if names()?.iter().any(|n| n.starts_with(".stowage-get-")) {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let partial = std::fs::metadata(
        dir.path().join(
            names()?
                .into_iter()
                .find(|n| n.starts_with(".stowage-get-"))
                .expect("partial"),
        ),
    )?;
    assert!(partial.len() < data.len() as u64, "stopped midway");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    let out = tokio::time::timeout(Duration::from_secs(30), get.wait_with_output()).await??;
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert_eq!(names()?, Vec::<String>::new(), "nothing left");
    mesh.stop().await
}

/// `stowage get -o FILE` of a file the user may write in a directory they may not (so no
/// temporary file beside it): a download that fails leaves the file as it was, one that
/// succeeds replaces its bytes and keeps its owner and mode. Run as `nobody` when the test
/// runs as root (root writes anywhere).
#[tokio::test]
async fn get_into_a_file_of_a_directory_not_ours_keeps_it_whole() -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(3 << 20);
    let file = upload(mesh.channel(), &alice, "report.bin", &data, &[]).await?;
    let root = nix::unistd::geteuid().is_root();
    let nobody = nix::unistd::Uid::from_raw(65534);
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked)?;
    let target = locked.join("kept.bin");
    std::fs::write(&target, b"old")?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o664))?;
    if root {
        nix::unistd::chown(&target, Some(nobody), None)?;
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555))?;
    let get = || {
        let mut cmd = if root {
            let mut cmd = tokio::process::Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(binary().expect("binary"));
            cmd
        } else {
            tokio::process::Command::new(binary().expect("binary"))
        };
        cmd.args([
            "get",
            &file.id,
            "--addr",
            &format!("http://{}", mesh.addr),
            "-o",
        ])
        .arg(&target)
        .env("STOWAGE_TOKEN", &alice)
        .current_dir(dir.path())
        .kill_on_drop(true);
        async move { cmd.output().await }
    };
    // The stored bytes changed behind Files' back: the download fails its checksum.
    let blob = setup
        .blob_dir
        .as_ref()
        .expect("a local store")
        .path()
        .join(stowage_integration_tests::storage_key(mesh.channel(), &file.id).await?);
    std::fs::write(&blob, random_bytes(data.len()))?;
    let failed = get().await?;
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("checksum mismatch"),
        "{failed:?}"
    );
    assert_eq!(std::fs::read(&target)?, b"old", "left as it was");

    std::fs::write(&blob, &data)?;
    let done = get().await?;
    assert!(done.status.success(), "{done:?}");
    assert!(std::fs::read(&target)? == data, "replaced byte for byte");
    let meta = std::fs::metadata(&target)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o664);
    if root {
        assert_eq!(meta.uid(), nobody.as_raw());
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755))?;
    mesh.stop().await
}

/// `stowage ls --trash` lists all of the trash, past its first page; with a filter it says
/// that trash is listed whole.
#[tokio::test]
async fn ls_trash_lists_every_page() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // 205 uploads as fast as they go: past the default per-user burst (100, then 50/s) on a
    // quick machine, which answered the last ones RESOURCE_EXHAUSTED.
    let mesh = Mesh::start_with(&setup, |c| {
        c.rate_limit.user.upload = Rule::new(10_000.0, 10_000);
    })
    .await?;
    let alice = token("alice", &[]);
    let mut trashed = Vec::new();
    for i in 0..205 {
        let file = upload(mesh.channel(), &alice, &format!("f{i}.txt"), b"x", &[]).await?;
        stowage_integration_tests::trash(mesh.channel(), &alice, &file.id).await?;
        trashed.push(file.id);
    }
    let ls = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["ls", "--addr", &format!("http://{}", mesh.addr)])
            .args(args)
            .env("STOWAGE_TOKEN", &alice)
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let listed = ls(&["--trash"]).await?;
    assert!(listed.status.success(), "{listed:?}");
    let mut ids: Vec<String> = String::from_utf8(listed.stdout)?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    ids.sort();
    trashed.sort();
    assert_eq!(ids, trashed);
    let filtered = ls(&["--trash", "--kind", "image"]).await?;
    assert!(!filtered.status.success(), "{filtered:?}");
    assert!(
        String::from_utf8_lossy(&filtered.stderr).contains("--trash lists all"),
        "{filtered:?}"
    );
    mesh.stop().await
}

/// `stowage cleanup` runs Lifecycle's clean-up jobs now for an admin: a dry run reports what
/// it would remove and removes nothing; a run removes it; a user without the scope is refused.
#[tokio::test]
async fn cleanup_runs_the_clean_up_jobs_now() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let file = upload(mesh.channel(), &alice, "old.bin", &random_bytes(500), &[]).await?;
    stowage_integration_tests::trash(mesh.channel(), &alice, &file.id).await?;
    // In trash for longer than the retention (30 days).
    stowage_db::connect(&setup.database_url, 1)?
        .get()
        .await?
        .execute(
            "UPDATE files.files SET deleted_at = now() - interval '31 days' WHERE id = $1::text::uuid",
            &[&file.id],
        )
        .await?;
    let cleanup = |who: &str, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["cleanup", "--addr", &format!("http://{}", mesh.addr)])
            .args(args)
            .env("STOWAGE_TOKEN", who)
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let trash_left = || async {
        let trash = stowage_integration_tests::files(mesh.channel())
            .list_trash(authed(pb::ListTrashRequest::default(), &alice))
            .await?
            .into_inner();
        anyhow::Ok(trash.files.len())
    };
    let root = token("root", &["admin"]);
    let dry = cleanup(&root, &["trash_purge", "--dry-run"]).await?;
    assert!(dry.status.success(), "{dry:?}");
    let said = String::from_utf8(dry.stdout)?;
    assert!(
        said.starts_with("trash_purge: looked at 1, 1 to act on, 0 failed"),
        "{said}"
    );
    assert!(said.contains(&file.id), "{said}");
    assert_eq!(trash_left().await?, 1);

    let denied = cleanup(&alice, &[]).await?;
    assert!(!denied.status.success(), "{denied:?}");
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("admin"),
        "{denied:?}"
    );

    let run = cleanup(&root, &[]).await?;
    assert!(run.status.success(), "{run:?}");
    let said = String::from_utf8(run.stdout)?;
    let jobs: Vec<&str> = said
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(
        jobs,
        [
            "orphan_uploads",
            "staging_cleanup",
            "reservations_expire",
            "trash_purge",
            "blob_gc",
            "ephemeral_cleanup"
        ]
    );
    assert!(
        said.contains("trash_purge: looked at 1, 1 acted on, 0 failed"),
        "{said}"
    );
    assert_eq!(trash_left().await?, 0);
    assert_eq!(
        stowage_integration_tests::usage(mesh.channel(), &alice)
            .await?
            .used_bytes,
        0
    );
    mesh.stop().await
}

/// `stowage token` signs with the secret of the configuration file the services read (not
/// only the environment's or the dev one): its token is accepted by a mesh of that secret.
#[tokio::test]
async fn token_signs_with_the_configured_secret() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nhs256_secret = \"{}\"\n",
            stowage_testkit::TEST_SECRET
        ),
    )?;
    let minted = tokio::process::Command::new(binary()?)
        .arg("--config")
        .arg(&config)
        .args(["token", "--user", "carol", "--data-dir"])
        .arg(dir.path().join("no-dev-data"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await?;
    assert!(minted.status.success(), "{minted:?}");
    let carol = String::from_utf8(minted.stdout)?.trim().to_owned();
    let usage = stowage_integration_tests::usage(mesh.channel(), &carol).await?;
    assert_eq!(usage.used_bytes, 0);
    mesh.stop().await
}

/// A TLS front (as an ingress is) before `backend`, with a certificate for `localhost` signed
/// by a CA made here; returns its port and the CA's PEM.
async fn tls_front(backend: std::net::SocketAddr) -> anyhow::Result<(u16, String)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes())?],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            });
        }
    });
    Ok((port, ca.pem()))
}

/// The CLI reaches Stowage through a TLS front (`https://`), checking its certificate against
/// the system's roots or `SSL_CERT_FILE`: a front whose certificate chains to no root it
/// trusts is refused, saying so.
#[tokio::test]
async fn the_cli_speaks_tls_to_a_front_it_trusts_only() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let file = upload(mesh.channel(), &alice, "report.pdf", b"%PDF-1.4 words", &[]).await?;
    let (port, ca) = tls_front(mesh.addr).await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("ca.pem"), ca)?;
    let ls = |roots: &str| {
        let mut cmd = tokio::process::Command::new(binary().expect("binary"));
        cmd.args(["ls", "--addr", &format!("https://localhost:{port}")])
            .env("STOWAGE_TOKEN", &alice)
            .env("SSL_CERT_FILE", dir.path().join(roots))
            .kill_on_drop(true);
        async move { cmd.output().await }
    };
    let listed = ls("ca.pem").await?;
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&file.id),
        "{listed:?}"
    );
    // Roots without the front's CA: another CA's.
    std::fs::write(dir.path().join("other.pem"), tls_front(mesh.addr).await?.1)?;
    let refused = ls("other.pem").await?;
    assert!(!refused.status.success(), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("certificate"), "{said}");
    mesh.stop().await
}

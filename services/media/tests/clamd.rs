//! The clamd client against a real clamd (the test kit's, whose only signature is EICAR).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use rand::RngCore;
use stowage_media::clamd::{Clamd, ScanError, Verdict};
use stowage_testkit::{EICAR, EICAR_SIGNATURE, LocalClamd};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Generous: a loaded 2-core CI machine scans 64 MiB slowly.
const TIMEOUT: Duration = Duration::from_secs(30);

async fn clamd() -> LocalClamd {
    let started = Instant::now();
    let clamd = LocalClamd::start().await.expect("clamd starts");
    eprintln!("clamd answered PING {:?} after spawn", started.elapsed());
    clamd
}

fn client(clamd: &LocalClamd, timeout: Duration) -> Clamd {
    Clamd::new(&clamd.url(), timeout).expect("the test kit's url is valid")
}

fn infected_with_eicar(verdict: &Verdict) -> bool {
    // clamd appends `.UNOFFICIAL` to signatures outside ClamAV's own databases.
    *verdict == Verdict::Infected(format!("{EICAR_SIGNATURE}.UNOFFICIAL"))
}

#[tokio::test]
async fn eicar_is_infected() {
    let clamd = clamd().await;
    let scanner = client(&clamd, TIMEOUT);
    scanner.ping().await.expect("PONG");
    let verdict = scanner
        .scan(EICAR, EICAR.len() as u64)
        .await
        .expect("a verdict");
    assert!(infected_with_eicar(&verdict), "{verdict:?}");
}

#[tokio::test]
async fn random_bytes_are_clean() {
    let clamd = clamd().await;
    let mut bytes = vec![0u8; 5 * 1024 * 1024];
    rand::rng().fill_bytes(&mut bytes);
    let verdict = client(&clamd, TIMEOUT)
        .scan(bytes.as_slice(), bytes.len() as u64)
        .await
        .expect("a verdict");
    assert_eq!(verdict, Verdict::Clean);
}

/// clamd answers `INSTREAM size limit exceeded. ERROR` and hangs up. One byte over, the
/// client has sent everything when it reads that answer; far over, clamd hangs up while the
/// client is still sending, and the client reads the answer after its broken pipe.
#[tokio::test]
async fn a_stream_past_the_limit_is_refused() {
    let clamd = clamd().await;
    let scanner = client(&clamd, TIMEOUT);
    let max = LocalClamd::STREAM_MAX_LENGTH;
    for len in [max + 1, max * 2] {
        let result = scanner.scan(tokio::io::repeat(0).take(len), len).await;
        assert!(
            matches!(&result, Err(ScanError::Refused(m)) if m.contains("size limit exceeded")),
            "{len} bytes: {result:?}\n{}",
            clamd.log()
        );
    }
    // The refusals concerned those inputs only.
    let verdict = scanner
        .scan(EICAR, EICAR.len() as u64)
        .await
        .expect("a verdict");
    assert!(infected_with_eicar(&verdict), "{verdict:?}");
}

/// Exactly `StreamMaxLength` bytes are accepted: the limit is inclusive.
#[tokio::test]
async fn a_stream_at_the_limit_is_scanned() {
    let clamd = clamd().await;
    let at_limit = tokio::io::repeat(0).take(LocalClamd::STREAM_MAX_LENGTH);
    let verdict = client(&clamd, TIMEOUT)
        .scan(at_limit, LocalClamd::STREAM_MAX_LENGTH)
        .await
        .expect("a verdict");
    assert_eq!(verdict, Verdict::Clean);
}

#[tokio::test]
async fn a_stopped_scanner_is_unavailable_and_a_restarted_one_scans_again() {
    let clamd = clamd().await;
    let port = clamd.port();
    let timeout = Duration::from_secs(2);
    let scanner = client(&clamd, timeout);
    assert!(infected_with_eicar(
        &scanner
            .scan(EICAR, EICAR.len() as u64)
            .await
            .expect("a verdict")
    ));

    clamd.stop().await.expect("clamd stops");
    let started = Instant::now();
    let result = scanner.scan(EICAR, EICAR.len() as u64).await;
    assert!(
        matches!(result, Err(ScanError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() <= timeout + Duration::from_secs(1));
    assert!(matches!(
        scanner.ping().await,
        Err(ScanError::Unavailable(_))
    ));

    let clamd = LocalClamd::start_on(port).await.expect("clamd restarts");
    let verdict = scanner
        .scan(EICAR, EICAR.len() as u64)
        .await
        .expect("a verdict after restart");
    assert!(infected_with_eicar(&verdict), "{verdict:?}");
    clamd.stop().await.expect("clamd stops");
}

/// A scanner that accepts the connection and then says nothing must not hold the scan past
/// the timeout.
#[tokio::test]
async fn a_silent_scanner_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let timeout = Duration::from_millis(500);
    let scanner = Clamd::new(&format!("tcp://{addr}"), timeout).expect("valid url");
    let started = Instant::now();
    let result = scanner.scan(EICAR, EICAR.len() as u64).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(ScanError::Unavailable(_))),
        "{result:?}"
    );
    assert!(elapsed >= timeout, "gave up early: {elapsed:?}");
    assert!(elapsed < timeout * 4, "gave up late: {elapsed:?}");
    holder.abort();
}

/// An input that fails half way is the input's fault, not the scanner's, and no verdict.
#[tokio::test]
async fn a_failing_input_is_an_input_error() {
    struct Broken;
    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::Error::other("object store went away")))
        }
    }
    let clamd = clamd().await;
    let input = tokio::io::repeat(0).take(1024 * 1024).chain(Broken);
    let result = client(&clamd, TIMEOUT).scan(input, 1024 * 1024).await;
    assert!(matches!(result, Err(ScanError::Input(_))), "{result:?}");
}

/// The Unix-socket transport, against a stand-in that answers PING like clamd does (the test
/// kit's clamd listens on TCP only).
#[tokio::test]
async fn ping_over_a_unix_socket() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clamd.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut command = [0u8; 6];
        conn.read_exact(&mut command).await.expect("command");
        assert_eq!(&command, b"zPING\0");
        conn.write_all(b"PONG\0").await.expect("answer");
    });
    let scanner = Clamd::new(&format!("unix://{}", path.display()), TIMEOUT).expect("valid url");
    scanner.ping().await.expect("PONG over the unix socket");
    server.await.expect("stand-in done");
}

/// A scan that cannot finish in what is left of its job's time while it moves (here 6.5 MB/s
/// of a 10 GB file) is refused for good, not reported as a scanner to try again; one that
/// stalls (nothing read), or has less left than the scanner's own timeout, stays a retry.
#[tokio::test]
async fn a_scan_past_the_jobs_time_is_refused_not_retried() {
    struct Stalled;
    impl AsyncRead for Stalled {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }
    let clamd = clamd().await;
    let timeout = Duration::from_millis(500);
    let scanner = client(&clamd, timeout);
    // 10 GB: 500 s allowed by size, 2 s left of the job. 64 KiB every 10 ms.
    let size = 10_000_000_000;
    let (mut writer, slow) = tokio::io::duplex(1 << 20);
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let piece = vec![0u8; 64 * 1024];
        while writer.write_all(&piece).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let started = Instant::now();
    let result = scanner
        .scan_within(slow, size, Duration::from_secs(2))
        .await;
    assert!(
        matches!(&result, Err(ScanError::Refused(m)) if m.contains("job's time limit")),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded by what was left"
    );
    feeder.abort();
    // Stalled from the start: the scanner or the store, not the file's size.
    let result = scanner
        .scan_within(Stalled, size, Duration::from_secs(1))
        .await;
    assert!(
        matches!(result, Err(ScanError::Unavailable(_))),
        "{result:?}"
    );
    // Less left than the scanner's own timeout: a setting, not the file; tried again.
    let result = scanner
        .scan_within(
            tokio::io::repeat(0).take(1024).chain(Stalled),
            1024,
            Duration::from_millis(100),
        )
        .await;
    assert!(
        matches!(result, Err(ScanError::Unavailable(_))),
        "{result:?}"
    );
}

//! A client of ClamAV's daemon, `clamd`: `zPING`, `zVERSION` and `zINSTREAM` over TCP or a
//! Unix socket.
//!
//! The protocol (clamd(8)): a command is `z` + name + NUL, and clamd answers with one
//! NUL-terminated line. `INSTREAM` is followed by chunks framed as a 4-byte big-endian length
//! and the bytes, then a zero length; the answer is `stream: OK`, `stream: <signature> FOUND`
//! or `<message> ERROR`. Past the server's `StreamMaxLength` clamd answers
//! `INSTREAM size limit exceeded. ERROR` and closes the connection while we may still be
//! writing, so a failed write is followed by an attempt to read that answer.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest chunk we send: clamd reads chunks into a buffer of its own, and 64 KiB keeps the
/// number of frames low without holding much memory per scan.
const CHUNK: usize = 64 * 1024;

/// Longest answer we accept; clamd's are one short line, so anything longer is not clamd.
const MAX_REPLY: usize = 4 * 1024;

/// A clamd daemon reached over TCP (`tcp://host:port`) or a Unix socket (`unix:///path`).
#[derive(Clone, Debug)]
pub struct Clamd {
    endpoint: Endpoint,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// What clamd found in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No signature matched.
    Clean,
    /// A signature matched; its name as clamd reports it (e.g. `Eicar-Signature`, or
    /// `Name.UNOFFICIAL` for signatures outside the official databases).
    Infected(String),
}

/// Why a scan gave no verdict.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Scanner unreachable, timed out, or answered nonsense: retry later; never treat as clean.
    #[error("scanner unavailable: {0}")]
    Unavailable(String),
    /// Scanner refused this input for good (e.g. "INSTREAM size limit exceeded").
    #[error("scanner refused the input: {0}")]
    Refused(String),
    /// The input itself could not be read (the scanner was not at fault).
    #[error("reading the input to scan failed: {0}")]
    Input(#[source] std::io::Error),
}

/// A clamd address that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid clamd url {url:?}: {reason} (expected tcp://host:port or unix:///path)")]
pub struct InvalidClamdUrl {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Clamd {
    /// A client of the daemon at `url`; every call (connect, send, answer) is bounded by
    /// `timeout` as a whole. Nothing is connected until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, InvalidClamdUrl> {
        let invalid = |reason| InvalidClamdUrl {
            url: url.to_owned(),
            reason,
        };
        let endpoint = if let Some(rest) = url.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
            let port: u16 = port.parse().map_err(|_| invalid("bad port"))?;
            // `[::1]` → `::1`: the brackets only delimit an IPv6 address in a URL.
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(invalid("no host"));
            }
            if port == 0 {
                return Err(invalid("port 0"));
            }
            Endpoint::Tcp {
                host: host.to_owned(),
                port,
            }
        } else if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid("the socket path must be absolute"));
            }
            Endpoint::Unix(PathBuf::from(path))
        } else {
            return Err(invalid("unknown scheme"));
        };
        Ok(Self { endpoint, timeout })
    }

    /// Checks that the daemon answers (`zPING` → `PONG`).
    pub async fn ping(&self) -> Result<(), ScanError> {
        let reply = self.command(b"zPING\0").await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(ScanError::Unavailable(format!(
                "unexpected answer to PING: {reply:?}"
            )))
        }
    }

    /// What the daemon scans with (`zVERSION`): `ClamAV 1.4.6/27480/Thu Dec  4 09:27:00 2026`
    /// with ClamAV's own databases (engine / their version / their date), the engine alone
    /// (`ClamAV 1.4.6`) with databases of one's own only. It changes when the signatures it
    /// loaded or the engine do, except with databases of one's own.
    pub async fn version(&self) -> Result<String, ScanError> {
        let reply = self.command(b"zVERSION\0").await?;
        if reply.starts_with("ClamAV ") {
            Ok(reply)
        } else {
            Err(ScanError::Unavailable(format!(
                "unexpected answer to VERSION: {reply:?}"
            )))
        }
    }

    /// Sends `command` (`z` + name + NUL) and returns the answer.
    async fn command(&self, command: &'static [u8]) -> Result<String, ScanError> {
        self.bounded(self.timeout, async {
            match &self.endpoint {
                Endpoint::Tcp { host, port } => {
                    command_on(connect_tcp(host, *port).await?, command).await
                }
                Endpoint::Unix(path) => command_on(connect_unix(path).await?, command).await,
            }
        })
        .await
    }

    /// Streams `reader` (`size` bytes) to the daemon (`zINSTREAM`) and returns its verdict.
    /// The input is sent as it is read, never held whole; reading it counts against the time
    /// allowed, which grows with the size (see [`scan_allowance`]).
    pub async fn scan<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        size: u64,
    ) -> Result<Verdict, ScanError> {
        self.scan_within(reader, size, Duration::MAX).await
    }

    /// [`Self::scan`], given at most `left` (what a job has left of its time limit) when that
    /// is shorter than the size's allowance but not than the scanner's timeout. A scan cut
    /// short by `left` is refused for good: it would be cut short again on every try (a file
    /// too large to scan in a job's time).
    pub async fn scan_within<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        size: u64,
        left: Duration,
    ) -> Result<Verdict, ScanError> {
        let allowance = scan_allowance(self.timeout, size);
        // Only the size's share of the allowance is cut: a job whose time is shorter than the
        // scanner's own timeout is a setting to mend, and its scans are not refused for it.
        let cut_by_job = left >= self.timeout && left < allowance;
        let bound = if cut_by_job { left } else { allowance };
        let sent = Arc::new(AtomicU64::new(0));
        let reader = Counted {
            inner: reader,
            read: Arc::clone(&sent),
        };
        let result = self
            .bounded(bound, async {
                // A scanner that does not take the connection is down, however large the file.
                let connecting = async {
                    match &self.endpoint {
                        Endpoint::Tcp { host, port } => {
                            connect_tcp(host, *port).await.map(Connection::Tcp)
                        }
                        Endpoint::Unix(path) => connect_unix(path).await.map(Connection::Unix),
                    }
                };
                let conn = tokio::time::timeout(self.timeout, connecting)
                    .await
                    .map_err(|_| {
                        ScanError::Unavailable(format!("no connection within {:?}", self.timeout))
                    })??;
                match conn {
                    Connection::Tcp(conn) => scan_on(conn, reader).await,
                    Connection::Unix(conn) => scan_on(conn, reader).await,
                }
            })
            .await;
        // Refused only when the scan was moving (a steady 1 MB/s at least) yet could not get
        // through the file: a stall (the scanner paused, the store stopped sending) is tried
        // again like any scanner that does not answer.
        let moving = sent.load(Ordering::Relaxed) >= bound.as_secs().saturating_mul(1_000_000);
        match result {
            Err(ScanError::Unavailable(why))
                if cut_by_job && moving && why.starts_with(NO_ANSWER) =>
            {
                Err(ScanError::Refused(format!(
                    "{size} bytes not scanned within the {left:?} left of the job's time limit"
                )))
            }
            other => other,
        }
    }

    async fn bounded<T>(
        &self,
        allowed: Duration,
        call: impl Future<Output = Result<T, ScanError>>,
    ) -> Result<T, ScanError> {
        tokio::time::timeout(allowed, call)
            .await
            .unwrap_or_else(|_| Err(ScanError::Unavailable(format!("{NO_ANSWER} {allowed:?}"))))
    }
}

/// A connection to the daemon.
enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A reader that counts what was read from it.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let added = (buf.filled().len() - before) as u64;
        self.read.fetch_add(added, Ordering::Relaxed);
        polled
    }
}

/// The version of the signatures in what [`Clamd::version`] answers
/// (`ClamAV 1.4.6/27480/...` → 27480); `None` when it names none (databases of one's own).
pub fn signature_version(version: &str) -> Option<i64> {
    version.split('/').nth(1)?.trim().parse().ok()
}

/// How a scan or ping that ran out of time is reported.
const NO_ANSWER: &str = "no answer within";

/// Slowest pace a scan is allowed, in bytes per second: a file of several GB is streamed and
/// scanned for minutes, and a fixed bound would time it out on every try.
pub const SCAN_BYTES_PER_SECOND: u64 = 20_000_000;

/// Time allowed to scan `size` bytes: `timeout`, plus one second per 20 MB.
pub fn scan_allowance(timeout: Duration, size: u64) -> Duration {
    timeout + Duration::from_secs(size / SCAN_BYTES_PER_SECOND)
}

async fn connect_tcp(host: &str, port: u16) -> Result<tokio::net::TcpStream, ScanError> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| unavailable("connect", &e))?;
    // Frames are written whole; waiting to coalesce them only adds latency.
    stream
        .set_nodelay(true)
        .map_err(|e| unavailable("connect", &e))?;
    Ok(stream)
}

async fn connect_unix(path: &std::path::Path) -> Result<tokio::net::UnixStream, ScanError> {
    tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| unavailable("connect", &e))
}

fn unavailable(what: &str, e: &std::io::Error) -> ScanError {
    ScanError::Unavailable(format!("{what}: {e}"))
}

async fn command_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    command: &[u8],
) -> Result<String, ScanError> {
    conn.write_all(command)
        .await
        .map_err(|e| unavailable("send", &e))?;
    read_reply(&mut conn).await
}

async fn scan_on<S, R>(mut conn: S, mut reader: R) -> Result<Verdict, ScanError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match send_stream(&mut conn, &mut reader).await {
        Ok(()) => {}
        Err(SendError::Input(e)) => return Err(ScanError::Input(e)),
        // clamd closes mid-stream when it refuses the input (size limit): its answer says
        // why, and is worth more than our broken pipe.
        Err(SendError::Write(e)) => {
            return match read_reply(&mut conn).await {
                Ok(reply) => parse_scan_reply(&reply),
                Err(_) => Err(unavailable("send", &e)),
            };
        }
    }
    parse_scan_reply(&read_reply(&mut conn).await?)
}

enum SendError {
    Input(std::io::Error),
    Write(std::io::Error),
}

async fn send_stream<S, R>(conn: &mut S, reader: &mut R) -> Result<(), SendError>
where
    S: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    conn.write_all(b"zINSTREAM\0")
        .await
        .map_err(SendError::Write)?;
    // One buffer holds the length prefix and the chunk so that each frame is one write.
    let mut frame = vec![0u8; 4 + CHUNK];
    loop {
        let n = reader
            .read(&mut frame[4..])
            .await
            .map_err(SendError::Input)?;
        let len = u32::try_from(n).unwrap_or_else(|_| unreachable!("a chunk is at most 64 KiB"));
        frame[..4].copy_from_slice(&len.to_be_bytes());
        conn.write_all(&frame[..4 + n])
            .await
            .map_err(SendError::Write)?;
        // The zero-length frame just written ends the stream.
        if n == 0 {
            break;
        }
    }
    conn.flush().await.map_err(SendError::Write)
}

/// Reads one NUL-terminated answer. A connection closed before the NUL is a broken answer,
/// not a short one: a cut `stream: ... FOUND` must never read as something milder.
async fn read_reply<S: AsyncRead + Unpin>(conn: &mut S) -> Result<String, ScanError> {
    let mut reply = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| unavailable("receive", &e))?;
        if n == 0 {
            return Err(ScanError::Unavailable(format!(
                "connection closed before the answer ended (got {:?})",
                String::from_utf8_lossy(&reply)
            )));
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
            reply.extend_from_slice(&buf[..end]);
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > MAX_REPLY {
            return Err(ScanError::Unavailable(format!(
                "answer longer than {MAX_REPLY} bytes"
            )));
        }
    }
    String::from_utf8(reply)
        .map(|s| s.trim().to_owned())
        .map_err(|_| ScanError::Unavailable("answer is not UTF-8".into()))
}

fn parse_scan_reply(reply: &str) -> Result<Verdict, ScanError> {
    if let Some(message) = reply.strip_suffix(" ERROR") {
        // The only refusal that retrying cannot cure; clamd's other errors (temporary
        // files, memory, a reload in progress) may pass, so they are left to the retry budget.
        return Err(if message.contains("size limit exceeded") {
            ScanError::Refused(message.trim().to_owned())
        } else {
            ScanError::Unavailable(format!("clamd error: {}", message.trim()))
        });
    }
    let Some(result) = reply.strip_prefix("stream: ") else {
        return Err(ScanError::Unavailable(format!(
            "unexpected answer to INSTREAM: {reply:?}"
        )));
    };
    if result == "OK" {
        return Ok(Verdict::Clean);
    }
    if let Some(signature) = result.strip_suffix(" FOUND") {
        let signature = strip_detection_info(signature.trim());
        if !signature.is_empty() {
            return Ok(Verdict::Infected(signature.to_owned()));
        }
    }
    Err(ScanError::Unavailable(format!(
        "unexpected answer to INSTREAM: {reply:?}"
    )))
}

/// With `ExtendedDetectionInfo yes` (Debian's default) clamd appends `(<md5>:<size>)` to the
/// signature name; the name alone is the stable part.
fn strip_detection_info(signature: &str) -> &str {
    let Some(open) = signature.rfind('(') else {
        return signature;
    };
    let Some(inner) = signature[open + 1..].strip_suffix(')') else {
        return signature;
    };
    let is_info = inner.split_once(':').is_some_and(|(hash, size)| {
        !hash.is_empty()
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
            && !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
    });
    if is_info {
        signature[..open].trim_end()
    } else {
        signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            Clamd::new("tcp://127.0.0.1:3310", t).map(|c| c.endpoint),
            Ok(Endpoint::Tcp { host, port: 3310 }) if host == "127.0.0.1"
        ));
        assert!(matches!(
            Clamd::new("tcp://[::1]:3310", t).map(|c| c.endpoint),
            Ok(Endpoint::Tcp { host, port: 3310 }) if host == "::1"
        ));
        assert!(matches!(
            Clamd::new("tcp://clamav.svc:3310/", t).map(|c| c.endpoint),
            Ok(Endpoint::Tcp { host, port: 3310 }) if host == "clamav.svc"
        ));
        assert!(matches!(
            Clamd::new("unix:///run/clamav/clamd.ctl", t).map(|c| c.endpoint),
            Ok(Endpoint::Unix(p)) if p == std::path::Path::new("/run/clamav/clamd.ctl")
        ));
        for bad in [
            "tcp://host",
            "tcp://:3310",
            "tcp://host:x",
            "tcp://host:0",
            "unix://relative",
            "http://host:3310",
            "",
        ] {
            let err = Clamd::new(bad, t).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn signature_versions_are_read_from_version_answers() {
        assert_eq!(
            signature_version("ClamAV 1.4.6/27480/Thu Dec  4 09:27:00 2026"),
            Some(27480)
        );
        assert_eq!(signature_version("ClamAV 1.4.6"), None);
        assert_eq!(signature_version("ClamAV 1.4.6/x/date"), None);
        assert_eq!(signature_version(""), None);
    }

    #[test]
    fn scan_replies() {
        assert_eq!(parse_scan_reply("stream: OK").ok(), Some(Verdict::Clean));
        assert_eq!(
            parse_scan_reply("stream: Eicar-Signature FOUND").ok(),
            Some(Verdict::Infected("Eicar-Signature".into()))
        );
        assert_eq!(
            parse_scan_reply(
                "stream: Eicar-Test-Signature(44d88612fea8a8f36de82e1278abb02f:68) FOUND"
            )
            .ok(),
            Some(Verdict::Infected("Eicar-Test-Signature".into()))
        );
        assert_eq!(
            parse_scan_reply("stream: Odd(name) FOUND").ok(),
            Some(Verdict::Infected("Odd(name)".into()))
        );
        assert!(matches!(
            parse_scan_reply("INSTREAM size limit exceeded. ERROR"),
            Err(ScanError::Refused(m)) if m == "INSTREAM size limit exceeded."
        ));
        assert!(matches!(
            parse_scan_reply("stream: Can't create temporary file ERROR"),
            Err(ScanError::Unavailable(_))
        ));
        for nonsense in [
            "",
            "PONG",
            "stream:",
            "stream: FOUND",
            "stream: okay",
            "UNKNOWN COMMAND",
        ] {
            assert!(
                matches!(parse_scan_reply(nonsense), Err(ScanError::Unavailable(_))),
                "{nonsense:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_reply_cut_short_is_not_a_verdict() {
        let mut cut: &[u8] = b"stream: OK";
        assert!(matches!(
            read_reply(&mut cut).await,
            Err(ScanError::Unavailable(_))
        ));
        let mut whole: &[u8] = b"stream: OK\0";
        assert_eq!(
            read_reply(&mut whole).await.ok().as_deref(),
            Some("stream: OK")
        );
    }

    #[tokio::test]
    async fn frames_are_length_prefixed_and_end_with_zero() {
        let input = vec![7u8; CHUNK + 10];
        let mut sent = Vec::new();
        let mut reader = input.as_slice();
        assert!(send_stream(&mut sent, &mut reader).await.is_ok());
        let mut rest = sent
            .strip_prefix(b"zINSTREAM\0".as_slice())
            .expect("command first");
        let mut body = Vec::new();
        loop {
            let (len, tail) = rest.split_at(4);
            let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
            assert!(len <= CHUNK);
            if len == 0 {
                assert!(tail.is_empty(), "nothing after the terminator");
                break;
            }
            body.extend_from_slice(&tail[..len]);
            rest = &tail[len..];
        }
        assert_eq!(body, input);
    }
}

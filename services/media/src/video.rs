//! ffprobe and ffmpeg as subprocesses: a time bound, an address-space bound, local files
//! only (`-protocol_whitelist file`) and a whitelist of demuxers, so a playlist or a
//! concat script cannot make them read other files or the network.

use std::{path::Path, process::Stdio, time::Duration};

use serde::Deserialize;
use tokio::{io::AsyncReadExt, process::Command};

/// Demuxers ffprobe and ffmpeg may use on user files: containers only, no playlists (`hls`,
/// `concat`, `dash`), no image sequences.
const DEMUXERS: &str = "mov,mp4,m4a,3gp,matroska,webm,avi,flv,mpeg,mpegts,mp3,ogg,flac,wav,aac";
/// Largest output kept from a tool (a poster frame, a probe's JSON).
const MAX_OUTPUT: u64 = 32 << 20;

/// Why a tool did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The input is not something the tool can read; running again will not help.
    #[error("{0}")]
    Unreadable(String),
    /// The tool could not run (missing binary, out of processes); worth a retry.
    #[error("cannot run {0}")]
    Unavailable(String),
    /// The tool was killed outright (SIGKILL: the kernel's OOM killer when the machine ran
    /// short of memory): worth a retry, but a run that ends so counts as one that did not
    /// come back, so a file that is killed every time fails after a few.
    #[error("{KILLED}: {0}")]
    Killed(String),
}

/// How a [`ToolError::Killed`] reads.
const KILLED: &str = "killed by SIGKILL";

/// How to run ffprobe and ffmpeg.
#[derive(Clone, Debug)]
pub struct Tools {
    /// ffprobe binary.
    pub ffprobe: String,
    /// ffmpeg binary.
    pub ffmpeg: String,
    /// libheif's heif-convert binary.
    pub heif_convert: String,
    /// Longest run.
    pub timeout: Duration,
    /// Address-space limit in bytes, applied with `prlimit` when it is installed.
    pub memory: u64,
}

/// What ffprobe says about a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    /// Duration in milliseconds.
    pub duration_ms: u64,
    /// Codec of the first video stream, else of the first audio stream.
    pub codec: String,
    /// Width of the first video stream as displayed (rotation applied).
    pub width: u32,
    /// Height of the first video stream as displayed.
    pub height: u32,
    /// Whether a video stream exists (not only cover art).
    pub has_video: bool,
}

#[derive(Deserialize)]
struct ProbeJson {
    #[serde(default)]
    streams: Vec<StreamJson>,
    format: Option<FormatJson>,
}

#[derive(Deserialize)]
struct StreamJson {
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    duration: Option<String>,
    #[serde(default)]
    disposition: std::collections::HashMap<String, i64>,
    #[serde(default)]
    side_data_list: Vec<serde_json::Value>,
    #[serde(default)]
    tags: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct FormatJson {
    duration: Option<String>,
}

impl StreamJson {
    /// Rotation in degrees from the display matrix or the legacy `rotate` tag.
    fn rotation(&self) -> i64 {
        let side = self
            .side_data_list
            .iter()
            .find_map(|d| d.get("rotation").and_then(serde_json::Value::as_f64));
        let tag = self.tags.get("rotate").and_then(|r| r.parse::<f64>().ok());
        side.or(tag).map_or(0, |r| r.round() as i64)
    }
}

fn seconds_to_ms(s: Option<&str>) -> Option<u64> {
    let secs: f64 = s?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).round() as u64)
}

/// Reads ffprobe's JSON.
pub fn parse_probe(json: &[u8]) -> Result<Probe, ToolError> {
    let parsed: ProbeJson = serde_json::from_slice(json)
        .map_err(|e| ToolError::Unreadable(format!("ffprobe output: {e}")))?;
    let video = parsed.streams.iter().find(|s| {
        s.codec_type.as_deref() == Some("video")
            && s.disposition.get("attached_pic").copied().unwrap_or(0) == 0
    });
    let audio = parsed
        .streams
        .iter()
        .find(|s| s.codec_type.as_deref() == Some("audio"));
    let Some(main) = video.or(audio) else {
        return Err(ToolError::Unreadable(
            "no video or audio stream in the file".into(),
        ));
    };
    let duration_ms = parsed
        .format
        .as_ref()
        .and_then(|f| seconds_to_ms(f.duration.as_deref()))
        .or_else(|| seconds_to_ms(main.duration.as_deref()))
        .unwrap_or(0);
    let (mut width, mut height) =
        video.map_or((0, 0), |v| (v.width.unwrap_or(0), v.height.unwrap_or(0)));
    if video.is_some_and(|v| v.rotation().rem_euclid(180) == 90) {
        std::mem::swap(&mut width, &mut height);
    }
    Ok(Probe {
        duration_ms,
        codec: main.codec_name.clone().unwrap_or_default(),
        width,
        height,
        has_video: video.is_some(),
    })
}

/// The absolute paths among `command`'s arguments, each with what stands for it in a message
/// (its file name), and their directories (with their slash, for nothing); longest first.
fn path_args(command: &Command) -> Vec<(String, String)> {
    let mut paths: Vec<(String, String)> = command
        .as_std()
        .get_args()
        .filter_map(|arg| arg.to_str())
        .filter(|arg| arg.starts_with('/'))
        .flat_map(|arg| {
            let path = Path::new(arg);
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let dir = path
                .parent()
                .map(|d| (format!("{}/", d.display()), String::new()));
            std::iter::once((arg.to_owned(), name)).chain(dir)
        })
        .collect();
    paths.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    paths
}

impl Tools {
    fn command(&self, program: &str) -> Command {
        let mut command = if self.memory > 0 && Path::new("/usr/bin/prlimit").exists() {
            let mut c = Command::new("/usr/bin/prlimit");
            c.arg(format!("--as={}", self.memory))
                .arg("--")
                .arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs `command`, returns its stdout (at most [`MAX_OUTPUT`] bytes) or why it failed.
    async fn run(&self, what: &str, command: Command) -> Result<Vec<u8>, ToolError> {
        self.run_for(what, command, self.timeout).await
    }

    async fn run_for(
        &self,
        what: &str,
        mut command: Command,
        timeout: Duration,
    ) -> Result<Vec<u8>, ToolError> {
        let paths = path_args(&command);
        let mut child = command
            .spawn()
            .map_err(|e| ToolError::Unavailable(format!("{what}: {e}")))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ToolError::Unavailable(format!("{what}: no pipes")));
        };
        let collect = async {
            // Both pipes are read to their end, so a tool that writes more than is kept never
            // waits on a full pipe.
            let (read_out, read_err) = tokio::join!(
                read_capped(stdout, MAX_OUTPUT),
                read_capped(stderr, 64 * 1024)
            );
            let (out, out_overflowed) =
                read_out.map_err(|e| ToolError::Unavailable(format!("{what}: {e}")))?;
            let (err, _) = read_err.map_err(|e| ToolError::Unavailable(format!("{what}: {e}")))?;
            if out_overflowed {
                return Err(ToolError::Unreadable(format!(
                    "{what} wrote more than {MAX_OUTPUT} bytes"
                )));
            }
            let status = child
                .wait()
                .await
                .map_err(|e| ToolError::Unavailable(format!("{what}: {e}")))?;
            Ok::<_, ToolError>((status, out, err))
        };
        // On timeout the future is dropped, and with it the child (kill_on_drop).
        let (status, out, err) = tokio::time::timeout(timeout, collect)
            .await
            .map_err(|_| ToolError::Unreadable(format!("{what} took longer than {timeout:?}")))??;
        // Killed outright: by the kernel's OOM killer when the machine ran short of memory
        // (a tool over its own limit fails its allocation instead), not by the input; tried
        // again, within the job's attempts.
        if std::os::unix::process::ExitStatusExt::signal(&status)
            == Some(nix::sys::signal::Signal::SIGKILL as i32)
        {
            return Err(ToolError::Killed(format!(
                "{what} ({status}): the machine may be short of memory"
            )));
        }
        if !status.success() {
            let detail = String::from_utf8_lossy(&err);
            let detail = detail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            // The reason goes to the file's owner: without this machine's paths.
            let detail = paths
                .iter()
                .fold(detail.to_owned(), |d, (path, name)| d.replace(path, name));
            return Err(ToolError::Unreadable(format!(
                "{what} failed ({status}): {}",
                detail.chars().take(300).collect::<String>()
            )));
        }
        Ok(out)
    }

    /// Duration, codec and dimensions of the local file `path`.
    pub async fn probe(&self, path: &Path) -> Result<Probe, ToolError> {
        let mut command = self.command(&self.ffprobe);
        command
            .args(["-v", "error", "-protocol_whitelist", "file"])
            .args(["-format_whitelist", DEMUXERS])
            .args(["-print_format", "json", "-show_format", "-show_streams"])
            .arg("-i")
            .arg(path);
        parse_probe(&self.run("ffprobe", command).await?)
    }

    /// A JPEG of the frame at `at_ms` (or the first frame when the file is shorter), at most
    /// 1280 px wide or high.
    pub async fn poster(&self, path: &Path, at_ms: u64) -> Result<Vec<u8>, ToolError> {
        let mut command = self.command(&self.ffmpeg);
        command
            .args(["-nostdin", "-v", "error", "-protocol_whitelist", "file"])
            .args(["-format_whitelist", DEMUXERS, "-threads", "2"])
            .args(["-ss", &format!("{:.3}", at_ms as f64 / 1000.0)])
            .arg("-i")
            .arg(path)
            .args(["-map", "0:v:0", "-frames:v", "1"])
            .args([
                "-vf",
                "scale='min(1280,iw)':'min(1280,ih)':force_original_aspect_ratio=decrease",
            ])
            .args(["-c:v", "mjpeg", "-q:v", "3", "-f", "image2pipe", "pipe:1"]);
        let frame = self.run("ffmpeg", command).await?;
        if frame.is_empty() {
            return Err(ToolError::Unreadable("ffmpeg produced no frame".into()));
        }
        Ok(frame)
    }
}

impl Tools {
    /// The local HEIF / HEIC or AVIF picture `input` as a PNG (its primary picture, upright:
    /// libheif applies the file's rotation and mirroring), written to `dir` and read back.
    /// A file of several pictures (a burst) gives its first.
    pub async fn heif_to_png(&self, input: &Path, dir: &Path) -> Result<Vec<u8>, ToolError> {
        let output = dir.join("picture.png");
        let mut command = self.command(&self.heif_convert);
        command.arg("--quiet").arg(input).arg(&output);
        self.run("heif-convert", command).await?;
        // One picture: `picture.png`; several: `picture-1.png`, `picture-2.png`, ...
        for written in [output, dir.join("picture-1.png")] {
            match tokio::fs::read(&written).await {
                Ok(png) => return Ok(png),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ToolError::Unavailable(format!("heif-convert: {e}"))),
            }
        }
        Err(ToolError::Unreadable(
            "heif-convert wrote no picture".to_owned(),
        ))
    }

    /// Transcodes the local file `input` into `output`: an MP4 that plays in every browser
    /// (H.264 in yuv420p, AAC when the input has sound, the index first for streaming), at
    /// most 720 px high, upright; given `timeout` at most (and never more than the tools').
    pub async fn transcode(
        &self,
        input: &Path,
        output: &Path,
        timeout: Duration,
    ) -> Result<(), ToolError> {
        let mut command = self.command(&self.ffmpeg);
        command
            .args(["-nostdin", "-v", "error", "-protocol_whitelist", "file"])
            .args(["-format_whitelist", DEMUXERS, "-threads", "2"])
            .arg("-i")
            .arg(input)
            .args(["-map", "0:v:0", "-map", "0:a:0?"])
            // None of the original's tags (where it was shot, its title, comments) or
            // chapters: the web copy is the one an app publishes.
            .args(["-map_metadata", "-1", "-map_chapters", "-1"])
            // Even sides, as yuv420p needs; the encoder on two threads too.
            .args(["-vf", "scale=-2:'trunc(min(720,ih)/2)*2'", "-threads", "2"])
            .args(["-c:v", "libx264", "-preset", "veryfast", "-crf", "26"])
            .args(["-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"])
            .args(["-movflags", "+faststart", "-f", "mp4", "-y"])
            // A bound on what it writes (a 720p copy of two minutes is a few dozen MB): a
            // copy cut off there ends early, and is not kept (see `cut_short`).
            .args(["-fs", &WEB_VIDEO_MAX_BYTES.to_string()])
            .arg(output);
        self.run_for("ffmpeg", command, timeout.min(self.timeout))
            .await?;
        Ok(())
    }
}

/// Most bytes ffmpeg writes for a web copy (stored from its file in 8 MiB pieces).
pub const WEB_VIDEO_MAX_BYTES: u64 = 256 << 20;

/// Whether a copy `output_ms` long of a video `input_ms` long ends early (more than a second
/// short: streams of one file differ by a few frames, and a copy cut at its size bound by
/// far more).
pub fn cut_short(input_ms: u64, output_ms: u64) -> bool {
    output_ms.saturating_add(1000) < input_ms
}

/// Reads `from` to its end, keeping its first `keep` bytes; and whether more came.
async fn read_capped(
    mut from: impl tokio::io::AsyncRead + Unpin,
    keep: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    (&mut from).take(keep).read_to_end(&mut kept).await?;
    let more = tokio::io::copy(&mut from, &mut tokio::io::sink()).await?;
    Ok((kept, more > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_cut_short_only_when_it_ends_more_than_a_second_early() {
        assert!(!cut_short(120_000, 120_000));
        assert!(!cut_short(120_000, 119_040), "a few frames short");
        assert!(!cut_short(2_000, 2_100), "a little longer");
        assert!(cut_short(120_000, 45_000), "stopped at the size bound");
        assert!(cut_short(120_000, 0));
    }

    fn shell() -> Tools {
        Tools {
            ffprobe: "sh".into(),
            ffmpeg: "sh".into(),
            heif_convert: "sh".into(),
            timeout: Duration::from_secs(20),
            memory: 0,
        }
    }

    #[tokio::test]
    async fn a_tool_that_logs_a_lot_is_read_to_its_end() {
        let tools = shell();
        // 1 MB on stderr: far past a pipe's buffer and the 64 KiB kept.
        let mut noisy = tools.command("sh");
        noisy.args(["-c", "head -c 1000000 /dev/zero >&2; printf done"]);
        let out = tools.run("noisy", noisy).await.expect("runs");
        assert_eq!(out, b"done");
        let mut flood = tools.command("sh");
        flood.args(["-c", &format!("head -c {} /dev/zero", MAX_OUTPUT + 1)]);
        match tools.run("flood", flood).await {
            Err(ToolError::Unreadable(why)) => assert!(why.contains("wrote more than"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// A tool's complaint names its input as the tool was given it: the reason, which its
    /// owner reads, says `input`, not where this machine keeps it.
    #[tokio::test]
    async fn a_failing_tool_s_reason_has_no_path_of_this_machine() {
        let tools = shell();
        let mut failing = tools.command("sh");
        failing.args([
            "-c",
            "echo \"$1: Invalid data found; wrote $2 in ${1%/*}/\" >&2; exit 1",
            "sh",
            "/tmp/stowage-media-x1/input",
            "/tmp/stowage-media-x1/out.png",
        ]);
        match tools.run("ffprobe", failing).await {
            Err(ToolError::Unreadable(why)) => assert_eq!(
                why,
                "ffprobe failed (exit status: 1): input: Invalid data found; wrote out.png in "
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tool_killed_outright_is_tried_again_and_one_that_crashes_is_not() {
        let tools = shell();
        let mut killed = tools.command("sh");
        killed.args(["-c", "kill -KILL $$"]);
        match tools.run("killed", killed).await {
            Err(e @ ToolError::Killed(_)) => assert!(e.to_string().starts_with(KILLED), "{e}"),
            other => panic!("{other:?}"),
        }
        let mut crashed = tools.command("sh");
        crashed.args(["-c", "kill -SEGV $$"]);
        assert!(matches!(
            tools.run("crashed", crashed).await,
            Err(ToolError::Unreadable(_))
        ));
    }

    #[test]
    fn probe_json_gives_duration_codec_and_upright_size() {
        let json = br#"{"streams":[
            {"codec_type":"video","codec_name":"h264","width":1920,"height":1080,
             "side_data_list":[{"rotation":-90}]},
            {"codec_type":"audio","codec_name":"aac"}],
            "format":{"duration":"2.500000"}}"#;
        let probe = parse_probe(json).expect("parses");
        assert_eq!(
            probe,
            Probe {
                duration_ms: 2500,
                codec: "h264".into(),
                width: 1080,
                height: 1920,
                has_video: true,
            }
        );
    }

    #[test]
    fn audio_with_cover_art_is_audio() {
        let json = br#"{"streams":[
            {"codec_type":"audio","codec_name":"mp3","duration":"1.25"},
            {"codec_type":"video","codec_name":"mjpeg","width":500,"height":500,
             "disposition":{"attached_pic":1}}],
            "format":{}}"#;
        let probe = parse_probe(json).expect("parses");
        assert_eq!(probe.codec, "mp3");
        assert_eq!(probe.duration_ms, 1250);
        assert!(!probe.has_video);
        assert!(parse_probe(br#"{"streams":[],"format":{}}"#).is_err());
    }
}

//! What Media does with a file, decided from what Ingest sniffed and what the name claims.
//!
//! The sniffed MIME type decides; a name that promises media the bytes do not hold (random
//! bytes named `.jpg`, a playlist named `.mp4`) ends as a failure with a reason instead of a
//! silent "ready without variants".

/// The work for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Decode as an image and render variants.
    Image,
    /// Convert (HEIF / HEIC, AVIF) to PNG with libheif, then as an image.
    Heif,
    /// Probe with ffprobe and take a poster frame.
    Video,
    /// Probe with ffprobe (duration, codec).
    Audio,
    /// Nothing to derive: scan (when configured) and mark ready.
    Plain,
    /// Processing can never succeed; the file ends failed with this reason.
    Refuse(String),
}

/// Image types the decoders handle.
const IMAGE_TYPES: &[&str] = &[
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/tiff",
    "image/bmp",
];

/// Image types libheif converts first: phones' HEIC photos, AVIF.
const HEIF_TYPES: &[&str] = &["image/heif", "image/heic", "image/avif"];

/// Video containers handed to ffprobe / ffmpeg (the demuxer whitelist matches them).
const VIDEO_TYPES: &[&str] = &[
    "video/mp4",
    "video/quicktime",
    "video/x-matroska",
    "video/webm",
    "video/x-msvideo",
    "video/x-m4v",
    "video/x-flv",
    "video/mpeg",
];

/// Audio types handed to ffprobe.
const AUDIO_TYPES: &[&str] = &[
    "audio/mpeg",
    "audio/ogg",
    "audio/opus",
    "audio/x-flac",
    "audio/x-wav",
    "audio/aac",
    "audio/m4a",
    "audio/x-m4a",
];

/// Extensions that promise an image, a video or a sound. Not `.ts` (TypeScript sources as
/// often as MPEG transport streams, which the sniffer does not know) nor `.m3u8` (a playlist is
/// text): files so named are kept as they are.
const MEDIA_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "png", "gif", "webp", "bmp", "tif", "tiff", "heic", "heif", "avif",
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "flv", "mpg", "mpeg", "mp3", "m4a", "aac", "ogg",
    "oga", "opus", "flac", "wav",
];

/// Decides the work for a file of `size` bytes, sniffed as `mime_type`, named `name`.
pub fn plan(mime_type: &str, name: &str, size: u64) -> Plan {
    let mime = mime_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if size == 0 {
        return Plan::Refuse("empty file: nothing to process".into());
    }
    if mime == "image/svg+xml" || extension(name).as_deref() == Some("svg") {
        return Plan::Refuse(
            "SVG is active content (it can carry scripts): no variants are rendered from it".into(),
        );
    }
    if IMAGE_TYPES.contains(&mime.as_str()) {
        return Plan::Image;
    }
    if HEIF_TYPES.contains(&mime.as_str()) {
        return Plan::Heif;
    }
    if VIDEO_TYPES.contains(&mime.as_str()) {
        return Plan::Video;
    }
    if AUDIO_TYPES.contains(&mime.as_str()) {
        return Plan::Audio;
    }
    match extension(name) {
        Some(ext) if MEDIA_EXTENSIONS.contains(&ext.as_str()) => Plan::Refuse(format!(
            "the name says .{ext} but the content is {}: not a supported image, video or audio",
            if mime.is_empty() { "unknown" } else { &mime }
        )),
        _ if mime.starts_with("image/") || mime.starts_with("video/") => {
            Plan::Refuse(format!("{mime} is not a supported format"))
        }
        _ => Plan::Plain,
    }
}

fn extension(name: &str) -> Option<String> {
    let (_, ext) = name.rsplit_once('.')?;
    Some(ext.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ogg Opus (sniffed as audio/opus) is audio; TypeScript and playlists are text kept as
    /// they are (both ended failed, "the name says .ts but the content is text/plain").
    #[test]
    fn opus_is_audio_and_typescript_is_text() {
        assert_eq!(plan("audio/opus", "memo.ogg", 10), Plan::Audio);
        assert_eq!(plan("audio/opus", "memo.opus", 10), Plan::Audio);
        assert_eq!(
            plan("text/plain; charset=utf-8", "index.ts", 10),
            Plan::Plain
        );
        assert_eq!(plan("application/octet-stream", "clip.ts", 10), Plan::Plain);
        assert_eq!(plan("text/plain", "live.m3u8", 10), Plan::Plain);
    }

    #[test]
    fn sniffed_types_decide() {
        assert_eq!(plan("image/jpeg", "a.bin", 10), Plan::Image);
        assert_eq!(plan("image/png", "a", 10), Plan::Image);
        assert_eq!(plan("image/tiff", "scan.tif", 10), Plan::Image);
        assert_eq!(plan("image/bmp", "old.bmp", 10), Plan::Image);
        assert_eq!(plan("image/heif", "IMG_0001.HEIC", 10), Plan::Heif);
        assert_eq!(plan("image/avif", "a.avif", 10), Plan::Heif);
        assert_eq!(plan("video/mp4", "clip.mp4", 10), Plan::Video);
        assert_eq!(plan("audio/mpeg", "song.mp3", 10), Plan::Audio);
        assert_eq!(plan("application/pdf", "doc.pdf", 10), Plan::Plain);
        assert_eq!(
            plan("text/plain; charset=utf-8", "notes.txt", 10),
            Plan::Plain
        );
    }

    #[test]
    fn names_that_lie_and_active_content_are_refused() {
        let refused = |p: Plan| matches!(p, Plan::Refuse(_));
        assert!(refused(plan("application/octet-stream", "photo.JPG", 10)));
        assert!(refused(plan("text/plain; charset=utf-8", "clip.mp4", 10)));
        assert!(refused(plan("text/plain; charset=utf-8", "logo.svg", 10)));
        assert!(refused(plan("image/svg+xml", "logo", 10)));
        assert!(refused(plan("image/jpeg", "empty.jpg", 0)));
        assert!(refused(plan("image/x-icon", "favicon.ico", 10)));
    }
}

//! Deciding what a file is from its first bytes, and for text and unknown bytes the name's
//! extension. The type a client declares is not trusted: it would pick how a file is served.

use stowage_blob::plan::{Plan, plan};
use stowage_proto::v1 as pb;

/// Bytes looked at before deciding.
pub const SNIFF_LEN: usize = 8192;

/// What the bytes say a file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sniffed {
    /// MIME type.
    pub mime_type: String,
    /// Kind name (`video`, `image`, `audio`, `document`, `other`).
    pub kind: &'static str,
    /// Extension for the storage key (lowercase alphanumeric).
    pub extension: String,
}

/// The content types a deployment takes (`STOWAGE_INGEST__ALLOWED_TYPES`): exact types
/// (`application/pdf`) and families (`image/*`); none listed takes every type.
#[derive(Clone, Debug, Default)]
pub struct AllowedTypes(Vec<String>);

impl AllowedTypes {
    /// Takes the types matching `patterns` (lowercase, as the configuration checks them).
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// Whether every type is taken.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses content sniffed as `sniffed` unless it is taken, naming `field` (where its
    /// first bytes came).
    pub fn check(&self, sniffed: &Sniffed, field: &'static str) -> crate::error::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mime = sniffed.mime_type.split(';').next().unwrap_or("").trim();
        let family = mime.split('/').next().unwrap_or("");
        let taken = self
            .0
            .iter()
            .any(|pattern| match pattern.strip_suffix("/*") {
                Some(wanted) => wanted == family,
                None => pattern == mime,
            });
        if taken {
            return Ok(());
        }
        Err(crate::error::Error::TypeNotAllowed {
            field,
            mime: mime.to_owned(),
            allowed: self.0.join(", "),
        })
    }
}

/// What status a new file is registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// No Media in this deployment: every file is ready at once.
    Ready,
    /// Media runs. It works on every file when `scanning` (each one is scanned); otherwise only
    /// on those it derives something from or refuses, and the rest (documents, archives,
    /// unknown bytes) are ready at once, without a job.
    Media {
        /// Whether a virus scanner is configured.
        scanning: bool,
    },
}

impl Registration {
    /// The status of a new file of `size` bytes named `display_name`, sniffed as `sniffed`.
    pub fn status(self, sniffed: &Sniffed, display_name: &str, size: u64) -> pb::FileStatus {
        match self {
            Self::Ready => pb::FileStatus::Ready,
            Self::Media { scanning: false }
                if plan(&sniffed.mime_type, display_name, size) == Plan::Plain =>
            {
                pb::FileStatus::Ready
            }
            Self::Media { .. } => pb::FileStatus::Processing,
        }
    }
}

/// An extension taken from a display name, only if it is short and plain.
fn name_extension(display_name: &str) -> Option<String> {
    let (_, ext) = display_name.rsplit_once('.')?;
    (1..=8)
        .contains(&ext.len())
        .then(|| ext.to_ascii_lowercase())
        .filter(|e| e.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `head` looks like text: valid UTF-8 (a cut last character allowed), no NULs.
fn looks_like_text(head: &[u8]) -> bool {
    if head.contains(&0) {
        return false;
    }
    match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && head.len() - e.valid_up_to() < 4,
    }
}

/// Sniffs `head` (the first up to 8 KiB of the file).
pub fn sniff(head: &[u8], display_name: &str) -> Sniffed {
    if let Some(t) = infer::get(head) {
        let kind = match t.matcher_type() {
            infer::MatcherType::Image => "image",
            infer::MatcherType::Video => "video",
            infer::MatcherType::Audio => "audio",
            infer::MatcherType::Doc | infer::MatcherType::Book | infer::MatcherType::Text => {
                "document"
            }
            _ => "other",
        };
        return Sniffed {
            mime_type: t.mime_type().to_owned(),
            kind,
            extension: t.extension().to_owned(),
        };
    }
    if !head.is_empty() && looks_like_text(head) {
        return Sniffed {
            mime_type: "text/plain; charset=utf-8".into(),
            kind: "document",
            extension: name_extension(display_name).unwrap_or_else(|| "txt".into()),
        };
    }
    Sniffed {
        mime_type: "application/octet-stream".into(),
        kind: "other",
        extension: name_extension(display_name).unwrap_or_else(|| "bin".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_types_match_exact_types_and_families_without_parameters() {
        let allowed = AllowedTypes::new(vec!["image/*".into(), "text/plain".into()]);
        let png = sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "a.png");
        assert!(allowed.check(&png, "data").is_ok());
        // `text/plain; charset=utf-8`: its parameters do not count.
        assert!(
            allowed
                .check(&sniff(b"some words", "notes.txt"), "data")
                .is_ok()
        );
        let refused = allowed
            .check(&sniff(b"%PDF-1.7\n", "doc.pdf"), "chunk.data")
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "chunk.data: the content is application/pdf; this deployment takes image/*, text/plain"
        );
        // A family is a whole family, not a prefix: `image/*` does not take `imagex/...`.
        let imagex = Sniffed {
            mime_type: "imagex/thing".into(),
            kind: "other",
            extension: "bin".into(),
        };
        assert!(allowed.check(&imagex, "data").is_err());
        assert!(AllowedTypes::default().check(&imagex, "data").is_ok());
    }

    #[test]
    fn only_files_media_works_on_start_in_processing() {
        let (ready, processing) = (pb::FileStatus::Ready, pb::FileStatus::Processing);
        let notes = sniff(b"some words", "notes.txt");
        let photo = sniff(b"\xFF\xD8\xFF\xE0\0\x10JFIF\0", "photo.jpg");
        let lying = sniff(b"some words", "photo.jpg");
        let media = Registration::Media { scanning: false };
        assert_eq!(media.status(&notes, "notes.txt", 10), ready);
        assert_eq!(media.status(&photo, "photo.jpg", 10), processing);
        // Refused by Media (a name promising an image; an empty file): it says why.
        assert_eq!(media.status(&lying, "photo.jpg", 10), processing);
        assert_eq!(media.status(&notes, "notes.txt", 0), processing);
        // A scanner reads every file; without Media nothing waits.
        let scanning = Registration::Media { scanning: true };
        assert_eq!(scanning.status(&notes, "notes.txt", 10), processing);
        assert_eq!(Registration::Ready.status(&photo, "photo.jpg", 10), ready);
    }

    #[test]
    fn bytes_win_over_names() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let s = sniff(png, "holiday.exe");
        assert_eq!(
            (s.mime_type.as_str(), s.kind, s.extension.as_str()),
            ("image/png", "image", "png")
        );
        let t = sniff(b"hello world\n", "../../etc/passwd");
        assert_eq!(t.kind, "document");
        assert_eq!(t.extension, "txt");
        let b = sniff(&[0, 1, 2, 3], "x.DaT");
        assert_eq!((b.kind, b.extension.as_str()), ("other", "dat"));
        assert_eq!(sniff(&[], "").extension, "bin");
    }
}

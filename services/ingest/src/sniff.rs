//! Deciding what a file is from its first bytes (the declared type is only a hint).

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

//! Checks on user-supplied names, tags, labels and idempotency keys shared by the services.

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Most tags on one file.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// A display name is 1..=255 characters without control characters. It is only ever
/// metadata, so `../../etc/passwd` is a valid (if odd) name.
pub fn display_name(name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    if chars == 0 || name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if chars > MAX_NAME_CHARS {
        return Err(format!("must be at most {MAX_NAME_CHARS} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Marks and overrides of the Unicode bidirectional algorithm (embeddings, overrides,
/// isolates, the left-to-right, right-to-left and Arabic letter marks): a name keeps them as
/// its owner gave it, but a file saved under it leaves them out (`invoice\u{202E}fdp.exe`
/// shows as `invoiceexe.pdf` and runs as the `.exe` it is).
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// `name` without its bidirectional controls ([`is_bidi_control`]), as a file is saved or a
/// name is shown in a terminal.
pub fn without_bidi_controls(name: &str) -> String {
    name.chars().filter(|c| !is_bidi_control(*c)).collect()
}

/// Tags are trimmed, deduplicated and checked: at most 32, each 1..=64 characters without
/// control characters.
pub fn tags(tags: &[String]) -> Result<Vec<String>, String> {
    // Counted first: every tag is compared with those kept, so a long list must not get that
    // far (duplicates, dropped below, are not worth sending either).
    if tags.len() > MAX_TAGS {
        return Err(format!("at most {MAX_TAGS} tags"));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        let tag = tag.trim();
        if tag.is_empty() {
            return Err("must not contain empty tags".into());
        }
        if tag.chars().count() > MAX_TAG_CHARS || tag.chars().any(char::is_control) {
            return Err(format!(
                "each tag must be at most {MAX_TAG_CHARS} characters without control characters"
            ));
        }
        if !out.iter().any(|t| t == tag) {
            out.push(tag.to_owned());
        }
    }
    if out.len() > MAX_TAGS {
        return Err(format!("at most {MAX_TAGS} tags"));
    }
    Ok(out)
}

/// Longest declared MIME type or package name, in characters.
pub const MAX_LABEL_CHARS: usize = 255;

/// A client's label (a declared MIME type, the name of the app that made a file) is empty or
/// at most 255 characters without control characters.
pub fn label(value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_LABEL_CHARS {
        return Err(format!("must be at most {MAX_LABEL_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;

/// An idempotency key (kept with what it made, to recognise a retry) is at most 200 characters
/// without control characters.
pub fn idempotency_key(key: &str) -> Result<(), String> {
    if key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(format!(
            "must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        ));
    }
    if key.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn idempotency_keys_are_counted_in_characters() {
        // 200 characters of two bytes each: 400 bytes, within the limit.
        assert_eq!(super::idempotency_key(&"é".repeat(200)), Ok(()));
        assert_eq!(
            super::idempotency_key(&"k".repeat(201)),
            Err("must be at most 200 characters".to_owned())
        );
        // PostgreSQL refuses NUL in text: refused here, by name, not failed there.
        assert!(super::idempotency_key("a\0b").is_err());
        assert!(super::idempotency_key("a\nb").is_err());
    }

    #[test]
    fn tag_lists_are_counted_before_they_are_read() {
        let many: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        assert_eq!(super::tags(&many), Err("at most 32 tags".to_owned()));
        let same = vec!["a".to_owned(); 33];
        assert!(super::tags(&same).is_err());
        let ok = super::tags(&[" a ".to_owned(), "a".to_owned(), "b".to_owned()]);
        assert_eq!(ok, Ok(vec!["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn labels_are_short_and_printable() {
        assert!(super::label("").is_ok());
        assert!(super::label("image/png").is_ok());
        assert!(super::label("com.example.app").is_ok());
        assert!(super::label(&"a".repeat(256)).is_err());
        assert!(super::label("image/png\r\nx: y").is_err());
    }

    #[test]
    fn names_are_metadata_not_paths() {
        assert!(super::display_name("../../etc/passwd").is_ok());
        assert!(super::display_name("").is_err());
        assert!(super::display_name("a\nb").is_err());
        assert!(super::display_name(&"é".repeat(256)).is_err());
    }

    #[test]
    fn tags_are_deduplicated_and_bounded() {
        let t = super::tags(&["a".into(), " a ".into(), "b".into()]).unwrap();
        assert_eq!(t, vec!["a", "b"]);
        assert!(super::tags(&[String::new()]).is_err());
        assert!(super::tags(&(0..33).map(|i| i.to_string()).collect::<Vec<_>>()).is_err());
    }
}

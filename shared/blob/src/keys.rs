//! Object keys. User ids and file ids are validated before they reach a key; display names
//! never do.

use object_store::path::Path;

/// Longest user id we accept.
pub const MAX_USER_ID_LEN: usize = 128;

/// Checks a user id against the strict charset allowed in keys: `[A-Za-z0-9_.@-]`, 1..=128
/// characters, not starting with a dot.
pub fn validate_user_id(user_id: &str) -> Result<(), &'static str> {
    if user_id.is_empty() {
        return Err("must not be empty");
    }
    if user_id.len() > MAX_USER_ID_LEN {
        return Err("must be at most 128 characters");
    }
    if user_id.starts_with('.') {
        return Err("must not start with a dot");
    }
    if !user_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
    {
        return Err("may contain only letters, digits and _ - . @");
    }
    Ok(())
}

/// Longest object key (S3's bound; ours are far shorter).
pub const MAX_KEY_LEN: usize = 1024;

/// Checks a list of keys a privileged caller asks about: 1..=1000 of them, each 1..=1024
/// bytes. The error names what is wrong, for the caller's `keys` field.
pub fn validate_key_list(keys: &[String]) -> Result<(), String> {
    if keys.is_empty() || keys.len() > 1000 {
        return Err("must hold 1..=1000 keys".into());
    }
    if let Some(i) = keys
        .iter()
        .position(|k| k.is_empty() || k.len() > MAX_KEY_LEN || k.contains('\0'))
    {
        return Err(format!(
            "keys[{i}] must be 1..={MAX_KEY_LEN} bytes, without NUL"
        ));
    }
    Ok(())
}

/// Key of an original: `users/{user}/{kind}/{yyyy}/{mm}/{file_id}.{ext}`.
///
/// `user` must have passed [`validate_user_id`]; `kind` and `ext` come from the sniffer.
pub fn original(user: &str, kind: &str, year: i32, month: u32, file_id: &str, ext: &str) -> Path {
    Path::from(format!(
        "users/{user}/{kind}/{year:04}/{month:02}/{file_id}.{ext}"
    ))
}

/// Key of a variant: `users/{user}/variants/{yyyy}/{mm}/{file_id}_{variant}.{ext}`.
pub fn variant(user: &str, year: i32, month: u32, file_id: &str, variant: &str, ext: &str) -> Path {
    Path::from(format!(
        "users/{user}/variants/{year:04}/{month:02}/{file_id}_{variant}.{ext}"
    ))
}

/// Prefix of an upload's staging parts: `staging/{upload_id}/`.
pub fn staging_prefix(upload_id: &str) -> Path {
    Path::from(format!("staging/{upload_id}"))
}

/// Key of one staging part: `staging/{upload_id}/{part:08}`.
pub fn staging_part(upload_id: &str, part: u32) -> Path {
    Path::from(format!("staging/{upload_id}/{part:08}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_are_bounded_in_number_and_length() {
        let keys = |n: usize, len: usize| vec!["k".repeat(len); n];
        assert!(validate_key_list(&keys(1000, 1024)).is_ok());
        assert!(validate_key_list(&keys(0, 10)).is_err());
        assert!(validate_key_list(&keys(1001, 10)).is_err());
        let mut long = keys(3, 10);
        long[2] = "k".repeat(1025);
        assert_eq!(
            validate_key_list(&long),
            Err("keys[2] must be 1..=1024 bytes, without NUL".into())
        );
        long[2] = "a\0b".into();
        assert!(validate_key_list(&long).unwrap_err().starts_with("keys[2]"));
        long[1] = String::new();
        assert!(validate_key_list(&long).unwrap_err().starts_with("keys[1]"));
    }

    #[test]
    fn user_ids_are_strict() {
        assert!(validate_user_id("alice").is_ok());
        assert!(validate_user_id("a.b-c_d@e").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("../etc").is_err());
        assert!(validate_user_id("a/b").is_err());
        assert!(validate_user_id(".hidden").is_err());
        assert!(validate_user_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn original_key_has_the_documented_shape() {
        let key = original("alice", "image", 2026, 3, "f1", "png");
        assert_eq!(key.as_ref(), "users/alice/image/2026/03/f1.png");
        assert_eq!(staging_part("u1", 7).as_ref(), "staging/u1/00000007");
    }
}

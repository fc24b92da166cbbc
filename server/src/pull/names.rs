//! File names a remote gives (a hub's listing, a bucket's keys, a URL's last segment) are
//! hostile: each must be a plain relative path that stays inside the model folder and
//! leaves the pull's own files (`.kandle-*`) alone, or the pull is refused.
use std::path::{Component, Path, PathBuf};

/// Longest name accepted, in bytes (Linux's PATH_MAX is 4096; models need far less).
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest path segment, in bytes: what ext4 and most file systems allow.
pub const MAX_SEGMENT_BYTES: usize = 255;
/// Segments starting with this are the pull's own (marker, lock, staging, range marks).
pub const RESERVED_PREFIX: &str = ".kandle-";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("an empty file name")]
    Empty,
    #[error("file name {0:?} is longer than {MAX_NAME_BYTES} bytes")]
    TooLong(String),
    #[error("file name {0:?} has a segment longer than {MAX_SEGMENT_BYTES} bytes")]
    SegmentTooLong(String),
    #[error("file name {0:?} holds a control character or a backslash")]
    BadCharacter(String),
    #[error("file name {0:?} is not a plain relative path (absolute, empty, `.` or `..` segments)")]
    NotRelative(String),
    #[error("file name {0:?} is reserved for kandle's own files (`{RESERVED_PREFIX}*`)")]
    Reserved(String),
}

/// Checks that `name` is safe to place under a destination folder.
pub fn check(name: &str) -> Result<(), NameError> {
    let owned = || name.to_string();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.chars().take(64).collect()));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err(NameError::BadCharacter(owned()));
    }
    for segment in name.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(NameError::NotRelative(owned()));
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(NameError::SegmentTooLong(owned()));
        }
        if segment.starts_with(RESERVED_PREFIX) {
            return Err(NameError::Reserved(owned()));
        }
    }
    Ok(())
}

/// `dest` joined with a checked `name`, proven to stay inside `dest`: after
/// normalisation every component below `dest` is a plain name.
pub fn inside(dest: &Path, name: &str) -> Result<PathBuf, NameError> {
    check(name)?;
    let relative = Path::new(name);
    if relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        Ok(dest.join(relative))
    } else {
        Err(NameError::NotRelative(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_and_folders_pass() {
        for ok in [
            "model.safetensors",
            "1_Pooling/config.json",
            "a/b/c.gguf",
            ".gitattributes",
            "..x",
            "x..y",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn names_that_leave_the_folder_or_touch_kandles_files_fail() {
        let long_segment = "a".repeat(256);
        let long_name = "a/".repeat(600);
        for bad in [
            "",
            "/tmp/x.gguf",
            "../../x.gguf",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a/.",
            "a\0b",
            "a\\..\\b",
            "a\nb",
            ".kandle-pull.json",
            ".kandle-pull.lock",
            ".kandle-staging/x",
            "sub/.kandle-ranges-x",
            long_segment.as_str(),
            long_name.as_str(),
        ] {
            assert!(check(bad).is_err(), "{bad:?} passed");
        }
    }

    proptest! {
        /// Whatever a remote sends, an accepted name lands strictly below the folder.
        #[test]
        fn accepted_names_stay_inside(name in "[a-z./\\\\\0-]{0,24}") {
            let dest = Path::new("/models/m");
            if let Ok(path) = inside(dest, &name) {
                prop_assert!(path.starts_with(dest) && path != dest);
                prop_assert!(path.components().skip(3).all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}

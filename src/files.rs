//! Reading the small files a policy names (secrets, keys, certificates).
//!
//! A policy is operator input: a path like `/dev/zero` or `/dev/stdin` must
//! not hang `check` or a reload, and a huge file must not be slurped. Only
//! regular files are read, and only up to a size that no key or
//! certificate chain comes near.

use std::io::Read;
use std::path::Path;

/// The largest policy-referenced file read (1 MiB).
pub const MAX_FILE: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_FILE`] bytes.
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len().min(MAX_FILE)).unwrap_or(0));
    file.take(MAX_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB",
        ));
    }
    Ok(buf)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused() {
        assert!(read_bounded(Path::new("/dev/zero")).is_err());
        assert!(read_bounded(Path::new("/tmp")).is_err());
        assert!(read_bounded(Path::new("/nonexistent/x")).is_err());
        assert!(read_text(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("Cargo.toml")
                .as_path()
        )
        .is_ok());
    }
}

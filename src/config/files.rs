//! Where validation gets the files a config names (certificates, keys, CA bundles, JWKS,
//! API keys): a [`ReadFile`] the caller passes in, so validation itself does no I/O and
//! can be tested on strings. [`disk`] is the real file system; [`MemoryFiles`] serves a
//! map for tests; [`no_files`] refuses everything, for fuzzing. Reading the config file
//! itself stays with `Config::load`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Reads one file a config names, whole. Validation sees file contents only through this.
pub type ReadFile<'a> = dyn Fn(&Path) -> io::Result<Vec<u8>> + 'a;

/// The real file system.
pub fn disk(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path)
}

/// Refuses every path: fuzzed configs name arbitrary paths, which must never be opened.
pub fn no_files(_: &Path) -> io::Result<Vec<u8>> {
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "file access is disabled",
    ))
}

/// Files served from memory, for tests; any other path is refused as not found.
#[derive(Clone, Debug, Default)]
pub struct MemoryFiles(HashMap<PathBuf, Vec<u8>>);

impl MemoryFiles {
    pub fn new() -> MemoryFiles {
        MemoryFiles::default()
    }

    /// Adds (or replaces) the file at `path`.
    pub fn with(mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> MemoryFiles {
        self.0.insert(path.into(), contents.into());
        self
    }

    /// The file's contents; pass `&|p| files.read(p)` as the reader.
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not among the in-memory files"))
    }
}

/// A text file (JWKS, API keys) through `read`. Invalid UTF-8 gets the error
/// `std::fs::read_to_string` gives, so messages read as they did when validation opened
/// files itself.
pub fn read_text(read: &ReadFile<'_>, path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_files_serve_their_map_and_refuse_the_rest() {
        let files = MemoryFiles::new().with("a.pem", "A");
        assert_eq!(files.read(Path::new("a.pem")).ok(), Some(b"A".to_vec()));
        let err = files.read(Path::new("b.pem")).err();
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn no_files_refuses_even_paths_that_exist() {
        assert!(no_files(Path::new("Cargo.toml")).is_err());
        assert!(disk(Path::new("Cargo.toml")).is_ok());
    }

    #[test]
    fn invalid_utf8_text_reads_like_read_to_string() {
        let files = MemoryFiles::new().with("keys", vec![0xff, 0xfe]);
        let err = read_text(&|p| files.read(p), Path::new("keys")).err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("stream did not contain valid UTF-8".to_string())
        );
    }
}

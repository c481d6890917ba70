//! Shared helpers for the validation unit tests: a minimal config and loaders that
//! return its errors.

use super::super::files::MemoryFiles;
use super::super::{Config, ConfigError, ConfigErrors};

pub(super) const MINIMAL: &str = "\
listeners:
  - bind: 127.0.0.1:8080
upstreams:
  echo: { builtin: echo }
routes:
  - name: echo
    match: { path_prefix: /echo }
    upstream: echo
";

pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "PORT" => Some("8443".into()),
        "SECRET" => Some("hunter2".into()),
        "BACKEND" => Some("10.0.0.7:9001".into()),
        "TIMEOUT" => Some("7s".into()),
        _ => None,
    }
}

pub(super) fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml_str_with_env(text, "test.yaml", &env)
}

pub(super) fn errors_of(text: &str) -> Vec<ConfigError> {
    match load(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors.0,
    }
}

/// The single error, which must be at `path`, `line`:`column` and mention `words`.
#[track_caller]
pub(super) fn assert_one_error(text: &str, path: &str, line: usize, column: usize, words: &str) {
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!(
        (e.path.as_str(), e.line, e.column),
        (path, line, column),
        "{e}"
    );
    assert!(e.message.contains(words), "{e}");
    assert_eq!(e.file, "test.yaml");
}

/// MINIMAL with `extra` appended.
pub(super) fn with(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

/// Like [`load`], with every file the config names served by `files` (nothing from disk).
pub(super) fn load_from(text: &str, files: &MemoryFiles) -> Result<Config, ConfigErrors> {
    Config::from_yaml_str_with(text, "test.yaml", &env, &|p| files.read(p))
}

/// The errors of `text` with files from `files`; panics if it validates.
pub(super) fn errors_from(text: &str, files: &MemoryFiles) -> Vec<ConfigError> {
    match load_from(text, files) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors.0,
    }
}

//! The `config_yaml` target: any file through config loading (SPEC §2), with the oracle
//! that no error message echoes an environment variable's value. Files the config names
//! are refused (the reader opens nothing), so fuzzing touches no file system.

use crate::config::Config;
use crate::config::files::no_files;

/// Larger configs are cut here; real ones are a few KiB.
pub const CONFIG_YAML_MAX_INPUT: usize = 64 * 1024;

/// What `${NAME}` expands to in the second pass: must never appear in an error message.
const SECRET: &str = "wsgate-fuzz-SECRET-7f3a";

/// Loads `data` (UTF-8-lossy) as a config file and formats every error, which runs the
/// key-path locator over the text.
///
/// Oracle: when the text uses `${…}`, it is loaded again with every variable set to a
/// marker, and no error message may contain the marker (`ConfigError::message` "never
/// contains env-substituted text").
pub fn config_yaml(data: &[u8]) {
    let data = data.get(..CONFIG_YAML_MAX_INPUT).unwrap_or(data);
    let text = String::from_utf8_lossy(data);
    if let Err(errors) =
        Config::from_yaml_str_with(&text, "fuzz.yaml", &|_| Some("x".into()), &no_files)
    {
        let shown = errors.to_string();
        std::hint::black_box(shown);
    }
    if text.contains("${")
        && !text.contains(SECRET)
        && let Err(errors) =
            Config::from_yaml_str_with(&text, "fuzz.yaml", &|_| Some(SECRET.into()), &no_files)
    {
        let shown = errors.to_string();
        if shown.contains(SECRET) {
            panic!("a config error shows an environment variable's value:\n{shown}");
        }
    }
}

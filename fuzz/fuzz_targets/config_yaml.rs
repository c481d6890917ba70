//! Defends config loading (SPEC §2) against any file an operator might write: YAML
//! parsing, `${NAME}` substitution, units, validation and the file:line:column locator
//! must never panic, and no error message may echo an environment variable's value.
//! Input: the file's bytes, read as UTF-8 (lossy).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate::fuzzing::config_yaml(data);
});

//! The local development CA's files (`self_signed: true` listeners, `wsgate proxy
//! --tls-self-signed`): found or created at start-up in a data directory, so that a client
//! told once to trust `dev-ca.crt` trusts every later run, as with Caddy's local CA. The
//! certificates themselves are made in memory by [`crate::tls`]; this module only reads
//! and writes the CA's two files (the key readable by its owner only).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The CA's certificate, the file clients are told to trust.
pub const CERT_FILE: &str = "dev-ca.crt";
/// The CA's private key (0600).
pub const KEY_FILE: &str = "dev-ca.key";

/// Where the CA lives: `$WSGATE_DATA_DIR`, else `$XDG_DATA_HOME/wsgate`, else
/// `$HOME/.local/share/wsgate`, else `.wsgate` in the working directory.
pub fn default_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("WSGATE_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(data) = var("XDG_DATA_HOME") {
        return PathBuf::from(data).join("wsgate");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/wsgate"),
        None => PathBuf::from(".wsgate"),
    }
}

/// Loads the CA of `dir`, creating it first when `dir` has none, and installs it in
/// [`crate::tls`]. Returns the certificate's path and whether it was just created.
pub fn prepare(dir: &Path) -> Result<(PathBuf, bool), String> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let created = !cert_path.exists() || !key_path.exists();
    if created {
        let (cert, key) = crate::tls::new_dev_ca()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_file(&key_path, key.as_bytes(), 0o600)?;
        write_file(&cert_path, cert.as_bytes(), 0o644)?;
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let shown = cert_path.display().to_string();
    crate::tls::install_dev_ca(&read(&cert_path)?, &read(&key_path)?, &shown)
        .map_err(|e| format!("{} / {}: {e}", cert_path.display(), key_path.display()))?;
    Ok((cert_path, created))
}

/// Writes `bytes` to a file with permission bits `mode` (also when it existed before).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(bytes)
        });
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The one-line recipe that makes the usual clients trust the CA at `cert`, for a wss://
/// URL.
pub fn trust_recipe(cert: &Path, url: &str) -> String {
    let c = cert.display();
    let https = url.replacen("wss://", "https://", 1);
    format!(
        "trust it: SSL_CERT_FILE={c} python3 -m websockets {url} | curl --cacert {c} {https} | Node: NODE_EXTRA_CA_CERTS={c} | browsers: import {c} as a certificate authority (Firefox: Settings > Certificates > Authorities; Chrome/Linux: Settings > Privacy > Security > Manage certificates > Authorities)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_private_and_a_second_run_reuses_the_ca() -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("wsgate-devca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, created) = prepare(&dir)?;
        assert!(created);
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .map_err(|e| e.to_string())
        };
        assert_eq!(mode(&dir.join(KEY_FILE))?, 0o600);
        let first = std::fs::read(&cert).map_err(|e| e.to_string())?;
        let (_, created) = prepare(&dir)?;
        assert!(!created);
        assert_eq!(std::fs::read(&cert).map_err(|e| e.to_string())?, first);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

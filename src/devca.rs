//! The local development CA's files (`self_signed: true` listeners, `wsgate proxy
//! --tls-self-signed`): found or created at start-up in a data directory, so that a client
//! told once to trust `dev-ca.crt` trusts every later run, as with Caddy's local CA. The
//! certificates themselves are made in memory by [`crate::tls`]; this module only reads
//! and writes the CA's two files (the key readable by its owner only), trusting nothing
//! planted in the directory by someone else.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
///
/// The directory may be shared (`WSGATE_DATA_DIR=/tmp/…`), so nothing planted there is
/// trusted: the directory must be the user's own and writable by nobody else, the files
/// are never followed through a symbolic link, a key someone else owns or can read is
/// refused, and new files are written under a fresh name then renamed into place.
pub fn prepare(dir: &Path) -> Result<(PathBuf, bool), String> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    private_dir(dir)?;
    let key_meta = plain_file(&key_path)?;
    let created = key_meta.is_none() || plain_file(&cert_path)?.is_none();
    if created {
        let (cert, key) = crate::tls::new_dev_ca()?;
        write_file(&key_path, key.as_bytes(), 0o600)?;
        write_file(&cert_path, cert.as_bytes(), 0o644)?;
    } else if let Some(meta) = key_meta {
        private_key(&key_path, &meta)?;
    }
    let shown = cert_path.display().to_string();
    crate::tls::install_dev_ca(&read(&cert_path)?, &read(&key_path)?, &shown)
        .map_err(|e| format!("{} / {}: {e}", cert_path.display(), key_path.display()))?;
    Ok((cert_path, created))
}

/// Reads a file of the CA without following a symbolic link.
fn read(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text)
}

/// Creates `dir` (0700) when missing; refuses one owned by another user or writable by
/// group or others, where anyone could plant or swap the CA's files.
fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!(
            "{} belongs to another user (uid {}): set WSGATE_DATA_DIR to a directory of your own",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by other users (mode {:o}): set WSGATE_DATA_DIR to a private directory (chmod 700)",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The metadata of a CA file when it exists; an error when it is a symbolic link or not
/// a regular file.
fn plain_file(path: &Path) -> Result<Option<std::fs::Metadata>, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Some(m)),
        Ok(_) => Err(format!(
            "{} is not a regular file (a symbolic link?): remove it",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Refuses a key someone else owns or could have read (then copied: it signs
/// certificates every client trusting the CA accepts).
fn private_key(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!(
            "{} belongs to another user (uid {}): remove it",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by other users (mode {:o}), so it may have been copied: delete {} and {} to make a new CA (then trust the new certificate), or chmod 600 the key if it never left your hands",
            path.display(),
            meta.mode() & 0o777,
            path.display(),
            path.with_file_name(CERT_FILE).display()
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` with permission bits `mode`: into a new file (never an
/// existing one, never through a link), then renamed over `path`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    Ok(())
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

    fn fresh_dir(name: &str) -> Result<PathBuf, String> {
        let dir = std::env::temp_dir().join(format!("wsgate-devca-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        Ok(dir)
    }

    #[test]
    fn a_planted_link_is_never_followed() -> Result<(), String> {
        let dir = fresh_dir("link")?;
        let victim = dir.join("victim.txt");
        std::fs::write(&victim, "precious").map_err(|e| e.to_string())?;
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&victim, dir.join(KEY_FILE)).map_err(|e| e.to_string())?;
        let refused = prepare(&dir);
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("symbolic link")),
            "{refused:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&victim).map_err(|e| e.to_string())?,
            "precious"
        );
        let mode = std::fs::metadata(&victim)
            .map_err(|e| e.to_string())?
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // A link in place of the certificate, with no key yet: the new CA replaces the
        // link itself, the file it pointed at is untouched.
        std::fs::remove_file(dir.join(KEY_FILE)).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&victim, dir.join(CERT_FILE)).map_err(|e| e.to_string())?;
        let (cert, created) = prepare(&dir)?;
        assert!(created);
        assert!(
            std::fs::symlink_metadata(&cert)
                .map_err(|e| e.to_string())?
                .is_file()
        );
        assert_eq!(
            std::fs::read_to_string(&victim).map_err(|e| e.to_string())?,
            "precious"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_directory_others_can_write_is_refused() -> Result<(), String> {
        let dir = fresh_dir("shared")?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| e.to_string())?;
        let refused = prepare(&dir);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("writable by other users")),
            "{refused:?}"
        );
        assert!(!dir.join(KEY_FILE).exists());
        let _ = std::fs::remove_dir_all(&dir);
        // One made by wsgate is private.
        let made =
            std::env::temp_dir().join(format!("wsgate-devca-{}-made/sub", std::process::id()));
        prepare(&made)?;
        let mode = std::fs::metadata(&made).map_err(|e| e.to_string())?.mode();
        assert_eq!(mode & 0o777, 0o700);
        let _ = made.parent().map(std::fs::remove_dir_all);
        Ok(())
    }

    #[test]
    fn a_key_others_can_read_is_refused() -> Result<(), String> {
        let dir = fresh_dir("readable")?;
        prepare(&dir)?;
        let key = dir.join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        let refused = prepare(&dir);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("readable by other users")),
            "{refused:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

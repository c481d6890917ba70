//! Makes a local test PKI for wsgate: a root CA, and a server certificate signed by it.
//!
//!     cargo run --example dev_pki -- DIR [NAME...]      # default names: localhost 127.0.0.1
//!
//! Writes DIR/ca.crt, DIR/ca.key, DIR/server.crt (leaf + CA) and DIR/server.key. For
//! testing only: keep the keys out of version control (certs/.gitignore does). The keys are
//! written readable by their owner only (0600).

use std::path::PathBuf;
use std::process::ExitCode;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: cargo run --example dev_pki -- DIR [NAME...]");
        return ExitCode::from(64);
    };
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
    }
    match make(&dir, names) {
        Ok(()) => {
            println!(
                "wrote {0}/ca.crt {0}/ca.key {0}/server.crt {0}/server.key",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dev_pki: {e}");
            ExitCode::FAILURE
        }
    }
}

fn make(dir: &std::path::Path, names: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "wsgate local test CA");
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.clone())?;
    leaf.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    let cert = leaf.signed_by(&key, &ca)?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    write_private(&dir.join("ca.key"), ca_key_pem.as_bytes())?;
    std::fs::write(
        dir.join("server.crt"),
        format!("{}{}", cert.pem(), ca.pem()),
    )?;
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    Ok(())
}

/// Writes a private key readable by its owner only (0600), also when the file existed.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)
}

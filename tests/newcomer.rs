//! A newcomer's first ten minutes, through the binary: wss:// with the printed development
//! CA, a second instance refused on a taken port (unless `--takeover`), `wsgate proxy`
//! without a file, why a backend is down (`upstream_error`, one stderr line), refusal
//! bodies that say what to change, the exit status of a forced stop, the routes a reload
//! changed, and config mistakes explained.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
const WAIT: Duration = Duration::from_secs(20);

fn unique(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wsgate-newcomer-{}-{name}", std::process::id()))
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let path = unique(&format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// A free port on 127.0.0.1 (bound then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The binary running, its stdout and stderr lines collected as they come.
struct Wsgate {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Wsgate {
    fn start(args: &[&str], data_dir: &Path) -> Wsgate {
        let mut child = Command::new(BIN)
            .args(args)
            .env("WSGATE_DATA_DIR", data_dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            });
            lines
        };
        let stderr = collect(Box::new(
            child.stderr.take().unwrap_or_else(|| panic!("stderr")),
        ));
        let stdout = collect(Box::new(
            child.stdout.take().unwrap_or_else(|| panic!("stdout")),
        ));
        Wsgate {
            child,
            stderr,
            stdout,
        }
    }

    fn lines(which: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        which.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first stderr line containing `needle`, waiting up to [`WAIT`].
    async fn stderr_line(&self, needle: &str) -> String {
        self.wait_line(&self.stderr, needle).await
    }

    async fn stdout_line(&self, needle: &str) -> String {
        self.wait_line(&self.stdout, needle).await
    }

    async fn wait_line(&self, which: &Arc<Mutex<Vec<String>>>, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = Self::lines(which).into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                start.elapsed() < WAIT,
                "no line with {needle:?}; stderr:\n{}",
                Self::lines(&self.stderr).join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address a listener reported (`listening (ws://)` or `(wss://)`).
    async fn listening(&self, scheme: &str) -> SocketAddr {
        let line = self.stderr_line(&format!("listening ({scheme}://)")).await;
        line.split("addr=")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line}"))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig}");
    }

    /// The exit code, waiting at most `within`.
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(start.elapsed() < within, "still running after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn default_config_on_free_ports() -> String {
    std::fs::read_to_string("conf/wsgate.yaml")
        .unwrap_or_else(|e| panic!("{e}"))
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
}

fn tls_client(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An echo over wss://localhost through `addr`, verifying the server against `config`.
async fn wss_echo(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{}/echo", addr.port());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    ws.send(Message::text("over wss"))
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "over wss" => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// Issue 22 item 1: the default config's wss:// listener serves a certificate of a local
/// development CA written to a file (key 0600) and printed with a trust recipe; a client
/// trusting that file gets its echo, one that does not fails and the log says why.
#[tokio::test]
async fn wss_works_for_a_client_trusting_the_printed_development_ca() {
    let data = unique("data-wss");
    let _ = std::fs::remove_dir_all(&data);
    let config = write_config("wss", &default_config_on_free_ports());
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    let wss = gw.listening("wss").await;
    let ws = gw.listening("ws").await;
    let announced = gw.stderr_line("development CA (created now)").await;
    let cert = data.join("dev-ca.crt");
    let recipe = format!("SSL_CERT_FILE={}", cert.display());
    assert!(announced.contains(&recipe), "{announced}");
    let curl = format!(
        "curl --cacert {} https://localhost:{}/echo",
        cert.display(),
        wss.port()
    );
    assert!(announced.contains(&curl), "{announced}");
    gw.stderr_line(&format!(
        "try it: python3 -m websockets ws://127.0.0.1:{}/echo",
        ws.port()
    ))
    .await;
    gw.stderr_line(&format!(
        "try it: python3 -m websockets wss://localhost:{}/echo",
        wss.port()
    ))
    .await;
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("dev-ca.key"))
            .unwrap_or_else(|e| panic!("{e}"))
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the CA key is private");

    let pem = std::fs::read(&cert).unwrap_or_else(|e| panic!("{e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    wss_echo(wss, tls_client(roots))
        .await
        .unwrap_or_else(|e| panic!("trusting the CA: {e}"));

    // A client that does not trust it: refused, and the log says what most likely happened.
    let webpki = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let untrusting = wss_echo(wss, tls_client(webpki)).await;
    assert!(untrusting.is_err(), "{untrusting:?}");
    let line = gw.stderr_line("TLS handshake failed").await;
    assert!(
        line.contains("the client most likely rejected the certificate") && line.contains(&recipe),
        "{line}"
    );
    drop(gw);

    // A second run keeps the CA, so a client trusts it once for good.
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    gw.stderr_line("development CA (reused)").await;
    let wss = gw.listening("wss").await;
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            r.add(c.unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        r
    };
    wss_echo(wss, tls_client(roots))
        .await
        .unwrap_or_else(|e| panic!("after a restart: {e}"));
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(config);
}

use rustls_pki_types::pem::PemObject;

/// Issue 22 item 2: SO_REUSEPORT would let a forgotten process keep part of the
/// connections; a second wsgate on the same listener refuses to start unless
/// `--takeover` is given.
#[tokio::test]
async fn a_second_instance_on_a_taken_port_refuses_unless_takeover() {
    let data = unique("data-takeover");
    let port = free_port();
    let text = format!(
        "listeners:\n  - {{ name: public, bind: \"127.0.0.1:{port}\" }}\n  - {{ name: secure, bind: \"127.0.0.1:0\", tls: {{ self_signed: true }} }}\nupstreams:\n  echo: {{ builtin: echo }}\nroutes:\n  - {{ name: echo, match: {{ path_prefix: / }}, upstream: echo }}\n"
    );
    let config = write_config("takeover", &text);
    let args = ["--config", &*config.to_string_lossy()];
    let first = Wsgate::start(&args, &data);
    first.listening("ws").await;
    let refused_data = unique("data-takeover-refused");
    let _ = std::fs::remove_dir_all(&refused_data);
    let mut second = Wsgate::start(&args, &refused_data);
    assert_eq!(second.exit_code(WAIT).await, Some(1));
    assert!(
        !refused_data.exists(),
        "a refused start writes nothing (no development CA)"
    );
    let line = second.stderr_line("another process already listens").await;
    assert!(
        line.contains(&format!("127.0.0.1:{port}")) && line.contains("--takeover"),
        "{line}"
    );
    // The first one still serves.
    let mut ws = support::connect(&format!("ws://127.0.0.1:{port}/")).await;
    ws.send(Message::text("still here"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let takeover = Wsgate::start(&[args[0], args[1], "--takeover"], &data);
    takeover.listening("ws").await;
    takeover
        .stderr_line("--takeover: sharing the address")
        .await;
    drop((first, takeover));
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(config);
}

/// Issue 22 items 3 and 5: `wsgate proxy` fronts a backend with no file; `--print-config`
/// prints a file that passes `--check`; a dead backend's 502 carries the OS error in the
/// access log (`upstream_error`) and one stderr line, not one per attempt.
#[tokio::test]
async fn proxy_mode_fronts_a_backend_and_says_why_a_dead_one_is_down() {
    let data = unique("data-proxy");
    let backend = support::echo_backend().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let to = backend.to_string();
    let gw = Wsgate::start(&["proxy", "--listen", &listen, "--to", &to], &data);
    gw.listening("ws").await;
    let mut ws = support::connect(&format!("ws://{listen}/any/path")).await;
    ws.send(Message::text("no file needed"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = tokio::time::timeout(WAIT, ws.next()).await;
    assert!(
        matches!(reply, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "no file needed"),
        "{reply:?}"
    );
    drop(gw);

    let out = Command::new(BIN)
        .args(["proxy", "--listen", &listen, "--to", &to, "--print-config"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(yaml.contains(&to) && yaml.contains(&listen), "{yaml}");
    let printed = write_config("printed", &yaml);
    let check = Command::new(BIN)
        .args(["--check", "--config", &printed.to_string_lossy()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(check.status.success(), "{yaml}\n{check:?}");
    let _ = std::fs::remove_file(printed);

    // A backend nobody listens on.
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Wsgate::start(&["proxy", "--listen", &listen, "--to", &dead], &data);
    let addr = gw.listening("ws").await;
    for _ in 0..3 {
        let (_, head) = support::raw_upgrade(addr, "/", "").await;
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    }
    let line = gw.stdout_line("upstream_connect").await;
    let line: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}"));
    let error = line["upstream_error"].as_str().unwrap_or_default();
    assert!(error.contains("Connection refused"), "{line}");
    assert_eq!(line["upstream"], dead.as_str());
    let warned = gw.stderr_line("backend failed").await;
    assert!(
        warned.contains("Connection refused") && warned.contains(&dead),
        "{warned}"
    );
    // Three attempts, one stderr line: the rest are in the access log only.
    let start = Instant::now();
    while Wsgate::lines(&gw.stdout)
        .iter()
        .filter(|l| l.contains("upstream_error"))
        .count()
        < 3
    {
        assert!(start.elapsed() < WAIT, "three access-log lines");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warnings = Wsgate::lines(&gw.stderr)
        .iter()
        .filter(|l| l.contains("backend failed"))
        .count();
    assert_eq!(warnings, 1);
}

/// Issue 22 item 4: a refusal's body names the reason first, then what to change,
/// without echoing a secret.
#[tokio::test]
async fn refusal_bodies_say_what_to_change_without_echoing_secrets() {
    let data = unique("data-hints");
    let text = "listeners: [{ name: public, bind: \"127.0.0.1:0\" }]\nupstreams:\n  echo: { builtin: echo }\nroutes:\n  - name: chat\n    match: { path_prefix: /chat }\n    upstream: echo\n    origins: [\"https://app.example.com\"]\n";
    let config = write_config("hints", text);
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    let addr = gw.listening("ws").await;
    let body = |resp: &str| {
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    };

    let (_, head) = support::raw_upgrade(addr, "/chat", "Origin: https://evil.example\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    let upgrade = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let resp = support::raw_request(
        addr,
        upgrade("/chat", "Origin: https://evil.example\r\n").as_bytes(),
    )
    .await;
    let text = body(&resp);
    assert_eq!(support::refusal_word(&resp), "origin", "{resp}");
    assert!(
        text.contains("origin not allowed: https://evil.example")
            && text.contains("https://app.example.com")
            && text.contains("allow_missing_origin"),
        "{text}"
    );
    let resp = support::raw_request(addr, upgrade("/chat", "").as_bytes()).await;
    assert_eq!(support::refusal_word(&resp), "origin", "{resp}");
    assert!(body(&resp).contains("allow_missing_origin: true"), "{resp}");

    // Two Origin headers, both allowed: the hint names the real problem.
    let twice = "Origin: https://app.example.com\r\nOrigin: https://app.example.com\r\n";
    let resp = support::raw_request(addr, upgrade("/chat", twice).as_bytes()).await;
    assert_eq!(support::refusal_word(&resp), "origin", "{resp}");
    assert!(
        body(&resp).contains("more than one Origin header"),
        "{resp}"
    );
    assert!(!body(&resp).contains("origin not allowed"), "{resp}");
    // An Origin that is not text: not "no Origin header".
    let mut request = upgrade("/chat", "Origin: https://\u{1}\r\n").into_bytes();
    if let Some(at) = request.iter().position(|b| *b == 1) {
        request[at] = 0xff;
    }
    let resp = support::raw_request(addr, &request).await;
    assert_eq!(support::refusal_word(&resp), "origin", "{resp}");
    assert!(body(&resp).contains("not valid text"), "{resp}");
    assert!(!body(&resp).contains("allow_missing_origin"), "{resp}");

    let resp = support::raw_request(
        addr,
        upgrade("/nowhere?access_token=s3cr3t-value", "").as_bytes(),
    )
    .await;
    assert_eq!(support::refusal_word(&resp), "no_route", "{resp}");
    assert!(body(&resp).contains("/nowhere"), "{resp}");
    assert!(!resp.contains("s3cr3t-value"), "{resp}");
    let _ = std::fs::remove_file(config);
}

/// Issue 22 item 7: a second SIGTERM cuts the drain short and the exit status says so.
#[tokio::test]
async fn a_second_stop_signal_exits_non_zero() {
    let data = unique("data-sigterm");
    let backend = support::echo_backend().await;
    let text = format!(
        "listeners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\ndrain: {{ spread: 20s, timeout: 30s }}\nupstreams:\n  app: {{ backends: [\"{backend}\"] }}\nroutes:\n  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}\n"
    );
    let config = write_config("sigterm", &text);
    let mut gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    let addr = gw.listening("ws").await;
    // Four connections spread over 20 s: the drain lasts at least 15 s.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(support::connect(&format!("ws://{addr}/")).await);
    }
    gw.signal("TERM");
    gw.stderr_line("draining").await;
    gw.signal("TERM");
    assert_eq!(gw.exit_code(Duration::from_secs(8)).await, Some(1));
    gw.stderr_line("second stop signal").await;
    let _ = std::fs::remove_file(config);
}

/// Issue 22 item 7: the reload line names the routes added, changed and removed.
#[tokio::test]
async fn reload_names_the_routes_added_changed_and_removed() {
    let data = unique("data-reload");
    let route = |name: &str, prefix: &str| {
        format!("  - {{ name: {name}, match: {{ path_prefix: {prefix} }}, upstream: echo }}\n")
    };
    let head = "listeners: [{ name: public, bind: \"127.0.0.1:0\" }]\nupstreams:\n  echo: { builtin: echo }\nroutes:\n";
    let config = write_config(
        "reload",
        &format!(
            "{head}{}{}{}",
            route("keep", "/k"),
            route("edit", "/e"),
            route("gone", "/g")
        ),
    );
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    gw.listening("ws").await;
    std::fs::write(
        &config,
        format!(
            "{head}{}{}{}",
            route("keep", "/k"),
            route("edit", "/e2"),
            route("new", "/n")
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    gw.signal("HUP");
    let line = gw.stderr_line("configuration reloaded").await;
    assert!(
        line.contains(r#"routes_added=["new"]"#)
            && line.contains(r#"routes_changed=["edit"]"#)
            && line.contains(r#"routes_removed=["gone"]"#),
        "{line}"
    );
    let _ = std::fs::remove_file(config);
}

fn check(text: &str, name: &str) -> (bool, String) {
    let path = write_config(name, text);
    let out = Command::new(BIN)
        .args(["--check", "--config", &path.to_string_lossy()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 22 item 7: the mistakes a newcomer makes get messages that say what to write.
#[test]
fn config_mistakes_are_explained() {
    let with_backend = |backends: &str, extra: &str| {
        format!(
            "listeners: [{{ name: a, bind: \"127.0.0.1:0\" }}]\nupstreams:\n  app:\n    backends: {backends}\n{extra}routes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: app }}\n"
        )
    };
    let (ok, err) = check(
        &with_backend("[{ addr: \"ws://127.0.0.1:9001/\" }]", ""),
        "scheme",
    );
    assert!(!ok);
    assert!(
        err.contains("without a scheme") && !err.contains("IPv6"),
        "{err}"
    );
    let (ok, err) = check(
        &with_backend("[\"127.0.0.1:9001\", \"127.0.0.1:9002\"]", ""),
        "plain",
    );
    assert!(ok, "a backend may be a plain string: {err}");
    let (ok, err) = check(
        &with_backend("[\"127.0.0.1:9001\"]", "    connect_timeout: 1.5s\n"),
        "decimal",
    );
    assert!(ok, "1.5s is a duration: {err}");
    let (ok, err) = check(&with_backend("[42]", ""), "number");
    assert!(
        !ok && err.contains("host:port") && !err.contains("FileBackend"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/wsgate.yaml"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        err.starts_with("/nonexistent/wsgate.yaml: cannot read the config file")
            && !err.contains(":0:0")
            && !err.contains("(root)")
            && err.contains("wsgate proxy"),
        "{err}"
    );
}

/// Issue 22 item 7: the example PKI (`cargo run --example dev_pki -- DIR`) writes its
/// private keys readable by their owner only. `cargo test` builds the example next to the
/// test binaries.
#[test]
fn the_example_pki_writes_private_keys_0600() {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("dev_pki"))
        .unwrap_or_else(|| panic!("no target directory above {exe:?}"));
    assert!(
        example.exists(),
        "{example:?} missing: run the tests with `cargo test`, which builds the examples"
    );
    let dir = unique("pki");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(&example)
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{out:?}");
    let mode = |name: &str| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .permissions(),
        ) & 0o777
    };
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("server.key"), 0o600);
    assert_eq!(
        mode("server.crt") & 0o077,
        mode("server.crt") & 0o044 & 0o077
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Review of #22, bug 1: a client's request body that fails (over `max_request_body`, or
/// aborted mid-body) is the client's doing: no "backend failed" warning about a healthy
/// backend (which would also hold back a genuine one for 10 s), no `upstream_error`, and
/// an abort is not a `502 upstream_connect`.
#[tokio::test]
async fn a_client_body_failure_is_not_blamed_on_the_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A slow backend: takes connections and reads, never answers.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let backend_addr = backend.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let data = unique("data-body");
    let text = format!(
        "listeners: [{{ name: public, bind: \"127.0.0.1:0\" }}]\nlimits: {{ max_request_body: 1KiB }}\nupstreams:\n  app: {{ backends: [\"{backend_addr}\"] }}\nroutes:\n  - {{ name: app, match: {{ path_prefix: / }}, upstream: app, http: proxy }}\n"
    );
    let config = write_config("body", &text);
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    let addr = gw.listening("ws").await;

    // Chunked, past the cap while the backend is still reading.
    let mut over = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = "POST /over HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    over.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let chunk = format!("258\r\n{}\r\n", "x".repeat(600));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if over.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, over.read(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");

    // Aborted mid-body, once the request went upstream.
    let mut aborted = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = "POST /aborted HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 500\r\n\r\n";
    aborted
        .write_all(format!("{head}{}", "y".repeat(100)).as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(aborted);

    let line = |path: &'static str| {
        let gw = &gw;
        async move {
            let l = gw.stdout_line(&format!("\"path\":\"{path}\"")).await;
            serde_json::from_str::<serde_json::Value>(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
        }
    };
    let over_line = line("/over").await;
    assert_eq!(over_line["status"], 413, "{over_line}");
    assert_eq!(over_line["proxy_reason"], "body_too_large", "{over_line}");
    assert!(over_line.get("upstream_error").is_none(), "{over_line}");
    let aborted_line = line("/aborted").await;
    assert_ne!(aborted_line["status"], 502, "{aborted_line}");
    assert_ne!(
        aborted_line["proxy_reason"], "upstream_connect",
        "{aborted_line}"
    );
    assert!(
        aborted_line.get("upstream_error").is_none(),
        "{aborted_line}"
    );
    let warned: Vec<String> = Wsgate::lines(&gw.stderr)
        .into_iter()
        .filter(|l| l.contains("backend failed"))
        .collect();
    assert!(warned.is_empty(), "{warned:?}");
    drop(gw);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(config);
}

/// Review of #22, bugs 2 and 5: a listener a reload adds is checked as at start-up (not
/// bound next to another process already listening there, the rest of the reload still
/// applied), and a `self_signed` listener a reload adds is signed by the development CA,
/// which a client trusting `dev-ca.crt` then accepts.
#[tokio::test]
async fn a_reload_checks_new_listeners_and_signs_them_with_the_development_ca() {
    let data = unique("data-reload-listeners");
    let _ = std::fs::remove_dir_all(&data);
    let taken = free_port();
    let other_text = format!(
        "listeners: [{{ name: other, bind: \"127.0.0.1:{taken}\" }}]\nupstreams:\n  echo: {{ builtin: echo }}\nroutes:\n  - {{ name: echo, match: {{ path_prefix: / }}, upstream: echo }}\n"
    );
    let other_config = write_config("reload-other", &other_text);
    let other_data = unique("data-reload-other");
    let other = Wsgate::start(&["--config", &other_config.to_string_lossy()], &other_data);
    other.listening("ws").await;

    let tail = "upstreams:\n  echo: { builtin: echo }\nroutes:\n  - { name: echo, match: { path_prefix: / }, upstream: echo }\n";
    let config = write_config(
        "reload-listeners",
        &format!("listeners:\n  - {{ name: public, bind: \"127.0.0.1:0\" }}\n{tail}"),
    );
    let gw = Wsgate::start(&["--config", &config.to_string_lossy()], &data);
    gw.listening("ws").await;
    assert!(
        !data.join("dev-ca.crt").exists(),
        "no CA without a self_signed listener"
    );
    let secure = free_port();
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{ name: public, bind: \"127.0.0.1:0\" }}\n  - {{ name: stolen, bind: \"127.0.0.1:{taken}\" }}\n  - {{ name: secure, bind: \"127.0.0.1:{secure}\", tls: {{ self_signed: true }} }}\n{tail}"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    gw.signal("HUP");
    let reloaded = gw.stderr_line("configuration reloaded").await;
    let refused = gw.stderr_line("another process already listens").await;
    assert!(
        refused.contains("`stolen`") && refused.contains(&format!("127.0.0.1:{taken}")),
        "{refused}"
    );
    assert!(
        reloaded.contains(r#"bound=["secure"]"#),
        "the rest of the reload applies: {reloaded}"
    );

    let pem = std::fs::read(data.join("dev-ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let addr: SocketAddr = format!("127.0.0.1:{secure}")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    wss_echo(addr, tls_client(roots))
        .await
        .unwrap_or_else(|e| panic!("trusting the CA after a reload: {e}"));
    drop((gw, other));
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&other_data);
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(other_config);
}

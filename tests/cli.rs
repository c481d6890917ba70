//! The `wsgate` binary itself: `--check` exit codes and located errors, and a real run of
//! the default configuration serving the built-in echo demo.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn temp_config(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("wsgate-test-{}-{name}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_configs_pass_check() {
    for file in ["conf/wsgate.yaml", "conf/example-full.yaml"] {
        let (code, out, err) = run(&["--check", "--config", file]);
        assert_eq!(code, 0, "{file}: {out}{err}");
        assert!(out.contains("is valid"), "{out}");
    }
}

#[test]
fn check_reports_every_error_with_file_line_column_and_key_path() {
    let path = temp_config(
        "bad",
        "listeners: [{ name: a, bind: \"127.0.0.1:0\" }]\nupstreams:\n  e: { builtin: echo }\nroutes:\n  - name: r\n    match: { path_prefx: /x }\n    upstream: e\n",
    );
    let (code, _, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 1, "{err}");
    let want = format!("{}:6:14: routes[0].match", path.display());
    assert!(err.contains(&want), "want {want:?} in {err}");
    assert!(err.contains("path_prefx"), "{err}");
    // Running (not checking) with it is a usage error.
    let (code, _, _) = run(&["--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 64);
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_sticky_key_is_refused_with_its_path() {
    let path = temp_config(
        "sticky",
        "listeners: [{ name: a, bind: \"127.0.0.1:0\" }]\nupstreams:\n  e: { backends: [{ addr: \"127.0.0.1:9\" }], sticky: { key: ipv4 } }\nroutes:\n  - name: r\n    match: { path_prefix: /x }\n    upstream: e\n",
    );
    let (code, _, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("upstreams.e.sticky.key") && err.contains("not a sticky key"),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
}

/// A PROXY listener that believes any peer is valid, but `--check` says what it means.
#[test]
fn check_warns_about_proxy_protocol_without_trusted_proxies() {
    let yaml = |top: &str| {
        format!(
            "listeners: [{{ name: lb, bind: \"127.0.0.1:0\", proxy_protocol: true }}]\n{top}\nupstreams:\n  e: {{ builtin: echo }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: e }}\n"
        )
    };
    let path = temp_config("proxy-any", &yaml(""));
    let (code, out, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("warning:")
            && err.contains("listeners[0].proxy_protocol")
            && err.contains("trusted_proxies"),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
    let path = temp_config("proxy-trusted", &yaml("trusted_proxies: [10.0.0.0/8]"));
    let (code, out, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("proxy_protocol"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn version_and_unknown_flags() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("wsgate "), "{out}");
    let (code, _, err) = run(&["--frobnicate"]);
    assert_eq!(code, 64);
    assert!(err.contains("unknown argument"), "{err}");
}

#[tokio::test]
async fn default_config_serves_the_echo_demo() {
    let text = std::fs::read_to_string("conf/wsgate.yaml").unwrap_or_else(|e| panic!("{e}"));
    let text = text
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let path = temp_config("default", &text);
    let data = std::env::temp_dir().join(format!("wsgate-test-{}-data", std::process::id()));
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap_or_default()])
        // The wss:// listener's development CA goes here, not into the user's data dir.
        .env("WSGATE_DATA_DIR", &data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    // Keep draining stderr after the listener line so the child never writes to a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("listening (ws://)")
                .nth(1)
                .and_then(|rest| rest.split("addr=").nth(1))
            {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("wsgate did not report its listener"));
    let mut ws = support::connect(&format!("ws://{addr}/echo")).await;
    ws.send(Message::text("hello demo"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = tokio::time::timeout(support::PATIENCE, ws.next()).await;
    assert!(
        matches!(reply, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "hello demo"),
        "{reply:?}"
    );
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    let _ = tokio::time::timeout(support::PATIENCE, ws.next()).await;
    drop(ws);
    // The access log (stdout by default) gets its line once the connection has ended.
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no access-log line"));
    let line: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(line["event"], "ws_close");
    assert_eq!(line["route"], "echo");
    assert_eq!(
        line["close"]["code"], 1005,
        "a close frame without a code is logged as 1005"
    );
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "exit: {status:?}");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_dir_all(data);
}

/// SPEC §2 `admin.token`: an admin listener off loopback without a token serves no
/// state-changing endpoint, and `--check` says so.
#[test]
fn check_warns_when_admin_changes_are_refused_for_want_of_a_token() {
    let path = temp_config(
        "open-admin",
        "listeners: [{ name: a, bind: \"127.0.0.1:0\" }]\nadmin: { bind: \"0.0.0.0:0\" }\nupstreams:\n  e: { builtin: echo }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: e }\n",
    );
    let (code, out, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("admin.token is not set") && err.contains("refused"),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
}

/// A short `admin.token` is taken, with a warning from `--check` (and at start) that does
/// not show it.
#[test]
fn check_warns_about_a_short_admin_token() {
    let yaml = |token: &str| {
        format!(
            "listeners: [{{ name: a, bind: \"127.0.0.1:0\" }}]\nadmin: {{ bind: \"127.0.0.1:0\", token: \"{token}\" }}\nupstreams:\n  e: {{ builtin: echo }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: e }}\n"
        )
    };
    let path = temp_config("short-admin-token", &yaml("hunter2-x"));
    let (code, out, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("admin.token is 9 characters long") && err.contains("at least 16"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the token is not shown: {err}");
    let _ = std::fs::remove_file(path);
    let path = temp_config("long-admin-token", &yaml("0123456789abcdef"));
    let (code, out, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("admin.token"), "{err}");
    let _ = std::fs::remove_file(path);
}

/// The container and Kubernetes config binds admin to 0.0.0.0, so it takes its token
/// from the environment (a Kubernetes Secret): without it, it does not load.
#[test]
fn the_container_config_needs_an_admin_token_from_the_environment() {
    let (code, _, err) = run(&["--check", "--config", "conf/k8s/wsgate.yaml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("WSGATE_ADMIN_TOKEN"), "{err}");
    let out = Command::new(BIN)
        .args(["--check", "--config", "conf/k8s/wsgate.yaml"])
        .env("WSGATE_ADMIN_TOKEN", "a-long-random-token-from-a-secret")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("admin.token is not set"), "{err}");
}

/// Review of #22: `wsgate proxy` validates before printing or running, and its errors name
/// the flag the user typed, not a line of a file they never wrote.
#[test]
fn proxy_mode_errors_name_the_flag() {
    let (code, out, err) = run(&[
        "proxy",
        "--listen",
        ":8080",
        "--to",
        "127.0.0.1:9001",
        "--print-config",
    ]);
    assert_eq!(code, 64, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("--listen: ") && !err.contains("(wsgate proxy)"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "proxy",
        "--listen",
        "127.0.0.1:8080\nx",
        "--to",
        "127.0.0.1:9001",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("control characters"), "{err}");
}

/// docs/configuration.md: once the file reads, every error among its values is printed
/// together (an error of form, such as an unknown key, stops reading at that point).
#[test]
fn check_prints_every_value_error_at_once() {
    let path = temp_config(
        "values",
        "listeners: [{ name: a, bind: \"nowhere\" }, { name: b, bind: \"127.0.0.1:0\" }]\nupstreams:\n  e: { builtin: echo }\nroutes:\n  - { name: r, match: { path_prefix: /x }, upstream: missing }\n",
    );
    let (code, _, err) = run(&["--check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("listeners[0].bind"), "{err}");
    assert!(err.contains("routes[0].upstream"), "{err}");
    let _ = std::fs::remove_file(path);
}

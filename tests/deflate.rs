//! permessage-deflate (SPEC §2 `deflate`) with a real peer on both ends: Python's
//! `websockets` (tests/deflate/peer.py), which negotiates permessage-deflate with context
//! takeover by default, as the client and as the echo backend.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deflate/peer.py");

/// Fails (never skips) when the peer cannot run.
fn require_websockets() {
    let ok = Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "these tests need python3 with the `websockets` package: python3 -m pip install websockets (.ci/run installs it)"
    );
}

/// The Python echo backend; its stdout lines (`ext <offer>` per connection) arrive on the
/// channel. Killed when dropped.
struct PyServer {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn py_server() -> PyServer {
    require_websockets();
    let mut child = Command::new("python3")
        .args([PEER, "server"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let lines = lines_of(child.stdout.take().unwrap_or_else(|| panic!("no stdout")));
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the Python server did not start: {e}"));
    let port = first
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    PyServer { child, port, lines }
}

/// Runs the Python client on `case`; returns (negotiated extensions, result line).
async fn py_client(url: String, case: &'static str) -> (String, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([PEER, "client", &url, case])
            .output()
            .unwrap_or_else(|e| panic!("python3: {e}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let ext = lines
        .next()
        .and_then(|l| l.strip_prefix("ext "))
        .map(str::to_owned);
    let result = lines.next().map(str::to_owned);
    match (ext, result) {
        (Some(ext), Some(result)) => (ext, result),
        _ => panic!(
            "client {case}: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

async fn gateway(server: &PyServer, deflate: &str) -> TestGateway {
    spawn_gateway(&format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
limits: {{ max_message_size: 1MiB, max_frame_size: 1MiB }}
upstreams:
  app: {{ backends: [{{ addr: "127.0.0.1:{port}" }}], connect_timeout: 2s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app, deflate: {deflate} }}
"#,
        port = server.port
    ))
    .await
}

fn upstream_offer(server: &PyServer) -> String {
    let line = server
        .lines
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the backend saw no connection: {e}"));
    line.strip_prefix("ext ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_relays_a_compressed_conversation_and_counts_compressed_bytes() {
    let server = py_server();
    let gw = gateway(&server, "pass").await;
    let (ext, result) = py_client(gw.url("/"), "echo").await;
    assert!(ext.starts_with("permessage-deflate"), "negotiated {ext:?}");
    assert!(upstream_offer(&server).contains("permessage-deflate"));
    assert_eq!(result, "ok 40");
    // 4 MiB of zeros is a few KiB compressed: under `pass` the limit sees only those.
    let (_, result) = py_client(gw.url("/"), "zeros").await;
    assert_eq!(result, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_never_negotiates_permessage_deflate() {
    let server = py_server();
    let gw = gateway(&server, "strip").await;
    let (ext, result) = py_client(gw.url("/"), "echo").await;
    assert_eq!(ext, "-", "the client got an extension back");
    assert_eq!(upstream_offer(&server), "-", "the upstream saw an offer");
    assert_eq!(result, "ok 40");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_keeps_other_extension_offers() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(
        &config_for(backend, "").replace("upstream: app }", "upstream: app, deflate: strip }"),
    )
    .await;
    let (_client, head) = raw_upgrade(
        gw.addr(),
        "/",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-other; a=1\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_up, up_head) = next_accepted(&mut accepted).await;
    assert_eq!(
        header_value(&up_head, "sec-websocket-extensions").as_deref(),
        Some("x-other; a=1"),
        "{up_head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_judges_the_inflated_size() {
    let server = py_server();
    let gw = gateway(&server, "inspect").await;
    // A few KiB on the wire, 4 MiB inflated: over `max_message_size: 1MiB`.
    let (ext, result) = py_client(gw.url("/"), "zeros").await;
    assert!(ext.starts_with("permessage-deflate"), "negotiated {ext:?}");
    assert_eq!(result, "closed 1009");
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["by"], "proxy", "{line}");
    // The bomb never reached the backend whole: its frame was cut where it went over.
    let mut seen = Vec::new();
    while let Ok(l) = server.lines.recv_timeout(Duration::from_millis(500)) {
        seen.push(l);
    }
    assert!(
        !seen.iter().any(|l| l.starts_with("got ")),
        "the backend got a message: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_checks_inflated_text_for_utf8() {
    let server = py_server();
    let gw = gateway(&server, "inspect").await;
    let (ext, result) = py_client(gw.url("/"), "badutf8").await;
    assert!(ext.starts_with("permessage-deflate"), "negotiated {ext:?}");
    assert_eq!(result, "closed 1007");
    // The proxy judged it (under `pass`, the Python backend would have closed 1007 itself).
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["by"], "proxy", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_relays_a_compressed_conversation_with_context_takeover() {
    let server = py_server();
    let gw = gateway(&server, "inspect").await;
    let (ext, result) = py_client(gw.url("/"), "echo").await;
    assert!(ext.starts_with("permessage-deflate"), "negotiated {ext:?}");
    assert!(
        !ext.contains("client_no_context_takeover"),
        "negotiated {ext:?}"
    );
    assert_eq!(result, "ok 40");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_closes_a_corrupt_deflate_stream_with_1002() {
    let server = py_server();
    let gw = gateway(&server, "inspect").await;
    let (mut client, head) = raw_upgrade(
        gw.addr(),
        "/",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        header_value(&head, "sec-websocket-extensions")
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "{head}"
    );
    // RSV1 + FIN + binary; 0xff… is not a DEFLATE block (BTYPE 11 is reserved).
    let frame = client_frame(0xC2, &[0xff; 16]);
    tokio::io::AsyncWriteExt::write_all(&mut client, &frame)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_close_code(&mut client).await, Some(1002));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["by"], "proxy", "{line}");
}

//! socket.io end to end through `http: proxy` (SPEC §3 "HTTP alongside WebSockets"):
//! two real python-socketio server processes behind wsgate, and real python-socketio
//! clients with the default transports (long-polling first, then the upgrade to
//! websocket). Each session survives its upgrade only if its polls and its WebSocket
//! reached the same backend. The peer is tests/socketio/peer.py; the tests fail, never
//! skip, without the package (`.ci/run` installs it).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/socketio/peer.py");

fn require_socketio() {
    let ok = Command::new("python3")
        .args(["-c", "import socketio, aiohttp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "these tests need python3 with `python-socketio` and `aiohttp`: python3 -m pip install python-socketio aiohttp (.ci/run installs them)"
    );
}

/// A python-socketio server process; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(name: &str) -> Server {
    let mut child = Command::new("python3")
        .args([PEER, "server", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drained to the end: a server whose stdout is closed fails its next print.
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the socket.io server did not start: {e}"));
    let port = first
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    Server { child, port }
}

/// Runs one client through the gateway as the client `xff` (a trusted proxy's word).
async fn client(url: String, xff: String) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([PEER, "client", &url, &xff])
            .output()
            .unwrap_or_else(|e| panic!("python3: {e}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "client: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socketio_sessions_poll_then_upgrade_through_wsgate_on_two_backends() {
    require_socketio();
    let a = server("a");
    let b = server("b");
    let gw = spawn_gateway(&format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
trusted_proxies: ["127.0.0.1/32"]
upstreams:
  io:
    backends: [{{ addr: "127.0.0.1:{}" }}, {{ addr: "127.0.0.1:{}" }}]
    connect_timeout: 2s
    sticky: {{ key: "ip" }}
routes:
  - {{ name: io, match: {{ path_prefix: /socket.io/ }}, upstream: io, http: proxy }}
"#,
        a.port, b.port
    ))
    .await;
    let url = format!("http://{}", gw.addr());
    let clients: Vec<_> = (1..=16)
        .map(|i| tokio::spawn(client(url.clone(), format!("203.0.113.{i}"))))
        .collect();
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let result = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .unwrap_or_else(|_| panic!("client {i} did not finish"));
        let result = result.unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(result["transport"], "websocket", "client {i}: {result}");
        assert_eq!(result["before"], result["after"], "client {i}: {result}");
        let echoed: Vec<i64> = (0..5).collect();
        let got: Vec<i64> = result["echoed"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["n"].as_i64()).collect())
            .unwrap_or_default();
        assert_eq!(got, echoed, "client {i}: {result}");
        names.insert(result["after"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(
        names.len(),
        2,
        "sixteen clients all on one backend: {names:?}"
    );
    // Each client's polls are `http` lines and its upgrade a `ws_close` line, all on one
    // backend.
    for i in 1..=16 {
        let ip = format!("203.0.113.{i}");
        let poll = gw
            .log_line(|l| l["event"] == "http" && l["route"] == "io" && l["client_ip"] == ip)
            .await;
        assert_eq!(poll["http"], "1.1");
        assert_eq!(poll["status"], 200);
        let ws = gw
            .log_line(|l| l["event"] == "ws_close" && l["route"] == "io" && l["client_ip"] == ip)
            .await;
        assert_eq!(ws["status"], 101);
        assert_eq!(ws["upstream"], poll["upstream"], "{ip}");
        for l in gw.log_lines() {
            if l["client_ip"] == ip.as_str() && l["event"] == "http" {
                assert_eq!(l["upstream"], poll["upstream"], "{ip}: {l}");
            }
        }
    }
    let scrape = scrape(&gw).await;
    let polls = metric(
        &scrape,
        "wsgate_http_requests_total",
        &[("route", "io"), ("code", "200")],
    );
    assert!(polls >= 16.0, "{polls}");
}

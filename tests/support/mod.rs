//! Shared helpers for integration tests: an in-process gateway on ephemeral ports, real
//! WebSocket backends (tokio-tungstenite and raw TCP), clients, and raw frame tools.
//! Every wait is bounded; nothing binds outside 127.0.0.1.
#![allow(dead_code)]

pub mod redis_server;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::config::Config;
use wsgate::observe::access_log::Sink;

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Backend = WebSocketStream<TcpStream>;

/// Upper bound on any single wait in tests.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestGateway {
    pub gw: wsgate::Gateway,
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// Every test's access log is checked for tokens when its gateway goes away: a JWT always
/// starts with `eyJ` (base64 of `{"`), and none may ever be logged (SPEC §6).
impl Drop for TestGateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let lines = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        if let Some(leak) = lines.iter().find(|l| l.contains("eyJ")) {
            panic!("a token reached the access log: {leak}");
        }
    }
}

impl TestGateway {
    pub fn addr(&self) -> SocketAddr {
        self.gw.addr()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr(), path)
    }

    /// Access-log lines so far, parsed.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        let lines = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the first access-log line matching `pred`.
    pub async fn log_line(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        eventually("a matching access-log line", PATIENCE, async || {
            let lines = self.log_lines();
            match lines.iter().position(&pred) {
                Some(i) => Ok(lines[i].clone()),
                None => Err(lines),
            }
        })
        .await
    }
}

/// How often [`eventually`] looks again, at most (it starts at 1 ms and doubles up to this).
pub const POLL: Duration = Duration::from_millis(20);

/// Waits for a condition: calls `check` until it gives `Ok`, and returns that value. The
/// first looks come quickly (1, 2, 4... ms apart), then every [`POLL`]. Once `within` has
/// passed, panics naming `what` and the last `Err` (what was seen instead). Bounded in
/// time (a check still running at the bound gets [`PATIENCE`] more, then counts as
/// failed) and in count (`within / POLL` plus a few looks).
///
/// For waits only: a test that must let time pass (idle longer than a timeout, send
/// slowly) sleeps, and says why.
pub async fn eventually<T, E: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    let looks = within.as_millis() / POLL.as_millis() + 8;
    let mut pause = Duration::from_millis(1);
    let mut seen = None;
    for _ in 0..looks {
        match tokio::time::timeout_at(deadline + PATIENCE, check()).await {
            Ok(Ok(done)) => return done,
            Ok(Err(now)) => seen = Some(now),
            Err(_) => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL);
    }
    panic!("{what}: not within {within:?}; last seen: {seen:?}");
}

/// Starts wsgate in-process from YAML (listeners should bind 127.0.0.1:0).
pub async fn spawn_gateway(yaml: &str) -> TestGateway {
    let config = Config::from_yaml_str_with_env(yaml, "test.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("config: {e}"));
    let logs = Arc::new(Mutex::new(Vec::new()));
    let gw = wsgate::start(config, Sink::Memory(logs.clone()))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    TestGateway { gw, logs }
}

/// A config with one listener and one route `/` → `backend`, plus extra `limits` YAML.
pub fn config_for(backend: SocketAddr, limits: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
limits: {{ {limits} }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 2s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
"#
    )
}

/// Gateway in front of a fresh echo backend.
pub async fn gateway_with_echo(limits: &str) -> TestGateway {
    let backend = echo_backend().await;
    spawn_gateway(&config_for(backend, limits)).await
}

fn big_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// A tokio-tungstenite echo server.
pub async fn echo_backend() -> SocketAddr {
    let (addr, mut rx) = ws_backend().await;
    tokio::spawn(async move {
        while let Some(mut ws) = rx.recv().await {
            tokio::spawn(async move {
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A tokio-tungstenite backend that hands each accepted WebSocket to the test.
pub async fn ws_backend() -> (SocketAddr, mpsc::Receiver<Backend>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(ws) =
                    tokio_tungstenite::accept_async_with_config(s, Some(big_config())).await
                {
                    let _ = tx.send(ws).await;
                }
            });
        }
    });
    (addr, rx)
}

/// A raw backend: completes the handshake by hand, then hands the TCP stream and the
/// request head to the test, for exact bytes (e.g. masked frames from a server).
pub async fn raw_backend() -> (SocketAddr, mpsc::Receiver<(TcpStream, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let key = header_value(&head, "sec-websocket-key").unwrap_or_default();
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                if s.write_all(resp.as_bytes()).await.is_ok() {
                    let _ = tx.send((s, head)).await;
                }
            });
        }
    });
    (addr, rx)
}

/// A gateway (config from `yaml_for(backend address)`) in front of a raw backend, and one
/// upgraded connection through it: (client, upstream, gateway).
pub async fn pair_with(
    yaml_for: impl FnOnce(SocketAddr) -> String,
) -> (TcpStream, TcpStream, TestGateway) {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&yaml_for(backend)).await;
    let (client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (up, _) = tokio::time::timeout(PATIENCE, accepted.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no backend"));
    (client, up, gw)
}

/// Reads an HTTP head (up to the blank line), bounded in size and time.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(PATIENCE, read).await;
    String::from_utf8_lossy(&head).into_owned()
}

/// A header's value from a raw head (first occurrence, case-insensitive name).
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Connects a tokio-tungstenite client.
pub async fn connect(url: &str) -> Client {
    let fut = tokio_tungstenite::connect_async_with_config(url, Some(big_config()), false);
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => panic!("connect {url}: {e}"),
        Err(_) => panic!("connect {url}: timed out"),
    }
}

/// Sends a raw upgrade request and returns the stream after reading the response head.
pub async fn raw_upgrade(addr: SocketAddr, path: &str, extra_headers: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = read_head(&mut s).await;
    (s, head)
}

/// Sends raw bytes as a request and reads the whole response until EOF.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(request).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A frame as a client sends it (masked with a fixed key).
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    frame(first_byte, payload, Some([0x11, 0x22, 0x33, 0x44]))
}

/// A frame as a server sends it (unmasked).
/// The next connection a test backend accepted, within [`PATIENCE`].
pub async fn next_accepted<T>(accepted: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(PATIENCE, accepted.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no backend connection"))
}

/// Reads the proxy's next ping and returns a client pong that does not answer it (so the
/// proxy relays it upstream rather than consuming it): the frame, and its payload.
pub async fn pong_not_answering_next_ping(client: &mut TcpStream) -> (Vec<u8>, Vec<u8>) {
    let (b0, ping) = read_frame(client)
        .await
        .unwrap_or_else(|| panic!("no ping"));
    assert_eq!(b0, 0x89);
    let wrong: Vec<u8> = ping.iter().map(|b| !b).collect();
    (client_frame(0x8A, &wrong), wrong)
}

pub fn server_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    frame(first_byte, payload, None)
}

pub fn frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first_byte];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A close payload: code and reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Sends a close frame as a client would (masked).
pub async fn send_client_close(s: &mut TcpStream, code: u16) {
    s.write_all(&client_frame(0x88, &close_payload(code, "")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Sends a close frame as a server would (unmasked).
pub async fn send_server_close(s: &mut TcpStream, code: u16) {
    s.write_all(&server_frame(0x88, &close_payload(code, "")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// One frame read from a raw stream: (first byte, unmasked payload). `None` on EOF/timeout.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> Option<(u8, Vec<u8>)> {
    let fut = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.ok()?;
        let len = match h[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mask = if h[1] & 0x80 != 0 {
            let mut m = [0u8; 4];
            s.read_exact(&mut m).await.ok()?;
            Some(m)
        } else {
            None
        };
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        s.read_exact(&mut payload).await.ok()?;
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        Some((h[0], payload))
    };
    tokio::time::timeout(PATIENCE, fut).await.ok().flatten()
}

/// Reads frames until a close frame and returns its code (None if the stream ended first).
pub async fn read_close_code<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> Option<u16> {
    for _ in 0..1000 {
        let (b0, payload) = read_frame(s).await?;
        if b0 & 0x0F == 0x8 {
            return Some(
                payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
            );
        }
    }
    None
}

/// True when the peer closes the TCP connection (EOF or reset) within the patience.
pub async fn closes_tcp(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, fut).await.unwrap_or(false)
}

/// A backend that says who it is: each upgraded connection first receives one text frame
/// holding its name, then is held (a close frame is answered) until the peer goes or
/// `PATIENCE` passes idle; any other request (a health check) gets `200 ok`. `kill()`
/// closes the listener and every connection at once, like a crashed process.
pub struct NamedBackend {
    pub addr: SocketAddr,
    pub name: String,
    task: tokio::task::JoinHandle<()>,
}

impl NamedBackend {
    pub async fn start(name: &str) -> NamedBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        NamedBackend::serve(name, listener)
    }

    /// On an address the test holds: it can be killed and started again there.
    pub fn start_at(name: &str, place: &Reserved) -> NamedBackend {
        NamedBackend::serve(name, place.listener())
    }

    fn serve(name: &str, listener: TcpListener) -> NamedBackend {
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let me = name.to_owned();
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.spawn(named_conn(s, me.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        NamedBackend {
            addr,
            name: name.to_owned(),
            task,
        }
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for NamedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn named_conn(mut s: TcpStream, name: String) {
    let head = read_head(&mut s).await;
    let Some(key) = header_value(&head, "sec-websocket-key") else {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            .await;
        return;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if s.write_all(resp.as_bytes()).await.is_err()
        || s.write_all(&server_frame(0x81, name.as_bytes()))
            .await
            .is_err()
    {
        return;
    }
    while let Some((b0, payload)) = read_frame(&mut s).await {
        if b0 & 0x0F == 0x8 {
            let _ = s.write_all(&server_frame(0x88, &payload)).await;
            return;
        }
    }
}

/// An address held for the whole test: a socket bound there with `SO_REUSEPORT` that
/// never listens. No other process can take the port, connects to it are refused while
/// no backend listens there, and a backend can listen there (again) at any time, so a
/// test can kill and revive a backend, or configure an address before serving it.
pub struct Reserved {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl Reserved {
    /// A fresh port on `ip`.
    pub fn on(ip: std::net::IpAddr) -> Reserved {
        Reserved::at(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("reserve {ip}: {e}"))
    }

    /// `addr` itself (port 0: any port), if no one else holds it.
    pub fn at(addr: SocketAddr) -> std::io::Result<Reserved> {
        let socket = reuseport_socket(addr)?;
        socket.bind(addr)?;
        let addr = socket.local_addr()?;
        Ok(Reserved {
            addr,
            _socket: socket,
        })
    }

    /// A listener on the held address.
    pub fn listener(&self) -> TcpListener {
        let listen = || -> std::io::Result<TcpListener> {
            let socket = reuseport_socket(self.addr)?;
            socket.bind(self.addr)?;
            socket.listen(1024)
        };
        listen().unwrap_or_else(|e| panic!("listen on reserved {}: {e}", self.addr))
    }
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    Ok(socket)
}

/// An admin request over a fresh connection; returns the whole response.
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> String {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    raw_request(admin, req.as_bytes()).await
}

/// An HTTP response's status code (0 when there is none) and body.
pub fn status_and_body(resp: &str) -> (u16, String) {
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Lower-case hex SHA-256, as keys files hold API keys.
pub fn sha256_hex(key: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A keys file in a fresh scratch directory (named after `tag` and the process) holding
/// the hashes of `keys`, one per line.
pub fn keys_file(tag: &str, keys: &[&[u8]]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsgate-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("keys.txt");
    let text: String = keys.iter().map(|k| sha256_hex(k) + "\n").collect();
    std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
    file
}

// === Observability helpers (admin endpoints, metrics, log-line shapes) ===

/// `GET path` on the gateway's admin listener: (status code, body). Panics without admin.
pub async fn admin_get(gw: &TestGateway, path: &str) -> (u16, String) {
    let addr = gw
        .gw
        .admin
        .unwrap_or_else(|| panic!("the config has no admin listener"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    status_and_body(&raw_request(addr, req.as_bytes()).await)
}

/// `/metrics` as text, checked to be a 200.
pub async fn metrics_text(gw: &TestGateway) -> String {
    let (status, body) = admin_get(gw, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// `/metrics` parsed by a real Prometheus text parser.
pub async fn scrape(gw: &TestGateway) -> prometheus_parse::Scrape {
    let text = metrics_text(gw).await;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
}

/// A sample's value whatever type the parser gave it (histograms: `None`).
pub fn scalar(v: &prometheus_parse::Value) -> Option<f64> {
    use prometheus_parse::Value;
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => Some(*x),
        _ => None,
    }
}

/// Sum of the samples named `name` whose labels include all of `labels` (0 when none).
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| scalar(&s.value))
        .sum()
}

/// Polls `/metrics` until `name{labels}` equals `want` (bounded by [`PATIENCE`]).
pub async fn await_metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)], want: f64) {
    eventually(
        &format!("{name}{labels:?} = {want}"),
        PATIENCE,
        async || {
            let got = metric(&scrape(gw).await, name, labels);
            if got == want { Ok(()) } else { Err(got) }
        },
    )
    .await;
}

/// Per-IP places the gateway holds for 127.0.0.1: connections, and handshakes still in
/// progress (taken once a connection has its config, before its request head).
pub fn localhost_places(gw: &TestGateway) -> u32 {
    let localhost = "127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
    let key = wsgate::admission::client_ip::IpKey::new(localhost, 64);
    gw.gw.shared.per_ip.count(key)
}

/// A connection id as the log writes it: 26 Crockford base32 characters (ULID-shaped).
pub fn is_conn_id(id: &str) -> bool {
    id.len() == 26
        && id
            .bytes()
            .all(|c| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&c))
}

/// The reason word of a refusal: the first line of its body (SPEC §3). A second line, when
/// present, says what to change.
pub fn refusal_word(resp: &str) -> &str {
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines().next().unwrap_or("")
}

// === TLS clients for self-signed test listeners ===

/// A TLS client that accepts any certificate, offering `alpn`.
pub fn insecure_tls(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Takes any server certificate (tests serve self-signed ones).
#[derive(Debug)]
pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

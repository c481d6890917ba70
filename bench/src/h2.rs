//! `h2-idle` and `h2-echo`: WebSockets over HTTP/2 (RFC 8441) through the target, with the
//! `h2` crate as the client.
//!
//! A client connection is TLS with ALPN `h2` (or h2c with prior knowledge, `--h2c`), with
//! Chrome's windows: 6 MiB per stream, 15 MiB for the connection, so one stream never
//! holds up its siblings and WINDOW_UPDATEs are rare (what a browser costs a proxy). Each
//! WebSocket is an extended CONNECT (`:protocol: websocket`) answered 200; its DATA frames
//! carry the same masked RFC 6455 frames as the HTTP/1.1 scenarios.
//!
//! - `h2-idle`: `--connections` connections carrying `--streams` streams in all (spread
//!   round-robin, so 100 per connection when streams = 100 × connections), each stream
//!   echoing one message; RSS of the proxy before and after: (after − before) ÷ streams.
//!   One warm-up connection with a few streams is in the baseline.
//! - `h2-echo`: closed loop over `--connections` × `--streams-per-conn` streams, like the
//!   `echo` scenario: proxy CPU ÷ echoed messages, plus this generator's own CPU and each
//!   core's busy % over the measured window (is the generator the bottleneck?).

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::hist;
use crate::net::{Failures, FrameReader, Sources, tcp_connect};
use crate::procfs::{Procs, busy_pct, cpu_ticks, per_event_us};
use crate::ws::{self, Rng};

/// Chrome's HTTP/2 receive windows (SETTINGS_INITIAL_WINDOW_SIZE and the connection's).
const STREAM_WINDOW: u32 = 6 << 20;
const CONN_WINDOW: u32 = 15 << 20;

/// Where and how to open HTTP/2 connections.
#[derive(Clone)]
pub struct H2Target {
    pub addr: SocketAddr,
    pub path: String,
    /// `None`: h2c with prior knowledge.
    pub tls: Option<TlsConnector>,
}

impl H2Target {
    pub fn new(addr: SocketAddr, path: &str, h2c: bool) -> Result<H2Target> {
        let tls = if h2c {
            None
        } else {
            Some(crate::net::tls_connector_alpn(&[b"h2"])?)
        };
        Ok(H2Target {
            addr,
            path: path.to_string(),
            tls,
        })
    }
}

/// One HTTP/2 connection: the handle that opens streams (its driver runs in its own task).
async fn connect(target: &H2Target, src: Ipv4Addr) -> Result<SendRequest<Bytes>> {
    let tcp = tcp_connect(src, target.addr).await?;
    match &target.tls {
        None => handshake(tcp).await,
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .map_err(|e| anyhow!("server name: {e}"))?;
            let tls = connector.connect(name, tcp).await.context("TLS")?;
            if tls.get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
                bail!("the target did not choose h2 by ALPN");
            }
            handshake(tls).await
        }
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_concurrent_reset_streams(1000)
        .handshake(io)
        .await
        .context("h2 handshake")?;
    tokio::spawn(async move {
        // The connection's end is seen by its streams; nothing to do with it here.
        let _ = conn.await;
    });
    send.ready().await.context("h2 ready")
}

/// The two halves of a WebSocket on one stream.
struct WsStream {
    send: h2::SendStream<Bytes>,
    recv: H2Read,
}

/// Extended CONNECT for `path`; a refusal is an error naming the status.
async fn open_stream(conn: &SendRequest<Bytes>, target: &H2Target) -> Result<WsStream> {
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{scheme}://localhost{}", target.path))
        .header("sec-websocket-version", "13")
        .header("origin", format!("{scheme}://localhost"))
        .body(())
        .context("request")?;
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let mut conn = conn.clone().ready().await.context("h2 ready")?;
    let (resp, send) = conn.send_request(req, false).context("send CONNECT")?;
    let resp = resp.await.context("CONNECT answer")?;
    if resp.status() != StatusCode::OK {
        bail!("CONNECT refused with {}", resp.status());
    }
    Ok(WsStream {
        send,
        recv: H2Read {
            recv: resp.into_body(),
            buf: Bytes::new(),
        },
    })
}

/// A stream's receiving half as a byte stream, giving the window back as bytes arrive.
struct H2Read {
    recv: h2::RecvStream,
    buf: Bytes,
}

impl AsyncRead for H2Read {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Sends one whole WebSocket frame as one DATA frame.
fn send_frame(send: &mut h2::SendStream<Bytes>, frame: &[u8]) -> Result<()> {
    send.send_data(Bytes::copy_from_slice(frame), false)
        .context("send DATA")
}

/// Sends one masked binary message of `payload` and waits for its echo.
async fn echo_once(
    s: &mut WsStream,
    reader: &mut FrameReader,
    frame: &mut Vec<u8>,
    payload: &[u8],
    rng: &mut Rng,
) -> Result<()> {
    frame.clear();
    ws::push_frame(frame, true, ws::OP_BINARY, payload, Some(rng.mask()));
    send_frame(&mut s.send, frame)?;
    loop {
        match reader.next(&mut s.recv).await? {
            Some((h, _)) if h.opcode == ws::OP_BINARY => return Ok(()),
            Some(_) => continue,
            None => bail!("stream ended before the echo"),
        }
    }
}

pub struct IdleOptions {
    pub connections: u32,
    pub streams: u32,
    pub concurrency: u32,
    pub warm_streams: u32,
    pub settle: Duration,
}

pub async fn run_idle(
    target: H2Target,
    procs: Procs,
    label: &str,
    o: IdleOptions,
) -> Result<serde_json::Value> {
    if o.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let pongs = Arc::new(AtomicU64::new(0));
    let mut rng = Rng::new(11);
    // Warm-up: one connection and its streams are in the baseline.
    let warm = connect(&target, Ipv4Addr::new(127, 15, 0, 1))
        .await
        .context("warm-up connection")?;
    for i in 0..o.warm_streams {
        let (s, reader) = open_echoed(&warm, &target, i, &mut rng)
            .await
            .with_context(|| format!("warm-up stream {i}"))?;
        tokio::spawn(hold(s, reader, stop_rx.clone(), pongs.clone()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_opt(&procs)?;
    let cpu_before = procs.cpu_opt()?;

    let started = Instant::now();
    let src = Sources {
        role: 14,
        per_addr: 1,
    };
    let mut conns = Vec::new();
    for c in 0..o.connections {
        conns.push(
            connect(&target, src.addr(c))
                .await
                .with_context(|| format!("connection {c}"))?,
        );
    }
    let conns = Arc::new(conns);
    let next = Arc::new(AtomicU32::new(0));
    let opened = Arc::new(AtomicU32::new(0));
    let failures = Arc::new(Failures::default());
    let mut workers = Vec::new();
    for w in 0..o.concurrency.max(1) {
        let (target, conns, next, opened, failures, stop_rx, pongs) = (
            target.clone(),
            conns.clone(),
            next.clone(),
            opened.clone(),
            failures.clone(),
            stop_rx.clone(),
            pongs.clone(),
        );
        let n = o.streams;
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(u64::from(w) + 300);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let conn = &conns[i as usize % conns.len()];
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    open_echoed(conn, &target, i, &mut rng),
                )
                .await;
                match r {
                    Ok(Ok((s, reader))) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(hold(s, reader, stop_rx.clone(), pongs.clone()));
                    }
                    Ok(Err(e)) => failures.record(&e),
                    Err(_) => failures.record(&anyhow!("stream {i}: not echoed within 30 s")),
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let cpu_open = procs.cpu_opt()?;
    tokio::time::sleep(o.settle).await;
    let rss_after = rss_opt(&procs)?;
    let opened = opened.load(Ordering::Relaxed);
    let kib_per = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) / f64::from(opened)),
        _ => None,
    };
    let _ = stop_tx.send(true);
    Ok(json!({
        "scenario": "h2idle",
        "label": label,
        "tls": target.tls.is_some(),
        "connections": o.connections,
        "streams": o.streams,
        "open": opened,
        "failed": failures.count(),
        "first_error": failures.first(),
        "open_secs": open_secs,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_stream": kib_per,
        "stream_cpu_us": per_event_us(cpu_before, cpu_open, u64::from(opened)),
        "pongs": pongs.load(Ordering::Relaxed),
    }))
}

fn rss_opt(procs: &Procs) -> Result<Option<u64>> {
    if procs.is_empty() {
        Ok(None)
    } else {
        procs.rss_kib().map(Some)
    }
}

/// Opens stream `i` on `conn` and echoes one small message on it.
async fn open_echoed(
    conn: &SendRequest<Bytes>,
    target: &H2Target,
    i: u32,
    rng: &mut Rng,
) -> Result<(WsStream, FrameReader)> {
    let mut s = open_stream(conn, target)
        .await
        .with_context(|| format!("stream {i}"))?;
    let mut reader = FrameReader::new(Vec::new(), 256, 1 << 16);
    let mut frame = Vec::with_capacity(32);
    echo_once(
        &mut s,
        &mut reader,
        &mut frame,
        &u64::from(i).to_le_bytes(),
        rng,
    )
    .await
    .with_context(|| format!("stream {i}"))?;
    Ok((s, reader))
}

/// Keeps a stream open, answering pings, until told to stop.
async fn hold(
    mut s: WsStream,
    mut reader: FrameReader,
    mut stop: watch::Receiver<bool>,
    pongs: Arc<AtomicU64>,
) {
    let mut rng = Rng::new(pongs.load(Ordering::Relaxed) + 7);
    loop {
        let pong = tokio::select! {
            _ = stop.changed() => return,
            frame = reader.next(&mut s.recv) => match frame {
                Ok(Some((h, payload))) if h.opcode == ws::OP_PING => {
                    let mut out = Vec::with_capacity(payload.len() + 6);
                    ws::push_frame(&mut out, true, ws::OP_PONG, payload, Some(rng.mask()));
                    out
                }
                Ok(Some(_)) => continue,
                _ => return,
            },
        };
        if send_frame(&mut s.send, &pong).is_err() {
            return;
        }
        pongs.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct EchoOptions {
    pub connections: u32,
    pub streams_per_conn: u32,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

pub async fn run_echo(
    target: H2Target,
    procs: Procs,
    label: &str,
    o: EchoOptions,
) -> Result<serde_json::Value> {
    if o.size < crate::echo::STAMP {
        bail!("--size must be at least {} bytes", crate::echo::STAMP);
    }
    let src = Sources {
        role: 16,
        per_addr: 1,
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let mut streams = Vec::new();
    for c in 0..o.connections {
        let conn = connect(&target, src.addr(c))
            .await
            .with_context(|| format!("connection {c}"))?;
        for k in 0..o.streams_per_conn {
            streams.push(
                open_stream(&conn, &target)
                    .await
                    .with_context(|| format!("connection {c} stream {k}"))?,
            );
        }
    }
    let mut tasks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let (measuring, stop, size) = (measuring.clone(), stop.clone(), o.size);
        tasks.push(tokio::spawn(async move {
            let mut reader = FrameReader::new(Vec::new(), size + 64, size.max(1 << 16));
            let mut rng = Rng::new(i as u64 + 2000);
            let mut h = hist::new()?;
            let mut payload = vec![0u8; size];
            let mut frame = Vec::with_capacity(size + 14);
            let (mut count, mut seq) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let sent = base.elapsed();
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                payload[8..16].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
                echo_once(&mut s, &mut reader, &mut frame, &payload, &mut rng)
                    .await
                    .with_context(|| format!("stream {i}"))?;
                seq += 1;
                if measuring.load(Ordering::Relaxed) {
                    count += 1;
                    hist::record(&mut h, (base.elapsed() - sent).as_nanos() as u64);
                }
            }
            anyhow::Ok((count, h))
        }));
    }
    tokio::time::sleep(o.warmup).await;
    let me = Procs(vec![std::process::id()]);
    let (cpu0, gen0, ticks0) = (procs.cpu_opt()?, me.cpu()?, cpu_ticks()?);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(o.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, gen1, ticks1) = (procs.cpu_opt()?, me.cpu()?, cpu_ticks()?);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    let mut all = hist::new()?;
    for t in tasks {
        let (count, h) = t.await??;
        total += count;
        all.add(&h).context("merge histograms")?;
    }
    let proxy_pct = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(100.0 * b.saturating_sub(a).as_secs_f64() / secs),
        _ => None,
    };
    Ok(json!({
        "scenario": "h2echo",
        "label": label,
        "tls": target.tls.is_some(),
        "connections": o.connections,
        "streams_per_conn": o.streams_per_conn,
        "size": o.size,
        "msgs": total,
        "secs": secs,
        "msgs_per_sec": total as f64 / secs,
        "cpu_us_per_msg": per_event_us(cpu0, cpu1, total),
        "cpu_pct": proxy_pct,
        "generator_cpu_pct": 100.0 * gen1.saturating_sub(gen0).as_secs_f64() / secs,
        "core_busy_pct": busy_pct(&ticks0, &ticks1),
        "latency": hist::summary(&all),
    }))
}

//! A real Redis for the fleet tests (Debian's `redis-server`, no persistence, on a free
//! loopback port), a TCP relay in front of it that can freeze (a Redis that stops
//! answering mid-connection), and fake servers that hang or answer garbage.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{PATIENCE, eventually};

/// Where Debian installs the server.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A redis-server child process; killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
}

impl Redis {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    /// Starts a server on `port` (again, after [`Redis::stop`]).
    pub async fn start_on(port: u16) -> Redis {
        if !std::path::Path::new(REDIS_SERVER).exists() {
            panic!(
                "{REDIS_SERVER} is missing: the fleet tests need a real Redis; install it with `apt-get install -y redis-server` (.ci/run does)"
            );
        }
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{REDIS_SERVER}: {e}"));
        let redis = Redis {
            port,
            child: Some(child),
        };
        let url = redis.url();
        eventually("redis-server answers PING", PATIENCE, async || {
            let mut c = connect(&url).await?;
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL): its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A fresh connection to the server.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"))
    }

    /// `HGET key field` as a number (0 when absent).
    pub async fn hget(&self, key: &str, field: &str) -> i64 {
        let mut c = self.conn().await;
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query_async::<Option<i64>>(&mut c)
            .await
            .unwrap_or_else(|e| panic!("HGET: {e}"))
            .unwrap_or(0)
    }

    /// Commands the server has run since start, by name (INFO commandstats).
    pub async fn command_calls(&self) -> Vec<(String, u64)> {
        let mut c = self.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("INFO: {e}"));
        parse_commandstats(&info)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cmdstat_evalsha:calls=3,usec=…` lines as (name, calls).
pub fn parse_commandstats(info: &str) -> Vec<(String, u64)> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// A TCP relay to a Redis that can be frozen: while frozen it forwards nothing either
/// way and holds every connection open (a Redis that stopped answering).
pub struct Freezer {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Freezer {
    pub async fn start(to: u16) -> Freezer {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, f.clone()), pipe(sr, cw, f));
                });
            }
        });
        Freezer { addr, frozen }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::Release);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while frozen.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the freeze began are held until it ends.
        while frozen.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A fake Redis: accepts, then `answer` decides what each connection gets (`None`: it
/// reads and never answers).
pub async fn fake_redis(answer: Option<&'static [u8]>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Bounded: the gateway under test gives up long before.
                for _ in 0..10_000 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            if let Some(a) = answer
                                && s.write_all(a).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

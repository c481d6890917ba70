//! A relayed connection's life after the 101: registered for drains and `/connections`,
//! counted in its route's metrics, relayed, then its `ws_close` line written and its
//! permits released, in that order, once the sockets are closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::facts::{ConnInfo, Facts, LogFacts};
use crate::admission::ip_limit::IpPermit;
use crate::admission::subject::SubjectPermit;
use crate::fleet::FleetPermit;
use crate::observe::access_log::Record;
use crate::ops::registry::{Entry, unix_ms};
use crate::relay::{self, Settings};
use crate::upstream::UpstreamStream;
use crate::upstream::pool::Lease;

/// What the handshake leaves for the relay. Nothing here may borrow hyper's read buffers
/// (header values do): they would pin 8 KiB per connection for its whole life.
pub(super) struct Established {
    pub(super) upstream: UpstreamStream,
    pub(super) upstream_early: Bytes,
    pub(super) backend: String,
    pub(super) settings: Settings,
    pub(super) info: Facts,
    /// The token's id (JWT `jti`), for `/revoke?jti=`.
    pub(super) jti: Option<Box<str>>,
    /// Counts the connection against its client's per-IP cap until the task ends.
    pub(super) _permit: IpPermit,
    /// Counts it against its subject's cap, when one applies.
    pub(super) _subject_permit: Option<SubjectPermit>,
    /// Counts it in the fleet's caps (`cluster`), until the task ends: its drop only
    /// queues the release, the relay never reaches Redis.
    pub(super) _fleet_permit: Option<FleetPermit>,
    /// Counts the connection on its backend (bounded load, metrics) until the task ends.
    pub(super) _lease: Lease,
}

/// A connection's relay phase: the session and what its log line needs, nothing else.
pub type RelayPhase = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The relay and its access-log line. Built eagerly, as a plain struct (no async block,
/// which would keep a second copy of the relay session beside the one being polled): the
/// long-lived state is the relay session and the log facts, nothing else.
pub(super) fn run_relay<S>(
    conn: &ConnInfo,
    client: S,
    client_early: Bytes,
    est: Established,
) -> Relaying<impl Future<Output = relay::Report> + Unpin + Send + use<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Established {
        upstream,
        upstream_early,
        backend,
        mut settings,
        info,
        jti,
        _permit,
        _subject_permit,
        _fleet_permit,
        _lease,
    } = est;
    let route = info.route.as_deref().unwrap_or("");
    let metrics = conn.shared.metrics.route(route);
    let active = metrics.opened();
    let registry = &conn.shared.registry;
    let control = Arc::new(relay::Control::new(Entry {
        conn_id: conn.conn_id.as_str().into(),
        route: registry.name(route),
        upstream: registry.name(info.upstream.as_deref().unwrap_or("")),
        backend: registry.name(&backend),
        client_ip: info.client_ip.unwrap_or(conn.peer.ip()),
        subject: info.subject.as_deref().map(Into::into),
        jti,
        since_ms: unix_ms(),
        protocol: if conn.http == "2" { "h2" } else { "http/1.1" },
    }));
    let registration = registry.register(control.clone());
    // A revocation that landed between the admission check and this registration did not
    // see this connection: look again now that a revocation's scan will.
    let entry = &control.entry;
    if (entry.subject.is_some() || entry.jti.is_some())
        && conn
            .shared
            .revocations
            .is_revoked(entry.subject.as_deref(), entry.jti.as_deref())
    {
        control.revoke(crate::outcome::Ending::REVOKED_CODE);
    }
    // A reload that removed this route while the upgrade was in flight scanned the
    // registry before this connection was in it: drain it like the others.
    let config = conn.shared.config.load();
    if !config.routes.iter().any(|r| r.name == route) {
        registry.drain_one(&control, config.drain.spread);
    }
    settings.control = Some(control);
    settings.metrics = Some(metrics);
    let relay = relay::relay(client, client_early, upstream, upstream_early, &settings);
    Relaying {
        relay: Some(relay),
        tail: Some(RelayTail {
            log: LogFacts::new(conn, &info, &backend),
            active,
            registration,
            _permit,
            _subject_permit,
            _fleet_permit,
            _lease,
        }),
    }
}

/// The relay session, then (sockets closed) the connection's bookkeeping.
pub(super) struct Relaying<R> {
    relay: Option<R>,
    tail: Option<RelayTail>,
}

/// What a finished relay reports to: the registry, the route's metrics, the access log.
pub(super) struct RelayTail {
    log: LogFacts,
    active: crate::observe::metrics::ActiveConnection,
    registration: crate::ops::registry::Registration,
    /// Counts the connection against its client's per-IP cap until the log line is out.
    _permit: IpPermit,
    /// And against its subject's cap.
    _subject_permit: Option<SubjectPermit>,
    /// And in the fleet's counts (`cluster`).
    _fleet_permit: Option<FleetPermit>,
    /// Counts it on its backend (bounded load, `wsgate_backend_connections`).
    _lease: Lease,
}

/// A relay cut before it finished still gets its `ws_close` line: closed by the proxy, no
/// close frame; reason `drain` when the runtime shut down at `drain.timeout`, `internal`
/// when a panic unwinds through the connection's task (the relay catches its own).
impl<R> Drop for Relaying<R> {
    fn drop(&mut self) {
        if let Some(tail) = self.tail.take() {
            let reason = if std::thread::panicking() {
                crate::outcome::ProxyReason::Internal
            } else {
                crate::outcome::ProxyReason::Drain
            };
            let report = relay::Report {
                close: Some(relay::CloseInfo {
                    code: crate::outcome::code::ABNORMAL,
                    reason: String::new(),
                    by: relay::By::Proxy,
                }),
                proxy_reason: Some(reason),
                ..relay::Report::default()
            };
            tail.finish(&report);
        }
    }
}

impl<R: Future<Output = relay::Report> + Unpin> Future for Relaying<R> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        let Some(relay) = this.relay.as_mut() else {
            return std::task::Poll::Ready(());
        };
        let report = std::task::ready!(Pin::new(relay).poll(cx));
        this.relay = None;
        if let Some(tail) = this.tail.take() {
            tail.finish(&report);
        }
        std::task::Poll::Ready(())
    }
}

impl RelayTail {
    fn finish(self, report: &relay::Report) {
        let RelayTail {
            log,
            active,
            registration,
            _permit,
            _subject_permit,
            _fleet_permit,
            _lease,
        } = self;
        drop(registration);
        active.closed(report);
        let mut record = log.record("ws_close", 101);
        Record::set_report(&mut record, report);
        log.shared.access.log(&record);
        drop(_permit);
        drop(_subject_permit);
        drop(_fleet_permit);
        drop(_lease);
    }
}

//! The log lines of refusals that happen before a request head is read (SPEC §3
//! "Admission before work"), and the per-address budget every refusal line goes through:
//! beyond ten a second from one address, refusals are counted into one summary line
//! (`"count": N`) instead of one line each, so a flood can neither fill the disk nor push
//! other lines out of the access log's bounded queue.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::admission::client_ip::ip_text;
use crate::ids;
use crate::observe::access_log::{Record, TlsInfo, now_rfc3339};
use crate::observe::refusals::{Noted, Summary};
use crate::outcome::Refusal;
use crate::shared::Shared;

/// Whole seconds on the monotonic clock since the first call: the refusal tally's time.
pub fn this_second() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Counts a refusal of `client` in its second; says whether it gets its own line.
pub fn note(shared: &Shared, client: IpAddr, listener: &Arc<str>, refusal: Refusal) -> Noted {
    shared
        .refusals
        .note(client, this_second(), listener, refusal)
}

/// The `ws_reject` line of a connection refused at accept: nothing is known of it but its
/// address and listener. `tls` when the listener is a TLS one (no handshake took place).
pub fn log_at_accept(
    shared: &Shared,
    listener: &str,
    peer: SocketAddr,
    tls: bool,
    refusal: Refusal,
    status: u16,
) {
    let conn_id = ids::next();
    let tls_info = tls.then(TlsInfo::default);
    let record = Record {
        ts: now_rfc3339(),
        event: "ws_reject",
        conn_id: Some(&conn_id),
        listener,
        client_ip: ip_text(peer.ip()),
        client_port: peer.port(),
        tls: tls_info.as_ref(),
        status,
        proxy_reason: Some(refusal.reason()),
        ..Record::default()
    };
    shared.access.log(&record);
}

/// One summary line: `count` refusals of one address and reason in a second that ended.
pub fn log_summary(shared: &Shared, s: &Summary) {
    let record = Record {
        ts: now_rfc3339(),
        event: "ws_reject",
        conn_id: None,
        listener: &s.listener,
        client_ip: ip_text(s.client_ip),
        status: s.refusal.status().as_u16(),
        proxy_reason: Some(s.refusal.reason()),
        count: Some(s.count),
        ..Record::default()
    };
    shared.access.log(&record);
}

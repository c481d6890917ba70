//! The log lines of refusals that happen before a request head is read (SPEC §3
//! "Admission before work"), and the per-address budget every refusal line goes through:
//! beyond ten a second from one address, refusals are counted into one summary line
//! (`"count": N`) instead of one line each, so a flood can neither fill the disk nor push
//! other lines out of the access log's bounded queue.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::admission::client_ip::{IpKey, ip_text};
use crate::ids;
use crate::observe::access_log::{Record, TlsInfo, now_rfc3339};
use crate::observe::refusals::{Noted, Refusing, Summary};
use crate::outcome::Refusal;
use crate::shared::Shared;

/// Who was refused, where, and how.
pub struct Refused<'a> {
    pub client: IpAddr,
    pub listener: &'a Arc<str>,
    /// On a TLS listener.
    pub tls: bool,
    pub refusing: Refusing,
}

/// Counts a refusal in its second, by the key the per-IP limits use (IPv6 by its prefix);
/// says whether it gets its own line, and whether it is to be reset instead of answered.
pub fn note(shared: &Shared, r: Refused<'_>) -> Noted {
    let prefix = shared.config.load().limits.ipv6_prefix;
    let key = IpKey::new(r.client, prefix).addr();
    shared.refusals.note(key, r.listener, r.tls, r.refusing)
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

/// One summary line: `count` refusals of one address (its limits key), reason and status
/// sent in a second that ended; those beyond ten times the address's rate were reset.
pub fn log_summary(shared: &Shared, s: &Summary) {
    let status = s.status;
    let tls = s.tls.then(TlsInfo::default);
    let record = Record {
        ts: now_rfc3339(),
        event: "ws_reject",
        conn_id: None,
        listener: &s.listener,
        client_ip: ip_text(s.client_ip),
        tls: tls.as_ref(),
        status,
        proxy_reason: Some(s.refusal.reason()),
        count: Some(s.count),
        ..Record::default()
    };
    shared.access.log(&record);
}

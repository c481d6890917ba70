//! The access log's JSON writer: one [`Record`] into one line, written straight into a
//! buffer sized for a typical line.
//!
//! serde_json spent ~11,000 instructions per handshake on the one line a connection
//! writes (a field name escaped byte by byte, the line regrown four times); this writes
//! the names as constants and escapes only values. Its output is byte for byte what
//! serde_json writes for the same record (the `Serialize` derives stay and a property
//! test holds the two together).

use std::fmt::Write as _;

use super::{Close, Counts, Record, RttMs, StallCount, StickyLog, TlsInfo};

/// Room for a typical `ws_close` line (~450 bytes) without growing.
const LINE_CAPACITY: usize = 640;

/// `record` as one JSON object; `extra` (`,"instance":"…"`, already JSON) goes before the
/// closing brace.
pub fn line(record: &Record<'_>, extra: Option<&str>) -> String {
    let mut out = String::with_capacity(LINE_CAPACITY);
    let r = record;
    out.push_str("{\"ts\":");
    string(&mut out, &r.ts);
    out.push_str(",\"event\":");
    string(&mut out, r.event);
    out.push_str(",\"conn_id\":");
    opt_str(&mut out, r.conn_id);
    out.push_str(",\"request_id\":");
    opt_str(&mut out, r.request_id);
    out.push_str(",\"listener\":");
    string(&mut out, r.listener);
    out.push_str(",\"route\":");
    opt_str(&mut out, r.route);
    out.push_str(",\"client_ip\":");
    string(&mut out, &r.client_ip);
    out.push_str(",\"client_port\":");
    number(&mut out, u64::from(r.client_port));
    out.push_str(",\"tls\":");
    match r.tls {
        Some(tls) => tls_object(&mut out, tls),
        None => out.push_str("null"),
    }
    for (name, value) in [
        (",\"host\":", r.host),
        (",\"path\":", r.path),
        (",\"origin\":", r.origin),
        (",\"user_agent\":", r.user_agent),
        (",\"subject\":", r.subject),
        (",\"upstream\":", r.upstream),
    ] {
        out.push_str(name);
        opt_str(&mut out, value);
    }
    out.push_str(",\"sticky\":");
    match r.sticky {
        Some(s) => sticky(&mut out, s),
        None => out.push_str("null"),
    }
    out.push_str(",\"status\":");
    number(&mut out, u64::from(r.status));
    out.push_str(",\"duration_ms\":");
    number(&mut out, r.duration_ms);
    out.push_str(",\"c2u\":");
    counts(&mut out, &r.c2u);
    out.push_str(",\"u2c\":");
    counts(&mut out, &r.u2c);
    out.push_str(",\"stalls\":{\"u2c\":");
    stall(&mut out, &r.stalls.u2c);
    out.push_str(",\"c2u\":");
    stall(&mut out, &r.stalls.c2u);
    out.push_str("},\"close\":");
    match &r.close {
        Some(c) => close(&mut out, c),
        None => out.push_str("null"),
    }
    out.push_str(",\"proxy_reason\":");
    opt_str(&mut out, r.proxy_reason);
    if let Some(e) = r.upstream_error {
        out.push_str(",\"upstream_error\":");
        string(&mut out, e);
    }
    if let Some(n) = r.count {
        out.push_str(",\"count\":");
        number(&mut out, n);
    }
    out.push_str(",\"pings\":");
    number(&mut out, r.pings);
    out.push_str(",\"rtt_ms\":");
    match &r.rtt_ms {
        Some(rtt) => rtt_object(&mut out, rtt),
        None => out.push_str("null"),
    }
    out.push_str(",\"rate_limited\":");
    number(&mut out, r.rate_limited);
    if let Some(h) = r.http {
        out.push_str(",\"http\":");
        string(&mut out, h);
    }
    if let Some(extra) = extra {
        out.push_str(extra);
    }
    out.push('}');
    out
}

fn tls_object(out: &mut String, tls: &TlsInfo) {
    out.push_str("{\"version\":");
    opt_str(out, tls.version);
    out.push_str(",\"sni\":");
    opt_str(out, tls.sni.as_deref());
    out.push_str(",\"client_subject\":");
    opt_str(out, tls.client_subject.as_deref());
    out.push_str(",\"resumed\":");
    out.push_str(if tls.resumed { "true}" } else { "false}" });
}

fn sticky(out: &mut String, s: StickyLog) {
    out.push_str("{\"key\":");
    string(out, s.key);
    out.push_str(",\"fallback\":");
    out.push_str(if s.fallback { "true}" } else { "false}" });
}

fn counts(out: &mut String, c: &Counts) {
    out.push_str("{\"frames\":");
    number(out, c.frames);
    out.push_str(",\"messages\":");
    number(out, c.messages);
    out.push_str(",\"bytes\":");
    number(out, c.bytes);
    out.push('}');
}

fn stall(out: &mut String, s: &StallCount) {
    out.push_str("{\"count\":");
    number(out, s.count);
    out.push_str(",\"ms\":");
    number(out, s.ms);
    out.push('}');
}

fn close(out: &mut String, c: &Close<'_>) {
    out.push_str("{\"code\":");
    number(out, u64::from(c.code));
    out.push_str(",\"reason\":");
    string(out, c.reason);
    out.push_str(",\"by\":");
    string(out, c.by);
    out.push('}');
}

fn rtt_object(out: &mut String, rtt: &RttMs) {
    out.push_str("{\"min\":");
    float(out, rtt.min);
    out.push_str(",\"avg\":");
    float(out, rtt.avg);
    out.push_str(",\"max\":");
    float(out, rtt.max);
    out.push('}');
}

fn opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.push_str("null"),
    }
}

fn number(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        // `n % 10` < 10: the cast cannot truncate.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// As serde_json writes an f64. Round trips are whole tenths of a millisecond, written
/// here as `N.d`; anything else (never seen) goes through serde_json itself.
fn float(out: &mut String, f: f64) {
    let tenths = (f * 10.0).round();
    if f.is_sign_positive() && (0.0..1e15).contains(&tenths) && tenths / 10.0 == f {
        // A whole number below 1e15: exact in a u64.
        let tenths = tenths as u64;
        number(out, tenths / 10);
        out.push('.');
        number(out, tenths % 10);
    } else {
        out.push_str(&serde_json::to_string(&f).unwrap_or_else(|_| "null".into()));
    }
}

/// A JSON string: `"`, `\` and control characters escaped as serde_json does; everything
/// else (UTF-8 included) copied in runs.
fn string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        // `i` is at an ASCII byte, so both slices end on character boundaries.
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::access_log::StallsLog;
    use proptest::prelude::*;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9./:-]{0,12}",
            any::<String>(),
            proptest::collection::vec(0u8..0x80, 0..12)
                .prop_map(|v| v.into_iter().map(char::from).collect()),
        ]
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn rtt() -> impl Strategy<Value = Option<RttMs>> {
        proptest::option::of((any::<f64>(), 0u32..100_000, 0.0f64..1e6).prop_map(
            |(min, avg, max)| RttMs {
                min,
                avg: f64::from(avg) / 10.0,
                max,
            },
        ))
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(
            strings in proptest::collection::vec(text(), 4),
            opts in proptest::collection::vec(opt_text(), 12),
            nums in proptest::collection::vec(any::<u64>(), 14),
            flags in proptest::collection::vec(any::<bool>(), 6),
            rtt_ms in rtt(),
            instance in proptest::option::of(text()),
        ) {
            let s = |i: usize| leak(strings[i].clone());
            let o = |i: usize| opts[i].clone().map(leak);
            let tls = flags[0].then(|| TlsInfo {
                version: o(9),
                sni: opts[10].clone(),
                client_subject: opts[11].clone(),
                resumed: flags[1],
            });
            let record = Record {
                ts: strings[0].clone(),
                event: s(1),
                conn_id: o(0),
                request_id: o(1),
                listener: s(2),
                route: o(2),
                client_ip: strings[3].clone(),
                client_port: nums[0] as u16,
                tls: tls.as_ref(),
                host: o(3),
                path: o(4),
                origin: o(5),
                user_agent: o(6),
                subject: o(7),
                upstream: o(8),
                sticky: flags[2].then(|| StickyLog { key: s(1), fallback: flags[3] }),
                status: nums[1] as u16,
                duration_ms: nums[2],
                c2u: Counts { frames: nums[3], messages: nums[4], bytes: nums[5] },
                u2c: Counts { frames: nums[6], messages: nums[7], bytes: nums[8] },
                stalls: StallsLog {
                    u2c: StallCount { count: nums[9], ms: nums[10] },
                    c2u: StallCount { count: nums[11], ms: nums[12] },
                },
                close: flags[4].then(|| Close { code: nums[1] as u16, reason: s(2), by: s(1) }),
                proxy_reason: o(9),
                upstream_error: o(10),
                count: flags[5].then_some(nums[13]),
                pings: nums[13],
                rtt_ms,
                rate_limited: nums[2],
                http: o(11),
            };
            let extra = instance.map(|name| {
                format!(",\"instance\":{}", serde_json::to_string(&name).unwrap_or_default())
            });
            let mut expected = serde_json::to_string(&record).unwrap_or_default();
            if let Some(extra) = &extra {
                expected.pop();
                expected.push_str(extra);
                expected.push('}');
            }
            prop_assert_eq!(line(&record, extra.as_deref()), expected);
        }
    }
}

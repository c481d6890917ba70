//! `report`: folds the JSON lines of many runs into one Markdown table (median of the
//! repeated runs, with their min–max spread) and one JSON summary.
//!
//! Columns are the targets in the order they first appear; rows are fixed below. A row
//! whose runs are missing for a target shows "–". "Added" latency rows subtract the
//! `direct` target's median from each proxy's.

use std::collections::BTreeMap;
use std::rc::Rc;

use anyhow::{Context, Result};
use serde_json::{Value, json};

type Filter = Box<dyn Fn(&Value) -> bool>;
type Metric = Box<dyn Fn(&Value) -> Option<f64>>;

struct Row {
    title: String,
    filter: Filter,
    metric: Metric,
    /// Subtract the direct target's median (added latency).
    minus_direct: bool,
    decimals: usize,
}

fn row(title: &str, decimals: usize, filter: Filter, metric: Metric) -> Row {
    Row {
        title: title.to_string(),
        filter,
        metric,
        minus_direct: false,
        decimals,
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn is(v: &Value, key: &str, want: Value) -> bool {
    v.get(key) == Some(&want)
}

fn m(path: &'static [&'static str]) -> Metric {
    Box::new(move |v| num(v, path))
}

/// Median and spread of one cell.
#[derive(Clone, Copy, Debug)]
struct Cell {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn cell(mut xs: Vec<f64>) -> Option<Cell> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    Some(Cell {
        median,
        min: xs[0],
        max: xs[n - 1],
        n,
    })
}

fn fmt(x: f64, d: usize) -> String {
    format!("{x:.d$}")
}

pub fn run(input: &std::path::Path, json_out: Option<&std::path::Path>) -> Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("read {}", input.display()))?;
    let mut runs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", input.display(), i + 1))?;
        runs.push(v);
    }
    let mut labels: Vec<String> = Vec::new();
    for r in &runs {
        if let Some(l) = r.get("label").and_then(Value::as_str)
            && !labels.iter().any(|x| x == l)
        {
            labels.push(l.to_string());
        }
    }
    let rows = rows(&runs);
    let mut out = String::new();
    out.push_str(&format!("| metric | {} |\n", labels.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---|".repeat(labels.len())));
    let mut summary = Vec::new();
    for r in &rows {
        let mut cells: BTreeMap<&str, Cell> = BTreeMap::new();
        for l in &labels {
            let xs: Vec<f64> = runs
                .iter()
                .filter(|v| v.get("label").and_then(Value::as_str) == Some(l.as_str()))
                .filter(|v| (r.filter)(v))
                .filter_map(|v| (r.metric)(v))
                .collect();
            if let Some(c) = cell(xs) {
                cells.insert(l.as_str(), c);
            }
        }
        if cells.is_empty() {
            continue;
        }
        let direct = cells.get("direct").copied();
        let mut line = format!("| {} |", r.title);
        let mut js = serde_json::Map::new();
        for l in &labels {
            let text = match (cells.get(l.as_str()), r.minus_direct, direct) {
                (None, _, _) => "–".to_string(),
                (Some(_), true, _) if l == "direct" => "0 (baseline)".to_string(),
                (Some(_), true, None) => "–".to_string(),
                (Some(c), true, Some(d)) => {
                    js.insert(
                        l.clone(),
                        json!({ "median": c.median - d.median, "n": c.n }),
                    );
                    fmt(c.median - d.median, r.decimals)
                }
                (Some(c), false, _) => {
                    js.insert(
                        l.clone(),
                        json!({ "median": c.median, "min": c.min, "max": c.max, "n": c.n }),
                    );
                    if c.n > 1 {
                        format!(
                            "{} ({}–{})",
                            fmt(c.median, r.decimals),
                            fmt(c.min, r.decimals),
                            fmt(c.max, r.decimals)
                        )
                    } else {
                        fmt(c.median, r.decimals)
                    }
                }
            };
            line.push_str(&format!(" {text} |"));
        }
        out.push_str(&line);
        out.push('\n');
        summary.push(json!({ "metric": r.title, "values": js }));
    }
    if summary.is_empty() {
        out.clear();
    }
    out.push_str(&storm_table(&runs));
    print!("{out}");
    if let Some(p) = json_out {
        let body = serde_json::to_string_pretty(&summary).context("summary to JSON")?;
        std::fs::write(p, body).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}

fn rows(runs: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (size, name) in [(64u64, "64 B"), (16384, "16 KiB")] {
        rows.push(row(
            &format!("proxy CPU µs per echoed {name} message (closed loop)"),
            1,
            Box::new(move |v| {
                is(v, "scenario", json!("echo"))
                    && is(v, "mode", json!("closed"))
                    && is(v, "size", json!(size))
                    && is(v, "tls", json!(false))
            }),
            m(&["cpu_us_per_msg"]),
        ));
        rows.push(row(
            &format!("echoes/s, {name} closed loop"),
            0,
            Box::new(move |v| {
                is(v, "scenario", json!("echo"))
                    && is(v, "mode", json!("closed"))
                    && is(v, "size", json!(size))
                    && is(v, "tls", json!(false))
            }),
            m(&["msgs_per_sec"]),
        ));
    }
    // Idle sizes present in the data, ascending.
    let mut sizes: Vec<u64> = runs
        .iter()
        .filter(|v| is(v, "scenario", json!("idle")))
        .filter_map(|v| v.get("connections").and_then(Value::as_u64))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for tls in [false, true] {
        let kind = if tls { "TLS" } else { "plain" };
        for &n in &sizes {
            let f = move |v: &Value| {
                is(v, "scenario", json!("idle"))
                    && is(v, "tls", json!(tls))
                    && is(v, "connections", json!(n))
            };
            rows.push(row(
                &format!("KiB RSS per idle {kind} connection, {n} connections"),
                1,
                Box::new(f),
                m(&["kib_per_conn"]),
            ));
            rows.push(row(
                &format!("idle {kind} connections actually held (of {n})"),
                0,
                Box::new(f),
                m(&["open"]),
            ));
        }
    }
    let open = |v: &Value| is(v, "scenario", json!("echo")) && is(v, "mode", json!("open"));
    let rate = runs
        .iter()
        .find(|v| open(v))
        .and_then(|v| num(v, &["rate"]))
        .unwrap_or(0.0);
    for (q, key) in [("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")] {
        rows.push(row(
            &format!("{q} µs RTT at {rate:.0} msg/s (64 B, open loop)"),
            0,
            Box::new(open),
            Box::new(move |v| num(v, &["latency", key])),
        ));
    }
    for (q, key) in [("p50", "p50_us"), ("p99", "p99_us")] {
        let mut r = row(
            &format!("added {q} µs vs direct at {rate:.0} msg/s"),
            0,
            Box::new(open),
            Box::new(move |v| num(v, &["latency", key])),
        );
        r.minus_direct = true;
        rows.push(r);
    }
    rows.push(row(
        &format!("proxy CPU µs per echoed message at {rate:.0} msg/s"),
        1,
        Box::new(open),
        m(&["cpu_us_per_msg"]),
    ));
    for (tls, resume) in [(false, false), (true, false), (true, true)] {
        let kind = match (tls, resume) {
            (false, _) => "plain",
            (true, false) => "TLS",
            (true, true) => "TLS resumed",
        };
        let f = move |v: &Value| {
            is(v, "scenario", json!("handshake"))
                && is(v, "tls", json!(tls))
                && v.get("resume").and_then(Value::as_bool).unwrap_or(false) == resume
        };
        rows.push(row(
            &format!("handshakes/s, {kind}"),
            0,
            Box::new(f),
            m(&["per_sec"]),
        ));
        rows.push(row(
            &format!("proxy CPU µs per handshake, {kind}"),
            0,
            Box::new(f),
            m(&["cpu_us_per_handshake"]),
        ));
    }
    let ab = |v: &Value| is(v, "scenario", json!("abuse"));
    rows.push(row(
        "abuse: well-behaved p50 µs, quiet",
        0,
        Box::new(ab),
        m(&["quiet", "p50_us"]),
    ));
    rows.push(row(
        "abuse: well-behaved p99 µs, quiet",
        0,
        Box::new(ab),
        m(&["quiet", "p99_us"]),
    ));
    rows.push(row(
        "abuse: p50 under attack ÷ quiet",
        2,
        Box::new(ab),
        m(&["p50_ratio"]),
    ));
    rows.push(row(
        "abuse: p99 under attack ÷ quiet",
        2,
        Box::new(ab),
        m(&["p99_ratio"]),
    ));
    rows.push(row("abuse: messages lost", 0, Box::new(ab), m(&["lost"])));
    rows.push(row(
        "abuse: messages reordered",
        0,
        Box::new(ab),
        m(&["reordered"]),
    ));
    rows.push(row(
        "abuse: well-behaved clients cut off",
        0,
        Box::new(ab),
        m(&["clients_closed"]),
    ));
    rows.push(row(
        "abuse: new clients refused during attack",
        0,
        Box::new(ab),
        m(&["newcomers_refused_attack"]),
    ));
    rows.push(row(
        "abuse: new clients tried during attack",
        0,
        Box::new(ab),
        m(&["newcomers_attack"]),
    ));
    rows.push(row(
        "abuse: attacker connections admitted",
        0,
        Box::new(ab),
        m(&["attacker_admitted"]),
    ));
    rows.push(row(
        "abuse: attacker handshakes refused",
        0,
        Box::new(ab),
        m(&["attacker_refused"]),
    ));
    rows.push(row(
        "abuse: proxy CPU %, quiet",
        0,
        Box::new(ab),
        m(&["proxy_cpu_pct_quiet"]),
    ));
    rows.push(row(
        "abuse: proxy CPU %, attack",
        0,
        Box::new(ab),
        m(&["proxy_cpu_pct_attack"]),
    ));
    rows.push(row(
        "abuse: proxy peak RSS MiB",
        1,
        Box::new(ab),
        Box::new(|v| num(v, &["rss_peak_kib"]).map(|k| k / 1024.0)),
    ));
    for mode in ["plain", "tls"] {
        flood_rows(runs, mode, &mut rows);
    }
    h2_rows(runs, &mut rows);
    rows
}

/// The `h2` scenario's rows: echo over HTTP/1.1 TLS and over HTTP/2 (per layout of
/// connections × streams), idle memory per HTTP/2 stream.
fn h2_rows(runs: &[Value], rows: &mut Vec<Row>) {
    let h2echo = |v: &Value| is(v, "scenario", json!("h2echo"));
    if !runs
        .iter()
        .any(|v| h2echo(v) || is(v, "scenario", json!("h2idle")))
    {
        return;
    }
    let tls_echo = |v: &Value| {
        is(v, "scenario", json!("echo"))
            && is(v, "mode", json!("closed"))
            && is(v, "tls", json!(true))
            && is(v, "size", json!(64))
    };
    let conns = runs
        .iter()
        .find(|v| tls_echo(v))
        .and_then(|v| num(v, &["conns"]))
        .unwrap_or(0.0);
    let h1 = format!("HTTP/1.1 TLS, {conns:.0} connections");
    let mut layouts: Vec<(u64, u64)> = runs
        .iter()
        .filter(|v| h2echo(v))
        .filter_map(|v| {
            Some((
                v.get("connections")?.as_u64()?,
                v.get("streams_per_conn")?.as_u64()?,
            ))
        })
        .collect();
    layouts.sort_unstable();
    layouts.dedup();
    type Pick = (String, Rc<dyn Fn(&Value) -> bool>);
    let mut kinds: Vec<Pick> = vec![(h1, Rc::new(tls_echo))];
    for (c, s) in layouts {
        kinds.push((
            format!("h2 (TLS), {c} connection(s) × {s} streams"),
            Rc::new(move |v: &Value| {
                h2echo(v)
                    && is(v, "connections", json!(c))
                    && is(v, "streams_per_conn", json!(s))
                    && is(v, "size", json!(64))
            }),
        ));
    }
    for (title, d, metric) in [
        ("proxy CPU µs per echoed 64 B message", 1, "cpu_us_per_msg"),
        ("echoes/s, 64 B closed loop", 0, "msgs_per_sec"),
        ("proxy CPU %", 0, "cpu_pct"),
        ("generator CPU %", 0, "generator_cpu_pct"),
    ] {
        for (kind, f) in &kinds {
            let f = f.clone();
            rows.push(row(
                &format!("h2 echo: {title}, {kind}"),
                d,
                Box::new(move |v| f(v)),
                m_owned(metric),
            ));
        }
    }
    for (kind, f) in &kinds {
        for core in 0..2usize {
            let f = f.clone();
            rows.push(row(
                &format!("h2 echo: core {core} busy %, {kind}"),
                0,
                Box::new(move |v| f(v)),
                Box::new(move |v| v.get("core_busy_pct")?.get(core)?.as_f64()),
            ));
        }
    }
    let mut sizes: Vec<(u64, u64)> = runs
        .iter()
        .filter(|v| is(v, "scenario", json!("h2idle")))
        .filter_map(|v| Some((v.get("streams")?.as_u64()?, v.get("connections")?.as_u64()?)))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for (n, c) in sizes {
        let f = move |v: &Value| {
            is(v, "scenario", json!("h2idle"))
                && is(v, "streams", json!(n))
                && is(v, "connections", json!(c))
        };
        rows.push(row(
            &format!("h2 idle: KiB RSS per idle stream, {n} streams on {c} TLS connections"),
            2,
            Box::new(f),
            m_owned("kib_per_stream"),
        ));
        rows.push(row(
            &format!("h2 idle: streams actually held (of {n})"),
            0,
            Box::new(f),
            m_owned("open"),
        ));
    }
}

/// Keys of a JSON object at `path`, over every run of one flood mode (sorted, unique).
fn keys_seen(runs: &[Value], mode: &str, path: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = runs
        .iter()
        .filter(|v| is_flood(v, mode))
        .filter_map(|v| {
            let mut cur = v;
            for p in path {
                cur = cur.get(p)?;
            }
            cur.as_object()
        })
        .flat_map(|o| o.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn is_flood(v: &Value, mode: &str) -> bool {
    is(v, "scenario", json!("flood")) && is(v, "mode", json!(mode))
}

/// A flood row: `metric` of the runs of one mode.
fn flood_row(mode: &'static str, title: &str, decimals: usize, metric: Metric) -> Row {
    let prefix = if mode == "tls" { "flood TLS" } else { "flood" };
    row(
        &format!("{prefix}: {title}"),
        decimals,
        Box::new(move |v| is_flood(v, mode)),
        metric,
    )
}

/// A count in an object of counts at `path`; absent means none.
fn count_at(path: Vec<String>) -> Metric {
    Box::new(move |v| {
        let mut cur = v;
        for p in &path {
            match cur.get(p.as_str()) {
                Some(next) => cur = next,
                None => return Some(0.0),
            }
        }
        cur.as_f64()
    })
}

fn flood_rows(runs: &[Value], mode: &'static str, rows: &mut Vec<Row>) {
    if !runs.iter().any(|v| is_flood(v, mode)) {
        return;
    }
    let phases = [("quiet", "quiet"), ("attack", "under attack")];
    for (q, key) in [("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")] {
        for (phase, name) in phases {
            rows.push(flood_row(
                mode,
                &format!("well-behaved {q} µs RTT, {name}"),
                0,
                Box::new(move |v| num(v, &[phase, key])),
            ));
        }
        let ratio = match q {
            "p50" => "p50_ratio",
            "p99" => "p99_ratio",
            _ => "p999_ratio",
        };
        rows.push(flood_row(
            mode,
            &format!("{q} under attack ÷ quiet"),
            1,
            m_owned(ratio),
        ));
    }
    for (title, key) in [
        ("messages lost", "lost"),
        ("messages reordered", "reordered"),
        ("well-behaved connections dropped", "clients_dropped"),
        ("newcomers tried", "newcomers"),
        ("newcomers refused", "newcomers_refused"),
    ] {
        rows.push(flood_row(mode, title, 0, m_owned(key)));
    }
    rows.push(flood_row(
        mode,
        "newcomer connect + echo, max ms",
        1,
        Box::new(|v| num(v, &["newcomer_connect_echo", "max_us"]).map(|u| u / 1000.0)),
    ));
    for (title, key, d) in [
        ("attacker attempts", "attempts", 0),
        ("attacker attempts/s", "attempts_per_sec", 0),
        ("attacker attempts refused", "refused", 0),
        ("attacker connections admitted", "admitted", 0),
        (
            "TLS handshakes completed for the attacker",
            "tls_completed",
            0,
        ),
        (
            "… of which then refused (429 after TLS)",
            "tls_completed_refused",
            0,
        ),
        ("attacker spam frames sent", "spam_frames", 0),
        ("slowloris connections made", "slowloris_conns", 0),
    ] {
        if mode == "plain" && key.starts_with("tls_") {
            continue;
        }
        rows.push(flood_row(
            mode,
            title,
            d,
            Box::new(move |v| num(v, &["attacker", key])),
        ));
    }
    for (group, what) in [
        ("refused_by_kind", "refused by kind"),
        ("slowloris_ends", "slowloris ended by"),
        ("held_ends", "held connections ended by"),
    ] {
        for k in keys_seen(runs, mode, &["attacker", group]) {
            let path = vec!["attacker".to_string(), group.to_string(), k.clone()];
            rows.push(flood_row(mode, &format!("{what}: {k}"), 0, count_at(path)));
        }
    }
    for (title, key, d) in [
        ("proxy CPU %, quiet", "proxy_cpu_pct_quiet", 0),
        ("proxy CPU %, attack", "proxy_cpu_pct_attack", 0),
        ("proxy CPU s during the attack", "proxy_cpu_s_attack", 2),
        ("proxy CPU µs per refused attempt", "cpu_us_per_refused", 1),
        (
            "proxy CPU µs per refused attempt, less the quiet rate",
            "cpu_us_per_refused_net",
            1,
        ),
        (
            "generator CPU %, attack (core 1)",
            "generator_cpu_pct_attack",
            0,
        ),
    ] {
        rows.push(flood_row(mode, title, d, m_owned(key)));
    }
    rows.push(flood_row(
        mode,
        "proxy peak RSS MiB",
        1,
        Box::new(|v| num(v, &["rss_peak_kib"]).map(|k| k / 1024.0)),
    ));
}

fn m_owned(key: &'static str) -> Metric {
    Box::new(move |v| num(v, &[key]))
}

/// Issue 19's storm: one row per target, variant and client mode (medians over repeats),
/// times from the backend's restart, in seconds and in multiples of N / R.
fn storm_table(runs: &[Value]) -> String {
    let storms: Vec<&Value> = runs
        .iter()
        .filter(|v| is(v, "scenario", json!("storm")))
        .collect();
    if storms.is_empty() {
        return String::new();
    }
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for v in &storms {
        let k = (text(v, "label"), text(v, "variant"), text(v, "mode"));
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = String::from(
        "\n| target | variant | client mode | N | 99 % back s (× N/R) | 100 % back s (× N/R) | attempts/client | wasted % of N | client saw (after the kill) | backend peak waiting | backend 503s | proxy CPU s | runs |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (label, variant, mode) in keys {
        let mine: Vec<&&Value> = storms
            .iter()
            .filter(|v| {
                text(v, "label") == label
                    && text(v, "variant") == variant
                    && text(v, "mode") == mode
            })
            .collect();
        let med = |path: &[&str]| -> Option<f64> {
            cell(mine.iter().filter_map(|v| num(v, path)).collect()).map(|c| c.median)
        };
        let show = |x: Option<f64>, d: usize| x.map_or("–".to_string(), |x| fmt(x, d));
        let back = |t: &str, x: &str| match (med(&[t]), med(&[x])) {
            (Some(t), Some(x)) => format!("{} ({} ×)", fmt(t, 2), fmt(x, 2)),
            _ => {
                let got = med(&["back"]).unwrap_or(0.0);
                format!("not all: {got:.0} back")
            }
        };
        let mut seen: BTreeMap<String, f64> = BTreeMap::new();
        for v in &mine {
            if let Some(o) = v.get("outcomes").and_then(Value::as_object) {
                for (k, n) in o {
                    *seen.entry(k.clone()).or_default() +=
                        n.as_f64().unwrap_or(0.0) / mine.len() as f64;
                }
            }
        }
        let seen: Vec<String> = seen.iter().map(|(k, n)| format!("{k}: {n:.0}")).collect();
        out.push_str(&format!(
            "| {label} | {variant} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            show(med(&["clients"]), 0),
            back("t99_s", "t99_x"),
            back("t100_s", "t100_x"),
            show(med(&["attempts_per_client"]), 2),
            show(med(&["wasted_pct_of_clients"]), 1),
            seen.join(", "),
            show(med(&["backend_after_restart", "peak_waiting"]), 0),
            show(med(&["backend_after_restart", "refused_503"]), 0),
            show(med(&["proxy_cpu_s"]), 2),
            mine.len(),
        ));
    }
    out
}

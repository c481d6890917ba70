#!/usr/bin/env python3
"""SPEC §9 as one table: reads what bench/contract.sh gathered and judges every row.

    python3 bench/contract.py OUTDIR

OUTDIR holds one directory per group of runs (main, latency, flood, storm, fleet), each
with the runs.jsonl that bench/compare.sh (or bench/fleet.sh) wrote, and status.tsv (one
line per group: name, ok|failed|skipped, targets, seconds, detail), written by
contract.sh. Every figure is the median over the repeats of one run; nothing is
estimated: a value that was not measured says n/a (and why) or error (a run that should
have given it did not). Exit status 1 when any row says error.
"""
import json
import os
import statistics
import sys

class Group:
    def __init__(self, root, name, state, targets, secs, detail):
        self.name, self.state, self.detail = name, state, detail
        self.targets = targets.split()
        self.secs = secs
        path = os.path.join(root, name, "runs.jsonl")
        self.runs = []
        if os.path.exists(path):
            with open(path) as f:
                self.runs = [json.loads(line) for line in f if line.strip()]
        failed = os.path.join(root, name, "failed.txt")
        self.failed = []
        if os.path.exists(failed):
            with open(failed) as f:
                self.failed = [line.strip() for line in f if line.strip()]


class V:
    """One cell: a number (x), or why there is none (na / error / not applicable)."""

    def __init__(self, x=None, text=None, kind="ok", n=0):
        self.x, self.kind, self.n = x, kind, n
        self.text = text

    def ok(self):
        return self.kind == "ok" and self.x is not None

    def show(self, d=1):
        if self.text is not None:
            return self.text
        if self.kind == "ok":
            return f"{self.x:,.{d}f}"
        return self.kind


def na(why):
    return V(text=f"n/a ({why})", kind="na")


def err(why):
    return V(text=f"error ({why})", kind="error")


DASH = V(text="–", kind="none")


def dig(v, path):
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return None
        v = v[p]
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def median(xs):
    return statistics.median(xs) if xs else None


class Data:
    def __init__(self, root):
        self.groups = {}
        with open(os.path.join(root, "status.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 5:
                    self.groups[parts[0]] = Group(root, *parts[:5])

    def get(self, group, label, pred, path):
        """The median of `path` over the runs of `label` in `group` that match `pred`."""
        g = self.groups.get(group)
        if g is None:
            return err(f"group {group} not run")
        if g.state == "skipped":
            return na(g.detail)
        if label.split("-")[0] not in g.targets:
            return na(f"{label} not run: {g.detail or 'not in targets'}")
        xs = [dig(r, path) for r in g.runs if r.get("label") == label and pred(r)]
        xs = [x for x in xs if x is not None]
        if not xs:
            why = f"no {label} result in {group}/runs.jsonl"
            if g.failed:
                why += f"; {len(g.failed)} run(s) failed, see {group}/failed.txt"
            elif g.state == "failed":
                why += f"; {g.detail}"
            return err(why)
        return V(median(xs), n=len(xs))


def is_(**kw):
    return lambda r: all(r.get(k) == v for k, v in kw.items())


def echo(size, tls=False):
    return is_(scenario="echo", mode="closed", size=size, tls=tls)


def handshake(tls, resume):
    return lambda r: (r.get("scenario") == "handshake" and r.get("tls") == tls
                      and bool(r.get("resume", False)) == resume)


def ratio(a, b):
    if not (a.ok() and b.ok()) or b.x == 0:
        return None
    return a.x / b.x


def worst(vals):
    """The first error, else the first n/a, else None (all usable)."""
    for kind in ("error", "na"):
        for v in vals:
            if v.kind == kind:
                return v
    return None


def better_peer(*peers):
    """The better (lower) of the peers that ran; an error among them makes it an error."""
    bad = [p for p in peers if p[1].kind == "error"]
    if bad:
        return bad[0][0], bad[0][1]
    got = [p for p in peers if p[1].ok()]
    if not got:
        return None, na("no peer measured")
    name, v = min(got, key=lambda p: p[1].x)
    absent = [p[0] for p in peers if not p[1].ok()]
    if absent:
        name += f"; {', '.join(absent)} not measured"
    return name, v


def short(v):
    """A verdict for a value that is missing: error (the cell says why) or the n/a."""
    return "error" if v.kind == "error" else v.show()


def verdict_rel(value, ref, factor, ref_name=""):
    """met / missed with value ÷ reference, judged against factor."""
    bad = worst([value, ref])
    if bad:
        return bad.kind if bad.kind == "error" else bad.text
    r = value.x / ref.x if ref.x else None
    if r is None:
        return "error (reference is 0)"
    word = "met" if r <= factor else "missed"
    return f"{word} ({r:.2f} ×{(' ' + ref_name) if ref_name else ''})"


def verdict_abs(value, bound, unit):
    if not value.ok():
        return value.kind if value.kind == "error" else value.text
    word = "met" if value.x <= bound else "missed"
    return f"{word} ({value.x:.2f} ≤ {bound:g} {unit})" if word == "met" else \
        f"{word} ({value.x:.2f} > {bound:g} {unit})"


class Table:
    def __init__(self):
        self.rows = []

    def add(self, row, w, nginx, haproxy, floor, target, verdict):
        cells = [row] + [c if isinstance(c, str) else c.show() for c in (w, nginx, haproxy, floor)]
        self.rows.append(cells + [target, verdict])

    def markdown(self):
        head = ["row (SPEC §9)", "wsgate", "nginx", "HAProxy", "floor (tunnel)", "target", "verdict"]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out)


def fmt(v, d=1, unit=""):
    if not isinstance(v, V) or not v.ok():
        return v
    return V(v.x, text=f"{v.x:,.{d}f}{unit}")


def memory_rows(D, t):
    g = D.groups.get("main")
    sizes = sorted({r["connections"] for r in (g.runs if g else [])
                    if r.get("scenario") == "idle" and isinstance(r.get("connections"), int)})
    top = sizes[-1] if sizes else None
    low = 1000 if 1000 in sizes else (sizes[0] if sizes else None)
    for tls, factor in ((False, 0.6), (True, 0.5)):
        kind = "TLS" if tls else "plain"
        if top is None:
            w = err("no idle runs in main") if g and g.state != "skipped" else na("idle not run")
            t.add(f"idle memory per {kind} connection, KiB", w, w, w, DASH,
                  f"≤ {factor} × HAProxy {kind}", short(w))
            continue
        p = is_(scenario="idle", tls=tls, connections=top)
        w, n, h = (D.get("main", x, p, ["kib_per_conn"]) for x in ("wsgate", "nginx", "haproxy"))
        t.add(f"idle memory per {kind} connection, KiB ({top:,} connections)", fmt(w), fmt(n),
              fmt(h), DASH, f"≤ {factor} × HAProxy {kind}", verdict_rel(w, h, factor))
    # Per WebSocket stream on a shared HTTP/2 connection.
    streams = sorted({(r["streams"], r["connections"]) for r in (g.runs if g else [])
                      if r.get("scenario") == "h2idle"})
    if not streams:
        w = na("h2 not run") if not g or g.state == "skipped" else err("no h2idle runs in main")
        t.add("idle memory per WebSocket stream on a shared HTTP/2 connection, KiB", w,
              na("nginx has no RFC 8441"), w, DASH, "≤ 4 KiB", short(w))
    else:
        s, c = streams[-1]
        p = is_(scenario="h2idle", streams=s, connections=c)
        w = D.get("main", "wsgate", p, ["kib_per_stream"])
        h = D.get("main", "haproxy", p, ["kib_per_stream"])
        t.add(f"idle memory per WebSocket stream on a shared HTTP/2 connection, KiB "
              f"({s:,} streams on {c} connections)", fmt(w, 2), na("nginx has no RFC 8441"),
              fmt(h, 2), DASH, "≤ 4 KiB", verdict_abs(w, 4, "KiB"))
    return top, low


def cpu_rows(D, t):
    g = "main"
    for size, name in ((64, "64 B"), (16384, "16 KiB")):
        w, n, h, f = (D.get(g, x, echo(size), ["cpu_us_per_msg"])
                      for x in ("wsgate", "nginx", "haproxy", "tunnel"))
        bound = 1.03 if size == 64 else 1.05
        t.add(f"proxy CPU per echoed {name} message, µs", fmt(w), fmt(n), fmt(h), fmt(f),
              f"≤ {bound} × floor", verdict_rel(w, f, bound, "floor"))
        if size == 16384:
            bn, bv = better_peer(("nginx", n), ("haproxy", h))
            t.add(f"proxy CPU per echoed {name} message, µs", fmt(w), fmt(n), fmt(h), fmt(f),
                  "≤ 0.5 × better peer", verdict_rel(w, bv, 0.5, bn or ""))
    # HTTP/2 against HTTP/1.1 over TLS, per layout of the same 32 WebSockets.
    for c, s in ((1, 32), (32, 1)):
        h2 = is_(scenario="h2echo", connections=c, streams_per_conn=s, size=64)
        cells = {}
        for x in ("wsgate", "haproxy"):
            a = D.get(g, x, h2, ["cpu_us_per_msg"])
            b = D.get(g, x, echo(64, tls=True), ["cpu_us_per_msg"])
            bad = worst([a, b])
            cells[x] = (bad or V(a.x / b.x, text=f"{a.x / b.x:.2f} × ({a.x:.1f} / {b.x:.1f} µs)"), a, b)
        wv, a, b = cells["wsgate"]
        t.add(f"proxy CPU per 64 B message over HTTP/2 ({c} conn × {s} streams) ÷ over "
              f"HTTP/1.1 TLS (32 conns)", wv, na("nginx has no RFC 8441"), cells["haproxy"][0],
              DASH, "≤ 1.2 × HTTP/1.1 TLS", verdict_rel(a, b, 1.2, "HTTP/1.1 TLS"))


def handshake_rows(D, t):
    g = "main"
    full = {}
    for tls, resume, name, factor in ((False, False, "plain", 0.9), (True, False, "full TLS", 0.6)):
        p = handshake(tls, resume)
        w, n, h = (D.get(g, x, p, ["cpu_us_per_handshake"]) for x in ("wsgate", "nginx", "haproxy"))
        f = D.get(g, "tunnel", p, ["cpu_us_per_handshake"]) if not tls else DASH
        full[name] = (w, n, h)
        bn, bv = better_peer(("nginx", n), ("haproxy", h))
        t.add(f"proxy CPU per {name} handshake, µs", fmt(w, 0), fmt(n, 0), fmt(h, 0), fmt(f, 0),
              f"≤ {factor} × better peer", verdict_rel(w, bv, factor, bn or ""))
    p = handshake(True, True)
    res = [D.get(g, x, p, ["cpu_us_per_handshake"]) for x in ("wsgate", "nginx", "haproxy")]
    cells = []
    for r, fl in zip(res, full["full TLS"]):
        bad = worst([r, fl])
        cells.append(bad or V(r.x, text=f"{r.x:,.0f} ({r.x / fl.x:.2f} × full)"))
    t.add("proxy CPU per resumed TLS handshake, µs", cells[0], cells[1], cells[2], DASH,
          "≤ 0.35 × full TLS", verdict_rel(res[0], full["full TLS"][0], 0.35, "full"))


def latency_rows(D, t):
    g = "latency"
    opn = is_(scenario="echo", mode="open")
    grp = D.groups.get(g)
    rate = next((r.get("rate") for r in (grp.runs if grp else []) if opn(r)), 10000)
    for q, key in (("p99", "p99_us"), ("p99.9", "p999_us")):
        d = D.get(g, "direct", opn, ["latency", key])
        vals = {}
        for x in ("wsgate", "nginx", "haproxy", "tunnel"):
            v = D.get(g, x, opn, ["latency", key])
            bad = worst([v, d])
            vals[x] = bad or V(v.x - d.x, text=f"{v.x - d.x:+,.0f} ({v.x:,.0f} − {d.x:,.0f})", n=v.n)
        w = vals["wsgate"]
        bn, bv = better_peer(("nginx", vals["nginx"]), ("haproxy", vals["haproxy"]))
        if worst([w, bv]):
            verdict = verdict_rel(w, bv, 1.0)
        else:
            word = "met" if w.x <= bv.x else "missed"
            r = f"{w.x / bv.x:.2f} × {bn}" if bv.x > 0 else f"{w.x:+.0f} vs {bv.x:+.0f} µs {bn}"
            note = f", {w.n} repeats" + (" < 7: indicative only" if w.n < 7 else "")
            verdict = f"{word} ({r}{note})"
        t.add(f"added {q} latency at {rate:,.0f} msg/s, µs (proxy − direct)", w, vals["nginx"],
              vals["haproxy"], vals["tunnel"], "≤ better peer (≥ 7 repeats)", verdict)


def flood_rows(D, t):
    g = "flood"
    for mode in ("plain", "tls"):
        p = is_(scenario="flood", mode=mode)
        what = "plain" if mode == "plain" else "TLS"
        for q, key in (("p50", "p50_ratio"), ("p99", "p99_ratio")):
            w, n, h = (D.get(g, x, p, [key]) for x in ("wsgate", "nginx", "haproxy"))
            t.add(f"flood ({what} attacker): well-behaved {q} under attack ÷ quiet",
                  fmt(w, 2, " ×"), fmt(n, 2, " ×"), fmt(h, 2, " ×"), DASH, "≤ 2 × quiet",
                  verdict_rel(w, V(1.0), 2.0, "quiet"))
        cells = {}
        for x in ("wsgate", "nginx", "haproxy"):
            gross = D.get(g, x, p, ["cpu_us_per_refused"])
            net = D.get(g, x, p, ["cpu_us_per_refused_net"])
            cells[x] = (V(gross.x, text=f"{gross.x:.1f} ({net.x:.1f} less the quiet rate)")
                        if gross.ok() and net.ok() else fmt(gross))
        w = D.get(g, "wsgate", p, ["cpu_us_per_refused"])
        t.add(f"flood ({what} attacker): proxy CPU per refused attempt, µs (judged: all of "
              f"the attack's CPU)", cells["wsgate"], cells["nginx"], cells["haproxy"], DASH,
              "≤ 10 µs", verdict_abs(w, 10, "µs"))


def storm_rows(D, t):
    g = "storm"
    modes = ("naive", "jitter")

    def per_mode(label, variant, path):
        """Worst (highest) over client modes of the median over repeats; None → missing."""
        vs = {m: D.get(g, label, is_(scenario="storm", variant=variant, mode=m), path) for m in modes}
        bad = worst(list(vs.values()))
        if bad:
            return bad, vs
        m = max(vs, key=lambda k: vs[k].x)
        return V(vs[m].x, n=vs[m].n), vs

    def not_all_back(label, variant):
        grp = D.groups.get(g)
        runs = [r for r in (grp.runs if grp else []) if r.get("label") == label
                and r.get("variant") == variant and r.get("scenario") == "storm"]
        short = [r for r in runs if r.get("t100_x") is None]
        return short[0] if short else None

    peers = {"wsgate": "queue", "nginx": "rate", "haproxy": "rate"}
    cells = {}
    for label, variant in peers.items():
        v, vs = per_mode(label, variant, ["t100_x"])
        gone = not_all_back(label, variant)
        if gone is not None:
            v = V(float("inf"), text=f"not all back ({gone.get('back')} of {gone.get('clients')})")
        elif v.ok():
            v = V(v.x, text=f"{v.x:.2f} × (" + ", ".join(f"{m} {vs[m].x:.2f}" for m in modes) + ")")
        cells[label] = v
    w = cells["wsgate"]
    t.add("storm: every client back, × N/R (worst of naive / jittered clients; wsgate "
          "max_pending = backend slots, peers rate-limited just under R)", w, cells["nginx"],
          cells["haproxy"], DASH, "≤ 1.1 × N/R",
          "missed (not all back)" if w.ok() and w.x == float("inf")
          else verdict_rel(w, V(1.0), 1.1, "N/R"))
    cells = {x: per_mode(x, v, ["backend_after_restart", "refused_503"])[0] for x, v in peers.items()}
    w = cells["wsgate"]
    verdict = short(w) if not w.ok() else ("met (0)" if w.x == 0 else f"missed ({w.x:.0f})")
    t.add("storm: backend 503s after the restart (overloaded; worst mode)", fmt(w, 0),
          fmt(cells["nginx"], 0), fmt(cells["haproxy"], 0), DASH, "= 0", verdict)
    cells = {x: per_mode(x, v, ["wasted_pct_of_clients"])[0] for x, v in peers.items()}
    w = cells["wsgate"]
    t.add("storm: wasted handshake attempts, % of N (worst mode)", fmt(w), fmt(cells["nginx"]),
          fmt(cells["haproxy"]), DASH, "≤ 5 % of N", verdict_abs(w, 5, "%"))


def cluster_row(D, t):
    g = "fleet"
    hs = lambda c: (lambda r: r.get("scenario") == "handshake" and r.get("cluster") == c)
    wo = D.get(g, "plain", hs(False), ["cpu_us_per_handshake"])
    wi = D.get(g, "cluster", hs(True), ["cpu_us_per_handshake"])
    bad = worst([wi, wo])
    cell = bad or V(wi.x, text=f"{wi.x:.0f} with / {wo.x:.0f} without (n={wi.n})")
    t.add("with cluster: proxy CPU per plain handshake, µs (bench/fleet.sh)", cell,
          DASH, DASH, DASH, "≤ 1.3 × without cluster", verdict_rel(wi, wo, 1.3, "without"))


def constant_rows(D, t, top, low):
    if top is None or low is None or top == low:
        g = D.groups.get("main")
        w = err("no idle runs at two sizes in main") if g and g.state != "skipped" \
            else na("idle not run at two sizes")
        t.add("per-connection memory constant to the fd limit", w, w, w, DASH, "≤ 1.1 ×", short(w))
        return
    for tls in (False, True):
        kind = "TLS" if tls else "plain"
        cells = {}
        for x in ("wsgate", "nginx", "haproxy"):
            a = D.get("main", x, is_(scenario="idle", tls=tls, connections=low), ["kib_per_conn"])
            b = D.get("main", x, is_(scenario="idle", tls=tls, connections=top), ["kib_per_conn"])
            held = D.get("main", x, is_(scenario="idle", tls=tls, connections=top), ["open"])
            bad = worst([a, b, held])
            if bad:
                cells[x] = (bad, a, b, held)
            else:
                txt = f"{a.x:.1f} → {b.x:.1f} KiB ({b.x / a.x:.2f} ×)"
                if held.x < top:
                    txt += f", held {held.x:.0f} of {top:,}"
                cells[x] = (V(b.x / a.x, text=txt), a, b, held)
        v, a, b, held = cells["wsgate"]
        if v.ok() and held.x < top:
            verdict = f"missed (held {held.x:.0f} of {top:,})"
        else:
            verdict = verdict_rel(b, a, 1.1, f"at {low:,}")
        t.add(f"idle memory per {kind} connection, {low:,} → {top:,} connections "
              f"(fd limit {FD_LIMIT})", v, cells["nginx"][0], cells["haproxy"][0], DASH,
              f"≤ 1.1 × the {low:,} figure (constant)", verdict)


def multicore_rows(D, t):
    g = "main"
    for what, pred, path, d in (
        ("64 B message", echo(64), ["cpu_us_per_msg"], 1),
        ("16 KiB message", echo(16384), ["cpu_us_per_msg"], 1),
        ("plain handshake", handshake(False, False), ["cpu_us_per_handshake"], 0),
    ):
        one, two, mt1 = (D.get(g, f"wsgate-{v}", pred, path) for v in ("1t", "2t", "mt1"))
        bad = worst([one, two])
        cell = bad or V(two.x, text=f"{one.x:.{d}f} → {two.x:.{d}f}" + (
            f" (multi-thread runtime, 1 worker: {mt1.x:.{d}f})" if mt1.ok() else ""))
        t.add(f"2 worker threads vs 1: proxy CPU per {what}, µs (generator on both cores)",
              cell, DASH, DASH, DASH, "≤ 1.1 × one thread", verdict_rel(two, one, 1.1, "1 thread"))


FD_LIMIT = "?"


def main():
    global FD_LIMIT
    root = sys.argv[1]
    try:
        with open(os.path.join(root, "fd_limit")) as f:
            FD_LIMIT = f.read().strip()
    except OSError:
        FD_LIMIT = "?"
    D = Data(root)
    t = Table()
    top, low = memory_rows(D, t)
    cpu_rows(D, t)
    handshake_rows(D, t)
    latency_rows(D, t)
    flood_rows(D, t)
    storm_rows(D, t)
    cluster_row(D, t)
    constant_rows(D, t, top, low)
    multicore_rows(D, t)
    print(t.markdown())
    print()
    for g in D.groups.values():
        extra = f"; {len(g.failed)} run(s) failed (failed.txt)" if g.failed else ""
        print(f"- {g.name}: {g.state}, {g.secs} s, targets {' '.join(g.targets) or '–'}"
              f"{(': ' + g.detail) if g.detail else ''}{extra}")
    errors = sum(1 for r in t.rows if "error" in r[-1] or any(c.startswith("error") for c in r[1:2]))
    missed = sum(1 for r in t.rows if r[-1].startswith("missed"))
    met = sum(1 for r in t.rows if r[-1].startswith("met"))
    print(f"- verdicts: {met} met, {missed} missed, {errors} error, "
          f"{len(t.rows) - met - missed - errors} n/a")
    sys.exit(1 if errors or any(g.state == "failed" for g in D.groups.values()) else 0)


if __name__ == "__main__":
    main()

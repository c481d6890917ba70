#!/usr/bin/env python3
"""Memory and CPU per idle relayed connection of a wsgate process.

Starts a raw WebSocket backend (in this script), starts wsgate (release build) in front
of it, opens N WebSocket connections through wsgate, exchanges one message on each so
every relay buffer has been used once, lets them go idle, and reports
(RSS after - RSS before) / N from /proc/PID/status. With --hold S it then keeps them
open S seconds, answering the proxy's pings (keepalive default: every 20 s), and reports
wsgate's CPU time over that window (utime+stime from /proc/PID/stat): the cost of
keeping idle connections alive. Plain ws:// only for now.

    cargo build --release && python3 bench/idle_rss.py --connections 1000
    python3 bench/idle_rss.py --connections 9000 --batch 100 --hold 60
"""
import argparse
import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def answer_pings(reader, writer, counter):
    """Reads server frames; answers pings with a masked pong of the same payload."""
    try:
        while True:
            hdr = await reader.readexactly(2)
            n = hdr[1] & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(n)
            if hdr[0] & 0x0F == 0x9:
                mask = os.urandom(4)
                writer.write(bytes([0x8A, 0x80 | n]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
                counter[0] += 1
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def read_head(reader):
    return await reader.readuntil(b"\r\n\r\n")


async def backend_conn(reader, writer, held):
    head = await read_head(reader)
    key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    held.append(writer)
    # Echo one small unfragmented client frame back unmasked, then stay idle.
    hdr = await reader.readexactly(2)
    n = hdr[1] & 0x7F
    mask = await reader.readexactly(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(n)))
    writer.write(bytes([0x81, n]) + data)
    await writer.drain()
    try:
        await reader.read()  # until the proxy closes
    except (asyncio.CancelledError, ConnectionError):
        pass


async def client_conn(port, i, tls=None):
    if tls:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET /idle HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = b"hello %d" % i
    mask = os.urandom(4)
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
    await writer.drain()
    echo = await reader.readexactly(2 + len(payload))
    assert echo[2:] == payload
    return reader, writer


async def main(args):
    held = []
    server = await asyncio.start_server(lambda r, w: backend_conn(r, w, held), "127.0.0.1", 0, backlog=4096)
    bport = server.sockets[0].getsockname()[1]
    tls_block = ", tls: { self_signed: true }" if args.tls else ""
    tls = None
    if args.tls:
        import ssl
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(f"""
listeners: [{{ name: bench, bind: "127.0.0.1:{args.port}"{tls_block} }}]
log: {{ access: /dev/null }}
# Every bench client comes from 127.0.0.1: per-IP limits would refuse them.
limits: {{ max_connections_per_ip: 1000000, handshakes_per_ip: {{ rate: 1000000, per: 1s }} }}
{args.extra}
upstreams:
  b: {{ backends: [{{ addr: "127.0.0.1:{bport}" }}] }}
routes:
  - {{ name: idle, match: {{ path_prefix: / }}, upstream: b }}
""")
    cfg.close()
    proc = subprocess.Popen(args.wrap.split() + [args.binary, "--config", cfg.name], stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(3.0 if args.wrap else 0.5)
        warm = [await client_conn(args.port, i, tls) for i in range(20)]
        await asyncio.sleep(0.5)
        before = rss_kib(proc.pid)
        conns = []
        for start in range(0, args.connections, args.batch):
            batch = range(start, min(start + args.batch, args.connections))
            conns += await asyncio.gather(*(client_conn(args.port, i, tls) for i in batch))
        await asyncio.sleep(5.0 if args.wrap else 1.0)
        after = rss_kib(proc.pid)
        per = (after - before) / args.connections
        print(f"connections={args.connections} rss_before_kib={before} rss_after_kib={after} kib_per_idle_connection={per:.2f}")
        if args.hold > 0:
            pongs = [0]
            tasks = [asyncio.create_task(answer_pings(r, w, pongs)) for r, w in conns]
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(args.hold)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            used = cpu1 - cpu0
            print(f"hold_s={t1 - t0:.1f} pongs_sent={pongs[0]} wsgate_cpu_s={used:.3f} cpu_pct_of_one_core={100 * used / (t1 - t0):.3f} rss_end_kib={rss_kib(proc.pid)}")
            for t in tasks:
                t.cancel()
        for _, w in conns + warm:
            w.close()
        server.close()
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(cfg.name)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--batch", type=int, default=50, help="handshakes in flight at once")
    p.add_argument("--extra", default="", help="extra top-level YAML, e.g. 'keepalive: { ping_interval: 0s }'")
    p.add_argument("--tls", action="store_true", help="clients connect with TLS (self-signed listener)")
    p.add_argument("--hold", type=float, default=0, help="seconds to hold the idle connections, answering pings")
    p.add_argument("--binary", default="target/release/wsgate")
    p.add_argument("--wrap", default="", help="command prefix for wsgate, e.g. 'valgrind --tool=massif'")
    asyncio.run(main(p.parse_args()))

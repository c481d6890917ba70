"""A real socket.io peer for tests/socketio.rs (python-socketio over aiohttp).

    peer.py server NAME [log]
                          serves socket.io on 127.0.0.1 (port printed as `port N`;
                          with `log`, python-socketio's own logs on stderr);
                          `whoami` answers NAME, `echo` answers its data, and each
                          connect and transport upgrade is printed as a line
    peer.py client URL XFF
                          connects with the default transports (polling, then the
                          upgrade to websocket), sending `X-Forwarded-For: XFF`;
                          prints one JSON line: the transport in use after the upgrade,
                          the server's name before and after it, the echoed events
"""

import asyncio
import json
import sys

import aiohttp.web
import socketio


async def server(name):
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=bool(sys.argv[3:]), engineio_logger=bool(sys.argv[3:]))
    app = aiohttp.web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid, environ):
        print(f"connect {sid}", flush=True)

    @sio.event
    async def whoami(sid, data=None):
        return name

    @sio.event
    async def echo(sid, data):
        return data

    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    await asyncio.Event().wait()


async def client(url, xff):
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, headers={"X-Forwarded-For": xff}, wait_timeout=10)
    before = await sio.call("whoami", {}, timeout=10)
    # The upgrade runs in the background once connected; wait for it (bounded).
    for _ in range(200):
        if sio.transport() == "websocket":
            break
        await asyncio.sleep(0.05)
    after = await sio.call("whoami", {}, timeout=10)
    echoed = [await sio.call("echo", {"n": i}, timeout=10) for i in range(5)]
    result = {
        "transport": sio.transport(),
        "before": before,
        "after": after,
        "echoed": echoed,
        "sid": sio.get_sid(),
    }
    await sio.disconnect()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server(sys.argv[2]))
    else:
        asyncio.run(asyncio.wait_for(client(sys.argv[2], sys.argv[3]), 30))

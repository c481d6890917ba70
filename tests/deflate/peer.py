"""A real permessage-deflate peer for tests/deflate.rs (Python `websockets`, which
negotiates permessage-deflate with context takeover by default, client and server).

  peer.py server            echo server on 127.0.0.1:<free port>; prints `port N`, then
                            `ext <offer>` for each connection (its request's
                            Sec-WebSocket-Extensions, `-` when none)
  peer.py client URL CASE   prints `ext <negotiated>` then one result line:
      echo    a conversation of compressible text and binary messages, each echoed
              back unchanged -> `ok N`
      zeros   one 4 MiB binary message of zeros -> `ok` when echoed whole
      badutf8 a compressed text frame holding invalid UTF-8
  A close prints `closed CODE`.
"""
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve


def server():
    def echo(ws):
        offer = ws.request.headers.get("Sec-WebSocket-Extensions") or "-"
        print("ext", offer, flush=True)
        try:
            for msg in ws:
                print("got", len(msg), flush=True)
                ws.send(msg)
        except ConnectionClosed:
            pass

    with serve(echo, "127.0.0.1", 0, max_size=None) as srv:
        print("port", srv.socket.getsockname()[1], flush=True)
        srv.serve_forever()


def client(url, case):
    with connect(url, max_size=None, open_timeout=10, close_timeout=5) as ws:
        print("ext", ws.response.headers.get("Sec-WebSocket-Extensions") or "-", flush=True)
        try:
            if case == "echo":
                n = 0
                for i in range(20):
                    for msg in (f"hello {i} " * 50, bytes([i % 7]) * 3000):
                        ws.send(msg)
                        back = ws.recv(timeout=10)
                        assert back == msg, f"message {n} came back changed"
                        n += 1
                print("ok", n, flush=True)
            elif case == "zeros":
                msg = bytes(4 << 20)
                ws.send(msg)
                back = ws.recv(timeout=20)
                assert back == msg, "the 4 MiB message came back changed"
                print("ok", flush=True)
            elif case == "badutf8":
                ws.send(b"valid start \xff\xfe not utf-8", text=True)
                ws.recv(timeout=10)
                print("answered", flush=True)
            else:
                raise SystemExit(f"unknown case {case}")
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else 1006
            print("closed", code, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(sys.argv[2], sys.argv[3])

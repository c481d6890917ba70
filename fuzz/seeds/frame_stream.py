#!/usr/bin/env python3
"""Writes the seed corpus of the `frame_stream` fuzz target (fuzz/corpus/frame_stream/).

Input layout (see `wsgate::fuzzing::frame_stream`): flags, client stream length (u16 LE),
4 schedule bytes (bit 7: upstream; bits 0-6: chunk size, 0 = the rest), options, then the client -> upstream and upstream -> client wire bytes.
Run from anywhere: python3 fuzz/seeds/frame_stream.py
"""
import struct, os
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "frame_stream")
MASK = b"\x37\xfa\x21\x3d"
def frame(b0, payload, mask=None):
    n = len(payload)
    h = bytes([b0])
    m = 0x80 if mask else 0
    if n < 126: h += bytes([m | n])
    elif n < 65536: h += bytes([m | 126]) + struct.pack(">H", n)
    else: h += bytes([m | 127]) + struct.pack(">Q", n)
    if mask:
        h += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return h + payload
c = lambda b0, p: frame(b0, p, MASK)   # client → upstream: masked
s = lambda b0, p: frame(b0, p)          # upstream → client: unmasked
close = lambda code, reason=b"": struct.pack(">H", code) + reason
def seed(name, flags, client, upstream, schedule=(0x10, 0x90, 0x00, 0x80), options=0):
    data = bytes([flags]) + struct.pack("<H", len(client)) + bytes(schedule) + bytes([options]) + client + upstream
    with open(os.path.join(out, name), "wb") as f: f.write(data)

seed("echo-text-binary-then-close",
     0, c(0x81, b"hello") + c(0x82, bytes(range(40))) + c(0x88, close(1000, b"done")),
     s(0x81, b"hello") + s(0x82, bytes(range(40))) + s(0x88, close(1000, b"done")))
seed("fragments-with-ping-pong",
     0, c(0x01, b"frag") + c(0x89, b"ping") + c(0x00, "mé".encode()) + c(0x8A, b"") + c(0x80, b"end") + c(0x88, close(1000)),
     s(0x8A, b"ping") + s(0x02, b"\x00\x01") + s(0x80, b"\x02") + s(0x88, close(1000)),
     (0x04, 0x84, 0x02, 0x82))
seed("close-handshake-only", 0, c(0x88, close(1001, b"going away")), s(0x88, close(1001)))
seed("upstream-closes-first", 0, c(0x88, close(1000)), s(0x81, b"bye") + s(0x88, close(1000, b"server done")), (0x80, 0x00, 0x80, 0x00))
seed("close-empty-payload", 0, c(0x88, b""), s(0x88, b""))
seed("medium-frame-16bit-length", 0x04, c(0x82, bytes(i % 251 for i in range(300))) + c(0x88, close(1000)),
     s(0x82, bytes(i % 13 for i in range(2000))), (0x05, 0x8a, 0x20, 0xb0))
seed("client-unmasked-frame", 0, c(0x81, b"ok") + s(0x81, b"unmasked"), s(0x81, b"hi"))
seed("client-reserved-opcode-and-rsv", 0, c(0x83, b"reserved") + c(0xC2, b"rsv"), b"")
seed("client-invalid-utf8-text", 0, c(0x81, b"\xc3\x28"), s(0x88, close(1000)))
seed("client-close-invalid-code", 0, c(0x88, close(999)), b"")
seed("client-close-invalid-utf8-reason", 0, c(0x88, b"\x03\xe8\xc3\x28"), b"")
seed("client-control-too-long-and-fragmented", 0, c(0x89, bytes(126)) + c(0x0A, b"frag pong"), b"")
seed("client-orphan-continuation", 0, c(0x80, b"orphan"), b"")
seed("client-frame-over-limit", 0, bytes([0x82, 0xFF]) + struct.pack(">Q", 70000) + MASK + b"\x09" * 20, b"")
seed("upstream-masked-frame", 0, c(0x81, b"hi"), frame(0x81, b"masked", MASK))
seed("upstream-message-over-125-limit", 0x08, c(0x82, bytes(125)), s(0x02, bytes(100)) + s(0x80, bytes(30)), (0x80, 0x80, 0x80, 0x80), options=0x04)
seed("client-message-over-4KiB-limit", 0, c(0x01, b"a" * 1000) + c(0x00, b"b" * 1000) * 3 + c(0x80, b"c" * 200), s(0x88, close(1000)), (0x00, 0x80, 0x00, 0x80), options=0x08)
seed("early-bytes-both-sides", 0x30, c(0x81, b"early") + c(0x81, b"later"), s(0x81, b"early") + s(0x88, close(1000)), (1, 1, 0x00, 0x80))
seed("early-bytes-over-buffer", 0x10, c(0x82, bytes(1200)), b"", (200, 0, 0x00, 0x80))
seed("client-hangs-up-mid-frame", 0x40, c(0x82, bytes(100))[:50], s(0x81, b"still here"))
seed("upstream-hangs-up-mid-frame", 0x80 | 0x0c, c(0x81, b"hi"), s(0x82, bytes(500))[:200])
seed("permessage-deflate-rsv1", 0x01, c(0xC1, b"\xf2\x48\xcd\xc9\xc9\x07\x00") + c(0xC0, b"bad rsv1 on continuation"), s(0xC1, b"\xf2\x48\x05\x00"))
seed("opaque-extension-rsv-bits", 0x02, c(0xF2, b"any rsv") + c(0x88, close(1000)), s(0xB1, b"rsv2+3") + s(0x88, close(1000)))
seed("both-directions-tiny-chunks", 0x0c, c(0x81, b"abcdefghij" * 5) + c(0x88, close(1000)), s(0x82, b"0123456789" * 5) + s(0x88, close(1000)), (0x01, 0x81, 0x02, 0x82))
seed("upstream-frame-over-limit", 0x08, c(0x81, b"hi"), bytes([0x02, 0x7f]) + struct.pack(">Q", 65537) + b"\x00" * 16)
seed("upstream-announces-60000-then-eof", 0, b"", bytes([0x02, 0x7e]) + struct.pack(">H", 60000) + b"\x00" * 16)
seed("rate-limit-close-after-burst-of-2", 0, c(0x81, b"1") + c(0x89, b"p") + c(0x81, b"2") + c(0x81, b"3") + c(0x88, close(1000)),
     s(0x81, b"1") + s(0x88, close(1000)), options=0x11)
seed("rate-limit-throttle-burst-16", 0, c(0x82, b"a") * 40 + c(0x88, close(1000)), s(0x88, close(1000)), (0x05, 0x85, 0x05, 0x85), options=0x02)

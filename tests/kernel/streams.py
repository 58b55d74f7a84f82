"""Byte streams every byte of which a test can check: request/response connections that send
right after connect (`serve`, `client`), and endless one-way streams (`Stream`)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import socket
import struct
import threading

HEADER = struct.Struct("!cII")  # op, size, seed
MAX_SIZE = 256 * 1024


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """E: echo as it arrives; U: read all, answer sha256; D: send the seeded payload."""
    try:
        op, size, seed = HEADER.unpack(await reader.readexactly(HEADER.size))
        if op == b"E":
            left = size
            while left:
                chunk = await reader.read(min(left, 65536))
                if not chunk:
                    raise ConnectionError("echo: early EOF")
                writer.write(chunk)
                await writer.drain()
                left -= len(chunk)
        elif op == b"U":
            writer.write(hashlib.sha256(await reader.readexactly(size)).digest())
        else:
            writer.write(payload(seed, size))
        await writer.drain()
    finally:
        writer.close()


async def send_in_pieces(sock: socket.socket, data: bytes, seed: int) -> None:
    """Several sendmsg calls back to back: the ones after a miss must not overtake it."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    cuts = sorted({0, len(data), *(rng.randint(1, len(data)) for _ in range(rng.randint(1, 4)))})
    for a, b in itertools.pairwise(cuts):
        await loop.sock_sendall(sock, data[a:b])


async def client(sock: socket.socket, addr: tuple[str, int], op: bytes, size: int,
                  seed: int) -> bool:
    """Connect and send at once; True when every byte that came back is right."""
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, addr)
    data = payload(seed, size) if op != b"D" else b""
    # The first message goes out right after connect: the window where the passive side may
    # not be in the sockhash yet.
    sending = loop.create_task(send_in_pieces(sock, HEADER.pack(op, size, seed) + data, seed))
    want = {b"E": size, b"U": 32, b"D": size}[op]
    got = bytearray()
    while len(got) < want:
        chunk = await loop.sock_recv(sock, 1 << 17)
        if not chunk:
            break
        got += chunk
    await sending
    sock.close()
    if op == b"E":
        return bytes(got) == data
    if op == b"U":
        return bytes(got) == hashlib.sha256(data).digest()
    return bytes(got) == payload(seed, size)


PERIOD = 251  # a prime period: a lost, duplicated or reordered chunk cannot line up again
PATTERN = bytes(range(PERIOD)) * (2 + (1 << 17) // PERIOD)


def pattern(offset: int, length: int) -> bytes:
    start = offset % PERIOD
    return PATTERN[start:start + length]


class Stream:
    """One direction: a sender thread writes the pattern until told to stop, then SHUT_WR; a
    receiver thread checks every byte in order."""

    def __init__(self, tx: socket.socket, rx: socket.socket, seed: int) -> None:
        self.tx, self.rx, self.rng = tx, rx, random.Random(seed)
        self.sent = self.received = 0
        self.error: str | None = None
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def _send(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.rng.choice([1, 100, 1460, 4096, 65536, self.rng.randint(1, 1 << 17)])
                self.tx.sendall(pattern(self.sent, n))
                self.sent += n
            self.tx.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = f"send: {exc}"

    def _recv(self) -> None:
        try:
            while True:
                chunk = self.rx.recv(1 << 17)
                if not chunk:
                    return
                if chunk != pattern(self.received, len(chunk)):
                    self.error = f"wrong bytes at offset {self.received}"
                    return
                self.received += len(chunk)
        except OSError as exc:
            self.error = f"recv: {exc}"

    def join(self, timeout: float) -> None:
        for th in self.threads:
            th.join(timeout)
            assert not th.is_alive(), "stream stalled"

"""Closed-loop HTTP load generator for the benchmark (127.0.0.1 only).

``--concurrency`` keep-alive connections each send one chat completion after
another: ``--warmup`` seconds not counted, then ``--duration`` seconds
measured, then the requests still in flight are waited for (each request has
``--timeout``). Bounded in time: it sends nothing after the measured window.

A request counts in the window when it completes inside it. Measured: requests
per second, latency percentiles, time to first token for streams (the first
SSE event with non-empty ``content``), errors (every phase), and, for the
server's process tree given by ``--pid``, CPU time (utime+stime from /proc)
across the window and the resident memory (VmRSS) of each process at its end.

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions \
        --model bench --key sk-... --concurrency 10 [--stream] --out result.json

HTTP/1.1 on raw asyncio (Content-Length and chunked bodies), so that the
client costs little CPU next to the servers it measures.
"""

import argparse
import asyncio
import json
import math
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CONTENT = re.compile(rb'"content"\s*:\s*"[^"]')
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

HEAD, FIXED, CHUNKED, TO_EOF = range(4)


@dataclass
class Reply:
    status: int
    request_id: str
    body: bytes
    first_token: float | None
    close: bool


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buffer = bytearray()
        self.future: asyncio.Future[Reply] | None = None
        self._reset()

    def _reset(self) -> None:
        self.state = HEAD
        self.status = 0
        self.request_id = ""
        self.close_after = False
        self.remaining = 0
        self.chunk_left = 0
        self.chunk_crlf = False
        self.body = bytearray()
        self.scanned = 0
        self.first_token: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.future is not None and not self.future.done():
            if self.state == TO_EOF:
                self._finish()
            else:
                self.future.set_exception(
                    ConnectionError(f"connection closed ({exc or 'by peer'})")
                )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, payload: bytes) -> "asyncio.Future[Reply]":
        assert self.transport is not None
        self._reset()
        self.buffer.clear()
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.future

    def data_received(self, data: bytes) -> None:
        if self.future is None or self.future.done():
            return  # nothing asked: ignore
        self.buffer += data
        try:
            self._parse()
        except (ValueError, IndexError) as error:
            self.future.set_exception(ConnectionError(f"bad response: {error}"))
            self.close()

    def _parse(self) -> None:
        if self.state == HEAD:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            del self.buffer[: end + 4]
            self.status = int(lines[0].split(" ", 2)[1])
            length: int | None = None
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                elif name == "x-request-id":
                    self.request_id = value
                elif name == "connection":
                    self.close_after = value.lower() == "close"
            if chunked:
                self.state = CHUNKED
            elif length is not None:
                self.state, self.remaining = FIXED, length
            elif self.status in (204, 304):
                self.state, self.remaining = FIXED, 0
            else:
                self.state = TO_EOF
        if self.state == FIXED:
            if self.buffer:
                take = bytes(self.buffer[: self.remaining])
                del self.buffer[: len(take)]
                self.remaining -= len(take)
                self._body(take)
            if self.remaining == 0:
                self._finish()
        elif self.state == CHUNKED:
            self._chunks()
        elif self.state == TO_EOF and self.buffer:
            self._body(bytes(self.buffer))
            self.buffer.clear()

    def _chunks(self) -> None:
        while True:
            if self.chunk_left > 0:
                if not self.buffer:
                    return
                take = bytes(self.buffer[: self.chunk_left])
                del self.buffer[: len(take)]
                self.chunk_left -= len(take)
                self._body(take)
                if self.chunk_left > 0:
                    return
                self.chunk_crlf = True
            if self.chunk_crlf:
                if len(self.buffer) < 2:
                    return
                del self.buffer[:2]
                self.chunk_crlf = False
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return
                del self.buffer[: trailer_end + 4]
                self._finish()
                return
            del self.buffer[: line_end + 2]
            self.chunk_left = size

    def _body(self, data: bytes) -> None:
        self.body += data
        if self.stream and self.first_token is None:
            if CONTENT.search(self.body, max(0, self.scanned - 32)):
                self.first_token = time.perf_counter()
            self.scanned = len(self.body)

    def _finish(self) -> None:
        assert self.future is not None
        if not self.future.done():
            self.future.set_result(
                Reply(
                    status=self.status,
                    request_id=self.request_id,
                    body=bytes(self.body),
                    first_token=self.first_token,
                    close=self.close_after,
                )
            )
        if self.close_after:
            self.close()


@dataclass
class Tally:
    """What the workers saw, by phase."""

    window_start: float
    window_end: float
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    ok_ids: list[str] = field(default_factory=list)
    ok_without_id: int = 0
    ok_total: int = 0
    late: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _valid(reply: Reply, stream: bool) -> str | None:
    """None when the reply is a complete success, else the error's kind."""
    if reply.status != 200:
        return f"http {reply.status}"
    if stream:
        if b"data: [DONE]" not in reply.body:
            return "stream without [DONE]"
        if b'"error"' in reply.body:
            return "error event in stream"
        if reply.first_token is None:
            return "stream without content"
    elif b'"choices"' not in reply.body:
        return "body without choices"
    return None


async def worker(
    host: str, port: int, payload: bytes, stream: bool, timeout: float, tally: Tally
) -> None:
    loop = asyncio.get_running_loop()
    connection: Connection | None = None
    while time.perf_counter() < tally.window_end:
        if connection is None or connection.closed:
            try:
                _, connection = await loop.create_connection(
                    lambda: Connection(stream), host, port
                )
            except OSError as error:
                tally.error(f"connect: {error.strerror or error}")
                await asyncio.sleep(0.05)
                continue
        started = time.perf_counter()
        try:
            reply = await asyncio.wait_for(connection.send(payload), timeout)
        except TimeoutError:
            tally.error("timeout")
            connection.close()
            continue
        except ConnectionError as error:
            tally.error(str(error)[:80])
            connection.close()
            continue
        finished = time.perf_counter()
        problem = _valid(reply, stream)
        if problem is not None:
            tally.error(problem)
            continue
        tally.ok_total += 1
        if reply.request_id:
            tally.ok_ids.append(reply.request_id)
        else:
            tally.ok_without_id += 1
        if tally.window_start <= finished <= tally.window_end:
            tally.latencies.append(finished - started)
            if reply.first_token is not None:
                tally.first_tokens.append(reply.first_token - started)
        elif finished > tally.window_end:
            tally.late += 1
    if connection is not None:
        connection.close()


# --- /proc ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def core_ticks() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each core, from /proc/stat."""
    cores = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            cores.append((sum(values) - idle, sum(values)))
    return cores


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p95/p99/mean/max in milliseconds (nearest rank)."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return {
        "p50": round(rank(0.50), 3),
        "p95": round(rank(0.95), 3),
        "p99": round(rank(0.99), 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen: only loopback targets are allowed")
    host, port = url.hostname, url.port or 80
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": 64,
    }
    if args.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    data = json.dumps(body).encode()
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        "Content-Type: application/json\r\nAccept: */*\r\n"
        + (f"Authorization: Bearer {args.key}\r\n" if args.key else "")
        + f"Content-Length: {len(data)}\r\n\r\n"
    )
    payload = head.encode() + data

    start = time.perf_counter()
    tally = Tally(
        window_start=start + args.warmup, window_end=start + args.warmup + args.duration
    )
    tasks = [
        asyncio.create_task(
            worker(host, port, payload, args.stream, args.timeout, tally)
        )
        for _ in range(args.concurrency)
    ]
    await asyncio.sleep(max(0.0, tally.window_start - time.perf_counter()))
    tree = process_tree(args.pid) if args.pid else []
    ticks_before, cores_before = cpu_ticks(tree), core_ticks()
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(max(0.0, tally.window_end - time.perf_counter()))
    ticks_after, cores_after = cpu_ticks(tree), core_ticks()
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    rss = {pid: rss_kb(pid) for pid in tree}
    parents = {pid: int((_stat(pid) or ["", "0"])[1]) for pid in tree}
    leaves = [pid for pid in tree if pid not in parents.values()]
    # Drain what is in flight (each request is bounded by its timeout).
    await asyncio.wait(tasks, timeout=args.timeout + 5)
    for task in tasks:
        task.cancel()

    requests = len(tally.latencies)
    server_ms = (ticks_after - ticks_before) * 1000 / CLOCK_TICKS
    return {
        "url": args.url,
        "stream": args.stream,
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "requests": requests,
        "rps": round(requests / args.duration, 2),
        "latency_ms": percentiles(tally.latencies),
        "ttft_ms": percentiles(tally.first_tokens) if args.stream else None,
        "errors": sum(tally.errors.values()),
        "error_kinds": tally.errors,
        "ok_total": tally.ok_total,
        "ok_without_request_id": tally.ok_without_id,
        "late": tally.late,
        "request_ids": tally.ok_ids if args.collect_ids else [],
        "server_pids": tree,
        "server_cpu_ms": round(server_ms, 1),
        "server_cpu_ms_per_request": round(server_ms / requests, 3)
        if requests
        else None,
        "server_core_pct": round(100 * server_ms / (args.duration * 1000), 1),
        "rss_kb": {str(pid): kb for pid, kb in rss.items()},
        "worker_rss_kb": max((rss[pid] for pid in leaves), default=0),
        "cores_busy_pct": [
            round(100 * (a[0] - b[0]) / max(1, a[1] - b[1]), 1)
            for a, b in zip(cores_after, cores_before, strict=False)
        ],
        "loadgen_cpu_ms": round(
            (
                own_after.ru_utime
                + own_after.ru_stime
                - own_before.ru_utime
                - own_before.ru_stime
            )
            * 1000,
            1,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pid", type=int, default=0, help="server's root process")
    parser.add_argument("--collect-ids", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""An OpenAI-compatible fake upstream that tests reach over real HTTP.

Each test picks a *scenario* name and points a deployment at
``fake.base(scenario)`` (``http://127.0.0.1:PORT/<scenario>/v1``), then programs
how that scenario answers::

    fake.program("flaky", {"status": 500}, {"content": "ok"})  # 500, then "ok" forever
    fake.program("slow", latency=2.0)                          # every call

Endpoints under ``/<scenario>/v1/``: ``POST chat/completions`` (JSON or SSE
when ``"stream": true``), ``POST completions``, ``POST embeddings`` and
``GET models``; anything else is a 404 JSON error. Every request is recorded
in ``fake.requests`` before any latency or error is applied.

Responses are HTTP/1.1 with keep-alive: a ``Content-Length`` body, or a
``Transfer-Encoding: chunked`` body for streams, so a stream that is cut off
(``drop_mid_stream``) is an error on the client side, not a clean end.

Stdlib only; the server runs in a daemon thread.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_CONTENT = "Hello from the fake upstream."
DEFAULT_MODEL = "fake-model"
HOLD_TIMEOUT = 30.0


@dataclass
class Behaviour:
    """How a scenario answers one call."""

    status: int = 200
    # Body of a non-200 answer: a dict is sent as JSON, a str as is.
    # None → {"error": {"message": "fake upstream error <status>", ...}}.
    error: dict[str, Any] | str | None = None
    # Seconds to wait before the response headers.
    latency: float = 0
    # Set as soon as a call is received (recorded), before anything else.
    received: threading.Event | None = None
    # Wait (at most 30 s) for this event before the response headers.
    gate: threading.Event | None = None
    # Non-stream answers use `content`; streams use `chunks`, or `content`
    # split into about three pieces.
    content: str = DEFAULT_CONTENT
    chunks: list[str] | None = None
    # Seconds between two stream chunks.
    chunk_delay: float = 0
    # Streams: after the first chunk is sent, wait (at most 30 s) for this
    # event before sending the rest.
    hold: threading.Event | None = None
    # Streams: set right after the first chunk is sent.
    first_chunk_sent: threading.Event | None = None
    # Set once the fake is done with the call: the response written out, or
    # given up because the client hung up (see ``Recorded.hung_up``).
    finished: threading.Event | None = None
    # False: no `usage` in bodies and no usage chunk in streams.
    usage: bool = True
    prompt_tokens: int = 7
    completion_tokens: int = 5
    # 200 with a body that is not JSON (or an SSE event that is not JSON).
    malformed: bool = False
    finish_reason: str = "stop"
    embedding_dims: int = 8
    # Close the connection after the first stream chunk (or half of a
    # non-stream body) without finishing the response.
    drop_mid_stream: bool = False

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        size = max(1, -(-len(self.content) // 3))
        return [
            self.content[start : start + size]
            for start in range(0, len(self.content), size)
        ]

    def usage_body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def error_body(self) -> tuple[bytes, str]:
        """The body and content type of a non-200 answer."""
        if isinstance(self.error, str):
            try:
                json.loads(self.error)
            except ValueError:
                return self.error.encode(), "text/plain; charset=utf-8"
            return self.error.encode(), "application/json"
        error = self.error
        if error is None:
            error = {
                "error": {
                    "message": f"fake upstream error {self.status}",
                    "type": "server_error",
                    "code": None,
                }
            }
        return json.dumps(error).encode(), "application/json"


class _Headers(dict[str, str]):
    """Request headers with lower-cased keys; lookups ignore case."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass
class Recorded:
    """One request as the fake received it."""

    scenario: str
    path: str  # the full URL path, e.g. "/s/v1/chat/completions" (no query)
    method: str
    json: dict[str, Any] | None  # the body if it is a JSON object
    headers: dict[str, str]  # lower-cased names; lookups ignore case
    body: bytes = b""
    # True when writing the response failed because the client had hung up.
    # (The first write into a closed connection may still succeed: a stream
    # with more than one chunk left notices, a short answer may not.)
    hung_up: bool = False


class FakeUpstream:
    """The fake server: start it, program scenarios, read what it received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._programs: dict[str, list[Behaviour]] = {}
        self._positions: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self.requests: list[Recorded] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-upstream",
            daemon=True,
        )
        self._thread.start()

    def base(self, scenario: str) -> str:
        """An OpenAI `api_base` for the scenario."""
        return f"{self.url}/{scenario}/v1"

    def program(
        self, scenario: str, *responses: Behaviour | dict[str, Any], **behaviour: Any
    ) -> None:
        """`program(s, status=500)`: every call of `s` answers so.
        `program(s, {"status": 500}, {"content": "ok"})`: calls answer in
        order, the last repeating. Replaces any earlier program of `s`."""
        if responses and behaviour:
            raise TypeError("pass either responses or behaviour keywords, not both")
        sequence = [
            item if isinstance(item, Behaviour) else Behaviour(**item)
            for item in responses
        ] or [Behaviour(**behaviour)]
        with self._lock:
            self._programs[scenario] = sequence
            self._positions[scenario] = 0

    def calls(self, scenario: str) -> int:
        """How many requests the scenario received (any path)."""
        with self._lock:
            return sum(1 for request in self.requests if request.scenario == scenario)

    def reset(self) -> None:
        """Forget all programs and recorded requests."""
        with self._lock:
            self._programs.clear()
            self._positions.clear()
            self.requests.clear()

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, request: Recorded, *, consume: bool) -> Behaviour:
        """Record the request and take the scenario's next behaviour."""
        with self._lock:
            self.requests.append(request)
            sequence = self._programs.get(request.scenario)
            if not sequence:
                return Behaviour()
            position = self._positions[request.scenario]
            if consume:
                self._positions[request.scenario] = position + 1
            return sequence[min(position, len(sequence) - 1)]

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (timeouts, dropped streams) are routine here.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def _split_path(path: str) -> tuple[str, str | None]:
    """("/s/v1/chat/completions") → ("s", "chat/completions")."""
    segments = path.strip("/").split("/")
    if len(segments) >= 3 and segments[1] == "v1":
        return segments[0], "/".join(segments[2:])
    return segments[0], None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_one_request(self) -> None:
        self._recorded: Recorded | None = None
        self._behaviour: Behaviour | None = None
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            if self._recorded is not None:
                self._recorded.hung_up = True
        finally:
            # After the failure is noted, so that a test waiting for this sees it.
            if self._behaviour is not None and self._behaviour.finished is not None:
                self._behaviour.finished.set()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- request -------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        payload: dict[str, Any] | None = parsed if isinstance(parsed, dict) else None
        scenario, endpoint = _split_path(path)
        route = _ROUTES.get((self.command, endpoint or ""))
        self._recorded = Recorded(
            scenario=scenario,
            path=path,
            method=self.command,
            json=payload,
            headers=_Headers({k.lower(): v for k, v in self.headers.items()}),
            body=body,
        )
        behaviour = fake._record(self._recorded, consume=route is not None)
        self._behaviour = behaviour
        if route is None:
            self._send_json(
                404,
                {
                    "error": {
                        "message": f"fake upstream: no route {self.command} {path}",
                        "type": "invalid_request_error",
                        "code": "not_found",
                    }
                },
            )
            return
        if behaviour.received is not None:
            behaviour.received.set()
        if behaviour.gate is not None:
            behaviour.gate.wait(HOLD_TIMEOUT)
        if behaviour.latency:
            fake._closing.wait(behaviour.latency)
        if behaviour.status != 200:
            data, content_type = behaviour.error_body()
            self._send(behaviour.status, data, content_type)
            return
        route(self, behaviour, payload or {})

    # -- response ------------------------------------------------------------

    def _send(
        self, status: int, data: bytes, content_type: str, *, drop: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if drop:
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    def _send_json(
        self, status: int, body: dict[str, Any], behaviour: Behaviour | None = None
    ) -> None:
        if behaviour is not None and behaviour.malformed:
            self._send(200, b'{"id": "fake", "choices": [ not JSON', "application/json")
            return
        drop = behaviour is not None and behaviour.drop_mid_stream
        self._send(status, json.dumps(body).encode(), "application/json", drop=drop)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _stream(self, behaviour: Behaviour, events: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if behaviour.malformed:
            self._write_chunk(b'data: {"id": "fake", "choices": [ not JSON\n\n')
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
            return
        for index, event in enumerate(events):
            if index and behaviour.chunk_delay:
                time.sleep(behaviour.chunk_delay)
            self._write_chunk(b"data: %s\n\n" % json.dumps(event).encode())
            if index == 0:
                if behaviour.first_chunk_sent is not None:
                    behaviour.first_chunk_sent.set()
                if behaviour.drop_mid_stream:
                    self.close_connection = True
                    return
                if behaviour.hold is not None:
                    behaviour.hold.wait(HOLD_TIMEOUT)
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _generate(self, behaviour: Behaviour, body: dict[str, Any], chat: bool) -> None:
        fake = self.server.fake
        prefix, kind = (
            ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        )
        common: dict[str, Any] = {
            "id": f"{prefix}-fake-{fake._next_id()}",
            "object": kind,
            "created": int(time.time()),
            "model": body.get("model") or DEFAULT_MODEL,
        }
        if chat:
            common["system_fingerprint"] = None
        if not body.get("stream"):
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": behaviour.content,
                        "refusal": None,
                    },
                }
            else:
                choice = {"index": 0, "text": behaviour.content}
            choice["logprobs"] = None
            choice["finish_reason"] = behaviour.finish_reason
            response = {**common, "choices": [choice]}
            if behaviour.usage:
                response["usage"] = behaviour.usage_body()
            self._send_json(200, response, behaviour)
            return
        if chat:
            common["object"] = "chat.completion.chunk"
        stream_options = body.get("stream_options")
        include_usage = (
            behaviour.usage
            and isinstance(stream_options, dict)
            and bool(stream_options.get("include_usage"))
        )
        pieces = behaviour.pieces() or [""]
        events: list[dict[str, Any]] = []
        for index, piece in enumerate(pieces):
            if chat:
                delta = {"content": piece}
                if index == 0:
                    delta = {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece}
            choice["logprobs"] = None
            choice["finish_reason"] = (
                behaviour.finish_reason if index == len(pieces) - 1 else None
            )
            event = {**common, "choices": [choice]}
            if include_usage:
                event["usage"] = None
            events.append(event)
        if include_usage:
            events.append({**common, "choices": [], "usage": behaviour.usage_body()})
        self._stream(behaviour, events)

    def _chat(self, behaviour: Behaviour, body: dict[str, Any]) -> None:
        self._generate(behaviour, body, chat=True)

    def _completions(self, behaviour: Behaviour, body: dict[str, Any]) -> None:
        self._generate(behaviour, body, chat=False)

    def _embeddings(self, behaviour: Behaviour, body: dict[str, Any]) -> None:
        raw = body.get("input")
        if isinstance(raw, str) or (
            isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
        ):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list):
            inputs = raw
        else:
            inputs = [] if raw is None else [raw]
        as_base64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        for index in range(len(inputs)):
            # Multiples of 1/16: exact in float32, so base64 round-trips exactly.
            vector = [index + (dim + 1) / 16 for dim in range(behaviour.embedding_dims)]
            embedding: list[float] | str = vector
            if as_base64:
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        response: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": body.get("model") or DEFAULT_MODEL,
        }
        if behaviour.usage:
            response["usage"] = {
                "prompt_tokens": behaviour.prompt_tokens,
                "total_tokens": behaviour.prompt_tokens,
            }
        self._send_json(200, response, behaviour)

    def _models(self, behaviour: Behaviour, body: dict[str, Any]) -> None:
        self._send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": DEFAULT_MODEL,
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": "fake-upstream",
                    }
                ],
            },
            behaviour,
        )


_ROUTES = {
    ("POST", "chat/completions"): _Handler._chat,
    ("POST", "completions"): _Handler._completions,
    ("POST", "embeddings"): _Handler._embeddings,
    ("GET", "models"): _Handler._models,
}

__all__ = ["Behaviour", "FakeUpstream", "Recorded"]

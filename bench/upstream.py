"""A fast fake OpenAI-compatible upstream for the benchmark.

Raw asyncio (no framework), HTTP/1.1 with keep-alive. Answers
``POST /v1/chat/completions`` from pre-built bytes: a JSON completion with
``usage``, or (``"stream": true``) an SSE stream of a role chunk,
``--chunks`` content chunks, a finish chunk, a usage chunk when
``stream_options.include_usage`` is asked (as litellm always does) and
``[DONE]``, as one chunked-encoded write. ``GET /v1/models`` lists the model;
anything else is a 404.

    python -m bench.upstream --port 9000 [--chunks 12]

Prints ``ready <port>`` on stdout once listening.
"""

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

MODEL = "bench-model"
CREATED = 1_700_000_000
PROMPT_TOKENS = 12
WORDS = (
    "Hello",
    " there",
    ",",
    " this",
    " is",
    " the",
    " fake",
    " upstream",
    " of",
    " the",
    " gateway",
    " benchmark",
    " speaking",
    " quickly",
    " and",
    " briefly",
)


def _head(status: str, content_type: str, length: int | None) -> bytes:
    framing = (
        f"Content-Length: {length}"
        if length is not None
        else "Transfer-Encoding: chunked"
    )
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{framing}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()


def _json_response(status: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return _head(status, "application/json", len(data)) + data


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def build_responses(chunks: int) -> dict[str, bytes]:
    """The pre-built answers: completion, stream, stream with usage, models, 404."""
    pieces = [WORDS[i % len(WORDS)] for i in range(chunks)]
    completion = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(pieces)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(len(pieces)),
    }
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
    }
    events = [
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
            ],
        }
    ]
    events += [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            ],
        }
        for piece in pieces
    ]
    events.append(
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )
    usage_event = {**base, "choices": [], "usage": _usage(len(pieces))}

    def stream(with_usage: bool) -> bytes:
        out = [_head("200 OK", "text/event-stream", None)]
        for event in [*events, usage_event] if with_usage else events:
            data = (
                b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            )
            out.append(b"%x\r\n%s\r\n" % (len(data), data))
        done = b"data: [DONE]\n\n"
        out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        return b"".join(out)

    return {
        "completion": _json_response("200 OK", completion),
        "stream": stream(False),
        "stream_usage": stream(True),
        "models": _json_response(
            "200 OK",
            {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}],
            },
        ),
        "not_found": _json_response(
            "404 Not Found",
            {"error": {"message": "not found", "type": "invalid_request_error"}},
        ),
        "bad_request": _json_response(
            "400 Bad Request",
            {"error": {"message": "invalid JSON", "type": "invalid_request_error"}},
        ),
    }


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer from pre-built bytes."""

    def __init__(self, responses: dict[str, bytes]) -> None:
        self.responses = responses
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, path = [*head[0].split(" "), "", ""][:2]
            length = 0
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            start = end + 4
            if chunked:
                parsed = _dechunk(self.buffer, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                if len(self.buffer) < start + length:
                    return
                body = bytes(self.buffer[start : start + length])
                consumed = start + length
            del self.buffer[:consumed]
            self.transport.write(self.answer(method, path, body))

    def answer(self, method: str, path: str, body: bytes) -> bytes:
        path = path.split("?", 1)[0]
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                return self.responses["bad_request"]
            if request.get("stream"):
                options = request.get("stream_options") or {}
                key = "stream_usage" if options.get("include_usage") else "stream"
                return self.responses[key]
            return self.responses["completion"]
        if method == "GET" and path.endswith("/models"):
            return self.responses["models"]
        return self.responses["not_found"]


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A complete chunked body from ``start``: (body, end offset), or None."""
    body = bytearray()
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", position - 2)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 4
        if len(buffer) < position + size + 2:
            return None
        body += buffer[position : position + size]
        position += size + 2


async def serve(port: int, chunks: int) -> None:
    responses = build_responses(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(responses), "127.0.0.1", port, backlog=1024
    )
    sys.stdout.write(f"ready {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=12)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.chunks))


if __name__ == "__main__":
    main()

"""The bare pass-through: a minimal aiohttp proxy with no logic at all.

It forwards ``POST /v1/...`` to the upstream over a keep-alive connection pool
and relays the answer (streams chunk by chunk as they arrive). No auth, no
limits, no accounting: the ceiling of a Python proxy on this machine.

    python -m bench.passthrough --port 9100 --upstream http://127.0.0.1:9000
"""

import argparse
import sys

from aiohttp import ClientSession, TCPConnector, web

SESSION: web.AppKey[ClientSession] = web.AppKey("session", ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    headers = {"Content-Type": "application/json"}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    async with session.post(
        request.app[UPSTREAM] + request.path, data=body, headers=headers
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            response = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": content_type}
            )
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response
        return web.Response(
            status=upstream.status,
            body=await upstream.read(),
            headers={"Content-Type": content_type},
        )


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_context(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = ClientSession(
            connector=TCPConnector(limit=0, keepalive_timeout=60)
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_context)
    app.router.add_post("/v1/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    sys.stdout.write(f"starting {args.port}\n")
    sys.stdout.flush()
    web.run_app(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
    )


if __name__ == "__main__":
    main()

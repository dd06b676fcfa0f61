"""The HTTP floor under the single-event scenario: an ASGI app that only reads each POST's body
and answers 202 with a fixed document of the ingest answer's shape and size, served by uvicorn
with `xray-ingest serve`'s options (workers, loop, protocol). bench_ingest drives it like the
server, so its rate in the same run says what HTTP alone allows on the machine, with this load
generator, before any event is decoded, queued or stored.

Run as `python -m benchmarks.floor_app --port N` (bench_ingest does).
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Receive, Scope, Send

from xray_ingest import balance
from xray_ingest.__main__ import uvicorn_options
from xray_ingest.config import load_settings

# The size of the server's 202 to a single event: two UUIDs and its message.
ACCEPTED = (
    b'{"id":"8a4e2c6d-1f3b-4a5c-9d7e-0b1c2d3e4f50",'
    b'"trace_id":"550e8400-e29b-41d4-a716-446655440000","message":"Event accepted"}'
)
ACCEPTED_HEADERS = [
    (b"content-length", b"%d" % len(ACCEPTED)),
    (b"content-type", b"application/json"),
    (b"x-request-id", b"5e8f62e30000c34e"),
]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    if scope["method"] == "POST":
        status, headers, body = 202, ACCEPTED_HEADERS, ACCEPTED
    else:  # /health, for ServerProcess.wait_ready
        status, headers, body = 200, [(b"content-length", b"2")], b"ok"
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    settings = load_settings()
    options = uvicorn_options(settings, settings.host, port, settings.workers)
    balance.share_connections_between(settings.workers)
    uvicorn.run("benchmarks.floor_app:app", **options)


if __name__ == "__main__":
    main()

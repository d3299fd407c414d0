"""A real uvicorn server on a free port, for the tests of the HTTP protocols."""

from __future__ import annotations

import asyncio

import uvicorn


async def started(config: uvicorn.Config) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """``config`` served (its port 0: a free one): the server, its task, its port."""
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]

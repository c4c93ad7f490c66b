"""What the pack adds to ComfyUI's server: it learns of "Free model and node cache", and it shows
and stops its workers.

ComfyUI's POST /free only sets a flag that its prompt loop consumes (``unload_models`` /
``free_memory``); the workers live outside ComfyUI's model management, so nothing there reaches
them. Rather than wrapping ComfyUI's functions, the pack watches the public API: an aiohttp
middleware sees every successful POST /free (and /api/free) that asks to unload or free, and
stops the workers once the running decode (if any) ends. The route and its body are ComfyUI's
documented API, the same on every version this pack supports.

Routes:
  GET  /parallel_vae/workers        device, pid, state, VAEs held and memory of each worker
  POST /parallel_vae/workers/stop   stop them now (after the running decode); they come back on
                                    the next decode
"""
from __future__ import annotations

import logging

from aiohttp import web

from . import backends

log = logging.getLogger("parallel_vae")

FREE_PATHS = ("/free", "/api/free")


@web.middleware
async def watch_free(request: web.Request, handler):
    response = await handler(request)
    if request.method == "POST" and request.path.rstrip("/") in FREE_PATHS and 200 <= response.status < 300:
        try:
            body = await request.json()  # aiohttp keeps the body the handler read
        except Exception:
            body = {}
        if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
            backends.release_soon("ComfyUI's free")
    return response


async def workers_report(request: web.Request) -> web.Response:
    return web.json_response(backends.report())


async def workers_stop(request: web.Request) -> web.Response:
    import asyncio

    stopped = await asyncio.get_running_loop().run_in_executor(None, backends.release, "the stop route")
    return web.json_response({"stopped": stopped})


def install(server) -> bool:
    """Add the middleware and the routes to ComfyUI's server (before it starts); False where the
    server cannot take them (no server: tests in-process; or already started)."""
    if server is None or getattr(server, "_parallel_vae_hooks", False):
        return False
    try:
        server.app.middlewares.append(watch_free)  # a frozen list once the server runs
        server.routes.get("/parallel_vae/workers")(workers_report)
        server.routes.post("/parallel_vae/workers/stop")(workers_stop)
    except (AttributeError, RuntimeError) as e:
        log.warning("parallel_vae: could not hook into ComfyUI's server (%s); POST /free will not reach "
                    "the workers (they still stop when idle)", e)
        return False
    server._parallel_vae_hooks = True
    return True

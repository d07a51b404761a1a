"""The Ray Serve application: HTTP in front of one QueryEngine per replica.

`start` validates the config and the index in the driver (so a mismatch fails before
anything is deployed), starts Serve's HTTP proxy on serve.host:serve.port and deploys
`serve.replicas` replicas; `serve_forever` is what `python -m jobs.serve` runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from grass_dist.build import build_dataset, build_model, build_task
from grass_dist.config import JobConfig
from grass_dist.errors import BadRequestError
from grass_dist.runtime.cluster import connect, threads_for
from grass_dist.service.engine import QueryEngine, open_checked, require_decoder
from grass_dist.service.protocol import parse_query

log = logging.getLogger("grass_dist")


class AttributionService:
    """One replica: parses requests, runs the engine one request at a time."""

    def __init__(self, raw_job: dict[str, Any]):
        self.job = JobConfig.from_cfg(raw_job)
        torch.set_num_threads(threads_for(self.job.serve.cpus_per_replica))
        self.engine = QueryEngine(self.job)
        self.prefix = self.job.serve.route_prefix.rstrip("/")
        self.default_kind = self.job.serve.kind or self.job.scoring.kind
        # Gradient capture keeps per-forward state, so requests take turns on the model.
        self.lock = asyncio.Lock()

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except BadRequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Exception as e:  # the service keeps serving; the log has the traceback
            log.exception("query failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    async def _route(self, request: Request) -> dict[str, Any]:
        path = request.url.path.rstrip("/")
        if path == f"{self.prefix}/healthz":
            return {"status": "ok", **self.engine.info()}
        if path != f"{self.prefix}/query":
            raise BadRequestError(f"no route {path!r}: use POST {self.prefix}/query", 404)
        if request.method != "POST":
            raise BadRequestError(f"{path} takes POST, not {request.method}", 405)
        req = parse_query(await self._body(request), self.job.serve, self.default_kind)
        items = self.engine.decode(req.examples)
        async with self.lock:
            results = await asyncio.to_thread(self.engine.query, items, req.topk, req.kind)
        return {
            "kind": req.kind,
            "topk": req.topk,
            "train_rows": self.engine.n_train,
            "results": results,
        }

    async def _body(self, request: Request) -> bytes:
        """The body, refusing (413) past serve.max_request_bytes without keeping it.

        An oversized body is still read (and dropped) up to 16x the limit, so the client
        gets the 413 rather than a connection reset while it is sending.
        """
        limit = self.job.serve.max_request_bytes
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > 16 * limit:
                break
        if size > limit:
            raise BadRequestError(
                f"request body over serve.max_request_bytes={limit}: send fewer examples", 413
            )
        return bytes(body)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(job: JobConfig) -> None:
    """Everything that can be refused before deploying: the task hook and the fingerprint."""
    model = build_model(job)
    task = build_task(job)
    require_decoder(job, task)
    open_checked(job, model, task, build_dataset(job, "train"))


def start(raw_job: dict[str, Any]) -> str:
    """Deploy the service on the configured Ray cluster; returns its base URL."""
    job = JobConfig.from_cfg(raw_job)
    check(job)
    s = job.serve
    if not _is_loopback(s.host):
        log.warning(
            "serve.host=%s is not a loopback address: the service (no authentication) is "
            "reachable from other machines",
            s.host,
        )
    connect(job.cluster)
    serve.start(http_options={"host": s.host, "port": s.port})
    app = (
        serve.deployment(AttributionService)
        .options(
            name="AttributionService",
            num_replicas=s.replicas,
            ray_actor_options={"num_cpus": s.cpus_per_replica},
            max_ongoing_requests=s.max_ongoing_requests,
        )
        .bind(raw_job)
    )
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    log.info("attribution service for %s at %s", job.index_url, url)
    return url


def stop() -> None:
    serve.shutdown()


def serve_forever(raw_job: dict[str, Any]) -> None:
    """Start the service and block until SIGINT or SIGTERM, then shut it down."""
    url = start(raw_job)
    print(f"serving {url}/query (health: {url}/healthz); Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()

"""The Ray Serve application: HTTP in front of one QueryEngine per replica.

`start` first runs the pre-deploy check in the driver: it validates the config and the
index and answers one real query of each kind the service offers through the same code as
POST /query (parse, decode, query gradients, preconditioning, scoring), so a config that
would fail every request fails before anything is deployed. Then it starts Serve's HTTP
proxy on serve.host:serve.port and deploys `serve.replicas` replicas; `serve_forever` is
what `python -m jobs.serve` runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
from typing import Any, NoReturn

import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from grass_dist import launch
from grass_dist.config import JobConfig
from grass_dist.errors import BadRequestError, ConfigError, GrassError, ServiceCheckError
from grass_dist.runtime import cluster, compute_thread
from grass_dist.runtime.cluster import connect, threads_for
from grass_dist.service.client import encode
from grass_dist.service.engine import BUILD_PRECONDITIONER, QueryEngine
from grass_dist.service.protocol import QueryRequest, parse_query

log = logging.getLogger("grass_dist")


class QueryHandler:
    """What POST /query does with a body, shared by the replicas and the pre-deploy check."""

    def __init__(self, job: JobConfig, engine: QueryEngine):
        self.job, self.engine = job, engine
        self.default_kind = job.serve.kind or job.scoring.kind

    def parse(self, body: bytes) -> tuple[QueryRequest, list]:
        """A body -> (the request, its examples as dataset items); BadRequestError if bad."""
        req = parse_query(body, self.job.serve, self.default_kind)
        return req, self.engine.decode(req.examples)

    def answer(self, req: QueryRequest, items: list) -> dict[str, Any]:
        """The JSON answer of a parsed request (runs the model: one request at a time)."""
        return {
            "kind": req.kind,
            "topk": req.topk,
            "train_rows": self.engine.n_train,
            "results": self.engine.query(items, req.topk, req.kind),
        }


class AttributionService:
    """One replica: parses requests, runs the engine one request at a time."""

    def __init__(self, raw_job: dict[str, Any]):
        self.job = JobConfig.from_cfg(raw_job)
        # The model computes on one thread (runtime/compute_thread.py), whatever thread
        # serves the request.
        compute_thread.call(torch.set_num_threads, threads_for(self.job.serve.cpus_per_replica))
        self.engine = compute_thread.call(QueryEngine, self.job)
        self.handler = QueryHandler(self.job, self.engine)
        self.prefix = self.job.serve.route_prefix.rstrip("/")
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
            return {"status": "ok", **self.engine.info(), "default_kind": self.handler.default_kind}
        if path != f"{self.prefix}/query":
            raise BadRequestError(f"no route {path!r}: use POST {self.prefix}/query", 404)
        if request.method != "POST":
            raise BadRequestError(f"{path} takes POST, not {request.method}", 405)
        req, items = self.handler.parse(await self._body(request))
        async with self.lock:
            return await asyncio.to_thread(compute_thread.call, self.handler.answer, req, items)

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


def probe_example(task: Any, item: Any) -> Any:
    """A training item as a request example: the task's `encode_example(item)` when it has
    one, else the classification format ({"input", "label"}, or a dict item's tensors)."""
    if hasattr(task, "encode_example"):
        return task.encode_example(item)
    fields = (
        {k: v for k, v in item.items() if torch.is_tensor(v)}
        if isinstance(item, dict)
        else {"input": item[0], "label": item[1]}
    )
    # A 0-dim tensor (a label) goes as a JSON number, as users send it.
    return {k: v.item() if torch.is_tensor(v) and v.ndim == 0 else v for k, v in fields.items()}


def check(job: JobConfig) -> None:
    """Everything that can be refused before deploying: the task hook, the fingerprint, the
    damping, and one real query per kind the service offers.

    The query is the first training row sent as a JSON body through QueryHandler, the code
    behind POST /query, scored against the first committed shard (QueryEngine's probe).
    """
    engine = QueryEngine(job, probe=True)
    handler = QueryHandler(job, engine)
    example = encode(probe_example(engine.task, engine.template))
    kinds = engine.info()["kinds"]
    if engine.pre is None:
        log.warning(
            "kind 'influence' is not served: %s; %s%s",
            engine.unavailable,
            BUILD_PRECONDITIONER,
            ""
            if handler.default_kind in kinds
            else f". Meanwhile a request that names no kind gets HTTP 409 (serve.kind="
            f"{handler.default_kind}): name one of {kinds} or set serve.kind",
        )
    for kind in kinds:
        body = json.dumps({"examples": [example], "topk": 1, "kind": kind}).encode()
        try:
            req, items = handler.parse(body)
        except BadRequestError as e:  # the example's format, not the config
            raise ServiceCheckError(
                f"the pre-deploy check could not send the first training row as a request "
                f"example ({e}): give the task {job.task['_target_']} an encode_example(item) "
                f"method that returns a training item in its request format"
            ) from e
        try:
            answer = handler.answer(req, items)
        except Exception as e:
            if not isinstance(e, GrassError):  # a bug, not a config: keep its traceback
                log.exception("pre-deploy query (kind=%s) failed", kind)
            raise ServiceCheckError(
                f"the pre-deploy query (the first training row, kind={kind}) failed, so "
                f"every {kind} request would: {type(e).__name__}: {e}. Fix the config "
                f"(model, data, task, precondition) to match the index before serving"
            ) from e
        top = answer["results"][0]["proponents"]
        log.info("pre-deploy query (kind=%s) answered: top proponent %s", kind, top[:1])


# What `start` started in this process, for `stop`: Serve applications, and an embedded Ray.
_STARTED: dict[str, Any] = {"apps": [], "ray": False}


def start(raw_job: dict[str, Any]) -> str:
    """Deploy the service on the configured Ray cluster; returns its base URL."""
    job = JobConfig.from_cfg(raw_job)
    if job.cluster.address is None and not ray.is_initialized():
        # A fresh embedded Ray's proxy binds here: a taken port fails now, not after the
        # checks (a running Ray's proxy may hold it already, for its other applications).
        check_port_free(job.serve.host, job.serve.port)
    check(job)
    s = job.serve
    if not _is_loopback(s.host):
        log.warning(
            "serve.host=%s is not a loopback address: the service (no authentication) is "
            "reachable from other machines",
            s.host,
        )
    if connect(job.cluster) and job.cluster.address is None:
        _STARTED["ray"] = True
    check_room(job)
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
    _STARTED["apps"].append(s.app_name)  # before it deploys: stop() also ends a half deploy
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    log.info("attribution service for %s at %s", job.index_url, url)
    return url


def check_port_free(host: str, port: int) -> None:
    """Refuse serve.host:serve.port when another program listens there (ConfigError)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"serve.port={port} on serve.host={host} cannot be bound ({e.strerror}): "
                f"another program listens there. Fix: choose a free port (serve.port=...) "
                f"or stop that program"
            ) from None


def check_room(job: JobConfig) -> None:
    """Refuse replicas that the embedded Ray cannot place: Serve would wait for them forever.
    A joined cluster, whose autoscaler may add nodes, is only warned about."""
    s = job.serve
    need, have = s.replicas * s.cpus_per_replica, ray.cluster_resources().get("CPU", 0.0)
    if need <= have:
        return
    what = (
        f"serve.replicas={s.replicas} x serve.cpus_per_replica={s.cpus_per_replica:g} need "
        f"{need:g} CPUs and the Ray cluster has {have:g}"
    )
    if job.cluster.address is None:
        raise ConfigError(
            f"{what}: lower serve.replicas, or serve.cpus_per_replica to let replicas share "
            f"CPUs (e.g. serve.cpus_per_replica={math.floor(100 * have / s.replicas) / 100:g})"
        )
    log.warning("%s: the replicas beyond it wait until nodes join", what)


def stop() -> None:
    """Delete the applications `start` deployed (their replicas finish the requests they
    hold), leaving any other Serve application of a joined cluster running, then stop the
    embedded Ray `start` started. (`serve.shutdown()` would end every application of the
    cluster, and on Ray's own shutdown it logs a failed graceful_shutdown task.)

    An embedded Ray whose processes stopped with this one (`cluster.embedded_lost`: a
    signal to the whole process group) can delete nothing: the process then ends at once,
    status 0, as the signal asked, rather than wait on that Ray for good."""
    deleting = threading.Thread(target=_delete_apps, name="serve-stop", daemon=True)
    deleting.start()
    while deleting.is_alive():
        deleting.join(_LOST_POLL_S)
        if _STARTED["ray"] and cluster.embedded_lost():
            _end_without_ray()
    if _STARTED["ray"]:
        _STARTED["ray"] = False
        if cluster.shutdown_unless_lost(_LOST_POLL_S):
            _end_without_ray()


_LOST_POLL_S = 0.2  # how often `stop` looks whether the embedded Ray is still there


def _delete_apps() -> None:
    while _STARTED["apps"]:
        serve.delete(_STARTED["apps"].pop())


def _end_without_ray() -> NoReturn:
    log.warning(
        "the embedded Ray's processes stopped together with this one (a signal to the whole "
        "process group, e.g. kill -TERM -- -PGID or systemd's KillMode=control-group; send "
        "it to this process alone to stop the service step by step): the service ends now"
    )
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def serve_forever(raw_job: dict[str, Any]) -> None:
    """Start the service and block until SIGINT or SIGTERM, then shut it down. Either signal
    also stops a service that is still starting, as cleanly."""
    done = threading.Event()

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # SIGINT raises KeyboardInterrupt already
    try:
        url = start(raw_job)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        print(
            f"serving {url}/query (health: {url}/healthz); Ctrl-C stops",
            file=launch.answers(),
            flush=True,
        )
        done.wait()
    except KeyboardInterrupt:
        log.info("stopped while starting")
    finally:
        stop()

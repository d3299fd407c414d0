"""HTTP endpoints other than infer (see ``infer_endpoint``): health, metadata, config, readiness
and statistics, answered as Triton answers them; the gateway's own views; and ``/metrics``
(``gateway.metrics``). Errors become a v2 error body in ``error_response``.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway import metrics as prometheus
from gateway.errors import BadRequest, GatewayError, NotFound, Unavailable
from gateway.infer_endpoint import inflate, read_body
from gateway.pipeline import InferencePipeline
from gateway.protocol import v2
from gateway.rollout import RolloutConflict
from gateway.router import Router
from gateway.upstream.client import model_path, upstream_error
from gateway.upstream.repository import RepositorySync
from gateway.upstream.repository_workers import WorkerRepository
from gateway.upstream.stats import add_cache_answers, merge_statistics

log = logging.getLogger(__name__)

JSON = "application/json"


@dataclass(slots=True)
class Services:
    router: Router
    pipeline: InferencePipeline
    repository: RepositorySync | WorkerRepository | None = None


def services(request: Request) -> Services:
    return request.app.state.services


async def error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, GatewayError):
        status, message = exc.status, exc.message
    elif isinstance(exc, HTTPException):  # Starlette's routing: no such path, or not that method
        status, message, headers = exc.status_code, exc.detail, dict(exc.headers or {})
        if status == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif status == 405:
            # Starlette lists the methods from a set, in no fixed order: sorted, so that every answer says the same.
            allowed = ", ".join(sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip()))
            if allowed:
                headers["Allow"] = allowed
            message = f"method {request.method} is not allowed on {request.url.path}" + (f": use {allowed}" if allowed else "")
        return Response(v2.error_body(message), status, headers=headers, media_type=JSON)
    else:  # a bug: say so without leaking internals, and keep the traceback in the log
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        status, message = 500, f"internal gateway error ({exc.__class__.__name__})"
    return Response(v2.error_body(message), status, media_type=JSON)


def model_and_version(request: Request) -> tuple[str, str]:
    return v2.model_and_version(request.path_params["model"], request.path_params.get("version", ""))


MAX_JSON_BODY = 1 << 20  # the admin and repository calls' bodies are a few bytes


async def json_body(request: Request, empty: Any = None) -> Any:
    """A small JSON request body, gzip- or deflate-compressed or not (``Content-Encoding``, as
    on the infer route); ``empty``: what an empty body means (None: it is not JSON)."""
    headers = request.headers
    declared = headers.get("content-length")
    raw = await read_body(request.receive, None if declared is None else declared.encode("latin-1"), MAX_JSON_BODY)
    raw = inflate(raw, headers.get("content-encoding", "").encode("latin-1"), MAX_JSON_BODY)
    if empty is not None and not raw.strip():
        return empty
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None


async def model_metadata(request: Request) -> Response:
    model, version = model_and_version(request)
    info = await services(request).pipeline.metadata.get(model, version)
    return Response(info.metadata, media_type=JSON)


async def model_config(request: Request) -> Response:
    model, version = model_and_version(request)
    info = await services(request).pipeline.metadata.get(model, version)
    return Response(info.config, media_type=JSON)


async def model_ready(request: Request) -> Response:
    """Ready means routable: READY on an up instance and not withheld (still warming up,
    draining). Triton is asked only where its repository index is not known yet."""
    model, version = model_and_version(request)
    router = services(request).router
    holds = [i.holds(model, version) for i in router.instances if i.routable]
    if any(holds):
        return Response(status_code=200)
    if None in holds:
        answers = await router.get_all(model_path(model, version) + "/ready")
        if any(a.status == 200 for a in answers):
            return Response(status_code=200)
    # Triton's status and words ("Model version not ready"), naming what was asked for.
    raise BadRequest(f"model '{model}'{f' version {version}' if version else ''} is not ready: no instance can serve it")


async def model_stats(request: Request) -> Response:
    if "model" in request.path_params:
        model, version = model_and_version(request)
        path = model_path(model, version) + "/stats"  # the name quoted again, never trusted
    else:
        path = "/v2/models/stats"
    answers = await services(request).router.get_all(path)
    ok = [orjson.loads(a.body) for a in answers if a.status == 200]
    if not ok:
        error = upstream_error(answers[0].status, answers[0].body)
        # Triton answers statistics of an unknown model or version 400 "... is not available",
        # where its metadata answers 404 "unknown model": both are the client's 404 here.
        if any(s in error.message for s in ("unknown model", "not found", "is not available")):
            raise NotFound(error.message)
        raise error
    stats = merge_statistics(ok)
    registry = getattr(request.app.state, "metrics", None)
    if registry is not None:
        add_cache_answers(stats, prometheus.cache_answers(registry))
    return Response(orjson.dumps(stats), media_type=JSON)


# What the gateway itself implements; Triton's other extensions (shared memory, sequences,
# repository control: the index is answered, load and unload are not) are not passed
# through, so clients do not rely on them here.
EXTENSIONS = ["binary_tensor_data", "classification", "parameters", "statistics", "model_configuration", "schedule_policy"]


async def server_metadata(request: Request) -> Response:
    answer = await services(request).router.get("/v2")
    if answer.status != 200:
        raise upstream_error(answer.status, answer.body)
    upstream = orjson.loads(answer.body)
    body = {"name": upstream.get("name", "triton"), "version": upstream.get("version", ""), "extensions": EXTENSIONS}
    return Response(orjson.dumps(body), media_type=JSON)


async def live(request: Request) -> Response:
    return Response(status_code=200)


async def ready(request: Request) -> Response:
    if not services(request).router.routable_count():
        raise Unavailable("no Triton instance is ready")
    return Response(status_code=200)


async def cache(request: Request) -> Response:
    """The response cache's counters per model (hits, misses, coalesced, evictions, bytes)."""
    response_cache = services(request).pipeline.cache
    body = response_cache.snapshot() if response_cache is not None else {"enabled": False, "models": {}}
    return Response(orjson.dumps(body), media_type=JSON)


async def rollout(request: Request) -> Response:
    """The rollout in force: stable and canary versions, shares (configured and in force),
    requests served per version, and why the file on disk was rejected, if it was."""
    return Response(orjson.dumps(services(request).pipeline.rollout_view()), media_type=JSON)


async def rollout_action(request: Request) -> Response:
    """An operator's action on a model's rollout: ``{"action": "promote" | "rollback" |
    "set_share", "share": 0.25}``, authorised by ``Authorization: Bearer <rollout.admin_token>``."""
    token = request.app.state.admin_token
    if not token:
        raise GatewayError("the rollout admin API is disabled: set rollout.admin_token in the config", status=403)
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        body = v2.error_body("missing or wrong admin token (Authorization: Bearer <token>)")
        return Response(body, 401, headers={"WWW-Authenticate": 'Bearer realm="gateway rollout"'}, media_type=JSON)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise BadRequest('the body must be {"action": "promote" | "rollback" | "set_share", "share": 0.25}')
    model = request.path_params["model"]
    pipeline = services(request).pipeline
    try:
        state = pipeline.rollouts.act(model, body["action"], body.get("share"))
    except KeyError:
        router = services(request).router
        if not any(i.holds(model, "") for i in router.instances):
            raise NotFound(f"unknown model '{model}': no instance serves it") from None
        raise NotFound(
            f"model '{model}' has no rollout: it has no table in the rollout file, and no newer "
            "version for an automatic canary"
        ) from None
    except RolloutConflict as exc:
        raise GatewayError(str(exc), status=409) from None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return Response(orjson.dumps({**state, "canary_share_in_force": pipeline.canary_share(model)}), media_type=JSON)


async def repository_index(request: Request) -> Response:
    """Triton's repository index, for the whole fleet (``Router.index``); ``{"ready": true}``
    lists only the versions ready to serve, as Triton's does."""
    body = await json_body(request, empty={})
    ready_only = False
    if body != {}:
        if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
            raise BadRequest('the body must be a JSON object, {"ready": true} or {"ready": false}')
        ready_only = body.get("ready", False)
    entries = services(request).router.index()
    if ready_only:
        entries = [e for e in entries if e["state"] == "READY"]
    return Response(orjson.dumps(entries), media_type=JSON)


async def model_control(request: Request) -> Response:
    """Triton's load and unload calls: not the gateway's to make on a client's behalf. It
    loads what its repository folder holds (``[repository] path``), on every instance, or
    serves what the instances load themselves."""
    action = request.url.path.rsplit("/", 1)[1]
    raise BadRequest(
        f"{action}ing a model through the gateway is not supported: it serves the versions its "
        "Triton instances hold; publish a version folder in the model repository (with "
        "[repository] path the gateway loads it on every instance), or remove one to unload it"
    )


async def repository(request: Request) -> Response:
    """The repository sync: per model, the versions on disk, those served, failures with their
    reasons, each instance's state of each version, and recent events."""
    sync = services(request).repository
    body = {"managed": True, **sync.snapshot()} if sync is not None else {"managed": False, "models": {}, "events": []}
    return Response(orjson.dumps(body), media_type=JSON)


async def fleet(request: Request) -> Response:
    """The gateway's view of each instance: state, weight, load, errors, ejections, models."""
    return Response(orjson.dumps({"instances": services(request).router.snapshot()}), media_type=JSON)


async def metrics(request: Request) -> Response:
    """The Prometheus text format of what the views above show, and of the infer requests
    answered (``gateway.metrics``); 503 until the gateway has started."""
    registry = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise Unavailable("the gateway is starting: no metrics yet")
    return Response(prometheus.render(registry), media_type=prometheus.CONTENT_TYPE)

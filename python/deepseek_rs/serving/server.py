"""HTTP serving of a torch module through a ``DynamicBatcher`` (Starlette on uvicorn).

``deepseek-rs serve`` (see ``python -m deepseek_rs serve --help``) starts it. Endpoints:

* ``POST /v1/infer`` with JSON ``{"inputs": [[...], ...], "id": any, "priority": int,
  "timeout": seconds}`` (only ``inputs`` is required) answers ``{"outputs": [...], "id": ...}``.
  ``inputs`` holds numbers only: a string, ``null`` or a boolean (``true`` is not 1) is a 400.
  Bad JSON or input is 400, a body over the size limit 413, a full queue 429 (with
  ``Retry-After``), a request that waited past its timeout 504, a request arriving while the
  server drains 503, a model error 500. ``/v1/infer/`` is the same route, and every route
  works under a ``root_path`` (the app mounted behind a prefix).
* ``GET /health``: 200 ``{"status": "ok", "batching": {...}}`` (the policy in force) while
  serving, 503 while draining.
* ``GET /metrics``: the batcher's counters and histograms and the HTTP response counts in the
  Prometheus text format.

Every error status (400, 404, 405, 413, 429, 500, 503, 504) has the one JSON body
``{"error": {"type": ..., "message": ...}, "id": ...}`` (``id`` as sent, or null); ``type`` is one
of :data:`ERROR_TYPES`. Every response, whatever its route and status, is counted in
``deepseek_http_responses_total{route, code}`` (``route`` is ``/v1/infer``, ``/health``,
``/metrics`` or ``unmatched``).

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in
flight; the batcher keeps running them, and shuts down (answering whatever it still holds)
once they are answered. The process then ends by the same signal (Ctrl-C: KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections import Counter
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import DeepseekError, InvalidValueError, QueueFullError, RequestTimeoutError, ShutdownError
from ..moe.layer import PEAMoE, set_batch_invariant
from .batcher import DynamicBatcher

DEFAULT_HIDDEN_SIZE = 256


def default_model() -> nn.Module:
    """The built-in model: a small PEAMoE layer (H=256, 16 experts of width 512, progressive
    top-p routing), seeded so every server answers the same. Inputs are ``[tokens, 256]``."""
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        model = PEAMoE(DEFAULT_HIDDEN_SIZE, 512, 16, router="top_p", top_p=0.5, max_k=4)
    return model.eval()


def load_model(spec: Optional[str]) -> nn.Module:
    """``None``: the built-in model; ``"package.module:factory"``: ``factory()`` from that module."""
    if spec is None:
        return default_model()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidValueError(f"a model is named as 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidValueError(f"cannot load model factory {spec!r}: {e}") from None
    if isinstance(factory, nn.Module) or not callable(factory):
        model = factory
    else:
        try:
            model = factory()
        except Exception as e:
            raise InvalidValueError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise InvalidValueError(f"{spec!r} must give an nn.Module, got {type(model).__name__}")
    return model.eval()


def _histogram(lines: list, name: str, help_: str, h: Dict[str, Any]) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    # Every 4th engine bucket: bounds at 1, 2, 4, ... microseconds, the same on every scrape.
    for le, cumulative in h["buckets"][::4]:
        lines.append(f'{name}_bucket{{le="{le:.6g}"}} {cumulative}')
    lines += [
        f'{name}_bucket{{le="+Inf"}} {h["count"]}',
        f"{name}_sum {h['sum']:.9g}",
        f"{name}_count {h['count']}",
    ]


def prometheus_text(metrics: Dict[str, Any], responses: Optional[Dict[Tuple[str, int], int]] = None) -> str:
    """The batcher's ``metrics()`` (and HTTP response counts by (route, status)) in Prometheus
    text format."""
    p = "deepseek_batcher"
    lines = [f"# HELP {p}_requests_total Requests by outcome.", f"# TYPE {p}_requests_total counter"]
    for outcome in ("accepted", "rejected", "timed_out", "cancelled", "completed", "failed"):
        lines.append(f'{p}_requests_total{{outcome="{outcome}"}} {metrics[outcome]}')
    lines += [f"# HELP {p}_batches_total Batches run.", f"# TYPE {p}_batches_total counter"]
    lines.append(f"{p}_batches_total {metrics['batches']}")
    for gauge, help_ in (("queue_depth", "Requests waiting."), ("in_flight", "Requests running.")):
        lines += [f"# HELP {p}_{gauge} {help_}", f"# TYPE {p}_{gauge} gauge", f"{p}_{gauge} {metrics[gauge]}"]
    lines += [f"# HELP {p}_batch_size Requests per batch.", f"# TYPE {p}_batch_size histogram"]
    sizes, cumulative, total = metrics["batch_sizes"], 0, 0
    for n in range(1, len(sizes)):
        cumulative += sizes[n]
        total += n * sizes[n]
        lines.append(f'{p}_batch_size_bucket{{le="{n}"}} {cumulative}')
    lines += [f'{p}_batch_size_bucket{{le="+Inf"}} {cumulative}', f"{p}_batch_size_sum {total}"]
    lines.append(f"{p}_batch_size_count {cumulative}")
    _histogram(lines, f"{p}_queue_time_seconds", "Time from arrival to dispatch.", metrics["queue_time"])
    _histogram(lines, f"{p}_latency_seconds", "Time from arrival to answer.", metrics["latency"])
    if responses is not None:
        help_ = "HTTP responses by route and status code (an answer to a client gone meanwhile counts too)."
        lines += [f"# HELP deepseek_http_responses_total {help_}"]
        lines += ["# TYPE deepseek_http_responses_total counter"]
        for route, code in sorted(responses):
            count = responses[(route, code)]
            lines.append(f'deepseek_http_responses_total{{route="{route}",code="{code}"}} {count}')
    return "\n".join(lines) + "\n"


class PayloadTooLargeError(DeepseekError, ValueError):
    """A request body over the server's limit (413)."""


# The ``error.type`` of every error answer, by status.
ERROR_TYPES = {
    400: ("InvalidJSON", "InvalidValueError", "ShapeError", "DTypeError"),
    404: ("NotFound",),
    405: ("MethodNotAllowed",),
    413: ("PayloadTooLargeError",),
    429: ("QueueFullError",),
    500: ("ModelError", "OutputError", "InternalError"),
    503: ("ShutdownError",),
    504: ("RequestTimeoutError",),
}


def error_json(status: int, message: str, rid: Any = None, type_: Optional[str] = None) -> bytes:
    """The body of every error answer: ``{"error": {"type", "message"}, "id"}``."""
    import orjson

    name = type_ or ERROR_TYPES[status][0]
    return orjson.dumps({"error": {"type": name, "message": message}, "id": rid})


def _has_bool(x: Any) -> bool:
    """Whether a parsed JSON value holds a boolean anywhere (numpy would read true as 1.0)."""
    if type(x) is bool:
        return True
    if type(x) is list:
        return any(_has_bool(v) for v in x)
    return False


def _route_label(scope: Dict[str, Any]) -> str:
    path = _route_path(scope)
    if path in _INFER_PATHS or scope["path"] == "/v1/infer":
        return "/v1/infer"
    return path if path in ("/health", "/metrics") else "unmatched"


def _jsonable(y: Any) -> Any:
    """A model output as something orjson writes fast: numpy arrays (float32/float64/ints)."""
    if isinstance(y, (tuple, list)):
        return [_jsonable(p) for p in y]
    if isinstance(y, torch.Tensor):
        try:  # the common case (a CPU float32 row slice) is a view: no copy, one torch call
            a = y.numpy()
            if a.flags.c_contiguous:
                return a if a.ndim else a[()]  # orjson writes numpy scalars, not 0-d arrays
        except (TypeError, RuntimeError):  # bfloat16, on a device, or needs grad
            pass
        y = y.detach().cpu()
        if y.dtype in (torch.float16, torch.bfloat16):
            y = y.float()
        a = y.contiguous().numpy()
        return a if a.ndim else a[()]
    return y


_INFER_PATHS = ("/v1/infer", "/v1/infer/")


def _route_path(scope: Dict[str, Any]) -> str:
    """The path below the app's mount point (``root_path``), as Starlette's routing sees it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


_JSON_HEADERS = [(b"content-type", b"application/json")]
_ALLOW_POST = [*_JSON_HEADERS, (b"allow", b"POST")]
_NOT_FOUND = error_json(404, "no such route: POST /v1/infer, GET /health and GET /metrics are served")


async def _send(send: Any, status: int, payload: bytes, headers: Any = _JSON_HEADERS) -> None:
    head = [*headers, (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


def create_app(
    batcher: DynamicBatcher, *, shutdown_batcher: bool = True, max_body_bytes: int = 16 << 20
) -> Any:
    """An ASGI app serving ``batcher``; with ``shutdown_batcher`` its lifespan shuts the
    batcher down when the server stops (after uvicorn has answered the requests in flight).
    Bodies over ``max_body_bytes`` get 413. Set ``app.state.draining`` to report 503 on /health.

    ``POST /v1/infer``, the hot path, is a plain ASGI callable: a Starlette request, response,
    middleware and route match per request cost more server CPU than the batch's model share
    of a small request. Starlette serves the rest (health, metrics, 404/405, the lifespan).
    """
    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    NUMPY = orjson.OPT_SERIALIZE_NUMPY
    dtype = batcher.dtype or torch.float32
    try:  # numpy reads nested lists about 3x faster than torch.tensor
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16 has no numpy dtype
        np_dtype = None

    def to_tensor(inputs: Any) -> torch.Tensor:
        if np_dtype is None:
            x = torch.tensor(inputs, dtype=dtype)
            finite = not x.is_floating_point() or bool(torch.isfinite(x).all())
        else:
            a = np.asarray(inputs)  # its own dtype first: given ours, numpy would parse "1" as 1.0
            if a.dtype.kind in "US":
                raise InvalidValueError('"inputs" must be numbers, not strings')
            with np.errstate(over="ignore", invalid="ignore"):  # caught below, as a 400
                a = a.astype(np_dtype, copy=False)
            finite = a.dtype.kind != "f" or bool(np.isfinite(a).all())
            x = torch.from_numpy(a)
        # JSON has no NaN or infinity: they come from null or from overflowing the dtype.
        if not finite:
            raise InvalidValueError(f'"inputs" must be finite numbers representable as {dtype}')
        return x

    responses: Counter = Counter()

    def error_body(status: int, e: BaseException, rid: Any) -> bytes:
        if isinstance(e, orjson.JSONDecodeError):
            name = "InvalidJSON"
        elif type(e).__name__ in ERROR_TYPES[status]:
            name = type(e).__name__
        else:  # a subclass or another exception: the first public name of the status
            public = [n for n in ERROR_TYPES[status] if any(c.__name__ == n for c in type(e).__mro__)]
            name = public[0] if public else ERROR_TYPES[status][0]
        return error_json(status, str(e), rid, name)

    async def read_body(scope: Dict[str, Any], receive: Any) -> Optional[bytes]:
        """The request body; None if the client went away; PayloadTooLargeError over the limit."""
        for key, value in scope["headers"]:
            if key == b"content-length":
                if value.isdigit() and int(value) > max_body_bytes:
                    raise PayloadTooLargeError(f"the body has {int(value)} bytes, more than {max_body_bytes}")
                break
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body", False):  # the whole body in one message: the usual case
            if message["type"] == "http.disconnect":
                return None
            return body
        raw = bytearray(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            raw += message.get("body", b"")
            if len(raw) > max_body_bytes:
                raise PayloadTooLargeError(f"the body has more than {max_body_bytes} bytes")
        return bytes(raw)

    async def infer(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        rid = None
        status, headers = 400, _JSON_HEADERS
        try:
            raw = await read_body(scope, receive)
            if raw is None:
                return
            if len(raw) > max_body_bytes:
                raise PayloadTooLargeError(f"the body has more than {max_body_bytes} bytes")
            body = orjson.loads(raw)
            if type(body) is not dict or "inputs" not in body:
                raise InvalidValueError('the body must be a JSON object with an "inputs" array')
            rid = body.get("id")
            if (b"true" in raw or b"false" in raw) and _has_bool(body["inputs"]):
                raise InvalidValueError('"inputs" must be numbers: true and false are not numbers')
            try:
                x = to_tensor(body["inputs"])
            except InvalidValueError:
                raise
            except (ValueError, TypeError, RuntimeError) as e:
                raise InvalidValueError(f'"inputs" must be a rectangular array of numbers: {e}') from None
            waiter = batcher.submit_async(x, timeout=body.get("timeout"), priority=body.get("priority", 0))
        except PayloadTooLargeError as e:
            status, payload = 413, error_body(413, e, rid)
        except QueueFullError as e:
            status, payload = 429, error_body(429, e, rid)
            headers = [*_JSON_HEADERS, (b"retry-after", b"1")]
        except ShutdownError as e:
            status, payload = 503, error_body(503, e, rid)
        except (ValueError, orjson.JSONDecodeError, DeepseekError) as e:  # bad JSON, inputs, options
            status, payload = 400, error_body(400, e, rid)
        else:
            try:
                y = await waiter
            except RequestTimeoutError as e:
                status, payload = 504, error_body(504, e, rid)
            except Exception as e:
                status, payload = 500, error_json(500, f"{type(e).__name__}: {e}", rid, "ModelError")
            else:
                try:
                    status, payload = 200, orjson.dumps({"outputs": _jsonable(y), "id": rid}, option=NUMPY)
                except TypeError as e:  # an output JSON cannot carry
                    status, payload = 500, error_json(500, str(e), rid, "OutputError")
        await _send(send, status, payload, headers)

    def reply(status: int, body: Dict[str, Any]) -> Response:
        return JSONResponse(body, status_code=status)

    async def health(request: Request) -> Response:
        if starlette.state.draining or batcher.closed:
            error = {"type": "ShutdownError", "message": "the server is draining"}
            return reply(503, {"status": "draining", "error": error, "id": None})
        return reply(200, {"status": "ok", "batching": batcher.config()})

    async def metrics(request: Request) -> Response:
        responses[("/metrics", 200)] += 1  # this answer too (counted when sent would be too late)
        return PlainTextResponse(
            prometheus_text(batcher.metrics(), dict(responses)), media_type="text/plain; version=0.0.4"
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        yield
        starlette.state.draining = True
        if shutdown_batcher:
            await asyncio.get_running_loop().run_in_executor(None, batcher.shutdown)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 / 405 / 500 in the one error schema."""
        status = getattr(exc, "status_code", 500)
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 404:
            return Response(_NOT_FOUND, 404, headers, media_type="application/json")
        if status == 405:
            message = f"{request.method} is not allowed here; use {headers.get('Allow', 'GET')}"
            return Response(error_json(405, message), 405, headers, media_type="application/json")
        if status in ERROR_TYPES:
            body = error_json(status, str(getattr(exc, "detail", exc)))
        else:
            body = error_json(500, f"{type(exc).__name__}: {exc}", type_="InternalError")
            status = 500
        return Response(body, status, headers, media_type="application/json")

    starlette = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: http_error, 405: http_error, Exception: http_error},
    )
    starlette.state.draining = False
    method_not_allowed = error_json(405, "use POST")

    async def route(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1/infer" or _route_path(scope) in _INFER_PATHS):
            if scope["method"] == "POST":
                await infer(scope, receive, send)
            else:
                await _send(send, 405, method_not_allowed, _ALLOW_POST)
        else:
            await starlette(scope, receive, send)

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await route(scope, receive, send)
        label = _route_label(scope)

        async def counted(message: Dict[str, Any]) -> None:
            # Counted once handed to the server, which drops it silently if the client went away.
            # (A 200 of /metrics counted itself before it was rendered.)
            if message["type"] == "http.response.start":
                if label != "/metrics" or message["status"] != 200:
                    responses[(label, message["status"])] += 1
            await send(message)

        await route(scope, receive, counted)

    app.state = starlette.state  # type: ignore[attr-defined]
    return app


def make_batcher(model: nn.Module, *, batching: bool = True, **kwargs: Any) -> DynamicBatcher:
    """The server's batcher: ragged token batches (``[tokens, H]`` requests) for the built-in
    PEAMoE; ``batching=False`` runs one request per model call (the baseline)."""
    if not batching:
        kwargs.update(min_size=1, max_size=1, max_queue_delay=0.0)
    return DynamicBatcher(model, **kwargs)


def run(
    model_spec: Optional[str] = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    max_body_bytes: int = 16 << 20,
    drain_delay: float = 0.0,
    access_log: bool = False,
    banner: Optional[str] = None,
    batch_invariant: bool = False,
    **batcher_kwargs: Any,
) -> None:
    """Serve until SIGTERM / SIGINT, then drain. With ``drain_delay`` seconds, the server first
    keeps serving that long with /health answering 503, so that a load balancer polling it
    stops sending requests before the listener closes (a second signal ends the delay).

    The model is loaded and warmed (one call on zeros when the input shape is known: the
    built-in model, or ``item_shape`` with ``collate="stack"``; a model that refuses zeros is
    served unwarmed, with a line on stderr) before the socket listens. ``banner`` is printed
    to stderr, with the address really bound (``port=0`` picks a free one), once it listens.
    ``access_log`` logs one line per request (uvicorn's access log) whatever ``log_level``.
    ``batch_invariant`` switches every PEAMoE of the model to batch-invariant execution
    (:func:`deepseek_rs.moe.set_batch_invariant`): a request's answer has the same bits whatever
    requests share its batch.
    """
    import logging
    import sys
    import time

    import uvicorn

    if (
        isinstance(drain_delay, bool)
        or not isinstance(drain_delay, (int, float))
        or not 0 <= drain_delay < 1e9
    ):
        raise InvalidValueError(f"drain_delay must be a number of seconds >= 0, got {drain_delay!r}")

    model = load_model(model_spec)
    if batch_invariant:
        set_batch_invariant(model)
    if model_spec is None:
        batcher_kwargs.setdefault("collate", "ragged")
        batcher_kwargs.setdefault("item_shape", (DEFAULT_HIDDEN_SIZE,))
        warm = torch.zeros(4, DEFAULT_HIDDEN_SIZE)
    elif batcher_kwargs.get("collate", "stack") == "stack" and batcher_kwargs.get("item_shape") is not None:
        dtype = batcher_kwargs.get("dtype") or torch.float32
        warm = torch.zeros(1, *batcher_kwargs["item_shape"], dtype=dtype)
    else:
        warm = None
    if warm is not None:
        try:
            with torch.inference_mode():  # the first call pays one-time set-up: not a client's
                model(warm)
        except Exception as e:
            if model_spec is None:
                raise
            # A model may refuse zeros (token ids, say): it is served anyway, just not warmed.
            print(
                f"deepseek-rs serve: warm-up skipped, the model failed on zeros of shape "
                f"{tuple(warm.shape)}: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )
    batcher = make_batcher(model, **batcher_kwargs)
    app = create_app(batcher, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on"
    )
    if access_log:  # uvicorn logs each request at INFO, under the level the other logs keep
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)

    class Server(uvicorn.Server):
        stop_at: Optional[float] = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if banner is not None and self.started and not self.should_exit:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                where = ", ".join(f"http://{a[0]}:{a[1]}" for a in bound) or f"http://{host}:{port}"
                print(f"{banner} listening on {where}", file=sys.stderr, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True  # /health says 503 from the signal on
            # uvicorn records the signal, to re-raise it once drained (the exit status says
            # SIGTERM, and SIGINT gives KeyboardInterrupt); the delay only postpones the exit.
            super().handle_exit(sig, frame)
            if drain_delay > 0 and self.stop_at is None:
                self.stop_at = time.monotonic() + drain_delay
                self.should_exit = False

        async def on_tick(self, counter: int) -> bool:  # uvicorn calls it every 0.1 s
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                self.should_exit = True
            return await super().on_tick(counter)

    server = Server(config)
    try:
        server.run()
    finally:
        batcher.shutdown()


__all__ = [
    "ERROR_TYPES",
    "PayloadTooLargeError",
    "create_app",
    "default_model",
    "error_json",
    "load_model",
    "make_batcher",
    "prometheus_text",
    "run",
]

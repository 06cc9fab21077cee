"""The HTTP server: a FastAPI app over the TokenizerManager, and its launcher.

`launch_server` starts the scheduler and detokenizer processes (spawned, daemonic,
each also watching its parent), waits until both are ready, then serves HTTP in
this process. The offline Engine runs the same Scheduler and Detokenizer classes
in-process instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import multiprocessing as mp
import secrets
import signal
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from radixserve.configs.request_limits import RequestLimits
from radixserve.entrypoints import native, ollama, pooling, tokenization
from radixserve.entrypoints.dashboard import add_dashboard_routes
from radixserve.entrypoints.expert_record_routes import add_expert_record_routes
from radixserve.entrypoints.metrics_routes import add_metrics_routes
from radixserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    parse_request,
)
from radixserve.entrypoints.openai.serving_chat import create_chat_completion
from radixserve.entrypoints.openai.serving_completions import create_completion
from radixserve.managers.data_parallel_controller import run_dp_controller_process
from radixserve.managers.detokenizer_manager import run_detokenizer_process
from radixserve.managers.ipc import PortArgs
from radixserve.managers.launcher import (RankProcess, replica_port_args, serve_followers,
                                          spawn_replica, stop_processes, wait_all_ready)
from radixserve.managers.request_validation import InvalidRequestError
from radixserve.managers.tokenizer_manager import (
    GenerateReqInput,
    RequestFailedError,
    ServerDeadError,
    TokenizerManager,
)
from radixserve.metrics.log_format import configure_logging
from radixserve.metrics.prometheus_setup import prepare_multiprocess_dir, remove_multiprocess_dir
from radixserve.metrics.trace_setup import setup_api_tracing, shutdown_tracing
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# After a worker dies, /health answers 503 this long before the server exits.
_DEAD_GRACE_S = 2.0
_HEALTH_GENERATE_TIMEOUT_S = 60.0


# --- worker processes ------------------------------------------------------------

@dataclass
class Workers:
    port_args: PortArgs
    processes: dict[str, BaseProcess] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    # The DP controller's own sockets to its replicas, when dp_size > 1.
    replica_port_args: PortArgs | None = None

    def dead(self) -> list[str]:
        return [f"{name} process (pid {p.pid}) exited with code {p.exitcode}"
                for name, p in self.processes.items() if not p.is_alive()]

    def stop(self) -> None:
        stop_processes(list(self.processes.values()))
        self.port_args.cleanup()
        if self.replica_port_args is not None:
            self.replica_port_args.cleanup()


def start_workers(server_args: ServerArgs) -> Workers:
    """Spawn the scheduler rank(s), the DP controller if any, and the detokenizer; return
    once all report ready. The process the TokenizerManager talks to is "scheduler"
    (TP rank 0 of the only replica, or the DP controller)."""
    workers = Workers(PortArgs.create())
    ctx = mp.get_context("spawn")
    try:
        dp = server_args.dp_size > 1
        if dp:
            workers.replica_port_args = PortArgs.create()
        ranks = []
        for d in range(server_args.dp_size):
            ranks += spawn_replica(server_args, d, replica_port_args(workers.replica_port_args, d)
                                   if dp else workers.port_args)
        ranks.append(_spawn(ctx, "detokenizer", run_detokenizer_process,
                            (server_args, workers.port_args)))
        workers.processes.update((r.name, r.proc) for r in ranks)
        replies = wait_all_ready(ranks)
        info = replies[0]
        if dp:
            controller = _spawn(ctx, "scheduler", run_dp_controller_process,
                                (server_args, workers.port_args, workers.replica_port_args))
            workers.processes["scheduler"] = controller.proc
            info = wait_all_ready([controller])[0]
        workers.model_info = {k: v for k, v in info.items() if k != "status"}
    except BaseException:
        workers.stop()
        raise
    return workers


def _spawn(ctx: Any, name: str, target: Callable[..., None], args: tuple) -> RankProcess:
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, writer), name=f"radixserve-{name}",
                       daemon=True)
    proc.start()
    writer.close()
    return RankProcess(name, proc, reader)


# --- the app ---------------------------------------------------------------------

def _error(message: str, param: str | None, status_code: int,
           error_type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, status_code, error_type),
                        status_code=status_code)


class BodyTooLargeError(Exception):
    """A request body over --max-request-body-bytes (answered 413)."""


async def _json_body(request: Request, limits: RequestLimits) -> Any:
    """The parsed body; it is read only up to the size limit, and nesting past the depth
    limit is refused (each level of nesting costs the parser a Python stack frame)."""
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_request_body_bytes:
            raise BodyTooLargeError(
                f"the request body is over {limits.max_request_body_bytes} bytes "
                f"(--max-request-body-bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidRequestError("malformed JSON body: nested too deeply", None) from None
    except ValueError as exc:  # bad JSON, bad UTF-8, integers of thousands of digits
        raise InvalidRequestError(f"malformed JSON body: {exc}", None) from None
    _check_body(body, limits.max_json_depth)
    return body


def _check_body(body: Any, max_depth: int) -> None:
    """Refuse nesting deeper than `max_depth`, and text holding a lone UTF-16 surrogate
    (JSON may escape one, \\ud800, but no tokenizer or UTF-8 response can carry it),
    naming where it is. Walked without recursion, as the body may be deeply nested."""
    stack: list[tuple[str, Any, int]] = [("", body, 0)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"{path or 'body'}: text holds a lone UTF-16 surrogate",
                    path or None) from None
        elif isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise InvalidRequestError(
                    f"malformed JSON body: nested deeper than {max_depth} levels at "
                    f"{path or 'body'} (--max-json-depth)", None)
            if isinstance(value, dict):
                for k, v in value.items():
                    # Escaped: the key itself may hold the surrogate this walk looks for.
                    name = k.encode("utf-8", "backslashreplace").decode()
                    key = f"{path}.{name}" if path else name
                    stack.append((key, k, depth + 1))
                    stack.append((key, v, depth + 1))
            else:
                stack.extend((f"{path}.{i}" if path else str(i), v, depth + 1)
                             for i, v in enumerate(value))


_NO_KEY_PATHS = frozenset({"/health", "/health_generate", "/dashboard"})


class ApiKeyMiddleware:
    """Refuse requests without `Authorization: Bearer <api key>` (except the health
    checks and the /dashboard page).

    A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's
    BaseHTTPMiddleware hands the route a receive channel that never reports the client's
    `http.disconnect`, so a non-streaming request whose client left would run on.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # /dashboard is a static page holding no data; it passes the key on itself.
        # sglang-router probes health without the key (also with --health-check-endpoint
        # /health_generate), as SGLang's own workers allow.
        if scope["type"] == "http" and scope["path"] not in _NO_KEY_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error("invalid or missing API key (Authorization: Bearer ...)",
                                  None, 401, "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(tm: TokenizerManager, server_args: ServerArgs,
               background: Callable[[], Awaitable[None]] | None = None,
               worker_pids: dict[str, int] | None = None) -> FastAPI:
    """The routes; `background` runs alongside the server (the worker watchdog)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tm.start()
        task = asyncio.create_task(background()) if background else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(lifespan=lifespan)
    limits = server_args.request_limits()

    if server_args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_args.api_key)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(exc.message, exc.param, 400)

    @app.exception_handler(BodyTooLargeError)
    async def on_too_large(_request: Request, exc: BodyTooLargeError) -> JSONResponse:
        return _error(str(exc), None, 413)

    @app.exception_handler(RequestFailedError)
    async def on_failed(_request: Request, exc: RequestFailedError) -> JSONResponse:
        return _error(exc.message, None, exc.status_code, "server_error")

    @app.exception_handler(ServerDeadError)
    async def on_dead(_request: Request, exc: ServerDeadError) -> JSONResponse:
        return _error(str(exc), None, 503, "server_error")

    @app.get("/health")
    async def health() -> Response:
        if tm.dead_reason is not None:
            return PlainTextResponse(tm.dead_reason, status_code=503)
        return PlainTextResponse("ok")

    @app.get("/health_generate")
    async def health_generate() -> Response:
        obj = GenerateReqInput(input_ids=[0], rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
                               sampling_params={"max_new_tokens": 1, "temperature": 0.0})

        async def run_one() -> None:
            if tm.pooling is not None:  # a model that answers with vectors
                await tm.encode(input_ids=[0], rid=obj.rid)
                return
            async with aclosing(await tm.generate(obj)) as gen:
                async for _ in gen:
                    pass

        try:
            await asyncio.wait_for(run_one(), _HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, ServerDeadError) as exc:
            return PlainTextResponse(f"unhealthy: {exc!r}", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": server_args.model_path,
                "tokenizer_path": server_args.tokenizer_path or server_args.model_path,
                "served_model_name": tm.served_model_name,
                "is_generation": tm.pooling is None,
                "context_length": tm.limits.context_len,
                "vocab_size": tm.limits.vocab_size,
                "model_type": tm.model_info.get("model_type"),
                "architectures": tm.model_info.get("architectures") or None}

    @app.get("/get_server_info")
    @app.get("/server_info")  # SGLang's newer name, which its frontend calls
    async def get_server_info() -> dict[str, Any]:
        info = await tm.get_server_info()
        args = {k: v for k, v in dataclasses.asdict(server_args).items() if k != "api_key"}
        from radixserve import __version__

        # served_model_name as served (sglang-router takes it as the worker's model id).
        return {**args, **dataclasses.asdict(info), "model_info": tm.model_info,
                "served_model_name": tm.served_model_name, "version": __version__,
                "num_pending_requests": tm.num_pending, "worker_pids": worker_pids or {}}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if await tm.flush_cache():
            return PlainTextResponse("Cache flushed.\n")
        return PlainTextResponse("Cache not flushed: requests are running.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _json_body(request, limits)
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object", "rid")
        abort_all = body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise InvalidRequestError("abort_all must be a boolean", "abort_all")
        rid = body.get("rid", "" if abort_all else None)
        if not isinstance(rid, str):
            raise InvalidRequestError("rid must be a string", "rid")
        tm.abort_request(rid, abort_all=abort_all)
        return PlainTextResponse("ok")

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        return await native.generate(tm, await _json_body(request, limits), request)

    def model_card() -> dict[str, Any]:
        return {"id": tm.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "radixserve", "root": server_args.model_path,
                "max_model_len": tm.limits.context_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        if model != tm.served_model_name:
            return _error(f"model {model!r} does not exist", "model", 404, "NotFoundError")
        return JSONResponse(model_card())

    @app.get("/version")
    async def version() -> dict[str, str]:
        from radixserve import __version__

        return {"version": __version__}

    def json_body(request: Request) -> Awaitable[Any]:
        return _json_body(request, limits)

    tokenization.register(app, tm, json_body)
    pooling.register(app, tm, json_body)
    ollama.register(app, tm, json_body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await _json_body(request, limits))
        return await create_completion(tm, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await _json_body(request, limits))
        return await create_chat_completion(tm, req, request)

    add_metrics_routes(app, server_args)
    add_dashboard_routes(app, tm, server_args)
    add_expert_record_routes(app, tm)
    return app


# --- launcher --------------------------------------------------------------------

def _load_tokenizer_in_background(server_args: ServerArgs) -> Future | None:
    """Import transformers' tokenizers and load this model's tokenizer in a thread.

    The workers take many seconds to come up (imports, weights, CUDA graphs) while this
    process only waits on their pipes, so the tokenizer's own seconds of imports and
    loading overlap with them instead of following them. An error surfaces when the
    result is taken, after the workers are up, and ends the launch as before.
    """
    if server_args.skip_tokenizer_init:
        return None

    def load() -> Any:
        from radixserve.model_loader.tokenizer import get_tokenizer

        return get_tokenizer(server_args.load_config())

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-load")
    loading = pool.submit(load)
    pool.shutdown(wait=False)
    return loading


def launch_server(server_args: ServerArgs) -> int:
    """Run until SIGINT/SIGTERM (0) or until a worker process dies (1)."""
    configure_logging(server_args.log_level, "api")
    if server_args.node_rank > 0:
        return serve_followers(server_args)  # no HTTP: node 0 serves
    # Before any process imports prometheus_client (the workers inherit it).
    metrics_dir = prepare_multiprocess_dir() if server_args.enable_metrics else None
    tokenizer_loading = _load_tokenizer_in_background(server_args)
    try:
        setup_api_tracing(server_args.enable_trace, server_args.otlp_traces_endpoint)
        workers = start_workers(server_args)
    except BaseException:
        remove_multiprocess_dir(metrics_dir)
        raise
    try:
        tokenizer = tokenizer_loading.result() if tokenizer_loading is not None else None
        tm = TokenizerManager(server_args, workers.port_args, workers.model_info, tokenizer)
        exit_code = 0
        server: uvicorn.Server | None = None

        async def watch_workers() -> None:
            nonlocal exit_code
            while not (dead := workers.dead()):
                await asyncio.sleep(0.2)
            logger.error("%s; shutting down", dead[0])
            tm.mark_dead(dead[0])
            exit_code = 1
            await asyncio.sleep(_DEAD_GRACE_S)
            server.should_exit = True

        app = create_app(tm, server_args, watch_workers,
                         {name: p.pid for name, p in workers.processes.items()})
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                log_level=server_args.log_level,
                                access_log=server_args.log_level == "debug",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it
        # found: make that an exit through `finally`, so the workers are stopped.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        logger.info("serving on http://%s:%d", server_args.host, server_args.port)
        server.run()
        return exit_code
    finally:
        workers.stop()
        remove_multiprocess_dir(metrics_dir)
        shutdown_tracing(server_args.enable_trace)


def _exit_on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)

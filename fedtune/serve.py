"""`fedtune serve`: one adapter behind a small HTTP API (FastAPI on uvicorn), on localhost by default.

The adapter is loaded once. Every model call happens in one worker thread (`fedtune.serve_batch`), so
the event loop keeps answering (``/health`` during a long generation) and torch never runs two
calls at once on the same CPU cores. The worker merges the inputs of the requests waiting in its
queue into one model call of at most ``max_batch`` inputs: under concurrent load, single-text
requests share forward passes instead of queueing one by one.

Every limit is checked before the model sees a request, and the body's size before it is parsed
(the declared ``Content-Length`` first, then the bytes as they arrive, for a chunked body). Every
error is JSON ``{"error": "..."}`` with a 4xx status that names the limit or the expected shape;
on the loopback, a foreign Host header is refused first (400, `fedtune.loopback`).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from fedtune.common.errors import ConfigError
from fedtune.loopback import listen, refuse_foreign_hosts, run_app, url
from fedtune.serve_batch import ApiError, Batcher
from fedtune.serve_defaults import DEFAULT_NEW_TOKENS

logger = logging.getLogger(__name__)

TASKS_ENDPOINT = {"classification": "/predict", "causal-lm": "/generate"}


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """Request limits and threads of one server.

    Attributes:
        max_batch: Most inputs (texts or prompts) in one request, and in one model call.
        max_body_bytes: Most bytes of a request body; a larger one is refused (413) before it is parsed.
        max_text_chars: Most characters of one text or prompt (a classifier reads only its first
            ``max_length`` tokens anyway; this bounds the tokenizer's work).
        max_new_tokens: Most tokens one /generate request may ask per prompt.
        default_new_tokens: Tokens per prompt when a /generate request does not say (``fedtune generate``'s default).
        max_queue: Requests waiting for the model; more are refused (503) rather than queued without end.
        threads: torch's CPU threads (None: torch's default, one per core).
    """

    max_batch: int = 64
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 16_384
    max_new_tokens: int = 512
    default_new_tokens: int = DEFAULT_NEW_TOKENS
    max_queue: int = 256
    threads: int | None = None

    def __post_init__(self) -> None:
        p = []
        for name, low in (("max_batch", 1), ("max_body_bytes", 256), ("max_text_chars", 1), ("max_new_tokens", 1), ("max_queue", 1)):
            if getattr(self, name) < low:
                p.append(f"serve {name} must be >= {low}, got {getattr(self, name)}.")
        if not 1 <= self.default_new_tokens <= self.max_new_tokens:
            p.append(f"serve default_new_tokens must be in [1, max_new_tokens = {self.max_new_tokens}], got {self.default_new_tokens}.")
        if self.threads is not None and self.threads < 1:
            p.append(f"serve threads must be >= 1, got {self.threads}.")
        if p:
            raise ConfigError(p)


@dataclass(frozen=True)
class ServedAdapter:
    """A loaded adapter and the function that runs one batch of its inputs.

    ``run(inputs, max_new_tokens)`` returns one output per input, in order: a ``{"label", "score"}``
    dict for a classifier (``max_new_tokens`` unused), the generated text for a causal LM.
    """

    task: str
    adapter: str  # the folder's name only: a client learns nothing of the server's file system
    model: str
    labels: tuple[str, ...]
    run: Callable[[list[str], int], list[Any]]


def load_served(adapter: Path, *, base_model: str | None = None, max_batch: int = 64) -> ServedAdapter:
    """Load ``adapter`` (classification or causal-lm, by its ``fedtune.json``) with fedtune.inference's loaders."""
    from fedtune.inference import adapter_task

    task = adapter_task(adapter)
    if task == "causal-lm":
        from fedtune.common.causal_lm import generate
        from fedtune.inference import load_lm_adapter

        lm = load_lm_adapter(adapter, base_model=base_model)

        def run_lm(prompts: list[str], max_new_tokens: int) -> list[Any]:
            return generate(lm.model, lm.tokenizer, prompts, max_new_tokens=max_new_tokens, template=lm.template,
                            batch_size=max_batch)

        return ServedAdapter(task=task, adapter=adapter.name, model=lm.base.name, labels=(), run=run_lm)
    if task != "classification":
        raise ConfigError(f"--adapter {adapter} is a {task!r} adapter; fedtune serve takes classification or causal-lm adapters.")
    from fedtune.common.tasks import encode, predict_proba
    from fedtune.inference import load_adapter

    loaded = load_adapter(adapter, base_model=base_model)

    def run_classifier(texts: list[str], _: int) -> list[Any]:
        # The same encoding and forward pass as `fedtune predict`; a batch pads to its longest text only.
        dataset = encode(loaded.tokenizer, texts, [loaded.labels[0]] * len(texts), loaded.labels, max_length=loaded.max_length)
        probs = predict_proba(loaded.model, dataset, batch_size=max_batch)
        return [{"label": loaded.labels[int(p.argmax())], "score": float(p.max())} for p in probs]

    return ServedAdapter(task=task, adapter=adapter.name, model=loaded.base.name, labels=tuple(loaded.labels), run=run_classifier)


class Prediction(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Its probability (softmax over the labels).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"texts": ["chest pain on exertion"]}]})
    texts: list[str] = Field(description="1 to max_batch texts (see /health's limits).")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="One per text, in order.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompts": ["Summarise: pt reports chest pain."], "max_new_tokens": 32}]})
    prompts: list[str] = Field(description="1 to max_batch prompts, each rendered as in training (one user turn).")
    max_new_tokens: int | None = Field(None, description=f"Greedy tokens per prompt, 1 to the server's max_new_tokens [{DEFAULT_NEW_TOKENS}].")


class GenerateResponse(BaseModel):
    generations: list[str] = Field(description="One greedy continuation per prompt, in order.")


class ErrorBody(BaseModel):
    error: str


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in (
        (400, "Malformed JSON."), (404, "Not this adapter's task."), (413, "Body, number of inputs or an input too large."),
        (422, "Wrong shape or type, an empty list, max_new_tokens out of range."), (503, "Too many requests waiting."))
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} (--max-body-bytes).")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no length: count as it arrives
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes; this server takes at most {limit} (--max-body-bytes).")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({err}).") from None


def _validated(data: Any, model: type[BaseModel]) -> Any:
    fields = list(model.model_fields)
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object with the keys {fields}, got a JSON {_json_type(data)}.")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors()[:3]:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
            if e["type"] == "extra_forbidden":
                problems.append(f"{where} is not a key of this endpoint (allowed: {fields})")
            elif e["type"] == "missing":
                problems.append(f"{where} is missing")
            else:
                problems.append(f"{where}: {e['msg']}, got a JSON {_json_type(e['input'])}")
        raise ApiError(422, "; ".join(problems) + ".") from None


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI's request body for an endpoint that reads its JSON itself (so that size limits come before parsing)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _check_inputs(name: str, inputs: Sequence[str], settings: ServeSettings) -> None:
    if not inputs:
        raise ApiError(422, f"{name} is empty; send 1 to {settings.max_batch} {name}.")
    if len(inputs) > settings.max_batch:
        raise ApiError(413, f"{name} holds {len(inputs)} items; this server takes at most {settings.max_batch} per request "
                            "(--max-batch): split the request.")
    for i, text in enumerate(inputs):
        if len(text) > settings.max_text_chars:
            raise ApiError(413, f"{name}[{i}] has {len(text)} characters; at most {settings.max_text_chars} are allowed.")


def create_app(served: ServedAdapter, settings: ServeSettings, *, host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app serving ``served`` on ``host``; its lifespan starts and stops the inference thread."""
    import asyncio

    from fedtune import __version__

    batcher = Batcher(served.run, max_batch=settings.max_batch, max_queue=settings.max_queue)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    # FastAPI's /docs and /redoc load their JavaScript from a CDN: a server on a site's premises
    # must not fetch code from a third party, and may be offline. /docs is rendered here instead.
    app = FastAPI(title="fedtune serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"A fedtune {served.task} adapter. Errors are JSON {{\"error\": \"...\"}} with a 4xx status.")

    refuse_foreign_hosts(app, host)  # a web page must not use a loopback server by rebinding its DNS name

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown path, wrong method
        return JSONResponse({"error": f"{exc.detail}; this server answers {sorted(TASKS_ENDPOINT.values()) + ['/health', '/docs']}."},
                            status_code=exc.status_code)

    def check_task(task: str) -> None:
        if served.task != task:
            raise ApiError(404, f"this server serves a {served.task} adapter ({served.adapter}); {TASKS_ENDPOINT[task]} is for "
                                f"{task} adapters: POST {TASKS_ENDPOINT[served.task]}.")

    async def infer(inputs: list[str], max_new_tokens: int) -> list[Any]:
        try:
            return await asyncio.wrap_future(batcher.submit(inputs, max_new_tokens))
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 -- logged with its traceback by the batcher
            raise ApiError(500, f"inference failed ({type(err).__name__}); see the server's log.") from None

    @app.get("/health", summary="Status, task, labels or model, limits")
    async def health() -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ok", "task": served.task, "adapter": served.adapter, "model": served.model}
        if served.labels:
            body["labels"] = list(served.labels)
        body["limits"] = {k: v for k, v in asdict(settings).items() if k not in ("threads", "max_queue")}
        body["model_calls"], body["requests_answered"] = batcher.calls, batcher.jobs
        return body

    async def checked(request: Request, task: str, model: type[BaseModel], inputs: str) -> Any:
        # In this order: the task, the body's size (before parsing), its shape, then the inputs' limits.
        check_task(task)
        body = _validated(await _read_json(request, settings.max_body_bytes), model)
        _check_inputs(inputs, getattr(body, inputs), settings)
        return body

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_body_doc(PredictRequest),
              summary="Label and probability of each text (classification adapters)")
    async def predict(request: Request) -> dict[str, Any]:
        body = await checked(request, "classification", PredictRequest, "texts")
        return {"predictions": await infer(body.texts, 0)}

    @app.post("/generate", response_model=GenerateResponse, responses=_ERRORS, openapi_extra=_body_doc(GenerateRequest),
              summary="Greedy continuation of each prompt (causal-lm adapters)")
    async def generate(request: Request) -> dict[str, Any]:
        body = await checked(request, "causal-lm", GenerateRequest, "prompts")
        tokens = settings.default_new_tokens if body.max_new_tokens is None else body.max_new_tokens
        if not 1 <= tokens <= settings.max_new_tokens:
            raise ApiError(422, f"max_new_tokens must be in [1, {settings.max_new_tokens}], got {tokens}.")
        return {"generations": await infer(body.prompts, tokens)}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        return docs_page(app.openapi())

    return app


def docs_page(spec: dict[str, Any]) -> str:
    """The OpenAPI spec as one self-contained HTML page: no script, no stylesheet from elsewhere."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(spec['info']['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:.6em;"
             "overflow-x:auto}code{font-weight:bold}</style></head><body>",
             f"<h1>{e(spec['info']['title'])} {e(spec['info']['version'])}</h1><p>{e(spec['info'].get('description', ''))}</p>",
             "<p>Machine-readable spec: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{e(method.upper())} {e(path)}</code></h2><p>{e(op.get('summary', ''))}</p>")
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema:
                parts.append(f"<h3>Request body</h3><pre>{e(json.dumps(schema, indent=2))}</pre>")
            codes = ", ".join(f"{e(code)} {e(r.get('description', ''))}" for code, r in op.get("responses", {}).items())
            parts.append(f"<h3>Responses</h3><p>{codes}</p>")
    schemas = spec.get("components", {}).get("schemas", {})
    parts.append("<h2>Schemas</h2>" + "".join(f"<h3 id='{e(name)}'>{e(name)}</h3><pre>{e(json.dumps(s, indent=2))}</pre>"
                                               for name, s in schemas.items()))
    return "".join(parts) + "</body></html>"


def serve(adapter: Path, *, base_model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings = ServeSettings(), announce: Callable[[str], None] = print) -> None:
    """Load ``adapter``, listen on ``host:port`` and serve until SIGINT/SIGTERM.

    ``announce`` gets one line once the server accepts connections, with its URL (the real port
    when ``port`` is 0).
    """
    import torch

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    sock = listen(host, port)  # before the model loads, so a port in use is one line at once
    try:
        served = load_served(adapter, base_model=base_model, max_batch=settings.max_batch)
    except BaseException:
        sock.close()
        raise
    where = url(host, sock.getsockname()[1])
    what = f"labels {list(served.labels)}" if served.labels else "POST /generate"
    line = f"serving {served.task} adapter {served.adapter} (base {served.model}; {what}) on {where}; API at {where}/docs"
    run_app(create_app(served, settings, host=host), sock, on_started=lambda: announce(line), log_level="info", graceful_seconds=10)

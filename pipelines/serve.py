"""serve: a model as an OpenAI-compatible chat endpoint (``/v1/chat/completions``, ``/v1/models``).

Reads: MODEL — a standalone Hugging Face directory (what ``export`` writes), ``models:/<name>@<alias>`` or
``models:/<name>/<version>`` (MLflow Model Registry), or an MLflow run id (a pipeline parent run serves its ``export``
stage's model; a stage run serves its ``model`` artifact); ``MLFLOW_TRACKING_URI``, ``TUNEWRIGHT_HOME``; the API key
from the environment (``TUNEWRIGHT_SERVE_API_KEY``, or the variable ``--api-key-env`` names).
Writes: downloads under ``$TUNEWRIGHT_HOME/cache/serve/`` (one directory per registry version or run artifact).

The server is ``transformers serve`` (FastAPI + uvicorn, from ``transformers[serving]``), built in-process on the one
model: its request validation, generation thread, streaming and response shapes, with three changes made here —
the model is loaded once from MODEL and named (registered model name, or directory name; ``/v1/models`` lists
that name, requests may use it or MODEL as given); decoding follows the model's ``generation_config.json`` (greedy,
its EOS ids, its ``max_new_tokens`` when a request sets none, its ``stop_strings`` plus a request's ``stop``, the
answer cut before the stop string as OpenAI does); only ``/v1/chat/completions``, ``/v1/models`` and ``/health`` are
exposed (not its model-loading, reset or other endpoints). The prompt is the tokenizer's chat template: the one the
model was trained and evaluated with.

Credentials: loopback (127.0.0.1, ::1, localhost) by default; binding any other address needs an API key, else it
refuses to start. With a key, every request but ``/health`` needs ``Authorization: Bearer <key>`` (else 401). The key
comes from the environment only (never a command-line argument, which ``ps`` shows) and is never printed.

    python -m pipelines.serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY_ENV = "TUNEWRIGHT_SERVE_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
OPEN_PATHS = frozenset({"/health"})  # liveness only: says nothing about the model
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class ServeError(ValueError):
    """The server cannot start as asked (bad MODEL, missing key, port taken); one line for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local standalone Hugging Face directory
    name: str  # what /v1/models lists and requests name
    source: str  # where it came from, for the start-up line


# ------------------------------------------------------------------------------------------------ credentials
def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_from_env(var: str | None = None) -> str | None:
    """The API key from ``$var`` (an error when that variable is unset or empty), else ``$TUNEWRIGHT_SERVE_API_KEY``."""
    if var:
        key = os.environ.get(var, "")
        if not key.strip():
            raise ServeError(f"--api-key-env {var}: the environment variable {var} is not set (or empty)")
        return key.strip()
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ServeError(f"--host {host} is beyond loopback: refusing to serve without an API key (set {API_KEY_ENV} "
                         "or name a variable with --api-key-env; clients then send 'Authorization: Bearer <key>')")


def check_port(host: str, port: int) -> None:
    """Fail in one line before loading anything when uvicorn could not listen there (it binds the same way)."""
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: expected 1-65535")
    addr = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            raise ServeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


class BearerAuth:
    """ASGI middleware: every HTTP request but ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                from starlette.responses import JSONResponse

                body = {"error": {"message": "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                  "type": "invalid_request_error", "code": "invalid_api_key"}}
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- MODEL → a dir
def _where() -> str:
    """The tracking URI for messages, without any ``user:password@`` part."""
    from pipelines import tracking

    return re.sub(r"(\w+://)[^/\s@]+@", r"\1", tracking.tracking_uri())


def _first_line(e: BaseException) -> str:
    """An exception's first line, any ``user:password@`` in its URLs removed."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"(\w+://)[^/\s@]+@", r"\1", line)


def _mlflow_error(e: BaseException, subject: str, missing: str) -> ServeError:
    """``subject: missing in <store>`` when MLflow says it does not exist, else that the store could not be queried."""
    code = getattr(e, "error_code", "")
    if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        return ServeError(f"{subject}: {missing} in {_where()} ({_first_line(e)})")
    return ServeError(f"{subject}: cannot query {_where()} ({_first_line(e)})")


def model_dir(root: Path, what: str) -> Path:
    """The standalone Hugging Face directory in ``root`` (itself, or the shallowest folder with a config.json)."""
    root = Path(root)
    if (root / "config.json").is_file():
        d = root
    else:
        found = sorted((p.parent for p in root.rglob("config.json")), key=lambda p: (len(p.parts), str(p)))
        if not found:
            if (root / "adapter_config.json").is_file() or any(root.rglob("adapter_config.json")):
                raise ServeError(f"{what}: a PEFT adapter, not a standalone model; export it first "
                                 "(tunewright export RUN_ID OUT_DIR merges every adapter)")
            raise ServeError(f"{what}: no Hugging Face model there (no config.json)")
        d = found[0]
    if not any(d.glob("*.safetensors")):
        raise ServeError(f"{what}: no safetensors weights in {d}")
    return d


def _cache_dir(key: str) -> Path:
    from pipelines import tracking

    return tracking.home() / "cache" / "serve" / key


def _download(key: str, fetch: Callable[[Path], str], expect_sha: str | None, what: str) -> Path:
    """``fetch(tmp)`` into the serve cache under ``key`` once (atomically; a concurrent identical download wins)."""
    from pipelines.artifacts import sha256_path

    dest = _cache_dir(key)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:40]}.", dir=dest.parent))
    try:
        local = Path(fetch(tmp))
        if expect_sha and sha256_path(local) != expect_sha:
            raise ServeError(f"{what}: downloaded content does not match its recorded sha256 {expect_sha[:12]}")
        try:
            os.replace(local, dest)
        except OSError:  # another process finished the same download first
            if not dest.is_dir():
                raise
    except ServeError:
        raise
    except Exception as e:
        raise ServeError(f"{what}: cannot download it ({_first_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80]  # never '@': transformers reads '@' as a revision


def _from_registry(uri: str) -> ResolvedModel:
    import mlflow

    from pipelines import tracking

    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        get = lambda c: c.get_model_version_by_alias(name, alias)  # noqa: E731
    else:
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ServeError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
        get = lambda c: c.get_model_version(name, version)  # noqa: E731
    if not name:
        raise ServeError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    c = tracking.client()
    try:
        mv = tracking.with_retries(lambda: get(c), "get model version")
    except Exception as e:
        raise _mlflow_error(e, uri, "no such model version") from None
    ident = json.dumps([tracking.tracking_uri(), mv.name, mv.version, mv.source, mv.run_id, mv.creation_timestamp])
    key = f"{_safe(mv.name)}-v{mv.version}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"

    def fetch(tmp: Path) -> str:  # the version the alias names now, even if the alias moves meanwhile
        where = tracking.with_retries(lambda: c.get_model_version_download_uri(mv.name, mv.version), "download uri")
        return tracking.with_retries(lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=where, dst_path=str(tmp), tracking_uri=tracking.tracking_uri()), "download artifacts")

    d = _download(key, fetch, None, uri)
    return ResolvedModel(model_dir(d, uri), mv.name, f"{uri} (version {mv.version})")


def _from_run(run_id: str) -> ResolvedModel:
    import mlflow

    from pipelines import tracking

    c = tracking.client()
    try:
        run = tracking.with_retries(lambda: c.get_run(run_id), "get run")
    except Exception as e:
        raise _mlflow_error(e, f"run {run_id}", "not found") from None
    tags = run.data.tags
    what = f"run {run_id}"
    if tracking.TAG_PIPELINE in tags and tracking.TAG_STAGE not in tags:  # a pipeline parent run: its export
        try:
            kids = tracking.with_retries(lambda: c.search_runs(
                [run.info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`{tracking.TAG_STAGE}` = 'export'",
                order_by=["attributes.start_time DESC"]), "search runs")
        except Exception as e:
            raise ServeError(f"{what}: cannot search its stage runs in {_where()} ({_first_line(e)})") from None
        done = [r for r in kids if r.info.status == "FINISHED"]
        if not done:
            raise ServeError(f"{what} (pipeline {tags[tracking.TAG_PIPELINE]}) has no finished export stage run; "
                             f"build a directory with: tunewright export {run_id} OUT_DIR")
        run = done[0]
        tags = run.data.tags
        what = f"{what} (export run {run.info.run_id})"
    elif run.info.status != "FINISHED":
        raise ServeError(f"{what}: status {run.info.status}, not FINISHED")
    source = tags.get(tracking.TAG_SOURCE) if tags.get(tracking.TAG_CACHE) == "hit" else None
    art_run = source or run.info.run_id  # a cache-hit run has no artifacts of its own: the run it reused has
    path = tags.get(tracking.TAG_PRIMARY, "model")
    sha = tags.get(tracking.TAG_SHA)
    key = f"run-{art_run}-{_safe(path)}" + (f"-{sha[:12]}" if sha else "")
    d = _download(key, lambda tmp: tracking.with_retries(lambda: mlflow.artifacts.download_artifacts(
        run_id=art_run, artifact_path=path, dst_path=str(tmp), tracking_uri=tracking.tracking_uri()),
        "download artifacts"), sha, f"{what}: artifact '{path}'")
    return ResolvedModel(model_dir(d, f"{what}: artifact '{path}'"), _run_model_name(c, art_run, tags), what)


def _run_model_name(c, run_id: str, tags: dict[str, str]) -> str:
    """A run's model name: the registered model one of its versions belongs to, else tunewright-<pipeline>."""
    from pipelines import tracking

    try:
        versions = c.search_model_versions(f"run_id = '{run_id}'")
    except Exception:
        versions = []
    if versions:
        return versions[0].name
    pipeline = tags.get(tracking.TAG_PIPELINE)
    return f"tunewright-{pipeline}" if pipeline else run_id


def resolve(model: str) -> ResolvedModel:
    """MODEL (a directory, a ``models:/`` URI or a run id) as a local standalone directory and a served name."""
    model = model.strip()
    if model.startswith("models:/"):
        return _from_registry(model)
    p = Path(model).expanduser()
    if p.is_dir():
        p = p.resolve()
        return ResolvedModel(model_dir(p, str(p)), p.name, str(p))
    if _RUN_ID.fullmatch(model):
        return _from_run(model)
    if p.exists():
        raise ServeError(f"{model}: a file; expected a model directory, models:/<name>@<alias> or a run id")
    raise ServeError(f"{model}: no such directory, and not models:/<name>@<alias>, models:/<name>/<version> "
                     "or an MLflow run id")


def resolve_model(model: str) -> Path:
    """The local standalone Hugging Face directory MODEL names (downloaded into the serve cache when remote)."""
    return resolve(model).path


# ------------------------------------------------------------------------------------------------ the server
def _as_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop if isinstance(s, str) and s]


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still start a stop string (kept until the next chunk)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


async def _stream_cut(events: AsyncIterator[str], stops: list[str]) -> AsyncIterator[str]:
    """An SSE stream of chat completion chunks, its content cut before the first stop string."""
    held, stopped, last = "", False, None

    def chunk(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async for part in events:
        out: list[str] = []
        for ev in part.split("\n\n"):
            if not ev.strip():
                continue
            try:
                data = json.loads(ev[len("data: "):]) if ev.startswith("data: ") else None
            except ValueError:
                data = None
            choices = (data or {}).get("choices") if isinstance(data, dict) else None
            if not choices:
                out.append(ev + "\n\n")
                continue
            ch = choices[0]
            delta = ch.get("delta") or {}
            last = data
            if delta.get("content") is not None and not ch.get("finish_reason"):
                if stopped:
                    continue
                held += delta["content"]
                text, stopped = cut_at_stop(held, stops)
                keep = 0 if stopped else _held_back(text, stops)
                emit, held = text[: len(text) - keep], ("" if stopped else text[len(text) - keep:])
                if emit:
                    delta["content"] = emit
                    out.append(chunk(data))
                continue
            if ch.get("finish_reason"):
                if held and not stopped:
                    out.append(chunk({**{k: v for k, v in data.items() if k != "usage"},
                                      "choices": [{"index": 0, "delta": {"content": held}}]}))
                    held = ""
                if stopped:
                    ch["finish_reason"] = "stop"
            out.append(chunk(data))
        if out:
            yield "".join(out)
    if held and not stopped and last is not None:  # the stream ended without a final chunk
        yield chunk({**last, "choices": [{"index": 0, "delta": {"content": held}}]})


def build_app(path: Path, name: str, api_key: str | None = None, aliases: Iterable[str] = (), device: str = "auto"):
    """The FastAPI app of ``transformers serve`` for the one model in ``path``, named ``name``."""
    try:
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse, StreamingResponse
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.server import build_server
        from transformers.cli.serving.utils import GenerationState
    except ImportError as e:
        raise ServeError(f"serving needs transformers' serving extra ({_first_line(e)}): "
                         "pip install 'transformers[serving]'") from None

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(f"{path}: the tokenizer has no chat template (tunewright export writes one)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", device_map=device, use_safetensors=True)
    model.eval()
    model_gc = model.generation_config
    names = {name, *aliases}
    created = int((path / "config.json").stat().st_mtime)

    class Handler(ChatCompletionHandler):
        """transformers serve's chat handler, pinned to this model and to its generation config."""

        def _resolve_model(self, body):
            requested = body.get("model")
            if requested not in (None, "", *names):
                raise HTTPException(status_code=404, detail=f"model '{requested}' is not served here; "
                                                            f"this server serves '{name}'")
            body["model"] = name
            return name, model, tokenizer

        def _stops(self, body) -> list[str]:
            return list(dict.fromkeys(_as_list(model_gc.stop_strings) + _as_list(body.get("stop"))))

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            gc = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            asked = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens", "generation_config"))
            if not asked and model_gc.max_new_tokens:
                gc.max_new_tokens = model_gc.max_new_tokens  # the model's own length, not the server's 1024
            gc.stop_strings = self._stops(body) or None
            return gc

        async def handle_request(self, body, request_id):
            stops = self._stops(body)
            resp = await super().handle_request(body, request_id)
            if not stops:
                return resp
            if isinstance(resp, StreamingResponse):
                resp.body_iterator = _stream_cut(resp.body_iterator, stops)
                return resp
            data = json.loads(resp.body)
            for ch in data.get("choices", []):
                msg = ch.get("message") or {}
                if isinstance(msg.get("content"), str):
                    msg["content"], hit = cut_at_stop(msg["content"], stops)
                    if hit and ch.get("finish_reason") != "tool_calls":
                        ch["finish_reason"] = "stop"
            return JSONResponse(data, status_code=resp.status_code)

    manager = ModelManager(device=device)  # holds no model: Handler hands out the one loaded above
    state = GenerationState()
    app = build_server(manager, Handler(model_manager=manager, generation_state=state), completion_handler=None,
                       response_handler=None, transcription_handler=None, systemone_handler=None,
                       generation_state=state)
    keep = {"/v1/chat/completions", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) in keep]
    card = {"id": name, "object": "model", "created": created, "owned_by": "tunewright"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        if model_id not in names:
            return JSONResponse({"error": {"message": f"model '{model_id}' is not served here",
                                           "type": "invalid_request_error", "code": "model_not_found"}},
                                status_code=404)
        return card

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)  # outermost: before any route or other middleware
    return app


def serve(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None, *,
          served_model_name: str | None = None, device: str = "auto", log: Callable[[str], Any] = print) -> None:
    """Serve MODEL until interrupted. Raises :class:`ServeError` (one line) before listening when it cannot."""
    check_bind(host, api_key)
    check_port(host, port)
    r = resolve(model)
    name = served_model_name or r.name
    log(f"serve: loading {r.source} from {r.path}")
    app = build_app(r.path, name, api_key=api_key, aliases={model}, device=device)
    shown = f"[{host}]" if ":" in host else host
    log(f"serve: model '{name}' on http://{shown}:{port}/v1 (chat/completions, models); "
        + ("auth: Bearer API key required" if api_key else "no auth (loopback only)"))
    import uvicorn

    uvicorn.run(app, host=host.strip("[]"), port=port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model directory, models:/<name>@<alias>, models:/<name>/<version>, or a run id")
    ap.add_argument("--host", default=DEFAULT_HOST, help="listen address (default 127.0.0.1; beyond loopback "
                                                         "needs an API key)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--api-key-env", metavar="VAR", default=None,
                    help=f"environment variable holding the API key (default: {API_KEY_ENV} when set)")
    ap.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                              "registered model name, or the directory name)")
    ap.add_argument("--device", default="auto", help="device map for loading (auto, cpu, cuda:0...)")
    args = ap.parse_args(argv)
    try:
        serve(args.model, args.host, args.port, api_key_from_env(args.api_key_env),
              served_model_name=args.served_model_name, device=args.device)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

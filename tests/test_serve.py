"""tunewright serve, for real: the server runs as a subprocess (`tunewright serve MODEL --port N`) on a free loopback
port and is called over HTTP like any OpenAI client would. Its answers must equal plain transformers' greedy
generation for the same chat (the tokenizer's chat template, the directory's generation_config: EOS ids, stop
strings, max_new_tokens). MODEL resolution (models:/NAME@ALIAS, models:/NAME/VERSION, run ids) runs against a real
MLflow sqlite store in a temporary directory; credentials: no key beyond loopback = exit 2 and one line; with a key,
401 without it.

The model is a tiny random-init Mistral with a ChatML template (tests/_own.py), its weights redrawn with a fixed
seed so that greedy output differs per prompt and contains no byte fragments. (Mistral, not Qwen2: transformers
serve parses Qwen-family replies for <think>/<tool_call> and trims their whitespace; the demo's Llama export and a
Mistral take the raw-text path that an exact comparison can check.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests._own import build_model
from tests.conftest import ROOT

TW = str(Path(sys.executable).parent / "tunewright")
MAX_NEW = 16  # the directory's generation_config.max_new_tokens
QUESTIONS = ["What colour is the Velora?", "How much is the Obrix?", "Tell me about the Quintex.",
             "Is the Marbolt red?", "What does a Zephyrin cost?", "Which colour has the Talvane?",
             "Describe the Crestil.", "How much is the Numora?"]
KEY = "tw-test-key-0123456789abcdef"


def chat(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(d: Path, messages, max_new_tokens: int | None = None, plain: bool = False) -> tuple[str, list[int]]:
    """Plain transformers: the tokenizer's chat template, model.generate with the directory's generation_config
    (``plain``: greedy with no EOS or stop strings), the answer cut at the first stop string."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                          eos_token_id=None) if plain else GenerationConfig.from_pretrained(str(d))
    if max_new_tokens is not None:
        gc.max_new_tokens = max_new_tokens
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gc, tokenizer=tok)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    for s in gc.stop_strings or []:
        text = text.split(s, 1)[0]
    return text, ids


def chat_model(d: Path) -> Path:
    """The tiny Mistral + ChatML of tests/_own.py, weights redrawn (seed 0) so that greedy answers vary per prompt;
    tokens that decode to byte fragments, control characters or special tokens get zero embeddings (never picked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(d, arch="mistral")
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d))
    unwanted = [i for i in range(len(tok)) if i in tok.all_special_ids
                or any(ch == "\ufffd" or ord(ch) < 32 for ch in tok.decode([i]))]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.35)
        model.get_input_embeddings().weight[unwanted] = 0.0
    model.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A model directory whose generation_config cuts one chat at a stop string (A), one at an extra EOS id (B),
    and leaves one to run to its max_new_tokens (C); chosen from the plain greedy answers, then checked."""
    from transformers import GenerationConfig

    d = chat_model(tmp_path_factory.mktemp("serve") / "tiny-chat")
    runs = {q: greedy(d, chat(q), plain=True) for q in QUESTIONS}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    assert len({t for t, _ in runs.values()}) == len(QUESTIONS), "greedy answers must differ per prompt"
    qa = QUESTIONS[0]
    ids_a = runs[qa][1]
    stop, k_a = next((tok.decode([ids_a[k]]).strip(), k) for k in range(3, 10)
                     if len(tok.decode([ids_a[k]]).strip()) >= 2
                     and tok.decode([ids_a[k]]).strip() not in tok.decode(ids_a[:k]))
    qb, eos, k_b = next((q, ids[k], k) for q, (text, ids) in runs.items() if q != qa and stop not in text
                        for k in range(3, 10) if ids[k] not in ids[:k] and ids[k] not in ids_a[:k_a + 1]
                        and stop not in tok.decode(ids[: k + 1]))
    qc = next(q for q, (text, ids) in runs.items() if q not in (qa, qb) and stop not in text and eos not in ids)
    gc = GenerationConfig.from_pretrained(str(d))
    gc.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), eos]
    gc.stop_strings = [stop]
    gc.max_new_tokens = MAX_NEW
    gc.do_sample = False
    gc.save_pretrained(str(d))
    refs = {q: greedy(d, chat(q)) for q in (qa, qb, qc)}
    # the generation config is what ends each answer: the server must read it to match
    assert refs[qa][0] == runs[qa][0].split(stop, 1)[0] and len(refs[qa][1]) < MAX_NEW, refs[qa]
    assert refs[qb][1] == runs[qb][1][: k_b + 1] and len(refs[qb][1]) < MAX_NEW, refs[qb]
    assert refs[qc][0] == runs[qc][0] and len(refs[qc][1]) == MAX_NEW, refs[qc]
    return {"dir": d, "refs": refs, "stop": stop, "a": qa, "b": qb, "c": qc, "plain": runs}


def serve_env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TUNEWRIGHT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **extra}
    for k in ("MLFLOW_TRACKING_URI", "TUNEWRIGHT_SERVE_API_KEY"):
        if k not in extra:
            env.pop(k, None)
    return env


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path, timeout: float = 300):
    """``tunewright serve ARGS --port N`` as a subprocess, once /health answers; stopped (SIGTERM) afterwards."""
    port = free_port()
    with open(log, "w") as out:
        p = subprocess.Popen([TW, "serve", *args, "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if p.poll() is not None:
                pytest.fail(f"server exited {p.returncode}:\n{log.read_text()}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() - t0 > timeout:
                pytest.fail(f"server not up after {timeout}s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    with running([str(served["dir"])], serve_env(home), home / "server.log") as url:
        yield url


def complete(url: str, body: dict, headers: dict | None = None) -> dict:
    r = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, body: dict) -> tuple[str, list[dict]]:
    r = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120)
    assert r.status_code == 200, r.text
    chunks = [json.loads(ln[len("data: "):]) for ln in r.iter_lines(decode_unicode=True)
              if ln.startswith("data: ") and ln != "data: [DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")), chunks


# ------------------------------------------------------------------------------------------------- the endpoint
def test_models_lists_the_served_name(server, served):
    name = served["dir"].name
    r = requests.get(f"{server}/v1/models", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [name]
    assert body["data"][0]["object"] == "model"
    assert requests.get(f"{server}/v1/models/{name}", timeout=30).json()["id"] == name
    assert requests.get(f"{server}/v1/models/gpt-4", timeout=30).status_code == 404


def test_answers_are_plain_transformers_greedy_with_the_generation_config(server, served):
    """Stop string (A), extra EOS id (B), the config's max_new_tokens (C): each as plain transformers decodes it."""
    name = served["dir"].name
    for q, finish in ((served["a"], "stop"), (served["b"], "stop"), (served["c"], "length")):
        want, ids = served["refs"][q]
        got = complete(server, {"model": name, "messages": chat(q)})
        assert got["object"] == "chat.completion" and got["model"] == name and got["id"]
        (choice,) = got["choices"]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == want, (q, choice, served["plain"][q])
        assert choice["finish_reason"] == finish, (q, choice)
        assert got["usage"]["completion_tokens"] == len(ids)
        assert got["usage"]["prompt_tokens"] > 0


def test_request_max_tokens_and_stop(server, served):
    name, q = served["dir"].name, served["c"]
    want, _ = greedy(served["dir"], chat(q), max_new_tokens=3)
    got = complete(server, {"model": name, "messages": chat(q), "max_tokens": 3})
    assert got["choices"][0]["message"]["content"] == want and got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 3
    full = served["refs"][q][0]
    extra = full.split()[2]  # a request's stop string adds to the model's
    got = complete(server, {"model": name, "messages": chat(q), "stop": [extra]})
    assert got["choices"][0]["message"]["content"] == full.split(extra, 1)[0]
    assert got["choices"][0]["finish_reason"] == "stop"


def test_streaming_gives_the_same_answer(server, served):
    name = served["dir"].name
    for q in (served["a"], served["c"]):
        text, chunks = stream(server, {"model": name, "messages": chat(q)})
        assert text == served["refs"][q][0], (q, chunks)
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == ("stop" if q == served["a"] else "length")
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == name for c in chunks)


def test_the_openai_client_talks_to_it(server, served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused-on-loopback")
    assert [m.id for m in client.models.list()] == [served["dir"].name]
    r = client.chat.completions.create(model=served["dir"].name, messages=chat(served["b"]))
    assert r.choices[0].message.content == served["refs"][served["b"]][0]


def test_unknown_model_name_and_hidden_endpoints(server, served):
    r = requests.post(f"{server}/v1/chat/completions", json={"model": "gpt-4", "messages": chat("hi")}, timeout=60)
    assert r.status_code == 404 and served["dir"].name in r.text
    # transformers serve's model loading / reset endpoints are not exposed: one model, chosen at start
    assert requests.post(f"{server}/load_model", json={"model": "/etc"}, timeout=30).status_code == 404
    assert requests.post(f"{server}/reset", timeout=30).status_code == 404


# ------------------------------------------------------------------------------------------------- credentials
def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0]


def tw_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([TW, "serve", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_beyond_loopback_without_a_key_refuses_to_start(served, tmp_path, host):
    p = tw_serve(str(served["dir"]), "--host", host, "--port", str(free_port()), env=serve_env(tmp_path))
    line = one_error_line(p)
    assert line.startswith(f"error: --host {host} is beyond loopback: refusing to serve without an API key")
    assert "Uvicorn running" not in p.stdout + p.stderr


def test_api_key_env_that_is_unset_is_an_error(served, tmp_path):
    env = serve_env(tmp_path)
    env.pop("TW_NO_SUCH_KEY_VAR", None)
    line = one_error_line(tw_serve(str(served["dir"]), "--host", "0.0.0.0", "--api-key-env", "TW_NO_SUCH_KEY_VAR",
                                   env=env))
    assert line == "error: --api-key-env TW_NO_SUCH_KEY_VAR: the environment variable TW_NO_SUCH_KEY_VAR is not set " \
                   "(or empty)"


def test_loopback_rules():
    from pipelines.serve import ServeError, check_bind, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "192.0.2.10", "example.com", ""))
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-key")  # beyond loopback with a key: allowed
    with pytest.raises(ServeError):
        check_bind("0.0.0.0", None)


def test_bad_model_is_one_line(tmp_path):
    env = serve_env(tmp_path)
    line = one_error_line(tw_serve(str(tmp_path / "nope"), env=env))
    assert line.startswith(f"error: {tmp_path / 'nope'}: no such directory")
    (tmp_path / "empty").mkdir()
    assert one_error_line(tw_serve(str(tmp_path / "empty"), env=env)) == \
        f"error: {tmp_path / 'empty'}: no Hugging Face model there (no config.json)"


def test_port_in_use_is_one_line_before_loading(served, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_error_line(tw_serve(str(served["dir"]), "--port", str(port), env=serve_env(tmp_path)))
    assert line.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there (")


def test_module_runs_alone():
    p = subprocess.run([sys.executable, "-m", "pipelines.serve", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "models:/<name>@<alias>" in p.stdout and "--api-key-env" in p.stdout


# ------------------------------------------------------------------------------------------ MODEL from MLflow
@contextlib.contextmanager
def tracking_home(home: Path):
    saved = {k: os.environ.get(k) for k in ("TUNEWRIGHT_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["TUNEWRIGHT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _log_stage_run(c, exp: str, parent: str, stage: str, model_dir: Path | None, pipeline: str = "servetest",
                   **tags: str) -> str:
    from pipelines import tracking
    from pipelines.artifacts import sha256_path

    rid = c.create_run(exp, run_name=stage, tags={"mlflow.parentRunId": parent, tracking.TAG_STAGE: stage,
                                                  tracking.TAG_PIPELINE: pipeline, **tags}).info.run_id
    if model_dir is not None:
        c.log_artifacts(rid, str(model_dir), "model")
        c.set_tag(rid, tracking.TAG_PRIMARY, "model")
        c.set_tag(rid, tracking.TAG_SHA, sha256_path(model_dir))
    c.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def registry(served, tmp_path_factory) -> dict:
    """A real MLflow sqlite store: a pipeline run whose export child logged the model at `model`, registered as
    version 1 of tw-serve (alias champion); a second version with other weights; a rerun whose export is a cache hit;
    a pipeline run without export; an sft run that logged an adapter."""
    from pipelines import tracking

    home = tmp_path_factory.mktemp("serve-registry")
    other = home / "other-weights"
    shutil.copytree(served["dir"], other)
    (other / "generation_config.json").write_text(
        json.dumps({**json.loads((other / "generation_config.json").read_text()), "max_new_tokens": 5}))
    adapter = home / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with tracking_home(home):
        c = tracking.client()
        exp = tracking.experiment_id()
        parent = c.create_run(exp, run_name="servetest", tags={tracking.TAG_PIPELINE: "servetest"}).info.run_id
        export = _log_stage_run(c, exp, parent, "export", served["dir"], **{tracking.TAG_CACHE: "miss"})
        c.set_terminated(parent, "FINISHED")
        rerun = c.create_run(exp, run_name="servetest", tags={tracking.TAG_PIPELINE: "servetest"}).info.run_id
        hit = _log_stage_run(c, exp, rerun, "export", None, **{  # as tasks/stages.py records a cache hit
            tracking.TAG_CACHE: "hit", tracking.TAG_SOURCE: export, tracking.TAG_PRIMARY: "model",
            tracking.TAG_SHA: c.get_run(export).data.tags[tracking.TAG_SHA]})
        c.set_terminated(rerun, "FINISHED")
        bare = c.create_run(exp, run_name="servetest", tags={tracking.TAG_PIPELINE: "servetest"}).info.run_id
        c.set_terminated(bare, "FINISHED")
        export2 = _log_stage_run(c, exp, bare, "sft", other)  # a stage run with full weights
        sft = _log_stage_run(c, exp, bare, "sft", adapter)
        c.create_registered_model("tw-serve")
        for rid in (export, export2):
            v = c.create_model_version("tw-serve", f"{c.get_run(rid).info.artifact_uri}/model", run_id=rid)
        c.set_registered_model_alias("tw-serve", "champion", "1")
        c.set_registered_model_alias("tw-serve", "challenger", v.version)
    return {"home": home, "parent": parent, "export": export, "rerun": rerun, "hit": hit, "bare": bare,
            "sft": sft, "stage_run": export2, "other": other}


def same_files(a: Path, b: Path) -> bool:
    from pipelines.artifacts import sha256_path

    return sha256_path(a) == sha256_path(b)


def test_registry_uris_resolve_to_the_version_they_name(registry, served):
    from pipelines.serve import resolve, resolve_model

    with tracking_home(registry["home"]):
        champ = resolve("models:/tw-serve@champion")
        assert champ.name == "tw-serve" and (champ.path / "config.json").is_file()
        assert same_files(champ.path, served["dir"])
        assert champ.path.is_relative_to(registry["home"] / "cache" / "serve") and "@" not in str(champ.path)
        assert resolve_model("models:/tw-serve/1") == champ.path  # the same version: the same cached download
        mtime = (champ.path / "model.safetensors").stat().st_mtime_ns
        assert resolve_model("models:/tw-serve@champion") == champ.path
        assert (champ.path / "model.safetensors").stat().st_mtime_ns == mtime, "cached, not downloaded again"
        two = resolve_model("models:/tw-serve@challenger")
        assert two != champ.path and same_files(two, registry["other"])


@pytest.mark.parametrize("uri, says", [
    ("models:/tw-serve@nope", "models:/tw-serve@nope: no such model version in sqlite:///"),
    ("models:/no-such-model/1", "models:/no-such-model/1: no such model version in sqlite:///"),
    ("models:/tw-serve/latest", "models:/tw-serve/latest: expected models:/<name>@<alias> or models:/<name>/<version>"),
])
def test_bad_registry_uri_is_one_line(registry, uri, says):
    from pipelines.serve import ServeError, resolve

    with tracking_home(registry["home"]), pytest.raises(ServeError) as e:
        resolve(uri)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_run_ids_resolve_to_their_export(registry, served):
    from pipelines.serve import ServeError, resolve

    with tracking_home(registry["home"]):
        by_parent = resolve(registry["parent"])  # a pipeline parent run: its export child
        assert same_files(by_parent.path, served["dir"])
        assert by_parent.name == "tw-serve"  # the registered model its export belongs to
        assert registry["export"] in by_parent.source
        assert resolve(registry["export"]).path == by_parent.path
        by_rerun = resolve(registry["rerun"])  # export was a cache hit: the artifacts of the run it reused
        assert by_rerun.path == by_parent.path
        stage = resolve(registry["stage_run"])  # any stage run with full weights at `model`
        assert same_files(stage.path, registry["other"])
        with pytest.raises(ServeError, match=r"has no finished export stage run; build a directory with: "
                                             r"tunewright export \w+ OUT_DIR$"):
            resolve(registry["bare"])
        with pytest.raises(ServeError, match="a PEFT adapter, not a standalone model"):
            resolve(registry["sft"])
        with pytest.raises(ServeError, match="not found in sqlite:///"):
            resolve("0" * 32)


def test_tracking_credentials_never_reach_the_error_line(monkeypatch, tmp_path):
    from pipelines.serve import ServeError, resolve

    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://tw-user:s3cret-pw@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ServeError) as e:
        resolve("models:/tunewright-demo@champion")
    assert str(e.value).startswith("models:/tunewright-demo@champion: cannot query http://127.0.0.1:")
    assert "s3cret-pw" not in str(e.value) and "tw-user" not in str(e.value)


def test_registry_model_behind_an_api_key(registry, served, tmp_path):
    """`tunewright serve models:/tw-serve@champion` with TUNEWRIGHT_SERVE_API_KEY: 401 without the key (and with a
    wrong one), the same greedy answer with it; /health stays open; the key never shows in the server's output."""
    from openai import AuthenticationError, OpenAI

    env = serve_env(registry["home"], TUNEWRIGHT_SERVE_API_KEY=KEY)
    log = tmp_path / "server.log"
    q = served["b"]
    with running(["models:/tw-serve@champion"], env, log) as url:
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
        r = requests.post(f"{url}/v1/chat/completions", json={"model": "tw-serve", "messages": chat(q)}, timeout=30)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
        assert requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code \
            == 401
        assert requests.get(f"{url}/v1/models", headers={"Authorization": KEY}, timeout=30).status_code == 401
        ok = {"Authorization": f"Bearer {KEY}"}
        models = requests.get(f"{url}/v1/models", headers=ok, timeout=30)
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["tw-serve"]
        got = complete(url, {"model": "tw-serve", "messages": chat(q)}, headers=ok)
        assert got["choices"][0]["message"]["content"] == served["refs"][q][0]
        got = complete(url, {"model": "models:/tw-serve@champion", "messages": chat(q)}, headers=ok)
        assert got["model"] == "tw-serve"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
        assert [m.id for m in OpenAI(base_url=f"{url}/v1", api_key=KEY).models.list()] == ["tw-serve"]
    out = log.read_text()
    assert "auth: Bearer API key required" in out
    assert KEY not in out
    assert any(p.name.startswith("tw-serve-v1-") for p in (registry["home"] / "cache" / "serve").iterdir())

"""`fedtune serve` as a user runs it: the real command in a subprocess on 127.0.0.1 (a free port the
server picks and prints), spoken to over HTTP with httpx. A tiny BERT classifier and a tiny Llama,
each with a non-identity LoRA adapter (test_export's builders), are served by two servers started
side by side. Answers must be `fedtune predict`'s and `fedtune generate`'s; every bad request gets a
4xx JSON error and the server answers /health after it. The servers are always stopped (SIGTERM,
then SIGKILL) and must exit cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from fedtune.cli import main
from fedtune.common.tiny import make_tiny_bert
from tests.integration.deployment import Processes
from tests.integration.test_export import LABELS, MAX_NEW_TOKENS, PROMPTS, TEXTS, _classifier_adapter, _lm_adapter

MAX_BATCH = 8
MAX_BODY = 4096
STARTUP_S = 150  # two servers importing torch + transformers on a shared 2-core machine


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    root: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, trust_env=False)  # no proxy from the environment for 127.0.0.1


def _serve_args(adapter: Path) -> list[str]:
    return ["serve", "--adapter", str(adapter), "--host", "127.0.0.1", "--port", "0", "--max-batch", str(MAX_BATCH),
            "--max-body-bytes", str(MAX_BODY), "--threads", "1"]


def _wait_ready(process: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+);", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"fedtune serve exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"fedtune serve did not start within {STARTUP_S} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("serve")
    bert = make_tiny_bert(root / "tiny-bert")
    adapters = {"classifier": _classifier_adapter(root, bert, "mean"), "lm": _lm_adapter(root)[1]}
    procs = Processes(root)  # each server in its own process group, always stopped (SIGTERM, then SIGKILL)
    try:
        processes = {name: procs.start(name, _serve_args(adapter), env=dict(os.environ)) for name, adapter in adapters.items()}
        deadline = time.monotonic() + STARTUP_S
        urls = {name: _wait_ready(p, root / f"{name}.log", deadline) for name, p in processes.items()}
        yield {name: Server(urls[name], processes[name], root / f"{name}.log", root) for name in processes}
        for name, process in processes.items():
            # A clean exit on SIGTERM (uvicorn re-raises the signal once it has shut down): the app's
            # shutdown ran, so the inference thread was stopped.
            procs.stop(name, timeout=30)
            code, log = process.returncode, procs.log(name)
            assert code in (0, -signal.SIGTERM) and "Application shutdown complete." in log, (code, log[-3000:])
    finally:
        procs.stop_all()


def _health(client: httpx.Client) -> dict:  # type: ignore[type-arg]
    response = client.get("/health")
    assert response.status_code == 200, response.text
    return response.json()


def test_health_names_the_task_labels_and_model_but_no_path(servers: dict[str, Server]) -> None:
    with servers["classifier"].client() as c, servers["lm"].client() as lm:
        classifier, generator = _health(c), _health(lm)
    assert (classifier["status"], classifier["task"], classifier["labels"]) == ("ok", "classification", LABELS)
    assert (classifier["adapter"], classifier["model"]) == ("adapter", "tiny-bert")
    assert (generator["task"], generator["model"]) == ("causal-lm", "tiny-llama") and "labels" not in generator
    assert classifier["limits"]["max_batch"] == MAX_BATCH and classifier["limits"]["max_body_bytes"] == MAX_BODY
    for body in (classifier, generator):
        assert str(servers["classifier"].root) not in json.dumps(body) and "/" not in json.dumps(body["adapter"])


def _fedtune(*args: str) -> list[str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_batch_prediction_equals_fedtune_predict_also_when_requests_share_a_batch(servers: dict[str, Server]) -> None:
    adapter = servers["classifier"].root / "mean-run" / "adapter"
    expected = [line.split("\t") for line in _fedtune("predict", "--adapter", str(adapter), *TEXTS)]
    assert len({label for label, _, _ in expected}) > 1  # the texts get different labels: a mix-up would show
    with servers["classifier"].client() as c:
        response = c.post("/predict", json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert [p["label"] for p in got] == [label for label, _, _ in expected]
        assert [round(p["score"], 3) for p in got] == pytest.approx([float(s) for _, s, _ in expected], abs=1.01e-3)
        # Many one-text requests at once: the worker merges the waiting ones into shared model calls,
        # and each request must still get its own text's answer.
        before = _health(c)["model_calls"]
        texts = [TEXTS[k % len(TEXTS)] for k in range(24)]
        def one(text: str) -> dict:  # type: ignore[type-arg]
            with servers["classifier"].client() as own:
                return own.post("/predict", json={"texts": [text]}).json()

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, texts))
        calls = _health(c)["model_calls"] - before
    for text, answer in zip(texts, answers):
        label, score, _ = expected[TEXTS.index(text)]
        assert answer["predictions"][0]["label"] == label and answer["predictions"][0]["score"] == pytest.approx(float(score), abs=6e-4)
    assert 1 <= calls <= len(texts)
    print(f"24 concurrent one-text requests took {calls} model calls")


def test_generation_equals_fedtune_generate(servers: dict[str, Server]) -> None:
    adapter = servers["lm"].root / "lm-run" / "adapter"
    expected = _fedtune("generate", "--adapter", str(adapter), "--max-new-tokens", str(MAX_NEW_TOKENS), *PROMPTS)
    assert any(expected)
    with servers["lm"].client() as lm:
        response = lm.post("/generate", json={"prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS})
    assert response.status_code == 200, response.text
    assert [t.replace("\n", " ").strip() for t in response.json()["generations"]] == expected


def _refused(client: httpx.Client, status: int, words: str, path: str = "/predict", **request: object) -> None:
    response = client.post(path, **request)  # type: ignore[arg-type]
    assert response.status_code == status, (request, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"], response.json()
    assert _health(client)["status"] == "ok"  # and the server still answers


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(servers: dict[str, Server]) -> None:
    with servers["classifier"].client() as c, servers["lm"].client() as lm:
        _refused(c, 400, "not valid JSON", content=b'{"texts": ["a"', headers={"content-type": "application/json"})
        _refused(c, 400, "not valid JSON", content=b"\xff\xfe", headers={"content-type": "application/json"})
        _refused(c, 422, "texts: Input should be a valid list, got a JSON string", json={"texts": "chest pain"})
        _refused(c, 422, "texts[1]: Input should be a valid string, got a JSON integer", json={"texts": ["a", 5]})
        _refused(c, 422, "got a JSON array", json=["chest pain"])
        _refused(c, 422, "text is not a key of this endpoint", json={"text": ["chest pain"]})
        _refused(c, 422, "texts is missing", json={})
        _refused(c, 422, "texts is empty", json={"texts": []})
        # Oversized: declared by Content-Length (refused before the body is read), and chunked (counted as it arrives).
        big = json.dumps({"texts": ["x" * MAX_BODY]}).encode()
        _refused(c, 413, f"at most {MAX_BODY} (--max-body-bytes)", content=big, headers={"content-type": "application/json"})
        _refused(c, 413, f"over {MAX_BODY} bytes", content=iter([big[:1000], big[1000:3000], big[3000:]]),
                 headers={"content-type": "application/json"})
        _refused(c, 413, f"at most {MAX_BATCH} per request (--max-batch)", json={"texts": ["a"] * (MAX_BATCH + 1)})
        _refused(c, 404, "serves a classification adapter", path="/generate", json={"prompts": ["a"]})
        _refused(c, 404, "Not Found", path="/nowhere", json={})
        _refused(lm, 404, "serves a causal-lm adapter", json={"texts": ["a"]})
        _refused(lm, 422, "max_new_tokens must be in [1, 512], got 0", path="/generate", json={"prompts": ["a"], "max_new_tokens": 0})
        _refused(lm, 422, "max_new_tokens: Input should be a valid integer, got a JSON number", path="/generate",
                 json={"prompts": ["a"], "max_new_tokens": 2.0})
        _refused(lm, 422, "prompts is empty", path="/generate", json={"prompts": []})
        # DNS rebinding: a web page that re-points its own name at 127.0.0.1 sends that name as Host.
        assert c.get("/health", headers={"Host": "attacker.example"}).status_code == 400
        assert c.post("/predict", json={"texts": ["a"]}, headers={"Host": "attacker.example:80"}).status_code == 400
        # After all that, real work still gets done.
        assert c.post("/predict", json={"texts": TEXTS[:1]}).status_code == 200
        assert lm.post("/generate", json={"prompts": PROMPTS[:1], "max_new_tokens": 2}).status_code == 200


def test_docs_work_offline_and_the_spec_names_both_endpoints(servers: dict[str, Server]) -> None:
    with servers["classifier"].client() as c:
        page = c.get("/docs")
        spec = c.get("/openapi.json").json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "POST /predict" in page.text and "PredictRequest" in page.text
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page.text)  # nothing loaded from another host
    assert {"/health", "/predict", "/generate"} <= set(spec["paths"])
    assert spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == ["texts"]


def test_only_loopback_hosts_serve_without_a_warning() -> None:
    from fedtune.loopback import exposure_warning

    assert [exposure_warning(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2")] == [None] * 4
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert "not a loopback address" in (exposure_warning(host) or ""), host


def test_host_header_is_read_with_its_port_and_ipv6_brackets() -> None:
    from fedtune.loopback import host_name

    cases = {"127.0.0.1:8000": "127.0.0.1", "LOCALHOST": "localhost", "[::1]:8000": "::1", "[::1]": "::1",
             "attacker.example:80": "attacker.example", "::1:8000": None, "[::1]x": None, "[::1]:80x": None, "[::1": None,
             "localhost:": None, "": ""}
    assert {header: host_name(header) for header in cases} == cases


@pytest.mark.parametrize("bound", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_loopback_server_refuses_a_foreign_host_on_ipv4_and_ipv6(bound: str) -> None:
    from fastapi.testclient import TestClient

    from fedtune.serve import ServeSettings, ServedAdapter, create_app

    # The real app and its guard; only the model is a stand-in (the guard answers before any model call).
    served = ServedAdapter(task="classification", adapter="adapter", model="tiny", labels=("a",),
                           run=lambda texts, _: [{"label": "a", "score": 1.0} for _ in texts])
    with TestClient(create_app(served, ServeSettings(), host=bound)) as client:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "[::1]", f"[{bound}]:1" if ":" in bound else f"{bound}:1"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "[::2]:8000", "::1:8000", "127.0.0.3:8000", "", "[::1]evil"):
            response = client.get("/health", headers={"Host": host})
            assert response.status_code == 400 and "not this server's loopback name" in response.json()["error"], host
    with TestClient(create_app(served, ServeSettings(), host="0.0.0.0")) as client:  # warned about at start; not guarded
        assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 200


def test_serve_and_generate_share_one_default_for_new_tokens() -> None:
    from fedtune.cli.model import generate
    from fedtune.serve import GenerateRequest, ServeSettings
    from fedtune.serve_defaults import DEFAULT_NEW_TOKENS

    (option,) = [p for p in generate.params if p.name == "max_new_tokens"]
    assert option.default == ServeSettings().default_new_tokens == DEFAULT_NEW_TOKENS
    assert f"[{DEFAULT_NEW_TOKENS}]" in (GenerateRequest.model_fields["max_new_tokens"].description or "")


def test_batcher_merges_waiting_requests_up_to_max_batch_and_keeps_their_order() -> None:
    from fedtune.serve_batch import Batcher

    # Prepare: a model call that waits until every job is queued, so the queue's contents are known.
    release, calls = threading.Event(), []

    def run(inputs: list[str], max_new_tokens: int) -> list[str]:
        release.wait(10)
        calls.append((list(inputs), max_new_tokens))
        return [f"{text}:{max_new_tokens}" for text in inputs]

    batcher = Batcher(run, max_batch=4, max_queue=16)
    batcher.start()
    try:
        first = batcher.submit(["a"])
        time.sleep(0.2)  # the worker holds "a" and waits in run()
        jobs = [batcher.submit(["b", "c"]), batcher.submit(["d"]), batcher.submit(["e", "f"]), batcher.submit(["g"], 7),
                batcher.submit(["h"], 7)]
        release.set()
        results = [first.result(10)] + [job.result(10) for job in jobs]
    finally:
        batcher.stop()
    assert results == [["a:0"], ["b:0", "c:0"], ["d:0"], ["e:0", "f:0"], ["g:7"], ["h:7"]]
    # b c d fill 3 of 4; e f would overflow, so they start the next call; g h ask another max_new_tokens.
    assert calls == [(["a"], 0), (["b", "c", "d"], 0), (["e", "f"], 0), (["g", "h"], 7)]


def test_a_full_queue_is_refused_with_503_and_a_failed_call_fails_only_its_requests() -> None:
    from fedtune.serve_batch import ApiError, Batcher

    release = threading.Event()

    def run(inputs: list[str], max_new_tokens: int) -> list[str]:
        release.wait(10)
        if "boom" in inputs:
            raise RuntimeError("model failed")
        return inputs

    batcher = Batcher(run, max_batch=1, max_queue=2)
    batcher.start()
    try:
        held = batcher.submit(["boom"])
        time.sleep(0.2)
        queued = [batcher.submit(["x"]), batcher.submit(["y"])]
        with pytest.raises(ApiError) as refused:
            batcher.submit(["z"])
        assert refused.value.status == 503 and "busy" in refused.value.message
        release.set()
        with pytest.raises(RuntimeError, match="model failed"):
            held.result(10)
        assert [job.result(10) for job in queued] == [["x"], ["y"]]
    finally:
        release.set()
        batcher.stop()

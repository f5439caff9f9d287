"""Load on `fedtune serve`: requests/s and p50/p99 latency of /predict at batch sizes 1 and 32, and
tokens/s of /generate. Prints figures, asserts nothing.

    python benchmarks/serve_load.py [--adapter DIR] [--base-model DIR] [--threads 1] [--batch-sizes 1,32]
        [--concurrency 1,4] [--requests 200] [--seconds 20] [--json OUT.json]
    python benchmarks/serve_load.py --generate [--adapter DIR] [--gen-prompts 1,8] [--gen-requests 3] [--max-new-tokens 32]

The server is the real command (``fedtune serve --port 0 --threads N``) in its own process on
127.0.0.1, stopped at the end whatever happens; the load comes from this process over HTTP (httpx,
one client per concurrent caller), so on a small machine client and server share the cores: the
figures are a floor for a server with the machine to itself. Each row is bounded by ``--requests``
and ``--seconds``, whichever ends first, after a short warm-up.

Without ``--adapter`` nothing is trained: a freshly initialised adapter (fedtune's LoRA defaults,
seed 0) is saved by ``build_model`` / ``save_adapter`` on the packaged all-MiniLM-L6-v2, with the
clinical demo's labels and max_length 64 (the classification default). With ``--generate``, the
same on the default causal LM (SmolLM2-135M-Instruct, converted from its pinned wheel on first use),
max_length 256. A fresh adapter costs what a trained one does: only its values differ. Texts are
the clinical triage demo's notes, prompts the clinical summaries demo's (common/demo_data).

Columns: ``batch`` texts (or prompts) per request; ``conc.`` requests in flight at once; ``req/s``
and ``texts/s`` over the row's wall clock; ``p50``/``p99`` latency of one request as the client sees
it; ``calls`` model calls the server made (from /health): fewer calls than requests means the
server merged waiting requests into shared batches. Generation: ``tokens/s`` counts the tokens of
the generated text (re-tokenised by the base model's tokenizer, without special tokens) over the
row's wall clock; every prompt is answered greedily up to ``--max-new-tokens`` or its end-of-turn.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "common" / "demo_data"
sys.path.insert(0, str(HERE.parent))

from tests.integration.deployment import Processes  # noqa: E402  (the tests' process helper: own group, always stopped)

STARTUP_S = 600  # the first --generate converts SmolLM2 from its wheel


def fresh_classifier(folder: Path, base_model: str | None) -> tuple[Path, list[str]]:
    from fedtune.common.config import LoraSettings, ModelConfig
    from fedtune.common.model import build_model, resolve_base_model, save_adapter

    rows = list(csv.DictReader(open(DEMO / "clinical_triage.csv", encoding="utf-8")))
    labels = sorted({r["label"] for r in rows})
    config = ModelConfig(base_model=base_model or "")
    model = build_model(config, LoraSettings(), len(labels), seed=0).model
    save_adapter(model, folder, metadata={"labels": labels, "max_length": 64, "base_model": str(resolve_base_model(config))})
    return folder, [r["text"] for r in rows]


def fresh_lm(folder: Path, base_model: str | None) -> Path:
    from fedtune.common.causal_lm import build_causal_lm
    from fedtune.common.config import LoraSettings, ModelConfig
    from fedtune.common.model import resolve_base_model, save_adapter

    base = resolve_base_model(ModelConfig(base_model=base_model or ""), "causal-lm")
    model = build_causal_lm(base, LoraSettings(), seed=0).model
    save_adapter(model, folder, metadata={"task": "causal-lm", "template": "auto", "max_length": 256, "base_model": str(base)})
    return folder


def start_server(procs: Processes, adapter: Path, args: argparse.Namespace) -> str:
    """``fedtune serve`` on a free port of 127.0.0.1 (stopped by ``procs.stop_all()``); its URL."""
    command = ["serve", "--adapter", str(adapter), "--host", "127.0.0.1", "--port", "0",
               "--threads", str(args.threads), "--max-batch", str(max(64, *args.batch_sizes, *args.gen_prompts))]
    if args.base_model:
        command += ["--base-model", args.base_model]
    process = procs.start("server", command, env=dict(os.environ))
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+);", procs.log("server"))
        if found:
            return found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"fedtune serve did not start:\n{procs.log('server')[-3000:]}")


def _client(url: str) -> Any:
    import httpx

    return httpx.Client(base_url=url, timeout=300, trust_env=False)


def _calls(url: str) -> int:
    with _client(url) as c:
        return int(c.get("/health").json()["model_calls"])


def load(url: str, path: str, bodies: list[dict[str, Any]], *, concurrency: int, requests: int, seconds: float) -> dict[str, Any]:
    """Send up to ``requests`` bodies (cycling) from ``concurrency`` callers, for at most ``seconds``."""
    stop_at = time.monotonic() + seconds
    counter = iter(range(requests))
    latencies: list[float] = []
    answers: list[Any] = []

    def caller() -> None:
        with _client(url) as c:
            for k in counter:  # shared iterator: each index is taken once (next() on a range iterator is atomic in CPython)
                if time.monotonic() > stop_at:
                    return
                started = time.perf_counter()
                response = c.post(path, json=bodies[k % len(bodies)])
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise SystemExit(f"{path} answered {response.status_code}: {response.text[:300]}")
                answers.append(response.json())

    calls = _calls(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(caller) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(ordered), "seconds": wall, "req_s": len(ordered) / wall, "model_calls": _calls(url) - calls,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "answers": answers}


def bench_predict(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    adapter, texts = (Path(args.adapter), None) if args.adapter else fresh_classifier(work / "adapter", args.base_model)
    if texts is None:
        texts = [r["text"] for r in csv.DictReader(open(DEMO / "clinical_triage.csv", encoding="utf-8"))]
    procs = Processes(work)
    rows = []
    try:
        url = start_server(procs, adapter, args)
        load(url, "/predict", [{"texts": texts[:8]}], concurrency=1, requests=5, seconds=30)  # warm-up
        for batch in args.batch_sizes:
            bodies = [{"texts": [texts[(i * batch + j) % len(texts)] for j in range(batch)]} for i in range(64)]
            for conc in args.concurrency:
                r = load(url, "/predict", bodies, concurrency=conc, requests=args.requests, seconds=args.seconds)
                r.pop("answers")
                rows.append({"endpoint": "/predict", "batch": batch, "concurrency": conc, **r, "texts_s": r["req_s"] * batch})
                print(f"/predict batch {batch:3d} conc. {conc}: {r['requests']:4d} requests in {r['seconds']:5.1f} s  "
                      f"{r['req_s']:7.1f} req/s  {r['req_s'] * batch:7.1f} texts/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  calls {r['model_calls']}", flush=True)
    finally:
        procs.stop_all()
    return rows


def bench_generate(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    adapter = Path(args.adapter) if args.adapter else fresh_lm(work / "adapter", args.base_model)
    meta = json.loads((adapter / "fedtune.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(args.base_model or meta["base_model"])
    prompts = [r["prompt"] for r in csv.DictReader(open(DEMO / "clinical_summaries.csv", encoding="utf-8"))]
    procs = Processes(work)
    rows = []
    try:
        url = start_server(procs, adapter, args)
        load(url, "/generate", [{"prompts": prompts[:1], "max_new_tokens": 4}], concurrency=1, requests=1, seconds=120)  # warm-up
        for n in args.gen_prompts:
            bodies = [{"prompts": [prompts[(i * n + j) % len(prompts)] for j in range(n)], "max_new_tokens": args.max_new_tokens}
                      for i in range(16)]
            r = load(url, "/generate", bodies, concurrency=1, requests=args.gen_requests, seconds=args.seconds * 6)
            tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for a in r.pop("answers") for text in a["generations"])
            rows.append({"endpoint": "/generate", "batch": n, "concurrency": 1, **r, "tokens": tokens, "tokens_s": tokens / r["seconds"]})
            print(f"/generate {n} prompt(s) per request: {r['requests']} requests, {tokens} tokens in {r['seconds']:.1f} s  "
                  f"{tokens / r['seconds']:.1f} tokens/s  p50 {r['p50_ms'] / 1000:.2f} s  p99 {r['p99_ms'] / 1000:.2f} s", flush=True)
    finally:
        procs.stop_all()
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="A saved adapter folder [a fresh one on the default base model].")
    parser.add_argument("--base-model", help="Base model folder [the task's default].")
    parser.add_argument("--threads", type=int, default=1, help="The server's torch threads [1: the machine is shared].")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 32], help="Texts per /predict request [1,32].")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4], help="Requests in flight at once [1,4].")
    parser.add_argument("--requests", type=int, default=200, help="Most requests per row [200].")
    parser.add_argument("--seconds", type=float, default=20.0, help="Most seconds per row (x6 for --generate) [20].")
    parser.add_argument("--generate", action="store_true", help="Measure /generate on a causal LM instead.")
    parser.add_argument("--gen-prompts", type=_ints, default=[1, 8], help="Prompts per /generate request [1,8].")
    parser.add_argument("--gen-requests", type=int, default=3, help="Most /generate requests per row [3].")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens per prompt [32].")
    parser.add_argument("--json", dest="json_out", help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    if not args.generate:
        args.gen_prompts = []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"fedtune serve on 127.0.0.1, server --threads {args.threads}, {os.cpu_count()} CPUs shared with this client", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        rows = bench_generate(args, Path(tmp)) if args.generate else bench_predict(args, Path(tmp))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"threads": args.threads, "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

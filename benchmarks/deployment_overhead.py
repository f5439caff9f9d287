"""Per-round overhead of a real deployment over the same rounds in simulation: prints figures.

    python benchmarks/deployment_overhead.py [--rounds 3] [--base-model DIR]

Runs 2 sites for R rounds three ways, with the same model, data and settings:
  1. simulation (Flower's simulation engine: warm Ray actors),
  2. deployment: coordinator + 2 site daemons on 127.0.0.1 over TLS, with the warm worker,
  3. the same deployment without it (every message's process loads torch, PEFT, Opacus, the model).
and prints seconds per round (rounds after the first: the first pays start-up), the overhead over
simulation, and the import / model-load costs that explain where the time goes.
Default model: a tiny BERT, so training is negligible and the overhead is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.deployment import CoordinatorPorts, Processes, fedtune, free_port, start_coordinator, write_site_data  # noqa: E402

LABELS = "cardiology,gastroenterology,neurology,orthopedics,pulmonology"


def round_seconds(run_dir: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def simulation(root: Path, model: str, rounds: int) -> list[float]:
    out = root / "sim"
    fedtune("simulate", "--base-model", model, "--sites", "2", "--rounds", str(rounds), "--data", str(root / "all.csv"),
            "--out", str(out), env=dict(os.environ), timeout=1800)
    return round_seconds(out)


def deployment(root: Path, model: str, rounds: int, *, warm: bool, threads: int = 1) -> list[float]:
    tag = "warm" if warm else "cold"
    ports = CoordinatorPorts.free()
    port, admin = ports.fleet, ports.admin_address
    env = {**os.environ, "FEDTUNE_HOME": str(root / f"home-{tag}")}
    certs = root / f"certs-{tag}"
    (root / f"logs-{tag}").mkdir()
    procs = Processes(root / f"logs-{tag}")
    try:
        fedtune("certs", "init", "--out", str(certs), env=env)
        start_coordinator(procs, certs=certs, state=root / f"state-{tag}", ports=ports, env=env)
        for name, data in (("site-a", root / "a.csv"), ("site-b", root / "b.csv")):
            site = root / f"{name}-{tag}"
            fedtune("site", "init", "--name", name, "--data", str(data), "--coordinator", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                    "--out", str(site), "--base-model", model, env=env)
            fedtune("coordinator", "add-site", str(site / "node-key.pub"), "--name", name, "--coordinator", admin, "--certs", str(certs), env=env)
            # Both sites share this machine: split its cores (see `fedtune site start --threads`).
            args = ["site", "start", "--config", str(site / "site.toml"), "--runtime-port", str(free_port()), "--threads", str(threads)]
            procs.start(name, args if warm else [*args, "--no-warm-worker"], env)
        out = root / f"run-{tag}"
        fedtune("run", "--coordinator", admin, "--certs", str(certs), "--labels", LABELS, "--base-model", model,
                "--rounds", str(rounds), "--out", str(out), env=env, timeout=3600)
        return round_seconds(out)
    finally:
        procs.stop_all()


def import_seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-model", default=None, help="model folder (default: a tiny BERT built here)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedtune-overhead-"))
    model = args.base_model
    if model is None:
        from fedtune.common.tiny import make_tiny_bert

        model = str(make_tiny_bert(root / "tiny-bert"))
    write_site_data(root / "a.csv", slice(0, 120))
    write_site_data(root / "b.csv", slice(120, 240))
    write_site_data(root / "all.csv", slice(0, 300))

    results = {
        "simulation": simulation(root, model, args.rounds),
        "deployment, warm worker": deployment(root, model, args.rounds, warm=True),
        "deployment, no warm worker": deployment(root, model, args.rounds, warm=False),
    }
    steady = {k: statistics.mean(v[1:] or v) for k, v in results.items()}
    print(f"\n2 sites, {args.rounds} rounds (one message per site per round), model {model}")
    print(f"{'mode':<28} {'s/round (after round 1)':>24} {'overhead vs simulation':>24}")
    for mode, seconds in steady.items():
        print(f"{mode:<28} {seconds:>24.1f} {seconds - steady['simulation']:>24.1f}")
    print("\nwhere the time goes (one fresh process each):")
    print(f"  python + flwr + fedtune's ClientApp module (what each message's process pays with the warm worker): "
          f"{import_seconds('import fedtune.client.app'):.1f} s")
    print(f"  + torch, transformers, PEFT, Opacus (what it pays without): {import_seconds('import fedtune.client.handlers'):.1f} s")
    print(f"  + building the model from {Path(model).name}: "
          f"{import_seconds(f'from fedtune.common.model import build_model; from fedtune.common.config import *; build_model(ModelConfig(base_model={model!r}), LoraSettings(), 5)'):.1f} s")
    print(f"work folder: {root}")


if __name__ == "__main__":
    main()

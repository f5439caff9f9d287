"""Scale: peak memory and seconds per round of `fedtune simulate` with 10, 100 and 1,000 simulated sites.

    python benchmarks/scale.py [--sites 10,100,1000] [--rounds 2] [--train-per-round 10]
                               [--model default|tiny] [--scale 16] [--data FILE]
                               [--timeout 3600] [--set evaluation.sample=500 ...] [--out benchmarks/out/scale]

Each point is one `fedtune simulate` in a subprocess of its own: --sites N, --fraction-train
train-per-round / N (so about the same number of sites train each round at every N), --rounds,
and the rest at fedtune's defaults (DP at each site, epsilon 8, the coordinator's test on the whole
held-out split every round unless --set evaluation.every / evaluation.sample say otherwise).

Measured:
- peak memory: the largest sum of resident memory (RSS) over the whole process tree (the CLI,
  Ray's GCS and raylet, every actor), sampled every 0.5 s with psutil; without psutil, the largest
  single process (``ru_maxrss`` of the children), which understates a tree;
- seconds per round: each round's own time from RUN_DIR/metrics.jsonl (training exchange, test,
  checkpoint), and the wall time of the whole command (Ray's start, the sites' warm-up, the final
  federated validation of every site, the report).

Data: the demo generator (same seed and mix) with --scale times the rows per hospital (16: 24,000
notes, about 17 training rows per site at 1,000 sites), or --data FILE. --model tiny builds a ~1M
parameter BERT (for a quick run); default is fedtune's all-MiniLM-L6-v2.

Prints a table, appends one JSON line per run to OUT/results-STAMP.jsonl and draws OUT/scale-STAMP.png.
A run past --timeout seconds is stopped (its whole process group) and recorded as timed out.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLE_SECONDS = 0.5


def scaled_demo(out: Path, scale: int) -> str:
    """The clinical demo data with ``scale`` times the rows per hospital, generated once into OUT/demo-xSCALE/."""
    folder = out / f"demo-x{scale}"
    if not (folder / "clinical_triage.csv").exists():
        subprocess.run([sys.executable, str(HERE.parent / "common" / "demo_data" / "generate.py"), "--scale", str(scale),
                        "--out-dir", str(folder)], check=True, capture_output=True)
    return str(folder / "clinical_triage.csv")


def tree_rss(pid: int) -> int | None:
    """Resident bytes of ``pid`` and all its descendants now (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_point(sites: int, args: argparse.Namespace, data: str, model: str | None, out: Path) -> dict[str, Any]:
    fraction = min(1.0, args.train_per_round / sites)
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--data", data, "--sites", str(sites), "--rounds", str(args.rounds),
           "--fraction-train", f"{fraction:g}", "--min-sites", str(min(2, sites)), "--seed", str(args.seed), "--out", str(out)]
    if model:
        cmd += ["--base-model", model]
    if args.config_file:
        cmd += ["--config", str(args.config_file)]
    log = out.parent / f"{out.name}.console.txt"
    started = time.perf_counter()
    peak, timed_out = 0, False
    with log.open("w", encoding="utf-8") as console:
        # A session of its own: a run past --timeout is stopped with everything it started (Ray included).
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None:
            rss = tree_rss(proc.pid)
            peak = max(peak, rss or 0)
            if time.perf_counter() - started > args.timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                try:  # Ray's actors can outlive a stopped driver: end whatever of the group is left
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    # Without psutil: the largest single child process (kB on Linux), an underestimate for a tree.
    largest_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    metrics = out / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {
        "sites": sites,
        "fraction_train": fraction,
        "rounds": args.rounds,
        "model": args.model,
        "data": data,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_seconds": round(wall, 1),
        "round_seconds": [line["seconds"] for line in lines],
        "seconds_per_round": round(sum(line["seconds"] for line in lines) / len(lines), 1) if lines else None,
        "sites_per_round": [line["sites_replied"] for line in lines],
        "peak_rss_bytes": peak or None,
        "peak_rss_source": "psutil: sum over the process tree" if peak else "ru_maxrss: largest child process",
        "largest_child_rss_bytes": largest_child,
        "test_accuracy": (summary.get("test") or {}).get("accuracy"),
        "evaluation": summary.get("evaluation"),
        "console": str(log),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["returncode"] == 0]
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["sites"] for r in done]
    mem.plot(x, [(r["peak_rss_bytes"] or r["largest_child_rss_bytes"]) / 2**30 for r in done], "o-")
    mem.set(xscale="log", xlabel="simulated sites", ylabel="peak RSS of the process tree (GiB)", title="Peak memory")
    sec.plot(x, [r["seconds_per_round"] for r in done], "o-", label="per round (metrics.jsonl)")
    sec.plot(x, [r["wall_seconds"] / r["rounds"] for r in done], "s--", label="wall time / rounds (incl. start-up)")
    sec.set(xscale="log", xlabel="simulated sites", ylabel="seconds", title="Time per round")
    sec.legend()
    fig.suptitle(f"fedtune simulate, ~{done[0]['fraction_train'] * done[0]['sites']:.0f} sites train per round" if done else "no run finished")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-per-round", type=int, default=10, help="sites sampled to train each round (fraction = this / N)")
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--scale", type=int, default=16, help="demo rows per hospital times this (1: the shipped 1,500 notes)")
    parser.add_argument("--data", help="a CSV/JSONL/Parquet to use instead of the scaled demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is stopped")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any other config key, every run")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "scale")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from utility import write_overrides  # noqa: E402  (a sibling script, not a package)

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.config_file = write_overrides(args.set, args.out / f"overrides-{stamp}.toml") if args.set else None
    data = args.data or scaled_demo(args.out, args.scale)
    model = None
    if args.model == "tiny":
        from fedtune.common.tiny import make_tiny_bert

        model = str(make_tiny_bert(args.out / "tiny-bert"))
    results = args.out / f"results-{stamp}.jsonl"
    rows = []
    print(f"{'sites':>6} {'train/round':>11} {'s/round':>8} {'wall s':>8} {'peak GiB':>9} {'test acc':>9}  status", flush=True)
    for sites in (int(s) for s in args.sites.split(",")):
        row = run_point(sites, args, data, model, args.out / f"run-{stamp}-{sites}")
        rows.append(row)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        peak = (row["peak_rss_bytes"] or row["largest_child_rss_bytes"]) / 2**30
        status = "timed out" if row["timed_out"] else ("ok" if row["returncode"] == 0 else f"failed ({row['console']})")
        acc = f"{row['test_accuracy']:.3f}" if row["test_accuracy"] is not None else "-"
        print(f"{sites:>6} {round(row['fraction_train'] * sites):>11} {row['seconds_per_round'] or float('nan'):>8.1f} "
              f"{row['wall_seconds']:>8.1f} {peak:>9.2f} {acc:>9}  {status}", flush=True)
    plot(rows, args.out / f"scale-{stamp}.png")
    print(f"results: {results}\nplot: {args.out / f'scale-{stamp}.png'}")


if __name__ == "__main__":
    main()

"""Utility under DP: federated runs with and without DP on the same data, split and settings.

    python benchmarks/utility.py [--datasets demo,real] [--sites 4] [--partition dirichlet:0.5]
                                 [--rounds 5] [--learning-rates 0,0.02] [--batch-sizes 256]
                                 [--epsilon 8] [--real-rows 3000] [--set model.pooling=cls ...]
                                 [--out benchmarks/out/utility]

For every (dataset, learning rate, batch size) it runs `fedtune simulate` twice, with DP at the
target epsilon and with --no-dp, and prints held-out test accuracy, macro-F1, the DP gap and the
wall time as a table (also written as JSON lines and a PNG beside them). Prints figures, asserts
nothing. ``--set KEY=VALUE`` (repeatable) fixes any other config key for every run, through a
config file given to `fedtune simulate --config`.

"demo-xK" is the demo generator (same seed and mix) with K times the rows per hospital, generated
into --out. "real" is human-written text (see benchmarks/real_data.py for source and licence): Health News in
Twitter, the --real-labels outlets, subsampled to --real-rows rows (seeded).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_REAL_LABELS = "goodhealth,KaiserHealthNews,reuters_health,everydayhealth"


def real_subset(out_dir: Path, rows: int, labels: list[str], seed: int) -> Path:
    sys.path.insert(0, str(HERE))
    from real_data import prepare  # noqa: E402  (a sibling script, not a package)

    full = prepare(out_dir / "health-news-tweets.csv")
    with open(full, newline="", encoding="utf-8") as f:
        data = [r for r in csv.DictReader(f) if r["label"] in labels]
    random.Random(seed).shuffle(data)
    per_label = rows // len(labels)
    picked: list[dict[str, str]] = []
    for label in labels:
        picked += [r for r in data if r["label"] == label][:per_label]
    path = out_dir / f"health-news-{len(labels)}-outlets-{len(picked)}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in picked)
    return path


def write_overrides(items: list[str], path: Path) -> Path:
    """``section.key=value`` items as a TOML config file (values parsed as TOML: 2, 0.5, true, "mean")."""
    import tomllib

    import tomli_w

    nested: dict[str, dict[str, object]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, sub = key.partition(".")
        if not (eq and dot):
            raise SystemExit(f"--set wants SECTION.KEY=VALUE, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word: a string
        nested.setdefault(section, {})[sub] = parsed
    path.write_text(tomli_w.dumps(nested), encoding="utf-8")
    return path


def run_one(data: str, out: Path, *, dp: bool, args: argparse.Namespace, lr: float, batch: int) -> dict:  # type: ignore[type-arg]
    cmd = [
        sys.executable, "-m", "fedtune.cli", "simulate", "--data", data, "--sites", str(args.sites),
        "--partition", args.partition, "--rounds", str(args.rounds), "--epsilon", str(args.epsilon),
        "--batch-size", str(batch), "--seed", str(args.seed), "--out", str(out),
    ]
    if lr > 0:  # 0: each mode's own default
        cmd += ["--learning-rate", str(lr)]
    if not dp:
        cmd.append("--no-dp")
    if args.config_file:
        cmd += ["--config", str(args.config_file)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "test_accuracy": summary["test"]["accuracy"],
        "test_macro_f1": summary["test"]["macro_f1"],
        "max_epsilon": summary["max_epsilon"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="demo,real")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--learning-rates", default="0,0.02", help="0 means fedtune's default (0.05 in both modes; 0.01 without DP before it changed)")
    parser.add_argument("--batch-sizes", default="256")
    parser.add_argument("--real-rows", type=int, default=3000)
    parser.add_argument("--real-labels", default=DEFAULT_REAL_LABELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key for every run (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "utility")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.config_file = write_overrides(args.set, args.out / f"overrides-{stamp}.toml") if args.set else None
    datasets = {}
    for name in args.datasets.split(","):
        if name == "demo":
            datasets[name] = "demo:clinical_triage"
        elif name.startswith("demo-x"):  # the same generator and seed, K times the rows per hospital
            folder = args.out / name
            subprocess.run([sys.executable, str(HERE.parent / "common" / "demo_data" / "generate.py"), "--scale", name[6:],
                            "--out-dir", str(folder)], check=True)
            datasets[name] = str(folder / "clinical_triage.csv")
        elif name == "real":
            datasets[name] = str(real_subset(args.out, args.real_rows, args.real_labels.split(","), args.seed))
        else:
            datasets[name] = name
    rows = []
    results = args.out / f"results-{stamp}.jsonl"
    for name, data in datasets.items():
        for lr in (float(x) for x in args.learning_rates.split(",")):
            for batch in (int(x) for x in args.batch_sizes.split(",")):
                pair = {}
                for dp in (True, False):
                    tag = f"{name}-lr{lr:g}-b{batch}-{'dp' if dp else 'nodp'}-{stamp}"
                    pair[dp] = run_one(data, args.out / tag, dp=dp, args=args, lr=lr, batch=batch)
                row = {"dataset": name, "learning_rate": lr, "batch_size": batch, "set": args.set, "dp": pair[True], "no_dp": pair[False],
                       "gap_points": round(100 * (pair[False]["test_accuracy"] - pair[True]["test_accuracy"]), 1)}
                rows.append(row)
                with open(results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(f"\n{args.sites} sites, partition {args.partition}, {args.rounds} rounds, DP at epsilon {args.epsilon:g} (delta 1e-5)"
          + (f", {' '.join(args.set)}" if args.set else ""))
    print(f"{'dataset':<8} {'lr':>6} {'batch':>6} {'DP acc':>7} {'no-DP acc':>9} {'gap (pts)':>9} {'DP F1':>6} {'max eps':>7} {'DP s':>6}")
    for r in rows:
        print(f"{r['dataset']:<8} {r['learning_rate']:>6g} {r['batch_size']:>6} {r['dp']['test_accuracy']:>7.3f} "
              f"{r['no_dp']['test_accuracy']:>9.3f} {r['gap_points']:>9.1f} {r['dp']['test_macro_f1']:>6.3f} "
              f"{r['dp']['max_epsilon']:>7.2f} {r['dp']['wall_seconds']:>6.0f}")
    print(f"results: {results}")


if __name__ == "__main__":
    main()

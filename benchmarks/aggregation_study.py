"""Aggregation rules under DP against the centralized references, over several seeds.

    python benchmarks/aggregation_study.py [--data real] [--seeds 0,1,2] [--sites 4] [--partition dirichlet:0.5]
        [--rounds 5] [--epsilon 8] [--methods fedavg,ffa,fedadam,fedprox,central]
        [--fedadam-lr 0.01] [--fedavgm-lr 0.3] [--fedavgm-momentum 0.9] [--proximal-mu 0.1]
        [--set federation.server_lr=0.01 ...] [--out benchmarks/out/study]

For every seed (which picks the held-out test set, the sites' partition, the initialisation and
the sampling) it runs each method with DP at --epsilon per site and, for 'fedavg' and 'central',
without DP too, through benchmarks/utility_sweep.py's in-process federation (the real site code:
split, Poisson sampling, ledger-calibrated noise, Opacus DP-SGD; the coordinator's FedAvg mean and
server optimiser step). Methods:

    fedavg   example-weighted FedAvg of the LoRA factors and head (fedtune's default)
    ffa      FFA-LoRA: A frozen at a seed-derived value, B and the head averaged (exact)
    fedadam  FedAvg's mean as a pseudo-gradient for FedAdam (--fedadam-lr, default 0.01)
    fedavgm  FedAvgM (--fedavgm-momentum beta, default 0.9; --fedavgm-lr eta, default 0.3); on a
             steady update its step tends to eta / (1 - beta), and under DP it averages about
             (1 + beta) / (1 - beta) rounds of noise, so sweep beta at a fixed eta / (1 - beta)
    fedprox  FedAvg with FedProx's proximal term at each site (--proximal-mu, default 0.1)
    central  the centralized reference: one party with the union of the sites' training splits,
             the same model, head, length, rounds and local epochs (DP-SGD at the same epsilon)

Prints one JSON line per run (with the method's settings, e.g. "federation.server_momentum"),
then a table of final test accuracy (mean and sample standard deviation over the seeds, and the gap
to centralized non-private), and writes the JSON lines and a plot of test accuracy per round (mean,
with a band of one standard deviation) into --out. A method's rows are grouped by its settings
(the label, e.g. "fedavgm b=0.5 lr=0.5"), so `--from-results` over two sweeps of one method keeps
them apart; results files of different schedules (--rounds, --partition, --set) are kept apart
too, each label naming the settings that differ, and the gap is then measured to centralized
non-private under the schedule where it scored best (a setting that suits the federation but not
centralized training never lowers the bar). A method run with one seed shows "(1 seed)", no
spread. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from utility_sweep import _value, federated_run, run_config  # noqa: E402  (a sibling script, not a package)

METHODS = ("fedavg", "ffa", "fedadam", "fedavgm", "fedprox", "central")
NON_PRIVATE_TOO = ("fedavg", "central")
CENTRAL_PLAIN_LEARNING_RATE = 0.01


def method_overrides(method: str, args: argparse.Namespace) -> dict[str, object]:
    return {
        "fedavg": {},
        "central": {},
        "ffa": {"federation.aggregation": "ffa"},
        "fedadam": {"federation.server_opt": "adam", "federation.server_lr": args.fedadam_lr},
        "fedavgm": {"federation.server_opt": "momentum", "federation.server_lr": args.fedavgm_lr,
                    "federation.server_momentum": args.fedavgm_momentum},
        "fedprox": {"train.proximal_mu": args.proximal_mu},
    }[method]


def central_plain_rate(method: str, mode: str, fixed: dict[str, object]) -> dict[str, object]:
    """The centralized non-private reference trains at its own best rate, 0.01, unless --set gives one.

    fedtune's default (0.05) suits the federation; one party holding the union overshoots at it
    (docs/benchmarks.md: 0.683 vs 0.777, seed 0), and a weaker reference would flatter every method.
    """
    if method == "central" and mode == "nodp" and "train.learning_rate" not in fixed:
        return {"train.learning_rate": CENTRAL_PLAIN_LEARNING_RATE}
    return {}


def data_path(name: str, rows: int) -> str:
    if name == "demo":
        return ""
    if name == "real":
        from utility import DEFAULT_REAL_LABELS, real_subset

        # One fixed subset (seed 0) for every seed: the seeds vary the split and the training, not the data.
        return str(real_subset(HERE / "out" / "utility", rows, DEFAULT_REAL_LABELS.split(","), 0))
    return name


# FedAvgM's momentum before it was a setting (rows from older results files do not record it).
FIXED_FEDAVGM_MOMENTUM = 0.9


def method_label(row: dict) -> str:  # type: ignore[type-arg]
    """The method with the settings that tell its runs apart: 'fedavgm b=0.9 lr=0.1', 'fedadam lr=0.05', 'fedprox mu=0.1'."""
    method = row["method"]
    if method == "fedavgm":
        return f"fedavgm b={row.get('federation.server_momentum', FIXED_FEDAVGM_MOMENTUM):g} lr={row['federation.server_lr']:g}"
    if method == "fedadam":
        return f"fedadam lr={row['federation.server_lr']:g}"
    if method == "fedprox":
        return f"fedprox mu={row['train.proximal_mu']:g}"
    return str(method)


def schedule_labels(rows: list[dict]) -> dict[int, str]:  # type: ignore[type-arg]
    """Per row (by position), the schedule settings that differ between the rows given, e.g. 'r=10 local_epochs=1'.

    Results files of different --rounds, --partition or --set (batch size, local epochs, learning
    rate) must not be averaged together by `--from-results`; settings shared by every row stay out
    of the labels (the table's first line names them).
    """
    def settings(r: dict) -> dict[str, str]:  # type: ignore[type-arg]
        found = {"r": str(r["rounds"]), "partition": str(r["partition"])}
        for item in r.get("set") or []:
            key, _, value = item.partition("=")
            found[key.rpartition(".")[2]] = value
        return found

    per_row = [settings(r) for r in rows]
    keys = sorted({k for s in per_row for k in s})
    varying = [k for k in keys if len({s.get(k, "default") for s in per_row}) > 1]
    return {i: " ".join(f"{k}={s.get(k, 'default')}" for k in varying) for i, s in enumerate(per_row)}


def row_labels(rows: list[dict]) -> list[str]:  # type: ignore[type-arg]
    """Each row's method label, followed by its schedule label when the rows given differ in schedule."""
    schedule = schedule_labels(rows)
    return [f"{method_label(r)} {schedule[i]}".strip() for i, r in enumerate(rows)]


def summarise(rows: list[dict], args: argparse.Namespace) -> list[str]:  # type: ignore[type-arg]
    schedule = schedule_labels(rows)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, label in enumerate(row_labels(rows)):
        groups.setdefault((label, rows[i]["mode"]), []).append(i)
    # The bar every method is measured against: centralized non-private, under the schedule
    # (rounds, partition, --set) where it scored best among the rows given, so a setting that
    # helps the federation but hurts centralized training never lowers the bar.
    references: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        if r["method"] == "central" and r["mode"] == "nodp":
            references.setdefault(schedule[i], []).append(r["test_accuracy"])
    best = max(references, key=lambda k: statistics.fmean(references[k])) if references else None
    ref_mean = statistics.fmean(references[best]) if best is not None else None
    first = rows[0]
    varies = any(schedule.values())
    width = max(20, *(len(label) for label, _ in groups))
    lines = [f"{first['data']}{' (' + str(first['rows']) + ' rows)' if first.get('rows') else ''}: {first['sites']} sites, "
             + (f"{first['partition']}, {first['rounds']} rounds, " if not varies else "schedules as labelled, ")
             + f"DP at epsilon {first['epsilon']:g} per site"
             + (f", {' '.join(first['set'])}" if first["set"] and not varies else "")
             + (f"; reference: central nodp {best}" if varies and best is not None else ""),
             f"{'method':<{width}} {'mode':<5} {'seeds':>5} {'test acc (mean +- sd)':>23} {'macro-F1':>8} {'vs central no-DP':>16} {'max eps':>7} {'s/run':>6}"]
    order = {m: i for i, m in enumerate(METHODS)}
    labels = sorted({label for label, _ in groups}, key=lambda label: (order.get(label.split()[0], len(order)), label))
    for label in labels:
        for mode in ("dp", "nodp"):
            members = groups.get((label, mode))
            if not members:
                continue
            runs = [rows[i] for i in members]
            acc = [r["test_accuracy"] for r in runs]
            # One seed has no spread: said so, never printed as a mean +- 0.
            spread = f"+- {statistics.stdev(acc):.3f}" if len(acc) > 1 else "(1 seed)"
            gap = f"{100 * (statistics.fmean(acc) - ref_mean):+.1f} pts" if ref_mean is not None else "-"
            lines.append(f"{label:<{width}} {mode:<5} {','.join(str(r['seed']) for r in runs):>5} {statistics.fmean(acc):>14.3f} {spread:>8} "
                         f"{statistics.fmean(r['test_macro_f1'] for r in runs):>8.3f} {gap:>16} "
                         f"{max(r['max_epsilon'] for r in runs):>7.2f} {statistics.fmean(r['seconds'] for r in runs):>6.0f}")
    return lines


def plot(rows: list[dict], path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[list[float]]] = {}
    for label, r in zip(row_labels(rows), rows):
        groups.setdefault(f"{label} ({'DP' if r['mode'] == 'dp' else 'no DP'})", []).append(r["accuracy_by_round"])
    ticks = 0
    for label, curves in sorted(groups.items()):
        a = np.array(curves)
        x = np.arange(1, a.shape[1] + 1)
        ticks = max(ticks, a.shape[1])
        label = f"{label}, {len(a)} seed{'s' if len(a) > 1 else ''}"
        mean, sd = a.mean(axis=0), a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
        line, = ax.plot(x, mean, marker="o", label=label, linestyle="--" if "no DP" in label else "-")
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.15, color=line.get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("held-out test accuracy")
    ax.set_xticks(np.arange(1, ticks + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="real", help="'real' (Health News in Twitter, 4 outlets, 3,000 tweets), 'demo' or a CSV path")
    parser.add_argument("--real-rows", type=int, default=3000, help="rows of the 'real' set (balanced over its 4 outlets)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--methods", default="fedavg,ffa,fedadam,fedprox,central")
    parser.add_argument("--fedadam-lr", type=float, default=0.01)
    parser.add_argument("--fedavgm-lr", type=float, default=0.3)
    parser.add_argument("--fedavgm-momentum", type=float, default=0.9, help="FedAvgM's server momentum beta, in [0, 1)")
    parser.add_argument("--proximal-mu", type=float, default=0.1)
    parser.add_argument("--modes", default="dp,nodp", help="'nodp' runs only for fedavg and central")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key for every run (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); to run seeds side by side")
    parser.add_argument("--from-results", default="", help="FILE[,FILE...]: only summarise and plot these JSON-lines results")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "study")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        rows = [json.loads(line) for f in args.from_results.split(",") for line in Path(f).read_text().splitlines() if line.strip()]
        report(rows, args, args.out / f"study-{time.strftime('%Y%m%d-%H%M%S')}")
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = args.out / f"study-{stamp}.jsonl"
    fixed: dict[str, object] = {"data.path": data_path(args.data, args.real_rows), "data.partition": args.partition, "federation.sites": args.sites,
                                "federation.min_sites": 1, "federation.rounds": args.rounds, "privacy.target_epsilon": args.epsilon}
    for item in args.set:
        key, _, value = item.partition("=")
        fixed[key] = _value(value)
    for method in methods:  # a bad setting (e.g. --fedavgm-momentum 1) fails now, naming its key, not after hours of runs
        run_config({**fixed, **method_overrides(method, args)})
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in methods:
            for mode in args.modes.split(","):
                if mode == "nodp" and method not in NON_PRIVATE_TOO:
                    continue
                run = run_config({**central_plain_rate(method, mode, fixed), **fixed, **method_overrides(method, args), "seed": seed,
                                  "privacy.enabled": mode == "dp"})
                with tempfile.TemporaryDirectory() as tmp:
                    result = federated_run(run, data_dir=Path(tmp), centralized=method == "central", every_round=True)
                row = {"data": args.data, "rows": args.real_rows if args.data == "real" else None, "sites": args.sites,
                       "partition": args.partition, "rounds": args.rounds, "epsilon": args.epsilon, "set": args.set, "method": method, "mode": mode, "seed": seed, **method_overrides(method, args), **result}
                rows.append(row)
                with open(results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    report(rows, args, args.out / f"study-{stamp}")
    print(f"results: {results}")


def report(rows: list[dict], args: argparse.Namespace, stem: Path) -> None:  # type: ignore[type-arg]
    table = summarise(rows, args)
    stem.with_suffix(".txt").write_text("\n".join(table) + "\n", encoding="utf-8")
    plot(rows, stem.with_suffix(".png"))
    print("\n" + "\n".join(table))
    print(f"table {stem.with_suffix('.txt')}, plot {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()

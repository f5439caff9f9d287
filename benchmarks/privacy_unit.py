"""Which unit of privacy learns at which scale: sample-level DP at each site vs client-level DP-FedAvg vs N sites.

    python benchmarks/privacy_unit.py [--sites 10,100,1000] [--units sample,client,none] [--seeds 0,1]
        [--rounds 5] [--sites-per-round 20] [--examples-per-round 32] [--batch-size 32] [--scale 16]
        [--epsilon 8] [--delta 1e-5] [--client-clip-norm 1.0] [--eval-sample 500] [--out benchmarks/out/privacy-unit]
        [--plot docs/img/privacy-unit.png]

The SAME data (the demo generator at --scale 16: 24,000 notes, about 17 training rows a site at
1,000 sites) is split IID over N sites, so rows per site shrink as N grows. For each N and seed,
three privacy units at the same rounds and the same (expected) sites per round K = min(N, --sites-per-round):

- ``sample``: sample-level DP-SGD at every site (fedtune's default; epsilon, delta per site, each
  site's noise calibrated by its own ledger for all planned rounds), FedAvg over a fixed-size
  sample of K sites, as `fedtune simulate` does;
- ``client``: client-level DP-FedAvg at the coordinator only (``privacy.enabled = false``,
  ``client_dp.enabled = true``, what `fedtune simulate --no-dp --client-dp` runs): each site joins
  a round with probability q = K / N (Poisson), updates clipped to C, Gaussian noise z C on the
  sum, divided by q N; z calibrated so that T rounds give (epsilon, delta) per site;
- ``none``: no DP, the reference (FedAvg over a fixed-size sample of K sites).

Every sampled site does the same local work each round: about --examples-per-round examples
(train.local_epochs = that / n, so a large site takes round(E / q) = examples / batch steps of
expected batch --batch-size, and a site smaller than the batch takes full-batch steps). Without it,
N = 10 would train on all 17,000 rows each round and cost 100 times a round at N = 1,000.

Why in one process rather than `fedtune simulate`: the same site code (`client.local.prepare_site`
/ `train_round`: the split, the site's ledger, Poisson sampling, Opacus DP-SGD) and the same
coordinator math (`server.client_dp_plan.plan_client_level`, `poisson_sample`,
`server.client_dp.dp_fedavg_aggregate`, `server.aggregation.update_delta`), without Ray, a process
per message, the warm-up and the federated validation of every site (about 3 minutes a run at
1,000 sites even with a 1M-parameter model, docs/scale.md); the defaults are the measured figure's
(docs/privacy-unit.md). `fedtune simulate --no-dp --client-dp --sites N
--fraction-train K/N` runs the `client` unit in the real engine.

Prints a table (N, unit, rows/site, sites/round, z, test accuracy over seeds, epsilon), appends one
JSON line per run to OUT/results-STAMP.jsonl and draws accuracy vs N (log x), one line per unit,
into --plot. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UNITS = ("sample", "client", "none")
UNIT_NAMES = {"sample": "sample-level DP-SGD at each site", "client": "client-level DP-FedAvg (coordinator)",
              "none": "no DP (reference)"}


@dataclass(frozen=True, kw_only=True)
class GridPoint:
    """One run: N sites, one privacy unit, one seed, and the sampling and local work that follow.

    Attributes:
        sites: N.
        unit: 'sample', 'client' or 'none' (see the module docstring).
        seed: the run's seed (split, initialisation, sampling, noise).
        sites_per_round: K = min(N, the requested sites per round): the fixed sample size of
            FedAvg, or the expected size q N of client-level DP's Poisson sample.
        fraction_train: K / N (q for client-level DP).
        rows_per_site: mean training rows per site, train_rows / N.
        local_epochs: examples_per_round / rows_per_site, so that a site processes about the same
            number of examples per round at every N.
    """

    sites: int
    unit: str
    seed: int
    sites_per_round: int
    fraction_train: float
    rows_per_site: float
    local_epochs: float


def build_grid(sites: Sequence[int], units: Sequence[str], seeds: Sequence[int], *, train_rows: int,
               sites_per_round: int, examples_per_round: int) -> list[GridPoint]:
    """Every (N, unit, seed), ordered by seed first so that a budget cut short still covers the grid once.

    Raises:
        ValueError: an unknown unit, N < 1, or sites_per_round, examples_per_round or train_rows < 1.
    """
    bad = [u for u in units if u not in UNITS]
    if bad:
        raise ValueError(f"--units must be among {list(UNITS)}, got {bad}.")
    if min(sites, default=0) < 1 or sites_per_round < 1 or examples_per_round < 1 or train_rows < 1:
        raise ValueError(f"sites ({list(sites)}), sites_per_round ({sites_per_round}), examples_per_round "
                         f"({examples_per_round}) and train_rows ({train_rows}) must all be >= 1.")
    points = []
    for seed in seeds:
        for n in sites:
            k = min(n, sites_per_round)
            rows = train_rows / n
            for unit in units:
                points.append(GridPoint(sites=n, unit=unit, seed=seed, sites_per_round=k, fraction_train=k / n,
                                        rows_per_site=rows, local_epochs=examples_per_round / rows))
    return points


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (N, unit) over its seeds: mean, min and max test accuracy, max epsilon, runs.

    Sorted by N, then in the order of UNITS. Failed runs (no ``test_accuracy``) are counted in
    ``failed`` and left out of the statistics.
    """
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["sites"], row["unit"]), []).append(row)
    out = []
    for (n, unit), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], UNITS.index(kv[0][1]))):
        done = [r for r in runs if r.get("test_accuracy") is not None]
        accs = [r["test_accuracy"] for r in done]
        eps = [r["epsilon"] for r in done if r.get("epsilon") is not None]
        out.append({
            "sites": n, "unit": unit, "runs": len(done), "failed": len(runs) - len(done),
            "rows_per_site": runs[0]["rows_per_site"], "sites_per_round": runs[0]["sites_per_round"],
            "noise_multiplier": max((r["noise_multiplier"] for r in done), default=None),
            "accuracy_mean": statistics.fmean(accs) if accs else None,
            "accuracy_min": min(accs, default=None), "accuracy_max": max(accs, default=None),
            "epsilon": max(eps, default=None),
        })
    return out


# ---------------------------------------------------------------------------------------------
# One run, in this process
# ---------------------------------------------------------------------------------------------


def run_point(point: GridPoint, args: argparse.Namespace, data: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedtune.client.local import prepare_site, train_round
    from fedtune.common.config import from_flat
    from fedtune.common.model import adapter_state, build_model, load_adapter_state, load_tokenizer
    from fedtune.common.sitedata import load_config_table, run_labels, simulated_split
    from fedtune.common.tasks import encode, evaluate
    from fedtune.server.aggregation import update_delta
    from fedtune.server.client_dp import clip_update, dp_fedavg_aggregate
    from fedtune.server.client_dp_plan import plan_client_level, poisson_sample

    run = from_flat({
        "data.path": data, "federation.sites": point.sites, "federation.rounds": args.rounds,
        "federation.fraction_train": point.fraction_train, "federation.min_sites": 1, "seed": point.seed,
        "model.max_length": args.max_length, "train.batch_size": args.batch_size, "train.local_epochs": point.local_epochs,
        "privacy.enabled": point.unit == "sample", "privacy.target_epsilon": args.epsilon, "privacy.delta": args.delta,
        "client_dp.enabled": point.unit == "client", "client_dp.target_epsilon": args.epsilon,
        "client_dp.delta": args.delta, "client_dp.clip_norm": args.client_clip_norm,
        **({} if point.unit == "sample" else {"train.learning_rate": args.plain_learning_rate}),
    })
    started = time.perf_counter()
    torch.manual_seed(point.seed)
    table = load_config_table(run.data)
    labels = run_labels(run.data, table)
    tokenizer = load_tokenizer(run.model)
    model = build_model(run.model, run.lora, len(labels), seed=run.seed).model
    global_state = adapter_state(model)
    split = simulated_split(table, run.data, num_sites=point.sites, seed=run.seed)
    test_rows = random.Random(point.seed).sample(split.test, min(args.eval_sample, len(split.test))) if args.eval_sample else split.test
    test = encode(tokenizer, [table.texts[i] for i in test_rows], [table.labels[i] for i in test_rows], labels,
                  max_length=run.max_length)
    plan = None
    if point.unit == "client":
        plan = plan_client_level(
            sites=point.sites, sites_source="federation.sites (benchmark)", fraction_train=point.fraction_train, min_sites=1,
            rounds=args.rounds, clip_norm=args.client_clip_norm, noise_multiplier=0.0, target_epsilon=args.epsilon,
            delta=args.delta, accountant=run.privacy.accountant)
    sampling_rng = random.Random(point.seed)
    noise_rng = np.random.default_rng(point.seed)
    prepared: dict[int, Any] = {}
    epsilon, site_z, norms, clipped, sampled_counts, train_sizes = 0.0, [], [], 0, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            if plan is not None:
                sampled = poisson_sample(range(point.sites), plan.sample_rate, sampling_rng)
            else:  # Flower's FedAvg: a fixed-size sample of K sites
                sampled = sorted(sampling_rng.sample(range(point.sites), point.sites_per_round))
            sampled_counts.append(len(sampled))
            global_np = {k: v.detach().double().numpy() for k, v in global_state.items()}
            states, weights = [], []
            for pid in sampled:
                if pid not in prepared:
                    site = prepare_site(run, {"partition-id": pid, "num-partitions": point.sites}, run_dir=tmp, labels=labels)
                    prepared[pid] = (site, encode(tokenizer, site.examples.train_texts, site.examples.train_labels, labels,
                                                  max_length=run.max_length))
                site, dataset = prepared[pid]
                load_adapter_state(model, global_state)
                privacy, _ = train_round(model, dataset, site=site, run=run, run_id="privacy-unit", server_round=rnd,
                                         num_rounds=args.rounds, seed=point.seed * 10**7 + rnd * 10**4 + pid)
                epsilon = max(epsilon, privacy.epsilon)
                site_z.append(privacy.noise_multiplier)
                state = {k: v.detach().double().numpy() for k, v in adapter_state(model).items()}
                delta = update_delta(state, global_np)
                result = clip_update(delta, args.client_clip_norm)  # only its norm is used outside the client unit
                norms.append(result.norm)
                clipped += result.was_clipped
                states.append(delta)
                weights.append(len(dataset))
                train_sizes.append(len(dataset))
            if plan is not None:
                mean = dp_fedavg_aggregate(states, clip_norm=plan.clip_norm, noise_multiplier=plan.noise_multiplier,
                                           expected_sites=plan.expected_sites, rng=noise_rng, template=global_np)
            else:
                total = float(sum(weights))
                mean = {k: sum(d[k] * (w / total) for d, w in zip(states, weights)) for k in global_np}
            global_state = type(global_state)(
                (k, torch.from_numpy(global_np[k] + mean[k]).to(global_state[k].dtype)) for k in global_state)
            print(f"  round {rnd}: {len(sampled)} sites, median update norm {statistics.median(norms[-len(sampled):]) if sampled else float('nan'):.3g}",
                  flush=True)
    load_adapter_state(model, global_state)
    result = evaluate(model, test, len(labels))
    return {
        **asdict(point),
        "rounds": args.rounds, "batch_size": args.batch_size, "examples_per_round": args.examples_per_round,
        "max_length": run.max_length, "learning_rate": run.learning_rate, "data": data,
        "train_rows_per_site_min": min(train_sizes, default=None), "train_rows_per_site_max": max(train_sizes, default=None),
        "sites_sampled": sampled_counts,
        # A site first sampled in round r plans its noise for the R - r + 1 rounds left (its ledger), so
        # sample-level z varies by site: the largest and the smallest used.
        "noise_multiplier": plan.noise_multiplier if plan else max(site_z, default=0.0),
        "noise_multiplier_min": plan.noise_multiplier if plan else min(site_z, default=0.0),
        "client_clip_norm": args.client_clip_norm if plan else None,
        "epsilon": plan.epsilon if plan else (epsilon if point.unit == "sample" else None),
        "delta": args.delta if point.unit != "none" else None,
        "median_update_norm": statistics.median(norms) if norms else None,
        "clipped_fraction_at_client_clip_norm": clipped / len(norms) if norms else None,
        "test_accuracy": round(result.accuracy, 4), "test_macro_f1": round(result.macro_f1, 4), "test_examples": len(test_rows),
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(summary: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for unit, style in zip(UNITS, ("o-", "s-", "^--")):
        pts = [s for s in summary if s["unit"] == unit and s["accuracy_mean"] is not None]
        if not pts:
            continue
        x = [s["sites"] for s in pts]
        y = [s["accuracy_mean"] for s in pts]
        err = [[m - s["accuracy_min"] for s, m in zip(pts, y)], [s["accuracy_max"] - m for s, m in zip(pts, y)]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=UNIT_NAMES[unit])
    ax.set(xscale="log", xlabel="sites N (same total data: rows per site = total / N)", ylabel="test accuracy",
           ylim=(0, 1), title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def print_table(summary: Sequence[dict[str, Any]]) -> None:
    print(f"{'N':>5} {'unit':>7} {'rows/site':>9} {'sites/rnd':>9} {'z':>7} {'test acc (min-max)':>22} {'epsilon':>8} {'runs':>4}")
    for s in summary:
        z = f"{s['noise_multiplier']:.3f}" if s["noise_multiplier"] else "-"
        acc = (f"{s['accuracy_mean']:.3f} ({s['accuracy_min']:.3f}-{s['accuracy_max']:.3f})"
               if s["accuracy_mean"] is not None else "failed")
        eps = f"{s['epsilon']:.2f}" if s["epsilon"] is not None else "-"
        print(f"{s['sites']:>5} {s['unit']:>7} {s['rows_per_site']:>9.1f} {s['sites_per_round']:>9} {z:>7} {acc:>22} {eps:>8} "
              f"{s['runs']:>4}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--units", default=",".join(UNITS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites-per-round", type=int, default=20, help="K: sites per round (expected, for client-level DP)")
    parser.add_argument("--examples-per-round", type=int, default=32, help="examples each sampled site processes per round")
    parser.add_argument("--batch-size", type=int, default=32, help="expected logical batch B (q = min(1, B / n))")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--client-clip-norm", type=float, default=1.0, help="C of client-level DP")
    parser.add_argument("--plain-learning-rate", type=float, default=0.01,
                        help="learning rate of the runs without DP-SGD (no DP, client-level); docs/privacy-unit.md used 0.01")
    parser.add_argument("--eval-sample", type=int, default=500, help="held-out examples tested (0: all)")
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--data", help="a CSV instead of the scaled demo")
    parser.add_argument("--results", type=Path, help="summarize and plot these JSON lines only (no runs)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "privacy-unit")
    parser.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "img" / "privacy-unit.png")
    args = parser.parse_args()

    title = f"epsilon {args.epsilon:g}, delta {args.delta:g}, {args.rounds} rounds, <= {args.sites_per_round} sites/round"
    if args.results:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        summary = summarize(rows)
        print_table(summary)
        plot(summary, args.plot, title=title)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from scale import scaled_demo  # a sibling script, not a package

    data = args.data or scaled_demo(args.out, args.scale)
    from fedtune.common.config import from_flat
    from fedtune.common.sitedata import load_config_table, simulated_split

    sites = [int(s) for s in args.sites.split(",")]
    base = from_flat({"data.path": data, "federation.sites": 1, "federation.min_sites": 1})
    train_rows = len(simulated_split(load_config_table(base.data), base.data, num_sites=1, seed=0).sites[0])
    train_rows = math.floor(train_rows * (1 - base.data.val_fraction))  # each site keeps a validation share
    points = build_grid(sites, args.units.split(","), [int(s) for s in args.seeds.split(",")], train_rows=train_rows,
                        sites_per_round=args.sites_per_round, examples_per_round=args.examples_per_round)
    results = args.out / f"results-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    rows = []
    for point in points:
        print(f"N={point.sites} unit={point.unit} seed={point.seed} K={point.sites_per_round} E={point.local_epochs:.3g}", flush=True)
        row = run_point(point, args, data)
        rows.append(row)
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  test accuracy {row['test_accuracy']:.3f}, z {row['noise_multiplier']:.3g}, epsilon {row['epsilon']}, "
              f"median update norm {row['median_update_norm']:.3g}, {row['seconds']} s", flush=True)
    summary = summarize(rows)
    print_table(summary)
    plot(summary, args.plot, title=title)
    print(f"results: {results}\nplot: {args.plot}")


if __name__ == "__main__":
    main()

"""A fast sweep of DP defaults: federated averaging in one process, without Flower.

    python benchmarks/utility_sweep.py [--data demo] [--sites 4] [--partition dirichlet:0.5]
        [--grid 'model.pooling=mean,cls'] [--grid 'lora.top_layers=1,2'] [--set federation.rounds=5]
        [--modes dp,nodp] [--out benchmarks/out/sweep]

Each site runs the real site code (``client.local.prepare_site`` / ``train_round``: the same split,
Poisson sampling, noise calibrated by the site's ledger to the target epsilon, Opacus DP-SGD); the
coordinator's part is an example-weighted mean of the adapters, which is what FedAvg computes
(under ``federation.aggregation=ffa`` the adapters are B and the head only, as in a real run:
``--grid federation.aggregation=fedavg,ffa`` compares FFA-LoRA with plain LoRA).
Sites run one after another in this process, so a 4-site run takes a fraction of the time of
`fedtune simulate` (no Ray, no per-message processes, no federated evaluation). Use it to choose
defaults; report the chosen ones with benchmarks/utility.py, which runs `fedtune simulate` itself.

``--grid KEY=V1,V2`` sweeps a config key (the cross product of all grids); ``--set KEY=V`` fixes
one. ``data`` is 'demo', 'real' (as in benchmarks/utility.py) or a CSV path. Prints one JSON line
per run and a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _value(text: str):  # type: ignore[no-untyped-def]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run_config(overrides: dict[str, object]):  # type: ignore[no-untyped-def]
    from fedtune.common.config import from_flat

    return from_flat(overrides)


def _server_opt(run):  # type: ignore[no-untyped-def]
    """The run's server optimiser (server.server_opt's pure step), or None for plain FedAvg."""
    from fedtune.server.server_opt import OptimizerState, server_opt_settings

    fed = run.federation
    settings = server_opt_settings(name=fed.server_opt, lr=fed.server_lr, momentum=fed.server_momentum)
    return None if settings is None else (settings, OptimizerState())


def federated_run(run, *, data_dir: Path, centralized: bool = False, every_round: bool = False) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """FedAvg (with the run's server optimiser and FedProx) over the run's simulated sites, in one process.

    ``centralized``: the reference a federation is measured against: one party holding the union of
    the sites' training splits trains the same model for the same rounds and local epochs (DP-SGD at
    the same target epsilon when the run has DP), and is tested on the same held-out set.
    ``every_round``: test accuracy after each round (``accuracy_by_round``), not only at the end.
    """
    import dataclasses

    import numpy as np
    import torch

    from fedtune.client.local import PreparedSite, prepare_site, train_round
    from fedtune.client.train import proximal_reference
    from fedtune.common.model import adapter_state, build_model, load_adapter_state, load_tokenizer, uses_ffa
    from fedtune.common.sitedata import SiteExamples, load_config_table, run_labels, simulated_split
    from fedtune.common.tasks import encode, evaluate
    from fedtune.server.server_opt import server_step

    table = load_config_table(run.data)
    labels = run_labels(run.data, table)
    tokenizer = load_tokenizer(run.model)
    model = build_model(run.model, run.lora, len(labels), seed=run.seed, ffa=uses_ffa(run)).model
    global_state = adapter_state(model)
    split = simulated_split(table, run.data, num_sites=run.federation.sites, seed=run.seed)
    test = encode(tokenizer, [table.texts[i] for i in split.test], [table.labels[i] for i in split.test], labels,
                  max_length=run.max_length)
    prepared = [prepare_site(run, {"partition-id": pid, "num-partitions": run.federation.sites}, run_dir=str(data_dir), labels=labels)
                for pid in range(run.federation.sites)]
    if centralized:  # one party: every site's training split (their validation splits stay out, as in the federation)
        union = SiteExamples(train_texts=[t for s in prepared for t in s.examples.train_texts],
                             train_labels=[y for s in prepared for y in s.examples.train_labels], val_texts=[], val_labels=[])
        first = prepared[0]
        prepared = [PreparedSite(settings=dataclasses.replace(first.settings, name="centralized", state_dir=data_dir / "centralized"),
                                 examples=union, train_records=[r for s in prepared for r in s.train_records], val_records=[])]
    sites = [(site, encode(tokenizer, site.examples.train_texts, site.examples.train_labels, labels, max_length=run.max_length))
             for site in prepared]
    optimizer = _server_opt(run)
    started = time.perf_counter()
    epsilon = 0.0
    by_round: list[float] = []
    for rnd in range(1, run.federation.rounds + 1):
        states, weights = [], []
        for pid, (site, dataset) in enumerate(sites):
            load_adapter_state(model, global_state)
            reference = proximal_reference(model) if run.train.proximal_mu > 0 else None
            privacy, _ = train_round(model, dataset, site=site, run=run, run_id="sweep", server_round=rnd,
                                     num_rounds=run.federation.rounds, seed=1000 * rnd + pid, proximal_reference=reference)
            epsilon = max(epsilon, privacy.epsilon)
            states.append(adapter_state(model))
            weights.append(len(dataset))
        total = float(sum(weights))
        mean = {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)) for k in global_state}
        if optimizer is not None:
            settings, opt_state = optimizer
            step = server_step(settings, opt_state, {k: v.double().numpy() for k, v in global_state.items()},
                               {k: v.numpy() for k, v in mean.items()})
            optimizer = settings, step.state
            mean = {k: torch.from_numpy(np.asarray(v)) for k, v in step.arrays.items()}
        global_state = type(global_state)((k, mean[k].to(global_state[k].dtype)) for k in global_state)
        if every_round and rnd < run.federation.rounds:
            load_adapter_state(model, global_state)
            by_round.append(round(evaluate(model, test, len(labels)).accuracy, 4))
    load_adapter_state(model, global_state)
    result = evaluate(model, test, len(labels))
    by_round.append(round(result.accuracy, 4))
    return {"test_accuracy": round(result.accuracy, 4), "test_macro_f1": round(result.macro_f1, 4),
            "max_epsilon": round(epsilon, 3), "site_sizes": [len(d) for _, d in sites],
            **({"accuracy_by_round": by_round} if every_round else {}),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="KEY=V (repeatable)")
    parser.add_argument("--modes", default="dp,nodp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-rows", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "sweep")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data == "demo":
        data = ""
    elif args.data == "real":
        sys.path.insert(0, str(HERE))
        from utility import DEFAULT_REAL_LABELS, real_subset  # a sibling script, not a package

        data = str(real_subset(HERE / "out" / "utility", args.real_rows, DEFAULT_REAL_LABELS.split(","), args.seed))
    else:
        data = args.data
    fixed: dict[str, object] = {"data.path": data, "data.partition": args.partition, "federation.sites": args.sites,
                                "federation.min_sites": 1, "seed": args.seed}
    for item in args.set:
        key, _, value = item.partition("=")
        fixed[key] = _value(value)
    keys = [g.partition("=")[0] for g in args.grid]
    choices = [[_value(v) for v in g.partition("=")[2].split(",")] for g in args.grid]
    results = args.out / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    rows = []
    for combo in itertools.product(*choices):
        point = dict(zip(keys, combo))
        row: dict[str, object] = {"data": args.data, **point}
        for mode in args.modes.split(","):
            run = run_config({**fixed, **point, "privacy.enabled": mode == "dp"})
            with tempfile.TemporaryDirectory() as tmp:
                row[mode] = federated_run(run, data_dir=Path(tmp))
        if "dp" in row and "nodp" in row:
            row["gap_points"] = round(100 * (row["nodp"]["test_accuracy"] - row["dp"]["test_accuracy"]), 1)  # type: ignore[index]
        rows.append(row)
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n{args.sites} sites, {args.partition}, fixed {fixed}")
    for r in rows:
        dp, nodp = r.get("dp", {}), r.get("nodp", {})
        point = " ".join(f"{k}={r[k]}" for k in keys)
        print(f"{point:<50} DP {dp.get('test_accuracy', float('nan')):.3f}  no-DP {nodp.get('test_accuracy', float('nan')):.3f}  "
              f"gap {r.get('gap_points', float('nan'))}")
    print(f"results: {results}")


if __name__ == "__main__":
    main()

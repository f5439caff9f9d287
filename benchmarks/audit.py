"""Membership-inference audit: an overtrained model without DP vs the same run with DP. Prints figures.

    python benchmarks/audit.py [--rows 400] [--rounds 5] [--local-epochs 8] [--epsilon 8]
    python benchmarks/audit.py --attack rmia --references 2 [--population 200] [--rows 200]

Both runs: 2 IID sites on the first --rows rows of the packaged clinical demo, MiniLM, many
local epochs (to overfit). Members are the rows the sites trained on (rebuilt from the run's
seeded split), non-members the held-out test rows. `fedtune audit` then attacks each final
adapter with a loss threshold (Yeom et al. 2018): AUC near 0.5 means the attack cannot tell.

--attack rmia also runs RMIA (Zarifzadeh et al. 2024, offline) next to the loss attack. The demo
rows after the first --rows (never seen by the targets) are the pool: --population of them, drawn
with a fixed seed, are RMIA's population z; each of the --references reference runs trains exactly
like its target (same flags, DP or not) on a seeded random half of the rest (at most --rows rows). Cost: 2 x (1 + K)
training runs. Everything goes under benchmarks/out/audit-rmia/ (or --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def demo_slice(root: Path, rows: int) -> Path:
    """The first `rows` rows of the packaged demo as root/notes.csv (text, label); also used by canary_audit.py."""
    from fedtune.common.sitedata import demo_data_path

    data = root / "notes.csv"
    with open(demo_data_path(), newline="", encoding="utf-8") as f:
        picked = list(csv.DictReader(f))[:rows]
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in picked)
    return data


def _write_rows(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(pairs)
    return path


def _pool(rows: int, population: int, references: int, root: Path) -> tuple[Path, list[Path]]:
    """RMIA's population file and one training file per reference, from the demo rows after the first ``rows``.

    Pool rows equal (text, label) to a target row are dropped: the population must be disjoint from the
    audited sets, and a reference must not have trained on them.
    """
    import random

    from fedtune.common.sitedata import demo_data_path

    with open(demo_data_path(), newline="", encoding="utf-8") as f:
        picked = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    seen = set(picked[:rows])
    pool = list(dict.fromkeys(p for p in picked[rows:] if p not in seen))
    random.Random(0).shuffle(pool)
    if len(pool) < population + 20:
        raise SystemExit(f"--population {population} leaves {len(pool) - population} pool rows for the references; lower it or --rows.")
    z, rest = pool[:population], pool[population:]
    # A random half of the rest, capped at the target's --rows: a reference should see as much data as a target does.
    size = min(len(rest) // 2, rows)
    halves = [_write_rows(root / f"reference-{k}.csv", random.Random(1000 + k).sample(rest, size)) for k in range(references)]
    return _write_rows(root / "population.csv", z), halves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=float, default=8.0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--attack", choices=["loss", "rmia"], default="loss", help="rmia: also RMIA, beside the loss attack.")
    parser.add_argument("--references", type=int, default=2, help="RMIA: reference runs per target (each one training run).")
    parser.add_argument("--population", type=int, default=200, help="RMIA: population rows z.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rmia = args.attack == "rmia"
    if rmia and args.references < 1:
        parser.error(f"--references must be >= 1 with --attack rmia, got {args.references}.")

    from fedtune.common.config import from_dict
    from fedtune.common.sitedata import load_config_table, simulated_split, site_examples

    default_out = Path(__file__).resolve().parent / "out" / "audit-rmia" if rmia else Path(tempfile.mkdtemp(prefix="fedtune-audit-"))
    root = args.out or default_out
    root.mkdir(parents=True, exist_ok=True)
    # Finished runs in root are reused (below); runs made with other settings would be audited against this
    # call's members and non-members without a word, so a folder holds the runs of one set of settings only.
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    stamp = root / "settings.json"
    if not stamp.is_file() and any(root.glob("*/summary.json")):
        raise SystemExit(f"{root} holds finished runs but no settings.json saying how they were made; give another --out, "
                         f"or write {json.dumps(settings)} there if they were made with these settings.")
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) != settings:
        raise SystemExit(f"{root} holds runs made with {stamp.read_text(encoding='utf-8').strip()}, not {json.dumps(settings)}; "
                         "give another --out or empty that folder.")
    stamp.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    data = demo_slice(root, args.rows)

    # Members and non-members exactly as the runs split them (same seed, same config).
    run = from_dict({"data": {"path": str(data)}, "federation": {"sites": 2}})
    table = load_config_table(run.data)
    split = simulated_split(table, run.data, num_sites=2, seed=run.seed)
    members = [
        (text, label)
        for k, indices in enumerate(split.sites)
        for text, label in zip(*_train_rows(site_examples(table, indices, val_fraction=run.data.val_fraction, seed=run.seed + k)))
    ]
    non_members = [(table.texts[i], table.labels[i]) for i in split.test]
    _write_rows(root / "members.csv", members)
    _write_rows(root / "non-members.csv", non_members)
    population, ref_data = _pool(args.rows, args.population, args.references, root) if rmia else (None, [])

    def simulate(data_file: Path, out: Path, mode: str) -> None:
        if (out / "summary.json").is_file():  # finished earlier: a rerun of the benchmark reuses it
            return
        cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--data", str(data_file), "--sites", "2", "--rounds", str(args.rounds),
               "--local-epochs", str(args.local_epochs), "--epsilon", str(args.epsilon), "--out", str(out)]
        _run(cmd + (["--no-dp"] if mode == "no-dp" else []))

    def audit(out: Path, report: Path, extra: list[str]) -> dict:  # type: ignore[type-arg]
        _run([sys.executable, "-m", "fedtune.cli", "audit", str(out), "--members", str(root / "members.csv"),
                        "--non-members", str(root / "non-members.csv"), "--json", str(report)] + extra)
        return json.loads(report.read_text())

    results = {}
    for mode in ("no-dp", "dp"):
        out = root / f"run-{mode}"
        simulate(data, out, mode)
        attacks = {"loss": audit(out, root / f"audit-{mode}.json", [])}
        if rmia:
            refs = [root / f"reference-{mode}-{k}" for k in range(args.references)]
            for ref, ref_file in zip(refs, ref_data):
                simulate(ref_file, ref, mode)
            extra = ["--attack", "rmia", "--population", str(population)] + [a for ref in refs for a in ("--reference", str(ref))]
            attacks["rmia"] = audit(out, root / f"audit-rmia-{mode}.json", extra)
        summary = json.loads((out / "summary.json").read_text())
        results[mode] = {"attacks": attacks, "test_accuracy": summary["test"]["accuracy"], "max_epsilon": summary["max_epsilon"]}

    lines = [f"membership inference; {len(members)} members, {len(non_members)} non-members; {args.rounds} rounds x "
             f"{args.local_epochs:g} local epochs, 2 sites" + (f"; RMIA: {args.references} reference run(s) per target, "
                                                             f"{args.population} population rows" if rmia else ""),
             f"{'run':<6} {'test acc':>8} {'epsilon':>8} {'attack':<6} {'AUC [95% CI]':>22} {'TPR@1%FPR [95% CP]':>24} {'non-members':>11}"]
    for mode, r in results.items():
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        for name, rep in r["attacks"].items():
            a = rep["auc"]
            t = next(row for row in rep["tpr_at_fpr"] if row["fpr"] == 0.01)
            # Reported only with >= 1,000 non-members (fedtune.audit_stats.non_members_needed).
            tpr = (f"{t['tpr']:>8.3f} [{t['tpr_ci'][0]:.3f}, {t['tpr_ci'][1]:.3f}]" if t["reported"]
                   else f"n/a (needs {t['non_members_needed']})")
            lines.append(f"{mode:<6} {r['test_accuracy']:>8.3f} {eps:>8} {name:<6} {a['value']:>8.3f} [{a['ci_low']:.3f}, "
                         f"{a['ci_high']:.3f}] {tpr:>24} {rep['non_members']:>11}")
    print("\n" + "\n".join(lines))
    print(f"work folder: {root}")
    if rmia:
        (root / "results.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                                      indent=2) + "\n", encoding="utf-8")


def _run(cmd: list[str]) -> None:
    """Run a fedtune command; on failure show the end of its output, not just the exit code."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])}... failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def _train_rows(examples):  # type: ignore[no-untyped-def]
    return examples.train_texts, examples.train_labels


if __name__ == "__main__":
    main()

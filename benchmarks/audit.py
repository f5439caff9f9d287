"""Membership-inference audit: an overtrained model without DP vs the same run with DP. Prints figures.

    python benchmarks/audit.py [--rows 400] [--rounds 5] [--local-epochs 8] [--epsilon 8]

Both runs: 2 IID sites on the first --rows rows of the packaged clinical demo, MiniLM, many
local epochs (to overfit). Members are the rows the sites trained on (rebuilt from the run's
seeded split), non-members the held-out test rows. `fedtune audit` then attacks each final
adapter with a loss threshold (Yeom et al. 2018): AUC near 0.5 means the attack cannot tell.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=float, default=8.0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from fedtune.common.config import from_dict
    from fedtune.common.sitedata import load_config_table, simulated_split, site_examples

    root = args.out or Path(tempfile.mkdtemp(prefix="fedtune-audit-"))
    root.mkdir(parents=True, exist_ok=True)
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
    for name, pairs in (("members.csv", members), ("non-members.csv", non_members)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(pairs)

    results = {}
    for mode in ("no-dp", "dp"):
        out = root / f"run-{mode}"
        cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--data", str(data), "--sites", "2", "--rounds", str(args.rounds),
               "--local-epochs", str(args.local_epochs), "--epsilon", str(args.epsilon), "--out", str(out)]
        subprocess.run(cmd + (["--no-dp"] if mode == "no-dp" else []), check=True, capture_output=True)
        report = root / f"audit-{mode}.json"
        subprocess.run([sys.executable, "-m", "fedtune.cli", "audit", str(out), "--members", str(root / "members.csv"),
                        "--non-members", str(root / "non-members.csv"), "--json", str(report)], check=True, capture_output=True)
        summary = json.loads((out / "summary.json").read_text())
        results[mode] = {"audit": json.loads(report.read_text()), "test_accuracy": summary["test"]["accuracy"],
                         "max_epsilon": summary["max_epsilon"]}

    print(f"\nloss-threshold membership inference; {len(members)} members, {len(non_members)} non-members; "
          f"{args.rounds} rounds x {args.local_epochs:g} local epochs, 2 sites")
    print(f"{'run':<10} {'test acc':>8} {'epsilon':>8} {'AUC [95% CI]':>22} {'TPR@1%FPR [95% CP]':>24}")
    for mode, r in results.items():
        a = r["audit"]["auc"]
        t = next(row for row in r["audit"]["tpr_at_fpr"] if row["fpr"] == 0.01)
        eps = "-" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}"
        # Reported only with >= 1,000 non-members (fedtune.audit_stats.non_members_needed).
        tpr = (f"{t['tpr']:>8.3f} [{t['tpr_ci'][0]:.3f}, {t['tpr_ci'][1]:.3f}]" if t["reported"]
               else f"n/a (needs {t['non_members_needed']} non-members)")
        print(f"{mode:<10} {r['test_accuracy']:>8.3f} {eps:>8} {a['value']:>8.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] {tpr}")
    print(f"work folder: {root}")


def _train_rows(examples):  # type: ignore[no-untyped-def]
    return examples.train_texts, examples.train_labels


if __name__ == "__main__":
    main()

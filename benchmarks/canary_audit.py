"""One-run canary audit (Steinke, Nasr, Jagielski 2023) of a non-DP run and a DP run. Prints figures.

    python benchmarks/canary_audit.py [--canaries 1000] [--rows 400] [--rounds 3] [--local-epochs 4]
                                      [--epsilon 8] [--sites 1] [--out DIR]

Each run is `fedtune audit-canary`: the first --rows rows of the packaged clinical demo spread over
--sites simulated sites, MiniLM with LoRA, plus --canaries random-text random-label canaries each
included with probability 1/2 at site-0. One run without DP (the positive control: the lower
bound should be large) and one with DP at --epsilon (the lower bound must stay below it; the
command fails otherwise). With --sites 1 the white-box score sees exactly the site's own update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=float, default=4.0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--base-model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--modes", default="no-dp,dp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="fedtune-canary-"))
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from audit import demo_slice  # noqa: E402  (a sibling script, not a package)

    data = demo_slice(root, args.rows)

    results = {}
    for mode in args.modes.split(","):
        out = root / f"run-{mode}"
        cmd = [sys.executable, "-m", "fedtune.cli", "audit-canary", "--data", str(data), "--sites", str(args.sites),
               "--min-sites", str(min(args.sites, 2)), "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
               "--epsilon", str(args.epsilon), "--max-length", str(args.max_length), "--canaries", str(args.canaries),
               "--out", str(out)]
        if args.base_model:
            cmd += ["--base-model", args.base_model]
        started = time.perf_counter()
        proc = subprocess.run(cmd + (["--no-dp"] if mode == "no-dp" else []), capture_output=True, text=True)
        seconds = time.perf_counter() - started
        print(proc.stdout[-2000:], file=sys.stderr)
        if proc.returncode != 0 and not (out / "canary-audit.json").is_file():
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{mode}: fedtune audit-canary failed (exit {proc.returncode})")
        audit = json.loads((out / "canary-audit.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        results[mode] = {"audit": audit, "seconds": seconds, "exit": proc.returncode, "test_accuracy": summary["test"]["accuracy"]}

    print(f"\none-run canary audit: {args.canaries} canaries at site-0 of {args.sites} site(s), {args.rows} demo rows, "
          f"{args.rounds} rounds x {args.local_epochs:g} local epochs, 95% confidence, Bonferroni over k")
    print(f"{'run':<7} {'test acc':>8} {'epsilon':>8} {'black-box LB':>13} {'(right/guesses)':>16} {'white-box LB':>13} "
          f"{'(right/guesses)':>16} {'seconds':>8} {'exit':>4}")
    for mode, r in results.items():
        a = r["audit"]
        eps = "inf" if a["epsilon"] is None else f"{a['epsilon']:.3f}"
        bb, wb = a["black_box"], a["white_box"]
        wb_text = (f"{wb['epsilon_lower_bound']:>13.3f} {str(wb['best']['correct']) + '/' + str(wb['best']['guesses']):>16}"
                   if wb else f"{'-':>13} {'':>16}")
        print(f"{mode:<7} {r['test_accuracy']:>8.3f} {eps:>8} {bb['epsilon_lower_bound']:>13.3f} "
              f"{str(bb['best']['correct']) + '/' + str(bb['best']['guesses']):>16} {wb_text} {r['seconds']:>8.0f} {r['exit']:>4}")
    print(f"work folder: {root}")


if __name__ == "__main__":
    main()

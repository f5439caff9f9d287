"""Secure aggregation against plain FedAvg on the same run: prints figures, asserts nothing.

    python benchmarks/secure_agg.py [--data demo:clinical_triage] [--sites 3] [--rounds 3]
                                    [--base-model DIR] [--out benchmarks/out/secure_agg]

Runs `fedtune simulate` twice with the same seed (plain FedAvg, then --secure-agg) and prints per
round: the largest |value| in the global adapter (what the clipping range must cover; sites also
refuse if theirs leave it), the largest difference between the two global adapters and the
quantization bound the protocol reports, test accuracy, bytes up per site and seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def simulate(out: Path, args: argparse.Namespace, *extra: str) -> float:
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "--data", args.data, "--sites", str(args.sites),
           "--rounds", str(args.rounds), "--seed", str(args.seed), "--out", str(out), *extra]
    if args.base_model:
        cmd += ["--base-model", args.base_model]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    from safetensors.numpy import load_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo:clinical_triage")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default="")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "secure_agg")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plain_dir, secure_dir = args.out / f"plain-{stamp}", args.out / f"secure-{stamp}"
    wall = {"plain": simulate(plain_dir, args), "secure": simulate(secure_dir, args, "--secure-agg")}

    def lines(run: Path) -> list[dict]:  # type: ignore[type-arg]
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    plain, secure = lines(plain_dir), lines(secure_dir)
    clipping = json.loads((secure_dir / "summary.json").read_text())["secure_aggregation"]["clipping_range"]
    print(f"{args.sites} sites, {args.rounds} rounds, data {args.data}; clipping range +-{clipping:g}")
    print(f"{'round':>5} {'max|v| plain':>12} {'max|v| secure':>13} {'max diff':>9} {'bound':>9} {'acc plain':>9} {'acc secure':>10} "
          f"{'kB up/site plain':>16} {'kB up/site secure':>17} {'s plain':>7} {'s secure':>8} {'refused':>7}")
    rows = []
    for p, s in zip(plain, secure, strict=True):
        a = load_file(str(plain_dir / "checkpoints" / f"round-{p['round']}" / "adapter_model.safetensors"))
        b = load_file(str(secure_dir / "checkpoints" / f"round-{s['round']}" / "adapter_model.safetensors"))
        row = {
            "round": p["round"],
            "max_abs_plain": max(float(abs(v).max()) for v in a.values()),
            "max_abs_secure": max(float(abs(v).max()) for v in b.values()),
            "max_diff": max(float(abs(a[k] - b[k]).max()) for k in a),
            "bound": s["secure_agg"]["quantization_error_bound"],
            "acc_plain": p["test_accuracy"], "acc_secure": s["test_accuracy"],
            "up_plain_kb": p["bytes_up"] / max(1, p["sites_replied"]) / 1e3,
            "up_secure_kb": s["bytes_up"] / max(1, s["sites_replied"]) / 1e3,
            "seconds_plain": p["seconds"], "seconds_secure": s["seconds"],
            "refused": len(s["sites_rejected"]),
        }
        rows.append(row)
        print(f"{row['round']:>5} {row['max_abs_plain']:>12.4f} {row['max_abs_secure']:>13.4f} {row['max_diff']:>9.2e} {row['bound']:>9.1e} "
              f"{row['acc_plain']:>9.3f} {row['acc_secure']:>10.3f} {row['up_plain_kb']:>16.1f} {row['up_secure_kb']:>17.1f} "
              f"{row['seconds_plain']:>7.1f} {row['seconds_secure']:>8.1f} {row['refused']:>7}")
    print(f"wall time: plain {wall['plain']:.0f}s, secure {wall['secure']:.0f}s")
    (args.out / f"results-{stamp}.json").write_text(json.dumps({"rows": rows, "wall": wall}, indent=1))


if __name__ == "__main__":
    main()

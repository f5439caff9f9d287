"""DP overhead and wire size: prints figures, asserts nothing.

    python benchmarks/dp_overhead.py [--base-model DIR] [--examples 384] [--steps 8] [--batch 64]

1. Local training throughput and peak memory with DP-SGD (Opacus: per-example gradients,
   clipping, noise) vs plain training: same model, data, Poisson batches and physical batch size.
   Each mode runs in its own process, so peak RSS is that mode's alone.
2. Bytes one site sends per round (the serialized Flower ArrayRecord) vs the raw adapter
   tensors, and vs exchanging the full model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _worker(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    import torch

    from fedtune.client.train import DPSettings, StepPlan, train_local
    from fedtune.common.config import LoraSettings, ModelConfig, TrainConfig
    from fedtune.common.data import label_set, load_table
    from fedtune.common.model import build_model, load_tokenizer
    from fedtune.common.sitedata import demo_data_path
    from fedtune.common.tasks import encode

    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(base_model=args.base_model or "", max_length=64)
    table = load_table(demo_data_path())
    labels = label_set(table.labels)
    data = encode(load_tokenizer(model_cfg), table.texts[: args.examples], table.labels[: args.examples], labels, max_length=64)
    model = build_model(model_cfg, LoraSettings(), len(labels)).model
    train = TrainConfig(batch_size=args.batch, physical_batch_size=32, learning_rate=1e-2)
    dp = DPSettings(noise_multiplier=1.0, clip_norm=1.0) if args.worker == "dp" else None
    q = args.batch / len(data)
    train_local(model, data, train=train, plan=StepPlan(sample_rate=q, steps=1), dp=dp, seed=0)  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = train_local(model, data, train=train, plan=StepPlan(sample_rate=q, steps=args.steps), dp=dp, seed=1)
    seconds = time.perf_counter() - start
    return {
        "mode": args.worker,
        "examples_per_s": result.examples_seen / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
    }


def _bytes(base_model: str | None) -> dict:  # type: ignore[type-arg]
    from flwr.app import ArrayRecord

    from fedtune.common.config import LoraSettings, ModelConfig
    from fedtune.common.model import adapter_state, build_model
    from fedtune.server.screening import arrays_nbytes

    model = build_model(ModelConfig(base_model=base_model or ""), LoraSettings(), 5).model
    state = adapter_state(model)
    raw = sum(t.numel() * t.element_size() for t in state.values())
    wire = arrays_nbytes(ArrayRecord(state))
    base = model.get_base_model()
    full = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    return {"adapter_raw_bytes": raw, "wire_bytes": wire, "full_model_bytes": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    rows = []
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--worker", mode, "--examples", str(args.examples), "--steps", str(args.steps),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        if args.base_model:
            cmd += ["--base-model", args.base_model]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain, dp = rows
    print(f"local training, {args.steps} logical steps of expected batch {args.batch}, physical batch 32, {args.threads} thread(s)")
    print(f"{'mode':<6} {'examples/s':>11} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['mode']:<6} {r['examples_per_s']:>11.1f} {r['peak_rss_mb']:>12.0f}")
    print(f"DP throughput / plain: {dp['examples_per_s'] / plain['examples_per_s']:.2f}x   "
          f"DP peak memory / plain: {dp['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x")
    b = _bytes(args.base_model)
    print(f"adapter raw {b['adapter_raw_bytes']:,} B; sent per site per round {b['wire_bytes']:,} B "
          f"({b['wire_bytes'] / b['adapter_raw_bytes']:.3f}x raw); full model {b['full_model_bytes']:,} B "
          f"(adapter is {b['wire_bytes'] / b['full_model_bytes']:.2%} of it, {b['full_model_bytes'] / b['wire_bytes']:.0f}x less)")


if __name__ == "__main__":
    main()

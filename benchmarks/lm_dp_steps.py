"""How fast one site's causal-LM adapter learns under DP-SGD, step by step. Prints figures, asserts nothing.

    python benchmarks/lm_dp_steps.py [--data CSV] [--rows 0] [--train-rows 180] [--test 16] [--generate 8]
        [--steps 27] [--chunks 3] [--batch 16] [--rank 4] [--alpha 2] [--top-layers 6] [--targets q_proj,v_proj]
        [--ffa] [--learning-rate 0.05] [--clip-norm 0.01] [--epsilon 8 | --no-dp] [--max-length 112]

A tuning probe for the generative demo (simulations/scenarios/clinical-summaries.toml), cheaper than a
federated run: one site, the default causal-LM base (SmolLM2-135M-Instruct) with LoRA, the real local
training (``client.train.train_local``: Poisson sampling and Opacus DP-SGD over per-example
response-token losses) with the noise calibrated to --epsilon (delta 1e-5) over all --steps. The steps
run in --chunks calls, as a site runs rounds (a fresh AdamW each), and after each the held-out
perplexity, ROUGE-L of greedy answers to the first --generate test prompts, one answer and the CPU
seconds are printed. The first --rows rows of --data (0: all) are shuffled with seed 0; the first
--test are held out. --data defaults to the
packaged demo set (common/demo_data/clinical_summaries.csv); `python common/demo_data/generate.py
--scale 5 --out-dir DIR` writes five times as many rows of the same kind.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent / "common" / "demo_data" / "clinical_summaries.csv")
    parser.add_argument("--rows", type=int, default=0, help="use the first N rows of --data (0: all)")
    parser.add_argument("--train-rows", type=int, default=180)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--generate", type=int, default=8)
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--top-layers", type=int, default=6)
    parser.add_argument("--targets", default="", help="LoRA target modules, comma-separated (default: inferred, q and v)")
    parser.add_argument("--ffa", action="store_true", help="freeze LoRA A (FFA-LoRA)")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--clip-norm", type=float, default=0.01)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--max-length", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from fedtune.client.train import DPSettings, StepPlan, train_local
    from fedtune.common.accounting import calibrate_noise_multiplier
    from fedtune.common.base_models import default_causal_lm
    from fedtune.common.causal_lm import build_causal_lm, encode_lm, evaluate_lm, generate, lm_loss, load_lm_table, load_lm_tokenizer
    from fedtune.common.config import LoraSettings, TrainConfig
    from fedtune.common.lm_site import prompt_texts, subset
    from fedtune.common.rouge import mean_rouge_l

    torch.set_num_threads(args.threads)
    path = default_causal_lm()
    tokenizer = load_lm_tokenizer(path)
    table = load_lm_table(args.data)
    if args.rows:
        table = subset(table, range(min(args.rows, len(table))), f"the first {args.rows} rows")
    order = list(range(len(table)))
    random.Random(0).shuffle(order)
    test = subset(table, order[: args.test], "test rows")
    train = subset(table, order[args.test : args.test + args.train_rows], "training rows")
    lora = LoraSettings(rank=args.rank, alpha=args.alpha, top_layers=args.top_layers)
    targets = tuple(args.targets.split(",")) if args.targets else None
    model = build_causal_lm(path, lora, target_modules=targets, ffa=args.ffa).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = encode_lm(tokenizer, train, max_length=args.max_length).dataset
    test_set = encode_lm(tokenizer, test, max_length=args.max_length).dataset
    q = min(1.0, args.batch / len(train_set))
    z = None if args.no_dp else calibrate_noise_multiplier(target_epsilon=args.epsilon, delta=1e-5, sample_rate=q, steps=args.steps)
    prompts = prompt_texts(subset(test, range(args.generate), "generation prompts"))
    references = [conv[-1].content for conv in test.conversations[: args.generate]]
    print(f"{len(train_set)} training rows, q {q:.3f}, {trainable:,} trainable coordinates, "
          f"{'no DP' if z is None else f'z {z:.3f} (epsilon {args.epsilon:g} over {args.steps} steps)'}, C {args.clip_norm:g}")

    def evaluate(tag: str) -> None:
        start = time.process_time()
        perplexity = evaluate_lm(model, test_set).perplexity
        answers = generate(model, tokenizer, prompts, max_new_tokens=48)
        print(f"{tag:>10}  perplexity {perplexity:7.2f}  ROUGE-L {mean_rouge_l(answers, references):.3f}  "
              f"eval {time.process_time() - start:.0f} CPU-s  | {answers[0]!r}", flush=True)

    print(f"{'':>10}  reference: {references[0]!r}")
    evaluate("base")
    per_chunk = max(1, args.steps // args.chunks)
    for chunk in range(args.chunks):
        config = TrainConfig(batch_size=args.batch, physical_batch_size=8, local_epochs=per_chunk * q, learning_rate=args.learning_rate)
        start = time.process_time()
        result = train_local(model, train_set, train=config, plan=StepPlan(sample_rate=q, steps=per_chunk),
                             dp=None if z is None else DPSettings(noise_multiplier=z, clip_norm=args.clip_norm),
                             seed=chunk, learning_rate=args.learning_rate, loss_fn=lm_loss)
        print(f"{'':>10}  {result.steps} steps, training loss {result.loss:.3f}, clipped {result.clipped_fraction:.2f}, "
              f"{time.process_time() - start:.0f} CPU-s", flush=True)
        evaluate(f"step {(chunk + 1) * per_chunk}")


if __name__ == "__main__":
    main()

"""The coordinator's Flower ServerApp: federated DP-LoRA rounds and the run directory they leave."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedtune.common.config import RunConfig, dump_toml, from_flat
from fedtune.common.errors import ConfigError
from fedtune.common.io import check_writable
from fedtune.common.messages import RoundInstructions
from fedtune.common.model import adapter_state, base_model_id, build_run_model, load_adapter_state, resolve_base_model, save_adapter
from fedtune.common.lm_site import resolve_lm_data_path
from fedtune.common.sitedata import load_config_table, resolve_data_path, run_labels, simulated_split
from fedtune.common.tasks import encode, evaluate

from .client_dp import ClientLevelDP
from .client_dp_plan import ClientLevelPlan, client_level_epsilon, connected_sites, plan_client_level
from .eval_schedule import EvalSchedule, scheduled_test
from .records import RunRecorder
from .robust import robust_strategy
from .resume import (
    INIT_TEST_KEY,
    RoundState,
    begin_run,
    checkpoint_arrays,
    checkpoint_files,
    restore_strategy,
    restored_sites,
    resumed_client_plan,
    resumed_init_adapter,
    resumed_init_score,
    strategy_parts,
    write_identity,
    write_manifest,
)
from .rounds import FailureRule, RoundTotals, TestScore, checkpoint_dir, missed_rounds, run_rounds
from .server_opt import server_optimizer

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from fedtune.common.init_adapter import EarlierAdapter

logger = logging.getLogger(__name__)


def make_strategy(run: RunConfig, client_plan: ClientLevelPlan | None = None) -> Strategy:
    """FedAvg weighted by examples (McMahan et al. 2017), or DP-FedAvg with Poisson sampling when client-level DP is planned,
    inside the server optimiser `federation.server_opt` names (none for plain FedAvg)."""
    fed = run.federation
    strategy: Strategy = FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_sites,
    )
    # A robust rule (median, trimmed mean, (multi-)Krum) replaces FedAvg's mean; refused with client-level DP.
    strategy = robust_strategy(strategy, run)
    if client_plan is not None:
        # FedAvg stays for evaluation only: ClientLevelDP samples and aggregates the training rounds.
        # Simulations are reproducible (seeded sampling); deployed runs sample from the OS's CSPRNG.
        strategy = ClientLevelDP.from_plan(strategy, client_plan, seed=run.seed if run.simulation else None)
    # Outermost: the server optimiser steps from whatever the round released (a DP release stays DP:
    # post-processing); under secure aggregation rounds.py hands it the SecAgg+ mean instead.
    return server_optimizer(strategy, name=fed.server_opt, lr=fed.server_lr, momentum=fed.server_momentum)


def client_dp_plan(run: RunConfig, grid: Grid | None = None) -> ClientLevelPlan:
    """Client-level DP's mechanism and guarantee for the planned rounds, over the N sites actually there.

    N is `federation.sites` in simulation (the engine starts exactly that many sites). In
    deployment it is the number of nodes the grid reports connected, waited for up to
    `federation.round_timeout` seconds and refused (ConfigError naming both numbers) unless it
    equals `federation.sites`: the run was planned for that federation, and another one stops the
    run before round 1 rather than changing its guarantee silently.
    """
    fed, cdp = run.federation, run.client_dp
    if run.simulation:
        sites, source = fed.sites, "federation.sites (simulation: the engine starts that many sites)"
    else:
        if grid is None:
            raise ConfigError("client-level DP in deployment needs the grid to count the connected sites (N); none was given.")
        sites = connected_sites(grid, planned=fed.sites, timeout=fed.round_timeout)
        source = "nodes connected to the SuperLink before round 1 (grid.get_node_ids), equal to federation.sites"
    return plan_client_level(
        sites=sites, sites_source=source, fraction_train=fed.fraction_train, min_sites=fed.min_sites, rounds=fed.rounds,
        clip_norm=cdp.clip_norm, noise_multiplier=cdp.noise_multiplier, target_epsilon=cdp.target_epsilon, delta=cdp.delta,
        accountant=run.privacy.accountant,
    )


def _describe_privacy(run: RunConfig) -> str:
    p = run.privacy
    text = f"sample-level DP at each site (target epsilon {p.target_epsilon:g}, delta {p.delta:g})" if p.enabled else "NO sample-level differential privacy"
    text += ", client-level DP (DP-FedAvg)" if run.client_dp.enabled else ""
    return text + (", secure aggregation (SecAgg+)" if run.secure_agg.enabled else "")


def resolve_run_dir(run: RunConfig, run_id: int) -> Path:
    return Path(run.out or f"runs/run-{run_id}").resolve()


def run_server(grid: Grid, run: RunConfig, *, run_id: int, earlier: EarlierAdapter | None = None) -> Path:
    """Run every round of a federated run, or the rounds left of a resumed one; returns the run directory.

    The run directory must take a durable write before anything starts (a ConfigError names it).
    A directory that holds a run is continued only on a `--resume` request (`server/resume.py`):
    from its last complete checkpoint, under the run's first identity, with its label set.
    ``earlier``: ``model.init_adapter`` as the caller already read it (``fedtune simulate``'s
    preflight), so the folder is read once; None: read here when the run needs it (deployment).
    """
    started = time.perf_counter()
    run_dir = resolve_run_dir(run, run_id)
    check_writable(run_dir, what="run directory (out)")
    identity, resume = begin_run(run_dir, run, flower_run_id=run_id)
    dump_toml(run, run_dir / "config.toml")
    last = resume.checkpoint if resume else None

    table = load_config_table(run.data) if run.simulation and not run.causal_lm else None
    labels = run_labels(run.data, table) if not run.causal_lm and (run.simulation or run.data.labels) else []
    if not labels and not run.causal_lm:  # a causal LM has no label set
        raise ConfigError("data.labels is empty: a deployed run needs its label set (fedtune run --labels L1,L2,...).")
    # Resumed: the initial adapter as the checkpoint records it (its arrays are the checkpoint's); the earlier
    # folder is read only for a fresh start, or for a checkpoint written before fedtune recorded it.
    init = resumed_init_adapter(last, run) if last is not None else None
    earlier = _earlier_adapter(run, run_dir, resumed=last is not None, read=earlier) if init is None else None
    if init is not None and not run.causal_lm:
        from fedtune.common.init_adapter import labels_after

        labels = labels_after(init.earlier_labels, labels, explicit=bool(run.data.labels), where="model.init_adapter, as the run's checkpoint records it")
    elif earlier is not None and not run.causal_lm:  # its labels keep their indexes; new ones follow
        from fedtune.common.init_adapter import labels_with_earlier

        labels = labels_with_earlier(earlier, labels, explicit=bool(run.data.labels))
    if last is not None and tuple(labels) != last.state.labels:
        raise ConfigError(f"the resumed run's labels {labels} are not the checkpoint's {list(last.state.labels)} "
                          f"({last.folder}): the data or data.labels changed since the run started.")
    # Under FFA-LoRA the initial arrays, the screened updates and the aggregate are B and the head
    # only; the checkpoints and the final adapter still hold A (this model's, derived from the seed
    # as every site derives it), so they load with plain PEFT.
    bundle = build_run_model(run, len(labels))
    model = bundle.model
    if earlier is not None:  # checked and loaded before any site is asked anything
        from fedtune.common.init_adapter import load_initial_adapter

        init = load_initial_adapter(earlier, bundle, run, labels)
    initial = ArrayRecord(adapter_state(model))
    if last is not None:
        initial = checkpoint_arrays(last, adapter_state(model))

    test_fn = score = None
    lm_test = None
    if run.causal_lm and (run.simulation or run.data.path):  # deployed: the coordinator's own held-out file, if named
        from fedtune.common.causal_lm import evaluate_lm

        from .lm_eval import lm_test_set

        lm_test = lm_test_set(run)
        test_set = lm_test.encoded.dataset

        def score(arrays: ArrayRecord, dataset: TensorDataset) -> TestScore:
            load_adapter_state(model, arrays.to_torch_state_dict())
            res = evaluate_lm(model, dataset)
            return TestScore(accuracy=None, macro_f1=None, loss=res.loss, perplexity=res.perplexity, examples=len(dataset))

    elif table is not None:
        from fedtune.common.model import load_tokenizer

        split = simulated_split(table, run.data, num_sites=run.federation.sites, seed=run.seed)
        test_set = encode(
            load_tokenizer(run.model),
            [table.texts[i] for i in split.test],
            [table.labels[i] for i in split.test],
            labels,
            max_length=run.max_length,
        )

        def score(arrays: ArrayRecord, dataset: TensorDataset) -> TestScore:
            load_adapter_state(model, arrays.to_torch_state_dict())
            res = evaluate(model, dataset, len(labels))
            return TestScore(accuracy=res.accuracy, macro_f1=res.macro_f1, loss=res.loss, examples=len(dataset))

    metadata: dict[str, Any] = {"task": run.task, "labels": labels, "max_length": run.max_length,
                                "base_model": str(resolve_base_model(run.model, run.task)),
                                # What a later run started from this adapter checks it against, and its lineage.
                                "run_id": identity.run_id, "simulation": run.simulation, "aggregation": run.federation.aggregation,
                                "seed": run.seed, "lineage": [e.to_json() for e in init.lineage] if init else [],
                                **({"init_adapter": init.to_json()} if init else {})}  # what a resume takes, not the folder
    if run.causal_lm:
        metadata["template"] = run.data.template  # how `fedtune generate` renders a prompt, as training did

    # Calibrated once, for the sites actually connected: the same plan drives the strategy and is recorded in the summary.
    # A resumed run keeps its plan (the rounds already released were drawn with its z).
    client_plan = resumed_client_plan(last, run) if last is not None else None
    if client_plan is None and run.client_dp.enabled:
        client_plan = client_dp_plan(run, grid)
    schedule = None
    if score is not None:  # evaluation.every / evaluation.sample: the test's share of a round, at many sites
        schedule = EvalSchedule(settings=run.evaluation, test_size=len(test_set), num_rounds=run.federation.rounds, seed=run.seed)
        test_fn = scheduled_test(score, test_set, schedule)
    strategy = make_strategy(run, client_plan)
    optimizer, client_dp = strategy_parts(strategy)
    if last is not None:
        restore_strategy(strategy, last, {k: v.numpy() for k, v in initial.items()})
    recorder = RunRecorder(run_dir)
    recorder.restore(resume.metrics.lines if resume else [], restored_sites(last))
    totals = RoundTotals(bytes_up=last.state.bytes_up, bytes_down=last.state.bytes_down) if last else RoundTotals()
    seconds_before = last.state.seconds if last else 0.0

    def max_epsilon() -> float | None:
        return max((s.epsilon for s in recorder.sites.values()), default=0.0) if run.privacy.enabled else None

    # The initial adapter's score on the held-out test set, before any training: the earlier adapter's. Measured once,
    # by the first session, and kept in every checkpoint: a resumed run's arrays are no longer the initial adapter.
    if last is not None:
        init_score = resumed_init_score(last) if init is not None else None
    else:
        init_score = test_fn(initial) if init is not None and test_fn is not None else None
    if init_score is not None:
        metadata[INIT_TEST_KEY] = dataclasses.asdict(init_score)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        # Everything a resume needs goes into the checkpoint's folder; complete.json, written last, makes it count.
        state = RoundState(
            round=server_round, run_id=identity.run_id, labels=tuple(labels), line=recorder.rounds[-1],
            sites={name: record.to_state() for name, record in sorted(recorder.sites.items())},
            bytes_up=totals.bytes_up, bytes_down=totals.bytes_down,
            seconds=round(seconds_before + time.perf_counter() - started, 3),
            optimizer_steps=optimizer.state.steps if optimizer else None,
            client_dp=client_dp.state().to_json() if client_dp else None,
            client_plan=dataclasses.asdict(client_plan) if client_plan else None,
        )
        folder = checkpoint_dir(run_dir, server_round)
        load_adapter_state(model, arrays.to_torch_state_dict())
        save_adapter(model, folder, metadata={**metadata, "round": server_round, "epsilon": max_epsilon()},
                     extra_files=checkpoint_files(state, optimizer.state if optimizer else None))
        write_manifest(folder, server_round=server_round, run_id=identity.run_id)

    instructions = RoundInstructions(
        server_round=1, num_rounds=run.federation.rounds, labels=tuple(labels), run_dir=str(run_dir), base_model_id=base_model_id(run.model, run.task),
        run_id=identity.run_id,
    )
    if resume is None:
        write_identity(run_dir, identity)  # before any site is asked anything: its charges go under this id
    first = resume.next_round if resume else 1
    print(f"fedtune: {run.federation.rounds} rounds, {_describe_privacy(run)}, "
          f"{'task causal-lm' if run.causal_lm else f'labels {labels}'}, run dir {run_dir}"
          + (f"; resuming run {identity.run_id} at round {first}" if resume else "")
          + (f"; starting from {init.folder}" + (f" (head grown for {list(init.labels_added)})" if init.labels_added else "")
             + (f", its test accuracy {init_score.accuracy:.4f}" if init_score and init_score.accuracy is not None else "") if init else ""),
          flush=True)
    final, totals = run_rounds(
        grid,
        strategy,
        initial=initial,
        start_round=first,
        totals=totals,
        num_rounds=run.federation.rounds,
        instructions=instructions,
        timeout=run.federation.round_timeout,
        recorder=recorder,
        checkpoint=checkpoint,
        test_fn=test_fn,
        secure=run.secure_agg,
        validate=run.federation.fraction_evaluate > 0,
        echo=lambda line: print(line, flush=True),
        max_update_norm=run.federation.max_update_norm,
        # Too few usable updates fail the round, except under client-level DP: DP-FedAvg releases a
        # noised adapter even for a round nobody took part in, or an unchanged one would tell.
        failure=FailureRule(min_sites=0 if client_plan is not None else run.federation.min_sites,
                            resume_command=f"fedtune {'simulate' if run.simulation else 'run'} --resume {run_dir}"),
        warm_up=run.federation.sites if run.simulation else 0,
        # Without DP-SGD the sites' epsilon is that of the DP-released validation statistics only:
        # the plain label would read as a guarantee on training.
        epsilon_label="max-epsilon" if run.privacy.enabled else "stats-epsilon",
    )
    load_adapter_state(model, final.to_torch_state_dict())
    save_adapter(model, run_dir / "adapter", metadata={**metadata, "round": run.federation.rounds, "epsilon": max_epsilon()})
    base_score = generations = None
    if lm_test is not None:  # the base model's fit, and what each model writes, on held-out prompts
        from .lm_eval import evaluate_base, score_generations

        base_score = evaluate_base(model, lm_test)
        generations = score_generations(model, lm_test, run_dir)
    if client_plan is not None and client_dp is not None and client_dp.state().rounds != client_plan.rounds:
        # Every release counts: the guarantee is stated for the rounds actually released.
        released = client_dp.state().rounds
        logger.warning("client-level DP released %d rounds, planned %d: the summary accounts %d", released, client_plan.rounds, released)
        client_plan = dataclasses.replace(client_plan, rounds=released, epsilon=client_level_epsilon(
            sample_rate=client_plan.sample_rate, noise_multiplier=client_plan.noise_multiplier, rounds=released,
            delta=client_plan.delta, accountant=client_plan.accountant))
    last_line = recorder.rounds[-1] if recorder.rounds else {}
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_state(model).values())
    # The frozen base model alone: neither the LoRA matrices nor PEFT's trainable copy of the head.
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    summary: dict[str, Any] = {
        "rounds": run.federation.rounds,
        "base_model": str(resolve_base_model(run.model, run.task)),
        "task": "causal-lm" if run.causal_lm else "sequence-classification",
        "labels": labels,
        "data": str(resolve_lm_data_path(run.data) if run.causal_lm else resolve_data_path(run.data)) if run.simulation else None,
        "dp": run.privacy.enabled,
        "privacy": (
            {"level": "sample-level DP-SGD at each site", "target_epsilon": run.privacy.target_epsilon, "delta": run.privacy.delta, "accountant": run.privacy.accountant}
            if run.privacy.enabled
            else {"level": "NONE: trained without differential privacy"}
        ),
        "client_level": client_plan.to_dict() if client_plan else None,
        "secure_aggregation": (
            {"protocol": "SecAgg+ (Flower)", "clipping_range": run.secure_agg.clipping_range, "max_weight": run.secure_agg.max_weight,
             "threshold": "a strict majority of the sampled sites (at least 2)"}
            if run.secure_agg.enabled else None
        ),
        "max_epsilon": max_epsilon(),
        "test": ({"loss": last_line.get("test_loss"), "perplexity": last_line.get("test_perplexity"),
                  "rouge_l": generations.tuned_rouge_l if generations else None,
                  "rouge_l_examples": generations.examples if generations else None} if run.causal_lm else
                 {"accuracy": last_line.get("test_accuracy"), "macro_f1": last_line.get("test_macro_f1")}) if test_fn else None,
        **({"base": {"loss": base_score.loss, "perplexity": base_score.perplexity,
                     "rouge_l": generations.base_rouge_l if generations else None} if base_score else None} if run.causal_lm else {}),
        # Federated validation of the final adapter on the sites' validation splits.
        "validation": totals.final_validation,
        # Which rounds were tested, and on how many held-out examples: a sampled figure says so here.
        "evaluation": schedule.describe() if schedule else None,
        "bytes_up": totals.bytes_up,
        "bytes_down": totals.bytes_down,
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": base_params * 4,
        # Over every session of the run (a crash's lost round and the time until the resume excluded).
        "seconds": round(seconds_before + time.perf_counter() - started, 2),
        # One record per resume after a crash: the checkpoint continued from and the round redone. A site that
        # trained in the lost round was charged for it: its epsilon above includes that round.
        "resumes": list(identity.resumes),
        # Sites that missed rounds and why; one that crashed or timed out may have spent budget that no
        # reply reported (its own ledger is the record).
        "missed_rounds": missed_rounds(recorder.rounds),
        # The earlier adapter this run started from (model.init_adapter) and its score before training, and the
        # runs this adapter descends from (each site's epsilon above already counts theirs: a site's ledger is lifetime).
        "init_adapter": {"folder": str(init.folder), "digest": init.digest, "labels_added": list(init.labels_added),
                         "test": dataclasses.asdict(init_score) if init_score else None} if init else None,
        "lineage": metadata["lineage"],
    }
    recorder.write_summary(summary)
    recorder.plot(dp=run.privacy.enabled, final_validation=totals.final_validation,
                  base_perplexity=base_score.perplexity if base_score else None)
    from .report import write_model_card, write_privacy_report

    write_privacy_report(run_dir)
    write_model_card(run_dir)  # the adapter folder says what it is and what privacy it carries
    print(f"fedtune: done in {summary['seconds']:.0f}s; adapter in {run_dir / 'adapter'}", flush=True)
    return run_dir


def _earlier_adapter(run: RunConfig, run_dir: Path, *, resumed: bool, read: EarlierAdapter | None = None) -> EarlierAdapter | None:
    """The earlier adapter ``model.init_adapter`` names (None: a fresh start), read before anything starts.

    ``read``: the folder as the caller already read it (the simulation's preflight); it is not read
    again, and it is checked here as a folder read here would be. A simulation from an earlier
    simulation must have its sites' ledgers continued first (``fedtune simulate`` does it): the
    coordinator refuses to start one whose sites would count from zero.
    """
    if not run.model.init_adapter:
        if read is not None:
            raise ValueError(f"an earlier adapter ({read.folder}) was given for a run without model.init_adapter.")
        return None
    from fedtune.common.init_adapter import CONTINUED_LEDGERS_FILE, read_earlier_adapter

    if read is not None and read.folder != Path(run.model.init_adapter).expanduser().resolve():
        raise ValueError(f"the earlier adapter given ({read.folder}) is not this run's model.init_adapter ({run.model.init_adapter}).")
    earlier = read if read is not None else read_earlier_adapter(run.model.init_adapter)
    if run.simulation and earlier.simulated and not resumed and not (run_dir / CONTINUED_LEDGERS_FILE).is_file():
        raise ConfigError(f"model.init_adapter {earlier.folder} comes from a simulation whose sites' ledgers this run's simulated "
                          f"sites must continue; start it with `fedtune simulate` (which does that and writes "
                          f"{CONTINUED_LEDGERS_FILE}), not with flwr run.")
    return earlier


def build_server_app(run_config: dict[str, Any] | None = None, *, earlier: EarlierAdapter | None = None) -> ServerApp:
    """The ServerApp; ``run_config`` (flat) is injected when the runtime passes none (``fedtune simulate``).

    ``earlier``: ``model.init_adapter`` as ``fedtune simulate``'s preflight read it (the engine runs
    this app in the same process), so the coordinator does not read the folder a second time.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if run_config:
            context.run_config.update(run_config)
        run_server(grid, from_flat(dict(context.run_config)), run_id=context.run_id, earlier=earlier)

    return server_app


app = build_server_app()

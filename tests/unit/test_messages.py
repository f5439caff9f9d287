"""The site/coordinator contract: every reply parses back to what was sent, and nothing undeclared passes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.common.errors import UpdateError
from fedtune.common.messages import (
    EvaluateReply,
    PrivacyParams,
    Refusal,
    RefusalCode,
    RoundInstructions,
    TrainingStats,
    TrainReply,
    ValidationStats,
    check_outgoing_metrics,
    round_significant,
)

finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def train_replies(draw) -> TrainReply:  # type: ignore[no-untyped-def]
    privacy = PrivacyParams(dp=draw(st.booleans()), epsilon=draw(finite), budget_epsilon=draw(finite), delta=draw(finite),
                            noise_multiplier=draw(finite), clip_norm=draw(finite), sample_rate=draw(finite), steps=draw(st.integers(1, 10**6)))
    mode = draw(st.sampled_from(["dp", "clear"]))
    validation = draw(st.none() | st.builds(
        ValidationStats, mode=st.just(mode), examples=finite, loss=finite, accuracy=finite,
        macro_f1=st.just(None) if mode == "dp" else finite, noise_std=finite, epsilon=finite))
    training = draw(st.none() | st.builds(TrainingStats, loss=finite, clipped_fraction=finite, seconds=finite))
    return TrainReply(site="s", weight=draw(st.integers(1, 10**9)), privacy=privacy, validation=validation, training=training)


@given(train_replies())
def test_train_reply_round_trips_through_its_wire_form(reply: TrainReply) -> None:
    assert TrainReply.from_metrics("s", reply.to_metrics()) == reply


def _minimal() -> dict[str, int | float]:
    privacy = PrivacyParams(dp=True, epsilon=1.0, budget_epsilon=8.0, delta=1e-5, noise_multiplier=1.0, clip_norm=1.0,
                            sample_rate=0.1, steps=5)
    return TrainReply(site="s", weight=100, privacy=privacy).to_metrics()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"val-labels": 3.0}, "undeclared keys ['val-labels']"),
        ({"val-accuracy": 0.5}, "validation statistics without val-mode"),
        ({"train-loss": 0.5}, "training statistics must come together"),
        ({"num-examples": 0}, "num-examples must be a positive integer"),
        ({"epsilon": float("nan")}, "'epsilon' is nan"),
        ({"val-mode": 1, "val-examples": 1.0, "val-loss": 1.0, "val-accuracy": 1.0, "val-noise-std": 1.0, "val-epsilon": 1.0,
          "val-macro-f1": 0.5}, "val-macro-f1 is released only in clear mode"),
    ],
)
def test_a_reply_outside_the_declared_message_is_refused_at_both_ends(change: dict, message: str) -> None:  # type: ignore[type-arg]
    metrics = {**_minimal(), **change}
    with pytest.raises(UpdateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_outgoing_metrics("train", metrics)
    with pytest.raises(UpdateError):
        TrainReply.from_metrics("s", metrics)


def test_an_evaluate_reply_must_carry_validation_statistics() -> None:
    with pytest.raises(UpdateError, match="no validation statistics"):
        EvaluateReply.from_metrics("s", {})
    stats = ValidationStats(mode="dp", examples=21.3, loss=1.2, accuracy=0.4, noise_std=3.4, epsilon=0.7)
    assert EvaluateReply.from_metrics("s", EvaluateReply(site="s", validation=stats).to_metrics()).validation == stats


def test_refusals_parse_back_and_foreign_errors_do_not() -> None:
    for code in RefusalCode:
        assert Refusal.parse(Refusal(site="hospital-a", code=code).reason()) == Refusal(site="hospital-a", code=code)
    assert Refusal.parse("Traceback (most recent call last): ...") is None


def test_round_instructions_round_trip_and_name_what_is_missing() -> None:
    instructions = RoundInstructions(server_round=2, num_rounds=3, labels=("a", "b"), run_dir="/r", base_model_id="x", validate_first=True)
    assert RoundInstructions.from_config(instructions.to_config()) == instructions
    with pytest.raises(UpdateError, match="lacks 'labels'"):
        RoundInstructions.from_config({"server-round": 1, "num-rounds": 1})
    with pytest.raises(UpdateError, match="server-round 4 outside 1..num-rounds 3"):
        RoundInstructions.from_config({**instructions.to_config(), "server-round": 4})


@pytest.mark.parametrize(("x", "rounded"), [(0, 0), (7, 7), (37, 37), (360, 360), (1234, 1200), (98765, 99000), (0.17777, 0.18)])
def test_counts_leave_at_two_significant_digits(x: float, rounded: float) -> None:
    assert round_significant(x) == pytest.approx(rounded)

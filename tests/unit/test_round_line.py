"""The per-round console line: what its epsilon is of."""

from __future__ import annotations

from fedtune.server.rounds import _round_line

LINE = {"round": 2, "sites_replied": 3, "sites_sampled": 3, "sites_missing": [], "train_loss": None, "accuracy": 0.8,
        "loss": 0.5, "validated_round": 1, "test_accuracy": 0.75, "max_epsilon": 2.1734, "bytes_up": 321_000,
        "bytes_down": 330_000, "seconds": 12.34}


def test_a_dp_run_shows_its_max_epsilon() -> None:
    text = _round_line(LINE, 5)

    assert text.startswith("round 2/5  sites 3/3")
    assert "max-epsilon 2.17" in text
    assert "test-accuracy 0.750" in text


def test_a_run_without_dp_sgd_labels_the_epsilon_as_the_statistics_release() -> None:
    text = _round_line(LINE, 5, "stats-epsilon")

    assert "stats-epsilon 2.17" in text
    assert "max-epsilon" not in text

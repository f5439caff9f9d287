"""The site policy: every check refuses with its code, and names the setting, the limit and the value asked."""

from __future__ import annotations

import pytest

from fedtune.client.policy import SitePolicy, policy_from_mapping
from fedtune.common.errors import PolicyRefusal

RUN = {"dp": True, "target_epsilon": 4.0, "clip_norm": 1.0, "steps": 10, "sample_rate": 0.1}


def test_a_run_within_the_policy_passes() -> None:
    SitePolicy().check_run(**RUN)
    SitePolicy().check_noise(0.5)
    SitePolicy().check_secure_round(threshold=2, participants=3)
    SitePolicy().check_plain_train()


@pytest.mark.parametrize(
    ("policy", "asked", "code", "words"),
    [
        (SitePolicy(max_epsilon_per_run=2.0), {"target_epsilon": 4.0}, "policy:max-epsilon", ["privacy.target_epsilon is 4", "at most 2"]),
        (SitePolicy(max_clip_norm=0.5), {"clip_norm": 1.0}, "policy:max-clip-norm", ["privacy.clip_norm is 1", "at most 0.5"]),
        (SitePolicy(max_sample_rate=0.9), {"sample_rate": 1.0}, "policy:max-sample-rate", ["is 1", "at most 0.9"]),
        (SitePolicy(max_steps_per_round=5), {"steps": 10}, "policy:max-steps", ["is 10", "at most 5"]),
        (SitePolicy(min_steps_per_round=20), {"steps": 10}, "policy:min-steps", ["is 10", ">= 20"]),
        (SitePolicy(), {"dp": False}, "policy:require-dp", ["privacy.enabled is false"]),
    ],
)
def test_each_limit_refuses_with_its_code(policy: SitePolicy, asked: dict, code: str, words: list[str]) -> None:  # type: ignore[type-arg]
    with pytest.raises(PolicyRefusal) as info:
        policy.check_run(**{**RUN, **asked})
    assert info.value.code == code
    assert all(w in str(info.value) for w in words), str(info.value)


def test_noise_secure_aggregation_and_plain_rounds() -> None:
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy(min_noise_multiplier=1.0).check_noise(0.8)
    assert info.value.code == "policy:min-noise"
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy(min_secure_agg_threshold=3, min_secure_agg_participants=5).check_secure_round(threshold=2, participants=5)
    assert info.value.code == "policy:secure-agg-threshold"
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy(min_secure_agg_participants=5).check_secure_round(threshold=3, participants=4)
    assert info.value.code == "policy:secure-agg-participants"
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy(require_secure_agg=True).check_plain_train()
    assert info.value.code == "policy:require-secure-agg"


def test_a_site_without_dp_requirement_accepts_a_run_without_dp() -> None:
    SitePolicy(require_dp=False).check_run(**{**RUN, "dp": False, "target_epsilon": 1e9})


def test_inconsistent_policies_are_reported_whole() -> None:
    _, problems = policy_from_mapping({"min_secure_agg_threshold": 1, "min_steps_per_round": 0, "statistics_noise_multiplier": 0})
    text = " ".join(problems)
    assert "policy.min_secure_agg_threshold must be >= 2" in text
    assert "policy.min_steps_per_round must be in [1" in text
    assert "policy.statistics_noise_multiplier must be > 0" in text


def test_delta_must_be_far_below_one_over_n(caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.client.local import check_delta
    from fedtune.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"delta 0.01 is not below 1/n = 0.01 for its 100 records"):
        check_delta(0.01, 100, site="a")
    with caplog.at_level("WARNING"):
        check_delta(5e-3, 100, site="a")  # below 1/n = 1e-2, above 1/(10 n) = 1e-3
    assert "above 1/(10 n)" in caplog.text
    caplog.clear()
    check_delta(1e-5, 100, site="a")
    assert caplog.text == ""

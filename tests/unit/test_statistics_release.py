"""The DP release of validation statistics: the mechanism and what its ledger charge is worth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.client.ledger import PrivacyLedger
from fedtune.client.statistics import SENSITIVITY, noisy_validation
from fedtune.common.accounting import Segment


def test_each_released_sum_carries_gaussian_noise_of_z_times_sqrt3() -> None:
    z, draws = 2.0, 4000
    rng = np.random.default_rng(0)
    counts = [noisy_validation(30.0, 50, 40.0, noise_multiplier=z, loss_bound=5.0, rng=rng).examples for _ in range(draws)]
    # 4000 draws: the sample std is within 5% of sigma except with probability < 1e-3 (chi-square, 3999 dof).
    assert np.std(counts, ddof=1) == pytest.approx(z * math.sqrt(3), rel=0.05)
    assert abs(np.mean(counts) - 50) < 4 * z * math.sqrt(3) / math.sqrt(draws)


def test_released_figures_are_clamped_post_processing() -> None:
    stats = noisy_validation(0.0, 1, 0.0, noise_multiplier=50.0, loss_bound=5.0, rng=np.random.default_rng(1))
    assert stats.noise_std == pytest.approx(50.0 * SENSITIVITY)
    assert 0.0 <= stats.accuracy <= 1.0 and 0.0 <= stats.loss <= 5.0 and stats.mode == "dp"


@pytest.mark.parametrize("z", [1.0, 2.0, 5.0])
def test_a_statistics_charge_costs_what_dp_accounting_says_the_gaussian_mechanism_costs(tmp_path, z: float) -> None:  # type: ignore[no-untyped-def]
    import dp_accounting

    ledger = PrivacyLedger(tmp_path)
    records = ["a" * 32, "b" * 32]
    spent = ledger.charge(records, run="r", round=1, kind="statistics", segment=Segment(sample_rate=1.0, noise_multiplier=z, steps=1),
                          clip_norm=0.0, delta=1e-5, budget_epsilon=100.0)
    # Independent: Google's RDP accountant on one Gaussian mechanism with noise multiplier z.
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z))
    expected = accountant.get_epsilon(1e-5)
    assert spent == pytest.approx(expected, rel=0.02)

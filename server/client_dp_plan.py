"""Client-level DP's plan: the sampling rate, the number of sites, the accounting and the calibration.

What DP-FedAvg (`fedtune.server.client_dp`) is worth is decided here, before round 1: q from
`client_sample_rate`, N observed on the grid by `connected_sites`, z given or calibrated
(`calibrate_client_noise`) and the client-level epsilon after T rounds (`client_level_epsilon`),
recorded together in a `ClientLevelPlan` by `plan_client_level`. `poisson_sample` is the sampler
the accountant's bound is proven for; the strategy draws each round's sites with it.

Why Poisson sampling in the strategy, rather than Flower's fixed-size sample accounted as
sampling without replacement: the sampled-Gaussian bound is proven for Poisson sampling and
add/remove neighbours, the relation that answers "did hospital X take part at all" (and the one
the sites' DP-SGD uses). The bounds for a fixed-size sample without replacement (Wang, Balle,
Kasiviswanathan, AISTATS 2019; `dp_accounting`'s `SampledWithoutReplacementDpEvent`) hold for
replace-one neighbours with N fixed: a different guarantee (add/remove at epsilon gives replace-one
at 2 epsilon by group privacy, not the other way round), which a site that drops out or joins late
breaks (see Lebeda et al. 2024 on mixing the two). Under Poisson sampling a site's privacy depends
only on q, z and T: a site offline in a round is not sampled and releases nothing, and N only sets
the denominator q N. The cost: the number of sites per round varies (Binomial(N, q)); a round can
sample no site at all, and then the global adapter plus noise is still released (an unchanged
adapter would tell that no sampled site took part).
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import Grid

from fedtune.common.accounting import Segment, calibrate_noise_multiplier, epsilon
from fedtune.common.errors import ConfigError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------


def client_level_epsilon(
    *, sample_rate: float, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` of T rounds of DP-FedAvg with Poisson sampling of sites, per site.

    Each round is one Poisson-sampled Gaussian mechanism with rate q and noise multiplier z on the
    sum of clipped deltas, neighbours being add/remove one site, so this is
    `fedtune.common.accounting.epsilon([Segment(q, z, T)])`. It is a valid bound for
    `ClientLevelDP`, which samples each connected site independently with probability q; it is
    not one for a fixed-size sample (Flower's FedAvg), see the module docstring. With q = 1 (every
    site every round) there is no amplification.

    Args:
        sample_rate: q, the probability that a site joins a round, 0 < q <= 1.
        noise_multiplier: z >= 0; z = 0 gives `inf` (no privacy) for T >= 1.
        rounds: T, the number of rounds (noisy releases), >= 0.
        delta: the target delta, 0 < delta < 1.
        accountant: one of `fedtune.common.accounting.ACCOUNTANTS`.

    Returns:
        Epsilon (>= 0); 0.0 for T = 0.

    Raises:
        ConfigError: a knob out of range.
    """
    if noise_multiplier == 0 and not isinstance(noise_multiplier, bool):
        Segment(sample_rate, 1.0, rounds)  # validates q and T, as the z > 0 path does
        epsilon([], delta=delta, accountant=accountant)  # validates delta and the accountant
        return math.inf if rounds > 0 else 0.0
    return epsilon([Segment(sample_rate, noise_multiplier, rounds)], delta=delta, accountant=accountant)


def calibrate_client_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest z with which T rounds of DP-FedAvg at Poisson rate q stay within `target_epsilon`.

    `fedtune.common.accounting.calibrate_noise_multiplier` with steps = T.

    Raises:
        ConfigError: a knob out of range, or a target the accountant cannot certify.
    """
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=rounds, accountant=accountant
    )


# ---------------------------------------------------------------------------------------------
# Sampling and the number of sites
# ---------------------------------------------------------------------------------------------


def client_sample_rate(*, sites: int, fraction_train: float, min_sites: int) -> float:
    """q = min(1, max(f, min_sites / N)): the Poisson rate at which each site joins a round.

    `fraction_train` (f) is the rate itself. `min_sites` cannot be a floor on a Poisson sample's
    size (conditioning on the count would break the accounting), so it raises the rate until
    the expected count q N reaches it, as Flower's FedAvg raises its fixed sample size.

    Raises:
        ConfigError: N < 1, f outside (0, 1] or min_sites < 0.
    """
    problems = []
    if not (is_int(sites) and sites >= 1):
        problems.append(f"`sites` (N) must be an integer >= 1, got {sites!r}.")
    if not (is_real(fraction_train) and 0.0 < float(fraction_train) <= 1.0):
        problems.append(f"`fraction_train` must be in (0, 1], got {fraction_train!r}.")
    if not (is_int(min_sites) and min_sites >= 0):
        problems.append(f"`min_sites` must be an integer >= 0, got {min_sites!r}.")
    if problems:
        raise ConfigError(problems)
    return min(1.0, max(float(fraction_train), min_sites / sites))


def poisson_sample(node_ids: Iterable[int], sample_rate: float, rng: random.Random) -> list[int]:
    """Each node independently with probability q (Poisson sampling), in the order given.

    `rng.random()` is uniform on [0, 1) with 53-bit resolution, so P(u < q) = q for every
    q representable as a double; q = 1 keeps every node. Pass `random.SystemRandom()` for
    deployment: who is sampled must not be predictable from a seed or earlier rounds.
    """
    if not (is_real(sample_rate) and 0.0 < float(sample_rate) <= 1.0):
        raise ConfigError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
    return [node for node in node_ids if rng.random() < sample_rate]


def connected_sites(grid: Grid, *, planned: int, timeout: float, poll: float = 1.0) -> int:
    """N, the number of sites the grid reports connected, once it equals the `planned` number.

    Sites still connecting are waited for, up to `timeout` seconds; more sites than planned are
    refused at once (an unplanned node taking part is a site registered by mistake, or a Sybil).
    A mismatch is refused rather than recalibrated: the operator set the target and the number of
    sites together, the denominator q N and the rate q depend on N, and a federation that is not
    the planned one should stop the run before round 1, not change its guarantee silently.

    Args:
        grid: the ServerApp's grid (only `get_node_ids()` is used).
        planned: the number of sites the run was planned for (`federation.sites`).
        timeout: seconds to wait for missing sites.
        poll: seconds between looks.

    Returns:
        `planned`, now observed.

    Raises:
        ConfigError: the grid reports more sites than planned, or fewer after `timeout` seconds;
            the message names both numbers.
    """
    deadline = time.monotonic() + timeout
    last_logged = -math.inf
    while True:
        found = len(set(grid.get_node_ids()))
        if found > planned:
            raise ConfigError(_mismatch(planned, found, "are connected"))
        if found == planned:
            logger.info("client-level DP: %d sites connected, as planned", found)
            return found
        now = time.monotonic()
        if now >= deadline:
            raise ConfigError(_mismatch(planned, found, f"were connected after waiting {timeout:g} s"))
        if now - last_logged >= 10.0:
            logger.info("client-level DP: waiting for sites to connect: %d of the planned %d", found, planned)
            last_logged = now
        time.sleep(min(poll, deadline - now))


def _mismatch(planned: int, found: int, what: str) -> str:
    return (
        f"client-level DP is planned for federation.sites = {planned} sites (N, which sets the sampling rate and "
        f"the denominator q N), but {found} {what}. Set federation.sites to {found} in the run config "
        f"if that is the federation, or connect the missing sites; the run was not started."
    )


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

SAMPLING_SCHEME = "poisson"
NEIGHBOURING = "add or remove one site (all of its data)"


@dataclass(frozen=True, kw_only=True)
class ClientLevelPlan:
    """Client-level DP's mechanism and guarantee for a run: what the strategy does and what it is worth.

    Attributes:
        clip_norm: C.
        noise_multiplier: z (given, or calibrated to the target epsilon).
        sample_rate: q, the Poisson rate at which each site joins a round.
        sites: N, the number of sites sampled from.
        sites_source: where N came from (the simulation's site count, or the connected nodes).
        rounds: T.
        delta: the delta of the guarantee.
        accountant: the accountant that computed `epsilon`.
        epsilon: the client-level epsilon after T rounds, at `delta`.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    sites: int
    sites_source: str
    rounds: int
    delta: float
    accountant: str
    epsilon: float

    @property
    def expected_sites(self) -> float:
        """m = q N, the expected number of sites per round: the fixed denominator."""
        return self.sample_rate * self.sites

    def to_dict(self) -> dict[str, Any]:
        """The record of the plan in summary.json (`client_level`)."""
        sampling = (
            "every connected site every round (q = 1: no amplification by sampling)"
            if self.sample_rate >= 1.0
            else "Poisson: each connected site joins each round independently with probability q (OS CSPRNG); "
            "accounted as the Poisson-sampled Gaussian mechanism"
        )
        return {
            "mechanism": "DP-FedAvg (McMahan et al. 2018): per-site update clipping, Gaussian noise, fixed denominator q N",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sampling_scheme": SAMPLING_SCHEME,
            "sampling": sampling,
            "neighbouring": NEIGHBOURING,
            "sample_rate": self.sample_rate,
            "sites": self.sites,
            "sites_source": self.sites_source,
            "expected_sites": self.expected_sites,
            "rounds": self.rounds,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon": self.epsilon,
        }


def plan_client_level(
    *,
    sites: int,
    sites_source: str,
    fraction_train: float,
    min_sites: int,
    rounds: int,
    clip_norm: float,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
) -> ClientLevelPlan:
    """The plan for N sites: q from `client_sample_rate`, z as given or calibrated, and its epsilon.

    Args:
        sites: N, the number of sites actually sampled from (observed, never a default).
        sites_source: where N came from, for the record.
        fraction_train, min_sites: see `client_sample_rate`.
        rounds: T.
        clip_norm: C.
        noise_multiplier: z; 0 calibrates it to `target_epsilon`.
        target_epsilon: the epsilon to reach after T rounds when z is calibrated.
        delta: the delta of the guarantee.
        accountant: one of `fedtune.common.accounting.ACCOUNTANTS`.

    Raises:
        ConfigError: a knob out of range, or a target the accountant cannot certify.
    """
    q = client_sample_rate(sites=sites, fraction_train=fraction_train, min_sites=min_sites)
    z = noise_multiplier or calibrate_client_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=q, rounds=rounds, accountant=accountant
    )
    return ClientLevelPlan(
        clip_norm=clip_norm, noise_multiplier=z, sample_rate=q, sites=sites, sites_source=sites_source, rounds=rounds,
        delta=delta, accountant=accountant,
        epsilon=client_level_epsilon(sample_rate=q, noise_multiplier=z, rounds=rounds, delta=delta, accountant=accountant),
    )


# ---------------------------------------------------------------------------------------------
# Validation (shared with the strategy in `fedtune.server.client_dp`)
# ---------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))  # type: ignore[arg-type]


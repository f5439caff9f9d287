"""The SecAgg+ mask generator that replaces Flower's 32-bit-seeded one."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_generator

from fedtune.common.masks import expand, install

SHAPES = [(3, 4), (), (1000,)]


def _fold_preserving_twin(seed: bytes) -> bytes:
    """A different secret with the same XOR of its 32-bit words (what Flower seeds numpy with)."""
    words = bytearray(seed)
    for i in range(4):  # flip the same bits in words 0 and 1: their XOR is unchanged
        words[i] ^= 0x5A
        words[4 + i] ^= 0x5A
    return bytes(words)


def test_flowers_generator_has_only_32_bits_of_seed_and_ours_uses_all_256() -> None:
    seed = os.urandom(32)
    twin = _fold_preserving_twin(seed)
    assert twin != seed
    same = [np.array_equal(a, b) for a, b in zip(flower_generator(seed, 2**32, SHAPES), flower_generator(twin, 2**32, SHAPES), strict=True)]
    assert all(same), "Flower's masks depend only on a 32-bit fold of the secret"
    ours = [np.array_equal(a, b) for a, b in zip(expand(seed, 2**32, SHAPES), expand(twin, 2**32, SHAPES), strict=True)]
    assert not any(ours)


def test_masks_are_deterministic_shaped_and_uniform() -> None:
    seed = os.urandom(32)
    first, second = expand(seed, 2**32, SHAPES), expand(seed, 2**32, SHAPES)
    assert [a.shape for a in first] == SHAPES
    assert all(a.dtype == np.int64 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True)), "both ends derive the same mask"
    big = expand(seed, 2**32, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < 2**32
    # Uniform on [0, 2**32): mean and spread within a few standard errors, top bit balanced.
    assert abs(big.mean() / 2**32 - 0.5) < 0.005
    assert abs((big >= 2**31).mean() - 0.5) < 0.005
    assert not np.array_equal(big, expand(os.urandom(32), 2**32, [(200_000,)])[0])


def test_range_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        expand(b"x" * 32, 1000, [(3,)])


def test_install_reaches_both_ends_of_the_protocol() -> None:
    import importlib

    install()
    # By module path: the packages re-export functions of the same names as these modules.
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert mod.pseudo_rand_gen is expand and workflow.pseudo_rand_gen is expand

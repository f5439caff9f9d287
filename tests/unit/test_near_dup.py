"""Near-duplicate detection: MinHash LSH candidates, decided by exact Jaccard on character 5-grams."""

from __future__ import annotations

import re

import pytest

from fedtune.client.near_dup import MAX_MISS, NearDupIndex, NearDupSettings, lsh_bands
from fedtune.common.errors import ConfigError

NOTE = ("Patient reports crushing chest pressure on exertion for three days, radiating to the left arm, "
        "relieved by rest; history of hypertension.")


def _oracle_jaccard(a: str, b: str, k: int = 5) -> float:
    """Independent of the module: lower case, keep letters and digits, one space between words, k-grams."""
    def grams(t: str) -> set[str]:
        c = " ".join(re.findall(r"[a-z0-9]+", t.lower()))
        return {c[i:i + k] for i in range(len(c) - k + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


@pytest.mark.parametrize("variant", [
    NOTE.replace(",", "").replace(";", ".").replace(".", "!"),  # punctuation only
    NOTE.upper(),  # case only
    "  " + NOTE.replace(" ", "   ") + "\n",  # spacing only
    NOTE.replace("crushing", "squeezing"),  # one word changed
    NOTE.replace("three", "3"),  # one word changed (a number)
    NOTE.replace(" on exertion", ""),  # two words dropped
])
def test_a_pair_differing_by_punctuation_case_or_a_word_is_found(variant: str) -> None:
    index = NearDupIndex()
    index.add(7, NOTE)

    found = index.query(variant)

    assert [m.key for m in found] == [7]
    assert found[0].jaccard == pytest.approx(_oracle_jaccard(NOTE, variant))
    assert found[0].jaccard >= 0.8


@pytest.mark.parametrize("other", [
    "Patient reports sudden weakness of the right arm and slurred speech since this morning; history of diabetes.",
    "Patient reports chest pressure.",  # a short text contained in the note is not its duplicate
    "Card lost abroad yesterday, please block it and send a new one to my home address.",
])
def test_a_pair_that_differs_a_lot_is_not_found(other: str) -> None:
    index = NearDupIndex()
    index.add(1, NOTE)

    assert index.query(other) == []
    assert _oracle_jaccard(NOTE, other) < 0.8


def test_the_nearest_match_comes_first_and_the_threshold_is_a_setting() -> None:
    index = NearDupIndex(NearDupSettings(threshold=0.6))
    far = NOTE.replace("crushing chest pressure", "a dull ache").replace("three", "five")
    index.add(1, far)
    index.add(2, NOTE.replace("three", "3"))

    found = index.query(NOTE)

    assert [m.key for m in found] == [2, 1]
    assert 0.6 <= found[1].jaccard < 0.8  # only found because the threshold was lowered
    assert NearDupIndex().query(NOTE) == []  # nothing indexed


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.9, 128), (0.7, 64), (0.5, 256)])
def test_lsh_bands_miss_a_pair_at_the_threshold_rarely_and_are_the_steepest_that_do(threshold: float, num_perm: int) -> None:
    b, r = lsh_bands(threshold, num_perm)

    assert b * r <= num_perm and b >= 2
    assert (1 - threshold ** r) ** b <= MAX_MISS
    steeper_b = num_perm // (r + 1)  # one more row per band: fewer spurious candidates, but misses more
    assert (1 - threshold ** (r + 1)) ** steeper_b > MAX_MISS


def test_settings_name_the_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\], got 1.5"):
        NearDupSettings(threshold=1.5)

"""ROUGE-L against Google's rouge-score (the reference implementation) and Lin (2004)'s own example."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.common.rouge import lcs_length, mean_rouge_l, rouge_l, tokens

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score (a dev dependency) is the oracle")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

WORDS = st.sampled_from(["the", "patient", "was", "seen", "Fever", "3", "days", "x-ray", "no", "acute", "findings", "."])
TEXT = st.lists(WORDS, max_size=25).map(" ".join)


def test_lins_example_sentences() -> None:
    # Lin (2004), section 3.1: S2 shares "police ... the gunman" (3 of 4) with the reference, S3 "the gunman".
    reference = "police killed the gunman"
    assert rouge_l("police kill the gunman", reference).f == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", reference).f == pytest.approx(0.5)


@settings(max_examples=300, deadline=None)
@given(prediction=TEXT, reference=TEXT)
def test_agrees_with_rouge_score_on_ascii_text(prediction: str, reference: str) -> None:
    expected = SCORER.score(reference, prediction)["rougeL"]  # rouge-score takes (target, prediction)
    got = rouge_l(prediction, reference)
    assert (got.precision, got.recall, got.f) == pytest.approx((expected.precision, expected.recall, expected.fmeasure))


def test_lcs_is_a_subsequence_not_a_substring() -> None:
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example: "bcba"


def test_letters_of_any_script_are_tokens() -> None:
    assert tokens("Übelkeit, Fieber_2 Tage") == ["übelkeit", "fieber", "2", "tage"]
    assert rouge_l("Übelkeit und Fieber", "übelkeit fieber").recall == 1.0


def test_the_corpus_score_is_the_mean_of_pairs_and_lengths_must_match() -> None:
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    assert mean_rouge_l([], []) == 0.0
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])

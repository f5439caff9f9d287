"""RMIA's score (Zarifzadeh, Liu, Chang, Shokri 2024, arXiv:2312.03262) against hand computation and plain loops.

The definitions checked, from the paper's Section 3 (the pairwise likelihood ratio and the score)
and its offline approximation of Pr(x) from OUT reference models:

    LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z))
    score(x) = fraction of population z with LR(x, z) > gamma
    Pr(x)    = ((1 + a) * mean_k Pr(x|theta_k) + (1 - a)) / 2

The oracle below is written from those three lines alone (Python loops, no numpy), never from
``fedtune/audit_rmia.py``'s code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedtune.audit import auc
from fedtune.audit_rmia import RmiaSettings, check_references, marginal_probability, rmia_scores
from fedtune.cli.privacy import audit
from fedtune.common.errors import ConfigError, DataError


def _oracle(px: list[float], refs_x: list[list[float]], pz: list[float], refs_z: list[list[float]], a: float, gamma: float) -> list[float]:
    def pr(column: list[float]) -> float:
        return ((1 + a) * (sum(column) / len(column)) + (1 - a)) / 2

    out = []
    for i in range(len(px)):
        ratio_x = px[i] / pr([ref[i] for ref in refs_x])
        wins = 0
        for j in range(len(pz)):
            ratio_z = pz[j] / pr([ref[j] for ref in refs_z])
            if ratio_x / ratio_z > gamma:
                wins += 1
        out.append(wins / len(pz))
    return out


# ----------------------------------------------------------------------------- hand-worked case
def test_score_of_a_hand_worked_case_with_two_references() -> None:
    # Prepare: a = 1, so Pr(.) is the plain mean of the two references.
    #   x1: 0.9 / mean(0.3, 0.5) = 2.25     z1: 0.5 / mean(0.5, 0.5) = 1.0
    #   x2: 0.4 / mean(0.4, 0.4) = 1.0      z2: 0.6 / mean(0.2, 0.4) = 2.0
    #   x3: 0.1 / mean(0.2, 0.6) = 0.25     z3: 0.2 / mean(0.7, 0.1) = 0.5
    # gamma = 1: x1 beats z1 (2.25), z2 (1.125), z3 (4.5) -> 3/3; x2 ties z1 (1.0, not > 1), loses to z2 (0.5),
    # beats z3 (2.0) -> 1/3; x3 beats none (0.25, 0.125, 0.5) -> 0.
    px, refs_x = [0.9, 0.4, 0.1], [[0.3, 0.4, 0.2], [0.5, 0.4, 0.6]]
    pz, refs_z = [0.5, 0.6, 0.2], [[0.5, 0.2, 0.7], [0.5, 0.4, 0.1]]

    # Execute
    result = rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(a=1.0, gamma=1.0))

    # Assert
    assert result.scores.tolist() == pytest.approx([1.0, 1 / 3, 0.0], abs=1e-12)
    assert result.ratios.tolist() == pytest.approx([2.25, 1.0, 0.25])
    assert result.population_ratios.tolist() == pytest.approx([1.0, 2.0, 0.5])
    assert result.references == 2


def test_offline_marginal_of_a_hand_worked_case() -> None:
    # mean(0.2, 0.6) = 0.4; ((1 + 0.3) * 0.4 + (1 - 0.3)) / 2 = (0.52 + 0.7) / 2 = 0.61.
    assert marginal_probability([[0.2], [0.6]], 0.3).tolist() == pytest.approx([0.61])


@pytest.mark.parametrize("a, gamma", [(0.3, 1.0), (0.0, 1.0), (1.0, 1.0), (0.6, 2.0), (0.3, 0.5)])
def test_score_matches_a_plain_loop_oracle(a: float, gamma: float) -> None:
    rng = np.random.default_rng(7)
    n, m, k = 23, 31, 3
    px, pz = rng.uniform(0.01, 1.0, n), rng.uniform(0.01, 1.0, m)
    refs_x, refs_z = rng.uniform(0.01, 1.0, (k, n)), rng.uniform(0.01, 1.0, (k, m))

    result = rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(a=a, gamma=gamma))

    expected = _oracle(px.tolist(), refs_x.tolist(), pz.tolist(), refs_z.tolist(), a, gamma)
    assert result.scores.tolist() == pytest.approx(expected, abs=1e-12)
    assert 0 < len(set(expected)) > 3, "the case must spread the scores, or it checks little"


def test_large_population_is_scored_in_chunks_like_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtune.audit_rmia as module

    monkeypatch.setattr(module, "_CHUNK", 50)  # forces several blocks of rows
    rng = np.random.default_rng(3)
    px, pz = rng.uniform(0.01, 1, 37), rng.uniform(0.01, 1, 19)
    refs_x, refs_z = rng.uniform(0.01, 1, (2, 37)), rng.uniform(0.01, 1, (2, 19))

    result = rmia_scores(px, refs_x, pz, refs_z)

    assert result.scores.tolist() == pytest.approx(_oracle(px.tolist(), refs_x.tolist(), pz.tolist(), refs_z.tolist(), 0.3, 1.0))


# ----------------------------------------------------------------------------------- properties
def test_a_member_whose_probability_rises_under_the_target_scores_higher() -> None:
    rng = np.random.default_rng(11)
    refs_x, refs_z = rng.uniform(0.2, 0.8, (2, 5)), rng.uniform(0.2, 0.8, (2, 200))
    pz = refs_z.mean(axis=0) * rng.uniform(0.8, 1.2, 200)  # the target behaves like the references on z
    px = refs_x.mean(axis=0).copy()
    before = rmia_scores(px, refs_x, pz, refs_z).scores[0]

    px[0] = min(1.0, px[0] * 1.15)  # training on x0 raised its probability relative to the references
    after = rmia_scores(px, refs_x, pz, refs_z).scores[0]

    assert after > before


def test_the_same_probability_scores_lower_where_the_references_find_it_easy() -> None:
    # Two x with the target's probability 0.9: the one the references also give 0.9 is unremarkable,
    # the one they give 0.3 was raised by training. Loss thresholding cannot tell them apart.
    refs_x = [[0.9, 0.3], [0.9, 0.3]]
    # Ratios Pr(z|theta) / Pr(z) at a = 0.3: 0.74, 0.81, 1.19, 1.28; x: 0.96 (beats 2 of 4) and 1.65 (all 4).
    pz, refs_z = [0.5, 0.6, 0.8, 0.95], [[0.5, 0.6, 0.5, 0.6], [0.5, 0.6, 0.5, 0.6]]

    scores = rmia_scores([0.9, 0.9], refs_x, pz, refs_z).scores

    assert scores.tolist() == [0.5, 1.0]


def test_gamma_at_its_extremes() -> None:
    rng = np.random.default_rng(5)
    px, pz = rng.uniform(0.01, 1, 10), rng.uniform(0.01, 1, 10)
    refs_x, refs_z = rng.uniform(0.01, 1, (2, 10)), rng.uniform(0.01, 1, (2, 10))

    # gamma -> 0: every x beats every z; gamma -> infinity: none does (the paper's gamma scans the threshold on LR).
    assert rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(gamma=1e-9)).scores.tolist() == [1.0] * 10
    assert rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(gamma=1e9)).scores.tolist() == [0.0] * 10
    low = rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(gamma=0.8)).scores
    high = rmia_scores(px, refs_x, pz, refs_z, settings=RmiaSettings(gamma=1.25)).scores
    assert np.all(high <= low) and np.any(high < low)


def test_a_at_its_extremes() -> None:
    refs = [[0.2, 0.5], [0.4, 0.9]]

    # a = 1: Pr(x) is the OUT references' mean as it is; a = 0: Pr_IN(x) is taken as 1, Pr(x) = (Pr_OUT + 1) / 2.
    assert marginal_probability(refs, 1.0).tolist() == pytest.approx([0.3, 0.7])
    assert marginal_probability(refs, 0.0).tolist() == pytest.approx([0.65, 0.85])


def test_a_target_identical_to_its_references_gives_no_signal() -> None:
    rng = np.random.default_rng(9)
    refs_x, refs_z = rng.uniform(0.05, 1, (1, 40)), rng.uniform(0.05, 1, (1, 30))

    # a = 1: every ratio is 1, no LR exceeds gamma = 1, and members cannot be told from non-members.
    scores = rmia_scores(refs_x[0], refs_x, refs_z[0], refs_z, settings=RmiaSettings(a=1.0)).scores

    assert scores.tolist() == [0.0] * 40
    assert auc(scores[:20], scores[20:]) == 0.5


# ------------------------------------------------------------------------------- invalid inputs
@pytest.mark.parametrize(
    "args, match",
    [
        (([0.5], np.empty((0, 1)), [0.5], np.empty((0, 1))), "empty"),
        (([0.5, 0.6], [[0.5]], [0.5], [[0.5]]), r"expected \(K, 2\)"),
        (([0.5], [[0.5], [0.4]], [0.5], [[0.5]]), r"expected \(2, 1\)"),
        (([0.5], [0.5], [0.5], [[0.5]]), r"shape \(K references, n\)"),
        (([math.nan], [[0.5]], [0.5], [[0.5]]), "outside"),
        (([0.5], [[0.5]], [1.2], [[0.5]]), "outside"),
        (([0.5], [[0.0]], [0.5], [[0.5]]), "outside"),
        (([], [[]], [0.5], [[0.5]]), "empty"),
    ],
)
def test_invalid_inputs_are_refused(args: tuple, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(DataError, match=match):
        rmia_scores(*args)


@pytest.mark.parametrize("kwargs, flag", [({"a": -0.1}, "--rmia-a"), ({"a": 1.5}, "--rmia-a"), ({"a": math.nan}, "--rmia-a"),
                                          ({"gamma": 0.0}, "--rmia-gamma"), ({"gamma": math.inf}, "--rmia-gamma")])
def test_settings_out_of_range_name_the_flag_and_value(kwargs: dict, flag: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=f"{flag} must be .* got {list(kwargs.values())[0]}"):
        RmiaSettings(**kwargs)


# -------------------------------------------------------------------------- references and CLI
def _fake_run(folder: Path, labels: list[str], base_id: str = "abc") -> Path:
    (folder / "adapter").mkdir(parents=True)
    meta = {"labels": labels, "base_model": "/models/tiny", "base_model_id": base_id, "max_length": 32}
    (folder / "adapter" / "fedtune.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_references_unlike_the_target_are_refused(tmp_path: Path) -> None:
    target = _fake_run(tmp_path / "target", ["a", "b"])
    same = _fake_run(tmp_path / "same", ["b", "a"])  # order does not matter: each model encodes by its own labels
    check_references(target, [same])

    with pytest.raises(ConfigError, match="at least one --reference"):
        check_references(target, [])
    with pytest.raises(ConfigError, match=r"--reference .*other-labels has labels \['a', 'c'\]; the audited run has \['a', 'b'\]"):
        check_references(target, [_fake_run(tmp_path / "other-labels", ["a", "c"])])
    with pytest.raises(ConfigError, match="base_model_id zzz.*base_model_id abc"):
        check_references(target, [_fake_run(tmp_path / "other-base", ["a", "b"], base_id="zzz")])
    with pytest.raises(ConfigError, match="is the audited run itself"):
        check_references(target, [target])
    with pytest.raises(ConfigError, match="given twice"):
        check_references(target, [same, same])
    with pytest.raises(ConfigError, match="no adapter/ folder"):
        check_references(target, [tmp_path / "nothing"])


def test_cli_rmia_without_reference_and_reference_without_rmia_name_the_flags(tmp_path: Path) -> None:
    target = _fake_run(tmp_path / "target", ["a", "b"])
    data = tmp_path / "rows.csv"
    data.write_text("text,label\nhello,a\n", encoding="utf-8")
    base = [str(target), "--members", str(data), "--non-members", str(data)]

    no_ref = CliRunner().invoke(audit, base + ["--attack", "rmia", "--population", str(data)])
    stray = CliRunner().invoke(audit, base + ["--reference", str(target), "--rmia-a", "0"])
    bad_a = CliRunner().invoke(audit, base + ["--attack", "rmia", "--rmia-a", "2"])

    assert no_ref.exit_code == 2 and "--attack rmia needs at least one --reference" in no_ref.output
    assert stray.exit_code == 2 and "--reference, --rmia-a only apply to --attack rmia" in stray.output
    assert bad_a.exit_code == 2 and "--rmia-a must be in [0, 1]" in bad_a.output and "got 2.0" in bad_a.output


def test_population_sharing_rows_with_the_audited_sets_is_refused_with_counts(tmp_path: Path) -> None:
    from fedtune.audit_rmia import run_rmia_audit

    target, ref = _fake_run(tmp_path / "target", ["a", "b"]), _fake_run(tmp_path / "ref", ["a", "b"])
    members = tmp_path / "m.csv"
    members.write_text("text,label\none,a\ntwo,b\nthree,a\n", encoding="utf-8")
    non_members = tmp_path / "n.csv"
    non_members.write_text("text,label\nfour,a\nfive,b\n", encoding="utf-8")
    population = tmp_path / "p.csv"
    # "two" and "three" are members, "five" a non-member; ("four", "b") differs from the non-member ("four", "a").
    population.write_text("text,label\ntwo,b\nthree,a\nfive,b\nfour,b\nsix,a\n", encoding="utf-8")

    with pytest.raises(DataError, match="2 distinct .* also in --members and 1 in --non-members"):
        run_rmia_audit(target, members=members, non_members=non_members, references=[ref], population=population)
    with pytest.raises(ConfigError, match="needs --population FILE"):
        run_rmia_audit(target, members=members, non_members=non_members, references=[ref], population=None)


def test_population_row_of_a_member_left_out_of_the_sample_is_still_refused(tmp_path: Path) -> None:
    from fedtune.audit_rmia import run_rmia_audit

    target, ref = _fake_run(tmp_path / "target", ["a", "b"]), _fake_run(tmp_path / "ref", ["a", "b"])
    members = tmp_path / "m.csv"
    members.write_text("text,label\n" + "".join(f"m{i},a\n" for i in range(20)), encoding="utf-8")
    non_members = tmp_path / "n.csv"
    non_members.write_text("text,label\nfour,a\nfive,b\n", encoding="utf-8")
    population = tmp_path / "p.csv"
    population.write_text("text,label\n" + "".join(f"m{i},a\n" for i in range(10, 20)), encoding="utf-8")

    # --max-examples 2, seed 1 audits members m4 and m18 and keeps population rows m11 and m12 (random.sample by
    # hand): the samples share no row, yet both population rows are trained-on members and must be refused.
    with pytest.raises(DataError, match="2 distinct .* also in --members and 0 in --non-members"):
        run_rmia_audit(target, members=members, non_members=non_members, references=[ref], population=population,
                       max_examples=2, seed=1)

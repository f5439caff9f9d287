"""De-identification before training (client/deid.py): recall on a planted corpus, checksums, settings,
and the training path that trains on the redacted text while the ledger keeps the stored rows' keys."""

from __future__ import annotations

import collections
import json
import socket
from pathlib import Path

import pytest

from fedtune.client.deid import ENTITIES, DeidSettings, deid_from_mapping, deidentify, from_node_config, site_deid, to_node_config
from fedtune.common.errors import ConfigError
from tests.deid_corpus import Planted, bad_checksums, generate, iban_valid, luhn_valid

ON = DeidSettings(enabled=True)
# Recall floors per entity type, set a little below what the seeded corpus measured (the README's table:
# 0.81 0.81 1.00 0.81 0.87 0.84 0.89 1.00 1.00 for e-mail, person, phone, date, postal, MRN, account, IBAN, card
# at 100 per type, seed 0): a planted identifier counts only when exactly it, and nothing else in its sentence,
# became its tag. 100 per type: at 35 a type's figure moved by up to 0.18 with the seed alone.
PER_TYPE = 100
RECALL_FLOOR = {"EMAIL": 0.78, "PHONE": 0.97, "DATE": 0.78, "POSTAL_CODE": 0.84, "MRN": 0.81, "ACCOUNT": 0.86,
                "IBAN": 0.97, "CARD": 0.97, "PERSON": 0.78}
MAX_FALSE_REDACTIONS = 0  # of the 40 identifier-free sentences (measured 0; the README says 0)


def _recall(corpus: list[Planted], texts: list[str]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    hit, total = collections.Counter(), collections.Counter()
    clean_changed = []
    for planted, out in zip(corpus, texts):
        if planted.entity is None:
            if out != planted.text:
                clean_changed.append((planted.text, out))
            continue
        total[planted.entity] += 1
        hit[planted.entity] += out == planted.expected(f"<{planted.entity}>")
    return {e: hit[e] / total[e] for e in total}, clean_changed


@pytest.fixture(scope="module")
def corpus_result() -> tuple[list[Planted], list[str], dict[str, int]]:
    corpus = generate(PER_TYPE)  # the default, spelled out: the README names it
    result = deidentify([p.text for p in corpus], ON)
    return corpus, result.texts, result.counts


def test_the_generators_checksums_agree_with_published_valid_numbers() -> None:
    # Independent values: the IBAN example of the ISO 13616 registry's documentation and a Visa test number.
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    assert luhn_valid("378282246310005")  # an American Express test number


def test_recall_per_entity_type_on_the_planted_corpus_is_above_its_floor(corpus_result) -> None:  # type: ignore[no-untyped-def]
    corpus, texts, counts = corpus_result
    recall, _ = _recall(corpus, texts)
    assert set(recall) == set(ENTITIES) and len(corpus) == 9 * PER_TYPE + 40
    below = {e: round(r, 3) for e, r in recall.items() if r < RECALL_FLOOR[e]}
    assert not below, f"recall below the floor: {below} (floors {RECALL_FLOOR})"
    assert set(counts) == set(ENTITIES) and all(counts[e] >= recall[e] * PER_TYPE for e in ENTITIES)


def test_the_demo_files_phone_numbers_in_ranges_reserved_for_fiction_are_redacted() -> None:
    import random

    from fedtune.common.demo_data.generate import _phone  # what the packaged demo files plant

    # Ofcom's drama mobiles (+44 7700 900xxx) and NANP's 555-01xx: libphonenumber calls them invalid.
    planted = sorted({_phone(random.Random(seed)) for seed in range(60)})
    assert {p[:4] for p in planted} >= {"+44 ", "0770", "555-", "(212"}, planted
    out = deidentify([f"Call back on {p}." for p in planted], ON)
    assert out.texts == ["Call back on <PHONE>."] * len(planted) and out.counts["PHONE"] == len(planted)
    # Seven bare digits only in 555-0100..0199, the drama digits only after 0 or +44; a region's national form only for it.
    kept = ["Dose 555-0210 mg.", "Ref 7700 900123.", "Lot 4 7700 900123."]
    assert deidentify(kept, DeidSettings(enabled=True, entities=("PHONE",))).texts == kept
    gb_only = DeidSettings(enabled=True, entities=("PHONE",), regions=("GB",))
    assert deidentify(["Call 555-0150 or +1 (212) 555-0150 or 01632 960123."], gb_only).texts == [
        "Call 555-0150 or <PHONE> or <PHONE>."]


def test_identifier_free_sentences_are_left_alone(corpus_result) -> None:  # type: ignore[no-untyped-def]
    corpus, texts, _ = corpus_result
    _, clean_changed = _recall(corpus, texts)
    assert len(clean_changed) <= MAX_FALSE_REDACTIONS, clean_changed


def test_redacted_text_redacts_to_itself(corpus_result) -> None:  # type: ignore[no-untyped-def]
    # `site prepare` writes redacted rows that training then de-identifies again: the tags must not match.
    _, texts, counts = corpus_result
    again = deidentify(texts, ON)
    assert sum(counts.values()) > 250 and again.texts == texts and again.rows_changed == 0


def test_an_iban_or_card_number_with_a_bad_checksum_is_not_redacted_as_one() -> None:
    bad = bad_checksums()
    assert not any(iban_valid(p.value) for p in bad if p.entity == "IBAN")
    assert not any(luhn_valid(p.value) for p in bad if p.entity == "CARD")
    good = generate(4, seed=3)
    out = deidentify([p.text for p in bad + good], ON)
    for planted, text in zip(bad, out.texts):
        assert "<IBAN>" not in text and "<CARD>" not in text, (planted.text, text)
    # The same frames with valid numbers are redacted (the check can fail).
    valid = [(p, t) for p, t in zip(good, out.texts[len(bad):]) if p.entity in ("IBAN", "CARD")]
    assert valid and all(t == p.expected(f"<{p.entity}>") for p, t in valid)


def test_settings_choose_the_entities_and_the_replacement() -> None:
    text = "Dr. Anna Weber emailed anna.weber@example.org on 03/04/2021."
    only_email = deidentify([text], DeidSettings(enabled=True, entities=("EMAIL",), replacement="[REDACTED]"))
    assert only_email.texts == ["Dr. Anna Weber emailed [REDACTED] on 03/04/2021."]
    assert only_email.counts == {"EMAIL": 1} and only_email.rows_changed == 1
    every = deidentify([text, ""], ON)
    assert every.texts == ["Dr. <PERSON> emailed <EMAIL> on <DATE>.", ""]
    assert every.counts == {**{e: 0 for e in ENTITIES}, "PERSON": 1, "EMAIL": 1, "DATE": 1}
    off = deidentify([text], DeidSettings())
    assert off.texts == [text] and off.counts == {} and off.rows_changed == 0


def test_bad_settings_name_the_setting_the_value_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        DeidSettings(enabled=True, entities=("EMAIL", "SSN"), regions=("XX",), replacement="<{type}>")
    text = str(info.value)
    assert "deid.entities must be a non-empty list of ['EMAIL', 'PHONE'" in text and "(['SSN'] unknown)" in text
    assert "deid.regions must be a non-empty list of ['US', 'GB', 'CA', 'DE', 'FR', 'NL'], got ['XX']" in text
    assert "deid.replacement may hold {entity} and no other {...} field, got '<{type}>'" in text


def test_regions_name_the_formats_the_recognizers_have() -> None:
    from fedtune.client import deid, deid_recognizers

    assert deid.REGIONS == deid_recognizers.REGIONS == DeidSettings().regions


def test_it_works_offline_no_socket_and_no_spacy_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy.cli

    from fedtune.client import deid, deid_recognizers

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(spacy.cli, "download", refuse)
    deid_recognizers.analyzer.cache_clear()  # built afresh under the patches
    deid._redact.cache_clear()
    out = deidentify(["Write to j.doe@mail.example.co.uk or call +44 20 7946 0018."], ON)
    assert out.texts == ["Write to <EMAIL> or call <PHONE>."]


# -- where the settings come from ------------------------------------------------------------------
def _site_toml(tmp_path: Path, deid: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text('[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n' + deid)
    return path


def test_site_toml_deid_reaches_the_clientapp_through_flowers_node_config_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args  # the parser flower-supernode applies

    from fedtune.client.daemon import load_site_config, supernode_command

    site = load_site_config(_site_toml(tmp_path, '[deid]\nenabled = true\nentities = ["email", "PERSON"]\nreplacement = "[{entity} removed]"\n'))
    node_config = parse_config_args([supernode_command(site)[supernode_command(site).index("--node-config") + 1]])

    assert site.deid == DeidSettings(enabled=True, entities=("EMAIL", "PERSON"), replacement="[{entity} removed]")
    assert from_node_config(node_config) == site.deid
    assert "deid-entities" not in load_site_config(_site_toml(tmp_path, "")).node_config(), "off unless the operator opts in"


def test_site_toml_deid_problems_are_reported_with_a_did_you_mean(tmp_path: Path) -> None:
    from fedtune.client.daemon import load_site_config

    with pytest.raises(ConfigError) as info:
        load_site_config(_site_toml(tmp_path, '[deid]\nenabled = "true"\nentites = ["EMAIL"]\nregions = ["US", "JP"]\n'))
    text = str(info.value)
    assert "unknown key deid.entites (did you mean 'entities'?)" in text
    assert "deid.enabled must be true or false (unquoted), got 'true'" in text
    assert "deid.regions must be a non-empty list of" in text and "(['JP'] unknown)" in text
    assert deid_from_mapping({"enabled": True})[0] == ON


def test_a_deployed_site_follows_its_own_setting_never_the_runs() -> None:
    assert site_deid({}, simulated=False, run_deidentify=True) == DeidSettings(), "a run cannot switch it on ..."
    own = to_node_config(DeidSettings(enabled=True, entities=("MRN",)))
    assert site_deid(own, simulated=False, run_deidentify=False).entities == ("MRN",), "... nor off"
    assert site_deid(own, simulated=True, run_deidentify=False) == DeidSettings()
    assert site_deid({}, simulated=True, run_deidentify=True) == ON


# -- the training path -----------------------------------------------------------------------------
ROWS = [
    ("Patient John Smith, MRN: 00123456, admitted with chest pain.", "cardio"),
    ("Call the daughter on (617) 555-0123 about the ECG.", "cardio"),
    ("Seen on 03/04/2021 for recurrent headaches.", "neuro"),
    ("Dr. Anna Weber reviewed the MRI scan.", "neuro"),
    ("Results sent to j.doe@example.org after the visit.", "cardio"),
    ("Headache improved after paracetamol.", "neuro"),
]


def test_a_simulated_site_trains_on_redacted_text_and_keys_the_ledger_by_the_stored_rows(tmp_path: Path) -> None:
    from fedtune.client.local import prepare_site
    from fedtune.common.config import from_dict
    from fedtune.common.data import record_digests

    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in ROWS * 4))
    node = {"partition-id": 0, "num-partitions": 2}
    run = {"data": {"path": str(data), "val_fraction": 0.25}, "federation": {"sites": 2, "min_sites": 2}}

    plain = prepare_site(from_dict(run), node, run_dir=str(tmp_path / "a"), labels=["cardio", "neuro"])
    redacted = prepare_site(from_dict({**run, "data": {**run["data"], "deidentify": True}}), node, run_dir=str(tmp_path / "b"),
                            labels=["cardio", "neuro"])

    expected = {t: deidentify([t], ON).texts[0] for t, _ in ROWS}
    assert redacted.examples.train_texts == [expected[t] for t in plain.examples.train_texts]
    assert redacted.examples.val_texts == [expected[t] for t in plain.examples.val_texts]
    assert any("<MRN>" in t or "<PHONE>" in t or "<EMAIL>" in t for t in redacted.examples.train_texts)
    words = " ".join(redacted.examples.train_texts + redacted.examples.val_texts)
    assert not any(secret in words for secret in ("Smith", "00123456", "555-0123", "03/04/2021", "Weber", "j.doe"))
    assert redacted.examples.train_labels == plain.examples.train_labels
    assert redacted.train_records == plain.train_records == record_digests(plain.examples.train_texts, plain.examples.train_labels)
    assert redacted.val_records == plain.val_records


def test_a_causal_lm_site_encodes_redacted_messages_and_keys_the_ledger_by_the_stored_rows(tmp_path: Path) -> None:
    from fedtune.client.local import prepare_site
    from fedtune.common.causal_lm import load_lm_tokenizer
    from fedtune.common.config import from_dict
    from fedtune.common.data import record_digests
    from tests.unit.test_causal_lm_run import save_tiny_llama

    pairs = [(f"Summarise: {t}", f"{label} case") for t, label in ROWS * 6]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    redacted_words = [deidentify([p], ON).texts[0] for p, _ in pairs]
    tokenizer_dir = save_tiny_llama(tmp_path / "tiny", [*[t for row in pairs for t in row], *redacted_words])
    run = from_dict({"task": "causal-lm", "model": {"base_model": str(tokenizer_dir), "max_length": 64},
                     "data": {"path": str(data), "template": "plain", "val_fraction": 0.25, "deidentify": True},
                     "federation": {"sites": 2, "min_sites": 2}})
    tokenizer = load_lm_tokenizer(tokenizer_dir)

    site = prepare_site(run, {"partition-id": 0, "num-partitions": 2}, run_dir=str(tmp_path / "run"), labels=[], tokenizer=tokenizer)

    assert site.lm is not None
    decoded = [tokenizer.decode(ids) for ids in site.lm.train.dataset.tensors[0]]
    trained = " ".join(decoded)
    assert "<PERSON>" in trained or "<MRN>" in trained or "<EMAIL>" in trained
    assert not any(secret in trained for secret in ("Smith", "00123456", "555-0123", "Weber", "j.doe")), trained
    stored = {record_digests([p], [r])[0] for p, r in pairs}
    assert set(site.all_records) <= stored and len(site.train_records) == len(site.lm.train.dataset)

    # A benchmark's own partition (prepare_lm_rows, deid=None) follows site_deid's rule: a simulated site
    # redacts as data.deidentify says; a deployed one only as its own [deid] (none in an empty node_config).
    import dataclasses

    from fedtune.client.local import prepare_lm_rows
    from fedtune.common.lm_site import load_config_lm_table

    table = load_config_lm_table(run.data)
    for simulated, redacts in ((True, True), (False, False)):
        settings = dataclasses.replace(site.settings, partition=0 if simulated else None)
        own = prepare_lm_rows(run, settings, table, range(len(pairs)), seed=0, tokenizer=tokenizer)
        text = " ".join(tokenizer.decode(ids) for ids in own.lm.train.dataset.tensors[0])
        assert ("Smith" not in text and "00123456" not in text) == redacts, (simulated, text[:200])


def test_a_deployed_site_redacts_what_its_site_toml_names_whatever_the_run_says(tmp_path: Path) -> None:
    from fedtune.client.daemon import load_site_config
    from fedtune.client.local import prepare_site
    from fedtune.common.config import from_dict

    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in ROWS * 4))
    site = load_site_config(_site_toml(tmp_path, '[deid]\nenabled = true\nentities = ["EMAIL", "MRN"]\n'))
    run = from_dict({"simulation": False, "data": {"deidentify": False}})  # the run asks for none: the site's own setting applies

    prepared = prepare_site(run, site.node_config(), run_dir="", labels=["cardio", "neuro"])

    texts = prepared.examples.train_texts + prepared.examples.val_texts
    assert any("MRN: <MRN>" in t for t in texts) and any("<EMAIL>" in t for t in texts)
    assert not any("00123456" in t or "j.doe@" in t for t in texts)
    assert any("John Smith" in t for t in texts), "PERSON is not in this site's entities"

"""A deployed causal-LM site: its site.toml columns, `site init --task causal-lm`, `site check` on
prompt/response data, and the policy key that lets a run train a generative model there at all.

The tiny Llama's tokenizer is word-level with a chat template that wraps a prompt as
``<|user|> PROMPT </s> <|assistant|>`` and an answer as ``RESPONSE </s>`` (``test_causal_lm_run``),
so every expected token count below is read off ``str.split``: prompt words + 3, response words + 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.client.daemon import load_site_config, supernode_command
from fedtune.client.policy import SitePolicy, policy_for, policy_from_node_config
from fedtune.common.config import TASKS, from_dict
from fedtune.common.errors import ConfigError, PolicyRefusal
from fedtune.common.messages import Refusal, RefusalCode, RoundInstructions

from .test_causal_lm_run import save_tiny_llama

SITE_HEAD = '[site]\nname = "clinic-a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n'


def _site_toml(tmp_path: Path, data: str, policy: str = "", model: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE_HEAD + "[data]\n" + data + ("[policy]\n" + policy if policy else "") + model, encoding="utf-8")
    return path


def _node_config(site_toml: Path) -> dict[str, Any]:
    """What flower-supernode hands the ClientApp: the daemon's --node-config, through Flower's own parser."""
    from flwr.common.config import parse_config_args

    cmd = supernode_command(load_site_config(site_toml))
    return dict(parse_config_args([cmd[cmd.index("--node-config") + 1]]))


# -- site.toml ----------------------------------------------------------------------------------
def test_a_causal_lm_site_s_own_columns_reach_its_clientapp_whatever_the_run_names(tmp_path: Path) -> None:
    from fedtune.client.site import resolve_site

    path = _site_toml(tmp_path, 'path = "notes.jsonl"\nprompt_column = "question"\nresponse_column = "answer"\n',
                      'allowed_tasks = ["causal-lm"]\n')
    node_config = _node_config(path)
    # The coordinator names other columns, and a chat column the site does not have.
    run = from_dict({"task": "causal-lm", "data": {"prompt_column": "p", "response_column": "r", "messages_column": "chat"}})

    settings = resolve_site(node_config, run, run_dir="")

    assert (settings.data.prompt_column, settings.data.response_column, settings.data.messages_column) == ("question", "answer", "")
    assert settings.data.path == str(tmp_path / "notes.jsonl")
    assert policy_from_node_config(node_config) == load_site_config(path).policy
    assert settings.policy.allowed_tasks == ("causal-lm",)


def test_a_classification_site_passes_no_lm_columns_and_allows_only_classification(tmp_path: Path) -> None:
    path = _site_toml(tmp_path, 'path = "notes.csv"\n')

    node_config = _node_config(path)

    assert not any(k in node_config for k in ("prompt-column", "response-column", "messages-column"))
    assert load_site_config(path).policy.allowed_tasks == ("classification",)
    assert policy_from_node_config(node_config).allowed_tasks == ("classification",)


def test_lm_column_and_task_problems_name_the_key_and_the_value(tmp_path: Path) -> None:
    path = _site_toml(tmp_path, 'path = "d.jsonl"\nprompt_column = 3\nresponse_column = ""\nmessages_column = ["m"]\ntemplate = "chat"\n',
                      'allowed_tasks = ["classification", "generation"]\n')

    with pytest.raises(ConfigError) as info:
        load_site_config(path)

    text = str(info.value)
    assert "data.prompt_column must be a non-empty string (a column name), got 3" in text
    assert "data.response_column must be a non-empty string (a column name), got ''" in text
    assert "data.messages_column must be a string (a column name), got ['m']" in text
    assert "unknown key data.template" in text, "the run decides how examples are rendered, not a site"
    assert "policy.allowed_tasks must list distinct tasks, at least one, of ['classification', 'causal-lm'], " \
           "got ['classification', 'generation']" in text
    assert all(p.startswith(str(path)) for p in info.value.problems)


@pytest.mark.parametrize(("policy", "expected"), [
    ("allowed_tasks = []\n", "policy.allowed_tasks must list distinct tasks, at least one"),
    ("allowed_tasks = [1]\n", "policy.allowed_tasks must be a list of strings or a comma-separated string, got [1]"),
    ('allowed_tasks = ["causal-lm", "causal-lm"]\n', "got ['causal-lm', 'causal-lm']"),
])
def test_allowed_tasks_of_the_wrong_type_or_empty_are_refused(tmp_path: Path, policy: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_site_config(_site_toml(tmp_path, 'path = "d.jsonl"\n', policy))


def test_prompt_and_response_columns_must_differ_unless_the_site_reads_chats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.prompt_column and data.response_column must differ, both are 'text'"):
        load_site_config(_site_toml(tmp_path, 'path = "d.jsonl"\nprompt_column = "text"\nresponse_column = "text"\n'))
    chats = load_site_config(_site_toml(tmp_path, 'path = "d.jsonl"\nprompt_column = "text"\nresponse_column = "text"\n'
                                                  'messages_column = "chat"\n'))
    assert chats.messages_column == "chat"


# -- site init --------------------------------------------------------------------------------
def _init(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    (tmp_path / "ca.crt").write_text("public\n")
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    return CliRunner().invoke(main, ["site", "init", "--name", "clinic-a", "--data", str(tmp_path / "pairs.jsonl"),
                                     "--coordinator", "127.0.0.1:9093", "--ca", str(tmp_path / "ca.crt"), "--out", str(tmp_path / "site"),
                                     *extra])


def test_site_init_for_causal_lm_writes_the_columns_and_allows_only_that_task(tmp_path: Path) -> None:
    import tomllib

    result = _init(tmp_path, "--task", "causal-lm", "--prompt-column", "question", "--response-column", "answer")

    assert result.exit_code == 0, result.output
    raw = tomllib.loads((tmp_path / "site" / "site.toml").read_text())
    assert raw["data"] == {"path": str((tmp_path / "pairs.jsonl").resolve()), "prompt_column": "question", "response_column": "answer"}
    assert raw["policy"]["allowed_tasks"] == ["causal-lm"]
    site = load_site_config(tmp_path / "site" / "site.toml")
    assert (site.prompt_column, site.response_column, site.messages_column) == ("question", "answer", "")
    assert "causal-lm" in result.output and "repeat training text" in result.output


def test_site_init_with_a_messages_column_writes_only_that_column(tmp_path: Path) -> None:
    import tomllib

    result = _init(tmp_path, "--task", "causal-lm", "--messages-column", "chat")

    assert result.exit_code == 0, result.output
    raw = tomllib.loads((tmp_path / "site" / "site.toml").read_text())
    assert raw["data"] == {"path": str((tmp_path / "pairs.jsonl").resolve()), "messages_column": "chat"}


@pytest.mark.parametrize(("flags", "expected"), [
    (["--prompt-column", "q"], "--prompt-column apply to --task causal-lm only; this site is initialised for --task classification"),
    (["--task", "causal-lm", "--messages-column", "chat", "--response-column", "a"],
     "--messages-column replaces --prompt-column and --response-column"),
])
def test_site_init_refuses_lm_flags_that_do_not_fit_in_one_line(tmp_path: Path, flags: list[str], expected: str) -> None:
    result = _init(tmp_path, *flags)

    assert result.exit_code == 2, result.output
    assert f"fedtune: error: {expected}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "site" / "site.toml").exists()


# -- the policy against a malicious coordinator ----------------------------------------------------
@pytest.fixture
def refusing_site(tmp_path: Path) -> Context:
    """A deployed classification site whose data file and model folder do not exist: any read fails loudly."""
    node_config = _node_config(_site_toml(tmp_path, 'path = "missing.csv"\n'))
    node_config["base-model"] = str(tmp_path / "no-model")  # set past site.toml's own checks of the folder
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _malicious(task: str, tmp_path: Path) -> tuple[dict[str, Any], ConfigRecord]:
    """What a coordinator controls: the whole run config and every field of the message."""
    run = from_dict({"task": task, "simulation": False, "privacy": {"target_epsilon": 1.0}, "out": str(tmp_path / "run"),
                     "data": {"path": "/etc/passwd", "prompt_column": "root"}})
    labels = ("a", "b") if task == "classification" else ()
    return run.to_flat(), ConfigRecord(RoundInstructions(server_round=1, num_rounds=1, labels=labels, run_id="attack").to_config())


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_run_whose_task_the_policy_does_not_allow_is_refused_with_a_code_before_any_read(
    refusing_site: Context, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    from fedtune.client.app import build_client_app

    run_flat, config = _malicious("causal-lm", tmp_path)
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": config}), dst_node_id=1, message_type=kind)

    with caplog.at_level(logging.WARNING, logger="fedtune.client.app"):
        reply = build_client_app(run_flat)(msg, refusing_site)

    assert reply.has_error()
    # The code and the site's name only: not the task, the policy, a path.
    assert Refusal.parse(reply.error.reason) == Refusal(site="clinic-a", code=RefusalCode.TASK_NOT_ALLOWED)
    assert reply.error.reason == "policy:task site=clinic-a"
    # Had the site read its data or its model first, the missing file or folder would have been the refusal.
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fedtune.client.app"]
    assert "policy:task" in line and "'causal-lm'" in line and "policy.allowed_tasks" in line, line
    assert not (tmp_path / "state").exists(), "nothing was written in the site's state folder (no ledger, no seed)"


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_causal_lm_only_site_refuses_a_classification_run_through_its_clientapp_before_any_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    from fedtune.client.app import build_client_app

    # The other task path (classification: the data is loaded first, the model after): nothing exists to read.
    node_config = _node_config(_site_toml(tmp_path, 'path = "missing.jsonl"\n', 'allowed_tasks = ["causal-lm"]\n'))
    node_config["base-model"] = str(tmp_path / "no-model")
    site = Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    run_flat, config = _malicious("classification", tmp_path)
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": config}), dst_node_id=1, message_type=kind)

    with caplog.at_level(logging.WARNING, logger="fedtune.client.app"):
        reply = build_client_app(run_flat)(msg, site)

    assert reply.has_error() and reply.error.reason == "policy:task site=clinic-a"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fedtune.client.app"]
    assert "'classification'" in line and "only ['causal-lm']" in line, line
    assert not (tmp_path / "state").exists()


def test_a_causal_lm_only_site_refuses_a_classification_run_and_accepts_its_own(tmp_path: Path) -> None:
    from fedtune.client.site import resolve_site

    path = _site_toml(tmp_path, 'path = "missing.jsonl"\n', 'allowed_tasks = ["causal-lm"]\n')
    node_config = _node_config(path)

    with pytest.raises(PolicyRefusal) as info:
        resolve_site(node_config, from_dict({"task": "classification"}), run_dir="")
    assert info.value.code == RefusalCode.TASK_NOT_ALLOWED.value
    assert "the run's task is 'classification'; this site's policy allows only ['causal-lm'] (policy.allowed_tasks)" in str(info.value)
    assert resolve_site(node_config, from_dict({"task": "causal-lm"}), run_dir="").name == "clinic-a"


def test_the_policy_refuses_a_task_it_does_not_list_and_simulated_sites_allow_every_task() -> None:
    with pytest.raises(PolicyRefusal):
        SitePolicy().check_task("causal-lm")
    SitePolicy().check_task("classification")
    SitePolicy(allowed_tasks=TASKS).check_task("causal-lm")
    for task in TASKS:  # the researcher owns every simulated site's data
        policy_for({"partition-id": 0}).check_task(task)


# -- site check ---------------------------------------------------------------------------------
# Every word is distinctive, so a leak of any row's text into the report would be found.
ROWS = [(" ".join(["triage", f"w{k}", *["zebrafinch"] * (k % 7)]), " ".join(["discharge", *["quokka"] * (k % 4)])) for k in range(30)]
MAX_LENGTH = 10
LEAKS = ("triage", "zebrafinch", "discharge", "quokka", "w1")


def _expected(rows: list[tuple[str, str]], max_length: int = MAX_LENGTH) -> tuple[int, int]:
    """(truncated, dropped) from word counts: prompt words + 3, response words + 1 (module docstring)."""
    truncated = dropped = 0
    for prompt, response in rows:
        p, r = len(prompt.split()) + 3, len(response.split()) + 1
        dropped += p >= max_length
        truncated += p < max_length < p + r
    return truncated, dropped


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", [t for row in ROWS for t in row])


def _lm_site(tmp_path: Path, model: Path, rows: list[dict[str, Any]], *, data: str = "") -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return _site_toml(tmp_path, 'path = "pairs.jsonl"\n' + data, 'allowed_tasks = ["causal-lm"]\n',
                      model=f'[model]\nbase_model = "{model}"\n')


def _checks(site_toml: Path, max_length: int = MAX_LENGTH) -> dict[str, Any]:
    from fedtune.client.check import run_checks

    return {r.name: r for r in run_checks(load_site_config(site_toml), max_length=max_length)}


def test_site_check_reports_rows_and_truncation_with_the_site_s_tokenizer_and_no_text(tmp_path: Path, tiny_llama: Path) -> None:
    site = _lm_site(tmp_path, tiny_llama, [{"prompt": p, "response": r} for p, r in ROWS])
    truncated, dropped = _expected(ROWS)
    assert truncated and dropped, "the rows exercise both fates"

    results = _checks(site)

    data = results["data"]
    assert data.ok, data.detail
    assert f"causal-lm: {len(ROWS)} rows ({len(ROWS)} distinct records" in data.detail
    assert f"at max_length {MAX_LENGTH}: {truncated} would be truncated" in data.detail
    assert f"{dropped} dropped" in data.detail
    longest = max(len(p.split()) + 3 + len(r.split()) + 1 for p, r in ROWS)
    assert f"max {longest}" in data.detail
    assert results["model"].ok and str(tiny_llama) in results["model"].detail
    assert "tasks allowed: causal-lm" in results["policy"].detail
    everything = " ".join(r.detail for r in results.values())
    assert not any(word in everything for word in LEAKS), everything


def test_site_check_command_counts_truncation_at_the_run_s_max_length(tmp_path: Path, tiny_llama: Path) -> None:
    from fedtune.cli import main

    site = _lm_site(tmp_path, tiny_llama, [{"prompt": p, "response": r} for p, r in ROWS])
    truncated, dropped = _expected(ROWS, 12)

    result = CliRunner().invoke(main, ["site", "check", "--config", str(site), "--max-length", "12"])

    assert result.exit_code == 1, result.output  # an insecure site with no coordinator running fails those two checks
    (line,) = [x for x in result.output.splitlines() if " data " in x]
    assert line.startswith("ok") and f"at max_length 12: {truncated} would be truncated" in line and f"{dropped} dropped" in line, line
    assert not any(word in result.output for word in LEAKS), result.output


def test_site_check_counts_empty_responses_naming_rows_not_text(tmp_path: Path, tiny_llama: Path) -> None:
    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    rows[2]["response"] = "  "
    rows[5]["response"] = None
    rows[8].pop("response")

    data = _checks(_lm_site(tmp_path, tiny_llama, rows))["data"]

    assert not data.ok
    assert "30 rows; 3 empty responses in column 'response' (row 3 (line 3), row 6 (line 6), row 9 (line 9))" in data.detail
    assert "pairs.jsonl" in data.detail
    assert not any(word in data.detail for word in LEAKS), data.detail


def test_site_check_names_every_bad_row_of_every_kind_at_once_without_text(tmp_path: Path, tiny_llama: Path) -> None:
    rows: list[dict[str, Any]] = [{"prompt": p, "response": r} for p, r in ROWS]
    rows[1]["prompt"] = " "
    rows[4]["response"] = ""
    rows[7]["prompt"] = {"triage": "zebrafinch"}
    rows[11]["response"] = 2.5  # a number that is not an integer: training refuses it too
    rows[12]["response"] = 7  # an integer is read as the text "7", as training reads it

    data = _checks(_lm_site(tmp_path, tiny_llama, rows))["data"]

    assert not data.ok
    assert ("30 rows; 1 blank prompts in column 'prompt' (row 2 (line 2)); 1 empty responses in column 'response' (row 5 (line 5)); "
            "2 unusable rows: row 8 (line 8): column 'prompt' holds dict, not text; row 12 (line 12): column 'response' holds "
            "float, not text. Training refuses") in data.detail
    assert not any(word in data.detail for word in LEAKS) and "2.5" not in data.detail, data.detail


def test_site_check_names_the_file_and_the_missing_column(tmp_path: Path, tiny_llama: Path) -> None:
    data = _checks(_lm_site(tmp_path, tiny_llama, [{"prompt": p, "response": r} for p, r in ROWS], data='response_column = "summary"\n'))["data"]

    assert not data.ok
    assert "pairs.jsonl: missing column(s) ['summary']; columns found: ['prompt', 'response']" in data.detail


def test_site_check_names_a_malformed_chat_s_row_without_quoting_it(tmp_path: Path, tiny_llama: Path) -> None:
    good = [{"role": "user", "content": "triage zebrafinch"}, {"role": "assistant", "content": "discharge quokka"}]
    rows = [{"chat": good}, {"chat": [{"role": "doctor", "content": "triage zebrafinch"}, good[1]]}, {"chat": good[:1]}]

    results = _checks(_lm_site(tmp_path, tiny_llama, rows, data='messages_column = "chat"\n'))
    data = results["data"]

    assert not data.ok
    assert "2 unusable rows" in data.detail
    assert "row 2 (line 2): column 'chat' message 1: role must be one of ['system', 'user', 'assistant']" in data.detail
    assert "row 3 (line 3): column 'chat' must end with the assistant's answer" in data.detail
    assert not any(word in data.detail for word in LEAKS), data.detail
    # The ledger check reads the same rows for their keys: it fails on them too, by number, never quoting one.
    ledger = results["privacy ledger"]
    assert not ledger.ok and "2 unusable rows" in ledger.detail, ledger.detail
    everything = " ".join(r.detail for r in results.values())
    assert not any(word in everything for word in LEAKS), everything


def test_site_ledger_names_an_unusable_row_by_number_without_its_text(tmp_path: Path, tiny_llama: Path) -> None:
    from fedtune.cli import main

    rows = [{"prompt": p, "response": r} for p, r in ROWS]
    rows[3]["response"] = ["discharge", "quokka"]  # training refuses it, quoting the value in the site's own log
    site = _lm_site(tmp_path, tiny_llama, rows)

    result = CliRunner().invoke(main, ["site", "ledger", "--config", str(site)])

    assert result.exit_code == 0, result.output  # the ledger stays readable when the data is not
    assert "cannot read the data file" in result.output
    assert "row 4 (line 4): column 'response' holds list, not text" in result.output
    assert not any(word in result.output for word in LEAKS), result.output


def test_site_ledger_reads_a_causal_lm_site_s_records(tmp_path: Path, tiny_llama: Path) -> None:
    from fedtune.cli import main

    site = _lm_site(tmp_path, tiny_llama, [{"prompt": p, "response": r} for p, r in ROWS])

    result = CliRunner().invoke(main, ["site", "ledger", "--config", str(site)])

    assert result.exit_code == 0, result.output
    assert f"({len(ROWS)} distinct records)" in result.output and "cannot read the data file" not in result.output

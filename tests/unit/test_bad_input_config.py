"""Bad input, part 1 (issue 13): configuration files, flags, model folders, adapters and run directories.

Each test makes a mistake as a user would, through the real command line (click's CliRunner, so
fedtune's own error handling runs), and asserts the exit code, that the one line names the file,
key or flag and the value found, and that no traceback is shown without --debug. No training: the
model folders are tiny BERTs built from a config in code (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fedtune import __version__
from fedtune.cli import main
from fedtune.common.config import RunConfig, dump_toml
from fedtune.common.errors import ConfigError

SITE = '[site]\nname = "hospital-a"\ncoordinator = "127.0.0.1:1"\ninsecure = true\n[data]\npath = "notes.csv"\n'


def _fedtune(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(result: Result, *expected: str) -> str:
    """The error line, after checking it is one fedtune error with exit code 2, no traceback, naming ``expected``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "fedtune: error: " in result.output, result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    return result.output


def _site(tmp_path: Path, extra: str = "", *, head: str = SITE) -> Path:
    (tmp_path / "notes.csv").write_text("text,label\n" + "".join(f"note {i},{'a' if i % 2 else 'b'}\n" for i in range(8)))
    path = tmp_path / "site.toml"
    path.write_text(head + extra)
    return path


# ----------------------------------------------------------------------------- 1. malformed TOML


@pytest.mark.parametrize("command", [["simulate"], ["run", "--labels", "a,b", "--insecure"]])
def test_a_toml_syntax_error_names_the_file_line_column_and_reason(command: list[str], tmp_path: Path) -> None:
    config = tmp_path / "scenario.toml"
    config.write_text("[federation]\nrounds = 3\n[privacy\n")
    _refused(_fedtune(*command, "--config", config, "--out", tmp_path / "run"),
             str(config), "is not valid TOML", "line 3, column 9", "Expected ']'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["check"], ["start"]])
def test_a_site_toml_syntax_error_names_the_file_line_and_column(command: list[str], tmp_path: Path) -> None:
    path = _site(tmp_path, "[privacy\n")
    _refused(_fedtune("site", *command, "--config", path), f"site config {path}", "line 7, column 9")


@pytest.mark.parametrize("command", [["simulate"], ["run", "--labels", "a,b", "--insecure"]])
def test_an_unknown_key_or_section_is_named_with_a_did_you_mean_and_the_allowed_keys(command: list[str], tmp_path: Path) -> None:
    config = tmp_path / "scenario.toml"
    config.write_text("[federation]\nround = 3\n[privcy]\ndelta = 1e-5\n[lora]\nrnk = 4\n[train]\nzzzz = 1\n")
    out = _refused(_fedtune(*command, "--config", config, "--out", tmp_path / "run"))
    assert f"{config}: unknown key federation.round (did you mean 'rounds'?); allowed: ['aggregation'," in out
    assert "unknown section [privcy] (did you mean 'privacy'?); allowed: ['client_dp', 'data'," in out
    assert "unknown key lora.rnk (did you mean 'rank'?)" in out
    assert "unknown key train.zzzz; allowed: ['batch_size'," in out  # nothing close: no guess
    assert not (tmp_path / "run").exists()


def test_a_value_of_the_wrong_type_in_a_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "scenario.toml"
    config.write_text('[federation]\nrounds = "five"\n[privacy]\nenabled = "yes"\n')
    _refused(_fedtune("simulate", "--config", config, "--out", tmp_path / "run"),
             f"{config}: federation.rounds must be an integer, got 'five'", "privacy.enabled must be true or false, got 'yes'")


def test_site_toml_unknown_keys_and_sections_get_a_did_you_mean(tmp_path: Path) -> None:
    path = _site(tmp_path, "[polcy]\nrequire_dp = true\n[privacy]\nbudget_epsilon_x = 3\n[policy]\nmax_epsilon_per_rn = 3\n")
    out = _refused(_fedtune("site", "check", "--config", path))
    assert f"{path}: unknown section [polcy] (did you mean 'policy'?); allowed: ['apps', 'data'," in out
    assert "unknown key privacy.budget_epsilon_x (did you mean 'budget_epsilon'?)" in out
    assert "unknown key policy.max_epsilon_per_rn (did you mean 'max_epsilon_per_run'?); allowed: [" in out


def test_site_toml_values_of_the_wrong_type_are_named_once_each(tmp_path: Path) -> None:
    path = _site(tmp_path, '[privacy]\nbudget_epsilon = "eight"\ndelta = "x"\n[policy]\nmax_clip_norm = "ten"\nrequire_dp = "yes"\n')
    out = _refused(_fedtune("site", "check", "--config", path),
                   "privacy.budget_epsilon must be a number, got 'eight'", "privacy.delta must be a number, got 'x'",
                   "policy.max_clip_norm must be a number, got 'ten'", "policy.require_dp must be true or false, got 'yes'")
    assert "could not convert" not in out and "must be > 0" not in out  # the type, not a range, is what is wrong


def test_a_quoted_false_never_turns_tls_off(tmp_path: Path) -> None:
    # bool("false") is True: read loosely, this site would run without TLS and node authentication.
    head = SITE.replace("insecure = true", 'insecure = "false"')
    _refused(_fedtune("site", "check", "--config", _site(tmp_path, '[privacy]\nallow_no_dp = "false"\n', head=head)),
             "site.insecure must be true or false (unquoted), got 'false'",
             "privacy.allow_no_dp must be true or false (unquoted), got 'false'")


def test_a_site_toml_section_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    path = _site(tmp_path, head="policy = 5\n" + SITE)
    _refused(_fedtune("site", "check", "--config", path), f"{path}: [policy] must be a table, got 5.")


# ------------------------------------------------------------------------- 2. out-of-range values


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epsilon", "0"], "privacy.target_epsilon must be > 0, got 0.0 (set by --epsilon)"),
        (["--epsilon", "-1"], "privacy.target_epsilon must be > 0, got -1.0 (set by --epsilon)"),
        (["--epsilon", "inf"], "privacy.target_epsilon must be finite, got inf"),
        (["--delta", "1"], "privacy.delta must be in (0, 1), got 1.0 (set by --delta)"),
        (["--delta", "0"], "privacy.delta must be in (0, 1), got 0.0 (set by --delta)"),
        (["--lora-rank", "0"], "lora.rank must be in [1, 512], got 0 (set by --lora-rank)"),
        (["--rounds", "0"], "federation.rounds must be >= 1, got 0 (set by --rounds)"),
        (["--fraction-train", "0"], "federation.fraction_train must be in (0, 1], got 0.0 (set by --fraction-train)"),
        (["--fraction-train", "1.5"], "federation.fraction_train must be in (0, 1], got 1.5 (set by --fraction-train)"),
        (["--clip-norm", "-0.5"], "privacy.clip_norm must be > 0 (or 0: the task's default), got -0.5 (set by --clip-norm)"),
        (["--clip-norm", "inf"], "privacy.clip_norm must be finite"),
        (["--client-dp-clip-norm", "-1"], "client_dp.clip_norm must be > 0, got -1.0 (set by --client-dp-clip-norm)"),
        (["--client-dp-epsilon", "0"], "client_dp.target_epsilon must be > 0, got 0.0 (set by --client-dp-epsilon)"),
    ],
)
def test_an_out_of_range_flag_names_the_setting_the_flag_and_the_value(flags: list[str], message: str, tmp_path: Path) -> None:
    _refused(_fedtune("simulate", *flags, "--out", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()


def test_fedtune_run_refuses_out_of_range_flags_before_it_dials_the_coordinator(tmp_path: Path) -> None:
    # 127.0.0.1:1 refuses connections: an error about the connection would mean the flags were not checked first.
    _refused(_fedtune("run", "--labels", "a,b", "--insecure", "--coordinator", "127.0.0.1:1", "--epsilon", "0", "--delta", "1",
                      "--rounds", "0", "--out", tmp_path / "run"),
             "privacy.target_epsilon must be > 0, got 0.0 (set by --epsilon)", "privacy.delta must be in (0, 1), got 1.0 (set by --delta)",
             "federation.rounds must be >= 1, got 0 (set by --rounds)")


def test_out_of_range_config_keys_are_named_with_the_file(tmp_path: Path) -> None:
    config = tmp_path / "scenario.toml"
    config.write_text("[privacy]\ntarget_epsilon = 0\ndelta = 1\nclip_norm = -2\n[lora]\nrank = 0\n"
                      "[federation]\nrounds = 0\nfraction_train = 0\n")
    out = _refused(_fedtune("simulate", "--config", config, "--out", tmp_path / "run"))
    for expected in ("privacy.target_epsilon must be > 0, got 0.0", "privacy.delta must be in (0, 1), got 1.0",
                     "privacy.clip_norm must be > 0 (or 0: the task's default), got -2.0", "lora.rank must be in [1, 512], got 0",
                     "federation.rounds must be >= 1, got 0", "federation.fraction_train must be in (0, 1], got 0.0"):
        assert f"{config}: {expected}" in out, expected
    assert "(set by" not in out  # the file set them, not a flag


def test_out_of_range_site_policy_and_budget_are_named_with_the_file(tmp_path: Path) -> None:
    path = _site(tmp_path, "[privacy]\nbudget_epsilon = 0\ndelta = 1\n[policy]\nmax_epsilon_per_run = 0\nmax_clip_norm = 0\n"
                           "max_sample_rate = 1.5\nmax_lora_rank = -1\n")
    out = _refused(_fedtune("site", "check", "--config", path))
    for expected in ("privacy.budget_epsilon must be > 0, got 0", "privacy.delta must be in (0, 1), got 1",
                     "policy.max_epsilon_per_run must be > 0, got 0.0", "policy.max_clip_norm must be > 0, got 0.0",
                     "policy.max_sample_rate must be in (0, 1], got 1.5", "policy.max_lora_rank must be >= 0"):
        assert f"{path}: {expected}" in out, expected


def test_debug_shows_the_traceback_of_the_same_error(tmp_path: Path) -> None:
    result = _fedtune("--debug", "simulate", "--epsilon", "0", "--out", tmp_path / "run")
    assert isinstance(result.exception, ConfigError)
    assert "privacy.target_epsilon must be > 0" in str(result.exception)


# ------------------------------------------------------------------- 3. a folder that is not a model


def _not_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Folders a user might mistake for a model, each with what the error must say about it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert",\n')
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text('{"model_type": "bert"}')
    missing = tmp_path / "no-such-folder"
    return {
        "empty": (empty, f"{empty} has no config.json"),
        "broken config.json": (broken, f"{broken / 'config.json'} is not valid JSON"),
        "no weights": (config_only, f"{config_only} has no weights and no tokenizer (it holds ['config.json'])"),
        "missing": (missing, f"{missing} does not exist"),
    }


NEEDS = "a local Hugging Face model folder needs config.json (with model_type), weights"


def test_a_base_model_flag_that_is_not_a_model_is_refused_before_any_site_starts(tmp_path: Path) -> None:
    for case, (folder, message) in _not_models(tmp_path).items():
        out = tmp_path / f"run-{folder.name}"
        _refused(_fedtune("simulate", "--base-model", folder, "--out", out), f"model.base_model: {message}", NEEDS, "(set by --base-model)")
        assert not out.exists(), case


def test_a_base_model_that_is_a_file_is_refused_by_the_flag(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a folder")
    result = _fedtune("simulate", "--base-model", file, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'--base-model'" in result.output and f"'{file}' is a file" in result.output  # click's own check


def test_a_config_file_base_model_that_is_not_a_model_names_the_file(tmp_path: Path) -> None:
    folder, message = _not_models(tmp_path)["no weights"]
    config = tmp_path / "scenario.toml"
    config.write_text(f'[model]\nbase_model = "{folder}"\n')
    _refused(_fedtune("simulate", "--config", config, "--out", tmp_path / "run"), f"{config}: model.base_model: {message}", NEEDS)


def test_site_start_refuses_a_site_base_model_that_is_not_a_model_before_anything_starts(tmp_path: Path) -> None:
    folder, message = _not_models(tmp_path)["broken config.json"]
    path = _site(tmp_path, f'[model]\nbase_model = "{folder}"\n')
    # A held runtime port: were the model not checked first, the refusal would name --runtime-port instead
    # (and nothing would start either way).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = _refused(_fedtune("site", "start", "--config", path, "--runtime-port", port, "--no-warm-worker"),
                       f"{path}: model.base_model: {message}", NEEDS)
    assert "--runtime-port" not in out


def test_site_check_fails_the_model_check_naming_the_site_base_model(tmp_path: Path) -> None:
    folder, message = _not_models(tmp_path)["empty"]
    result = _fedtune("site", "check", "--config", _site(tmp_path, f'[model]\nbase_model = "{folder}"\n'))
    assert result.exit_code == 1 and "Traceback" not in result.output
    model_line = next(line for line in result.output.splitlines() if " model " in f" {line} ")
    assert "FAIL" in model_line and message in model_line and NEEDS in model_line


# --------------------------------------------------------------- 4. an adapter for another model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A classification adapter on a tiny BERT (labels x, y), that BERT, and a wider one (hidden 48)."""
    from fedtune.common.config import LoraSettings, ModelConfig
    from fedtune.common.model import build_model, save_adapter
    from fedtune.common.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_bert(root / "bert-32")
    other = make_tiny_bert(root / "bert-48", hidden_size=48)
    model = build_model(ModelConfig(base_model=str(base)), LoraSettings(rank=4), 2, seed=1).model
    save_adapter(model, root / "adapter", metadata={"task": "classification", "labels": ["x", "y"], "max_length": 16,
                                                    "base_model": str(base)})
    (root / "data.csv").write_text("text,label\nchest pain,x\nheadache,z\n")
    return {"adapter": root / "adapter", "base": base, "other": other, "data": root / "data.csv", "root": root}


def test_an_adapter_records_the_fingerprint_of_its_base_models_config(adapters: dict[str, Path]) -> None:
    meta = json.loads((adapters["adapter"] / "fedtune.json").read_text())
    assert meta["base_model_id"] == hashlib.sha256((adapters["base"] / "config.json").read_bytes()).hexdigest()[:16]


def test_predict_and_evaluate_refuse_another_base_model_naming_both(adapters: dict[str, Path]) -> None:
    other_id = hashlib.sha256((adapters["other"] / "config.json").read_bytes()).hexdigest()[:16]
    for command in (["predict", "--adapter", adapters["adapter"], "--base-model", adapters["other"], "chest pain"],
                    ["evaluate", "--adapter", adapters["adapter"], "--base-model", adapters["other"], "--data", adapters["data"]]):
        _refused(_fedtune(*command), f"--adapter {adapters['adapter']} was trained on base model {adapters['base']}",
                 f"{adapters['other']} is another model (config id {other_id})")


def test_an_older_adapter_without_a_fingerprint_is_refused_by_its_tensor_shapes(adapters: dict[str, Path], tmp_path: Path) -> None:
    # Written before base_model_id existed, its recorded base model no longer on this machine.
    old = tmp_path / "old-adapter"
    shutil.copytree(adapters["adapter"], old)
    meta = json.loads((old / "fedtune.json").read_text())
    del meta["base_model_id"]
    meta["base_model"] = str(tmp_path / "gone")
    (old / "fedtune.json").write_text(json.dumps(meta))
    _refused(_fedtune("predict", "--adapter", old, "--base-model", adapters["other"], "chest pain"),
             f"--adapter {old} does not fit base model {adapters['other']} (it was trained on {tmp_path / 'gone'})",
             "size mismatch", "torch.Size([4, 48])")
    _refused(_fedtune("predict", "--adapter", old, "chest pain"), f"was trained on base model {tmp_path / 'gone'}, which is not on this machine",
             "--base-model")


def test_evaluate_names_the_adapters_labels_and_the_label_outside_them(adapters: dict[str, Path]) -> None:
    _refused(_fedtune("evaluate", "--adapter", adapters["adapter"], "--data", adapters["data"]),
             f"--adapter {adapters['adapter']} was trained on the labels ['x', 'y']",
             f"--data {adapters['data']} row 2: label 'z' is not one of ['x', 'y']")


def test_a_classification_adapter_is_refused_by_generate_and_a_causal_lm_one_by_predict(adapters: dict[str, Path], tmp_path: Path) -> None:
    _refused(_fedtune("generate", "--adapter", adapters["adapter"], "hello"),
             f"--adapter {adapters['adapter']} is a classification adapter, not a causal-lm one", "fedtune predict")
    lm = tmp_path / "lm-adapter"  # refused on its metadata, before any weight is read
    lm.mkdir()
    (lm / "adapter_config.json").write_text("{}")
    (lm / "fedtune.json").write_text(json.dumps({"task": "causal-lm", "max_length": 32, "base_model": str(adapters["base"])}))
    _refused(_fedtune("predict", "--adapter", lm, "hello"), f"--adapter {lm} is a causal-lm adapter", "fedtune generate")


def test_adapter_metadata_from_another_version_is_named(adapters: dict[str, Path], tmp_path: Path) -> None:
    odd = tmp_path / "odd-adapter"
    shutil.copytree(adapters["adapter"], odd)
    (odd / "fedtune.json").write_text(json.dumps({"labels": ["x", "y"], "base_model": str(adapters["base"])}))
    _refused(_fedtune("predict", "--adapter", odd, "hi"), f"{odd / 'fedtune.json'} lacks ['max_length']")
    (odd / "fedtune.json").write_text("{not json")
    _refused(_fedtune("predict", "--adapter", odd, "hi"), f"{odd / 'fedtune.json'} is not valid JSON")


# ------------------------------------------------------------ 5. a run directory from another version


def _run_dir(path: Path, *, run_format: int, writer: str = "9.0.0", config_extra: str = "") -> Path:
    path.mkdir(parents=True)
    dump_toml(RunConfig(out=str(path)), path / "config.toml")
    if config_extra:
        with open(path / "config.toml", "a", encoding="utf-8") as f:
            f.write(config_extra)
    (path / "run.json").write_text(json.dumps({"format": run_format, "run_id": "7", "created": 1.0,
                                               "fedtune_version": writer, "resumes": []}))
    (path / "summary.json").write_text(json.dumps({"dp": True, "sites": []}))
    return path


def test_resume_refuses_a_run_directory_of_another_format_naming_both_versions(tmp_path: Path) -> None:
    # The unknown section also stops a run if the format were not checked first: this test never starts one.
    run = _run_dir(tmp_path / "run", run_format=2, config_extra="\n[quantum]\nqubits = 3\n")
    expected = (f"{run / 'run.json'} has format 2 (written by fedtune 9.0.0); this fedtune {__version__} reads format 1 only: "
                "resume it with fedtune 9.0.0")
    _refused(_fedtune("simulate", "--resume", run), expected)
    _refused(_fedtune("run", "--resume", run, "--insecure", "--coordinator", "127.0.0.1:1"), expected)
    assert not (run / "resume-request.json").exists()


def test_resume_names_the_writer_when_a_newer_fedtune_wrote_keys_this_one_does_not_know(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", run_format=1, config_extra="\n[quantum]\nqubits = 3\n")
    _refused(_fedtune("simulate", "--resume", run), "config.toml: unknown section [quantum]",
             f"{run} was written by fedtune 9.0.0, this is fedtune {__version__}: resume it with fedtune 9.0.0")


def test_report_and_audit_refuse_a_run_directory_of_another_format_and_write_nothing(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", run_format=2)
    before = sorted(p.name for p in run.iterdir())
    _refused(_fedtune("report", run), "run.json has format 2 (written by fedtune 9.0.0)", "report on it with fedtune 9.0.0")
    data = tmp_path / "rows.csv"
    data.write_text("text,label\na,x\nb,y\n")
    _refused(_fedtune("audit", run, "--members", data, "--non-members", data), "run.json has format 2", "audit it with fedtune 9.0.0")
    assert sorted(p.name for p in run.iterdir()) == before


def test_report_names_the_fields_a_summary_lacks(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", run_format=1, writer=__version__)
    (run / "summary.json").write_text(json.dumps({"dp": True, "sites": [{"site": "hospital-a", "examples": 3}]}))
    _refused(_fedtune("report", run), f"{run / 'summary.json'}: sites[0] (hospital-a) lacks ['epsilon', 'budget_epsilon'")
    (run / "summary.json").write_text(json.dumps({"sites": []}))
    _refused(_fedtune("report", run), "summary.json: missing key 'dp'")
    assert not (run / "privacy.json").exists()


def test_audit_of_a_run_whose_summary_lacks_epsilon_reports_without_the_dp_bound(adapters: dict[str, Path], tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", run_format=1, writer=__version__)
    shutil.copytree(adapters["adapter"], run / "adapter")
    (run / "summary.json").write_text(json.dumps({"dp": True, "sites": [{"site": "hospital-a"}]}))
    data = tmp_path / "rows.csv"
    data.write_text("text,label\nchest pain,x\nheadache,y\n")
    result = _fedtune("audit", run, "--members", data, "--non-members", data, "--resamples", "10")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "lacks per-site epsilon and delta; no DP bound is shown" in result.output
    assert "DP bound" not in result.output.replace("no DP bound", "")


def test_resume_names_the_flag_that_gave_an_out_of_range_value(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", run_format=1, writer=__version__)
    _refused(_fedtune("simulate", "--resume", run, "--rounds", "0"), "federation.rounds must be >= 1, got 0 (set by --rounds)")
    assert not (run / "resume-request.json").exists()

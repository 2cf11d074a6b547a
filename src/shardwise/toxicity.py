"""Stage `score_toxicity`: a toxicity probability per generation, from a pluggable scorer
(docs/design.md §4): ``profanity-check`` (the embedded default: alt-profanity-check's offensive-language
classifier), ``hf`` (any Hugging Face sequence classifier prepared under resources/models/, with a
configured positive label) or ``detoxify`` (when installed). Neural scorers run batched, on the GPU
when there is one. Each score table records the scorer's name and version in its Parquet metadata.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.atomic import atomic_path
from shardwise.config import load_config
from shardwise.errors import InputError, ModelError
from shardwise.tables import load_generations

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("alt-profanity-check", "scikit-learn", "torch", "transformers", "detoxify")

PROFANITY_BATCH = 100_000  # texts per profanity-check call


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def profanity_check(texts: Sequence[str], batch_size: int = PROFANITY_BATCH) -> tuple[np.ndarray, str]:
    """Scores `batch_size` texts per call, so memory does not grow with the run (one call holds the
    texts' sparse word-count matrix whole). Each text's score is its own (a linear model on its own
    word counts): batches give the same scores as one call."""
    from profanity_check import predict_prob

    out = [
        np.asarray(predict_prob(list(texts[s : s + batch_size])), dtype=np.float64)
        for s in range(0, len(texts), batch_size)
    ]
    values = np.concatenate(out) if out else np.zeros(0, dtype=np.float64)
    return values, f"alt-profanity-check {_version('alt-profanity-check')}"


def hf_classifier(
    texts: Sequence[str], model_dir: str | Path, label: str, batch_size: int, name: str
) -> tuple[np.ndarray, str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from shardwise.models import read_record, revision

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}
    if label.lower() not in labels:
        known = ", ".join(map(str, model.config.id2label.values()))
        raise ModelError(f"toxicity model {name!r}: no label {label!r} (its labels: {known})")
    index = labels[label.lower()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    multi = model.config.problem_type == "multi_label_classification"
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**enc.to(device)).logits.float()
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
        out.append(probs[:, index].cpu().numpy())
    return np.concatenate(out).astype(
        np.float64
    ), f"hf {name} ({revision(read_record(model_dir))}) label {label}"


def detoxify(texts: Sequence[str], variant: str, batch_size: int) -> tuple[np.ndarray, str]:
    try:
        from detoxify import Detoxify
    except ImportError:
        raise ModelError("toxicity scorer 'detoxify': the detoxify package is not installed") from None
    import torch

    model = Detoxify(variant, device="cuda" if torch.cuda.is_available() else "cpu")
    out = [
        model.predict(list(texts[s : s + batch_size]))["toxicity"] for s in range(0, len(texts), batch_size)
    ]
    return np.concatenate(
        [np.asarray(o, dtype=np.float64) for o in out]
    ), f"detoxify {variant} {_version('detoxify')}"


def score(texts: Sequence[str], scorer: str, **kw: Any) -> tuple[np.ndarray, str]:
    """Toxicity probabilities of `texts` and the scorer's description (name + version)."""
    if scorer == "profanity-check":
        values, name = profanity_check(texts)
    elif scorer == "hf":
        values, name = hf_classifier(texts, kw["model_dir"], kw["label"], kw["batch_size"], kw["name"])
    else:
        values, name = detoxify(texts, kw.get("variant", "original"), kw["batch_size"])
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise InputError(
            f"toxicity scorer {name}: NaN/inf score for {len(bad)} text(s), first at row {bad[0]}"
        )
    return values, name


def job(smk: Any) -> None:
    """Snakemake rule `score_toxicity`: one score per generation of a run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = load_config(smk.config)
    tox = cfg.analysis
    table = load_generations(smk.input.generations, ("prompt_id", "sample_id", "continuation"))
    texts = table["continuation"].fillna("").tolist()
    values, name = score(
        texts,
        tox.toxicity.scorer,
        model_dir=getattr(smk.input, "model", None),
        label=tox.toxicity.label,
        batch_size=tox.toxicity.batch_size,
        name=tox.toxicity.model,
        variant=tox.toxicity.variant,
    )
    out = pd.DataFrame({"prompt_id": table["prompt_id"], "sample_id": table["sample_id"], "toxicity": values})
    arrow = pa.Table.from_pandas(out, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"shardwise.scorer": json.dumps(name).encode()}
    )
    with atomic_path(Path(smk.output[0])) as tmp:
        pq.write_table(arrow, tmp)
    log.info("scored %d continuations with %s", len(out), name)

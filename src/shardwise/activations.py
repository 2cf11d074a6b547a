"""Stage `activations`: pooled hidden states of a model's layers over a labelled table, sharded
(docs/design.md §3 "Activations"); the probes trained on them are in :mod:`shardwise.probes`.

Layer index l (0..n_layers): 0 is the token embeddings, l >= 1 the output of decoder block l, i.e.
the residual stream *before* the final norm for every block, the last included. (HF's
``hidden_states[-1]`` is taken after the final norm, transformers PR #40994; the index here is
uniform instead.) Each layer is pooled inside a forward hook on its module, so only
[layers, batch, dim] is ever kept: ``mean`` over the content tokens (attention mask without the
tokenizer's special tokens, e.g. BOS) or the ``last`` content token. The forward pass stops after
the highest requested layer (no final norm, no LM head, no logits).

Output ``results/activations/<probe set>/<model>.h5`` (probe sets: Config.probe_sets):
``activations`` float16 [L, N, D] (float32 when a pooled value is beyond float16's range, see
below), ``layers`` int64 [L], ``item_ids`` int64 [N], attrs pooling, model, revision, fingerprint,
version. As in the teacher logits stage, shard boundaries fall on multiples of ``chunk_size`` and
batches are formed inside a chunk, so merged files are byte-identical for any ``n_shards``.

Range: float16's largest finite value is 65,504, and large models have outlier activations in the
thousands; a pooled value of |x| >= 65,520 would round to inf and make that layer's probes NaN. So
each value is stored as float16 rounds it, except a value that float16 would turn into inf, which keeps
its float32 value; a file (a chunk, a shard, the merged file) is float32 when it holds such a
value, else float16 (:func:`storable`, :func:`concat`; a warning in the shard's log names the
layers and the largest |value|). The rule is per value, so the merged file's values and dtype do
not depend on the shard layout (a float16 part widens exactly). Readers must not assume float16:
``f["activations"][...].astype(np.float32)`` reads either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardwise import __version__, settings
from shardwise.batching import batches, right_padded
from shardwise.config import Config
from shardwise.errors import InputError, ShardError
from shardwise.models import load_shard_model, read_record, revision
from shardwise.sharded import Prepared, Request, ShardedStage
from shardwise.shards.worker import ShardContext
from shardwise.tables import load_labelled

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "transformers")


class _Stop(Exception):
    """Raised by the hook of the highest requested layer: nothing above it is computed."""


@dataclass(frozen=True)
class ActivationsCodec:
    attrs: dict[str, Any] = field(default_factory=dict)
    ext: str = "h5"

    def write(self, obj: Any, path: Path) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            acts = obj["activations"]
            f.create_dataset("activations", data=acts, chunks=(1, min(acts.shape[1], 1024), acts.shape[2]))
            f.create_dataset("item_ids", data=obj["item_ids"])
            f.create_dataset("layers", data=np.asarray(obj["layers"], dtype=np.int64))
            f.attrs.update(self.attrs)

    def combine(self, parts: Sequence[Path], path: Path) -> None:
        concat(parts, path, self.attrs)


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65,504


def storable(states: np.ndarray) -> np.ndarray:
    """Pooled activations (float32) as stored: float16 when every value fits, else float32 with
    each value that fits rounded to float16 and each that float16 would make inf (|x| >= 65,520)
    kept. Per value, so a value's stored bytes do not depend on what else is in its chunk."""
    with np.errstate(over="ignore"):
        half = states.astype(np.float16)
    over = np.isinf(half) & np.isfinite(states)
    if not over.any():
        return half
    out = half.astype(np.float32)
    out[over] = states[over]
    return out


def concat(sources: Sequence[str | Path], dest: str | Path, attrs: dict[str, Any]) -> None:
    """Join activation files along the item axis (a copy, one source open and read at a time).
    The result is float32 when any source is (:func:`storable`; float16 widens exactly), else float16."""
    import h5py

    counts, dtypes = [], []
    for p in sources:
        with h5py.File(p, "r") as h:
            counts.append(h["item_ids"].shape[0])
            dtypes.append(h["activations"].dtype)
    n = sum(counts)
    dtype = np.result_type(np.float16, *dtypes)
    with h5py.File(sources[0], "r") as h:
        n_layers, _, dim = h["activations"].shape
        layers = h["layers"][...]
    if dtype != np.float16:
        wide = sum(d != np.float16 for d in dtypes)
        log.info("%s: %d of %d part(s) beyond float16's range: stored as %s", dest, wide, len(dtypes), dtype)
    with h5py.File(dest, "w") as out:
        acts = out.create_dataset(
            "activations", shape=(n_layers, n, dim), dtype=dtype, chunks=(1, min(n, 1024), dim)
        )
        ids = out.create_dataset("item_ids", shape=(n,), dtype=np.int64)
        out.create_dataset("layers", data=layers)
        start = 0
        for p, m in zip(sources, counts, strict=True):
            with h5py.File(p, "r") as h:
                acts[:, start : start + m] = h["activations"][...]
                ids[start : start + m] = h["item_ids"][...]
            start += m
        out.attrs.update(attrs)


def resolve_layers(
    requested: Sequence[int] | None, n_blocks: int, source: str = "probes.layers"
) -> list[int]:
    """Layer indices 0..n_blocks (0 = embeddings); None = all. Negative indices count from the top."""
    if requested is None:
        return list(range(n_blocks + 1))
    out = []
    for layer in requested:
        index = layer + n_blocks + 1 if layer < 0 else layer
        if not 0 <= index <= n_blocks:
            raise InputError(
                f"{source}: layer {layer} is out of range for a model with {n_blocks} blocks "
                f"(0 = embeddings .. {n_blocks} = last block; negative counts from the top)"
            )
        out.append(index)
    return sorted(set(out))


def n_blocks(model_dir: str | Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).get_text_config().num_hidden_layers)


def _blocks(model: Any) -> Sequence[Any]:
    base = model.base_model
    for attr in ("layers", "h", "blocks"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise ShardError(f"{type(model).__name__}: cannot find the decoder blocks (layers/h/blocks)")


def pooled_states(
    model: Any, input_ids: Any, attention_mask: Any, content: Any, layers: Sequence[int], pooling: str
) -> Any:
    """[L, B, D] float32: each requested layer's output pooled over the content tokens (mask
    `content` [B, T], 1 = a content token) inside forward hooks; stops after the highest layer."""
    import torch

    weights = content.to(device=input_ids.device, dtype=torch.float32)
    if pooling == "mean":
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
    else:  # last content token
        last = content.shape[1] - 1 - content.flip(1).to(torch.int64).argmax(1)
        weights = torch.zeros_like(weights).scatter_(1, last.unsqueeze(1), 1.0)
    pooled: dict[int, Any] = {}
    top = max(layers)

    def hook_for(index: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            w = weights.to(hidden.device)
            pooled[index] = torch.einsum("btd,bt->bd", hidden.float(), w)
            if index == top:
                raise _Stop

        return hook

    modules = {0: model.get_input_embeddings(), **{i + 1: b for i, b in enumerate(_blocks(model))}}
    handles = [modules[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack([pooled[i] for i in layers])


@dataclass(frozen=True)
class ActivationsArgs:
    """An activations worker's arguments: where things are, the resolved layers, the batching budget."""

    data: str
    labels: tuple[str, ...]
    model_dir: str
    dtype: str
    random_weights_seed: int | None
    layers: list[int]
    pooling: str
    max_length: int
    batch_tokens: int


def prepare(cfg: Config, request: Request) -> Prepared[ActivationsArgs]:
    """The shards of model `model` over probe set `probe_set`'s table (Config.probe_sets)."""
    probe_set, name = request.wildcards["probe_set"], request.wildcards["model"]
    pr = cfg.probe_sets()[probe_set]
    layers = resolve_layers(pr.layers, n_blocks(request.model_dir))
    record = read_record(request.model_dir)
    _, redrawn = pr.weights_of(name)
    wanted = settings.activations(cfg, probe_set, name)
    attrs = {
        "model": name,
        "revision": f"random weights (seed {pr.seed}), architecture of {revision(record)}"
        if redrawn
        else revision(record),
        "pooling": pr.pooling,
        "max_length": pr.max_length,
        "version": __version__,
    }
    args = ActivationsArgs(
        data=str(request.items),
        labels=tuple(pr.labels),
        model_dir=str(request.model_dir),
        dtype=wanted["dtype"],
        random_weights_seed=wanted["random_weights_seed"],
        layers=layers,
        pooling=pr.pooling,
        max_length=pr.max_length,
        batch_tokens=pr.batch_tokens,
    )
    return Prepared(
        settings=wanted,
        n_items=len(load_labelled(request.items, pr.labels)),
        spec=pr.shards,
        args=args,
        codec=lambda plan: ActivationsCodec(attrs={**attrs, "fingerprint": plan.fingerprint}),
        identity={"layers": layers},
        align=pr.shards.chunk_size,
    )


def compute_shard(ctx: ShardContext) -> None:
    """Worker body: pooled activations of the shard's pending chunks, each committed in order."""
    import torch

    a: ActivationsArgs = ctx.args
    chunks = ctx.pending_chunks()
    if not chunks:
        return
    table = load_labelled(a.data, list(a.labels))
    model, tokenizer, device = load_shard_model(
        a.model_dir, a.dtype, ctx.device, ctx.n_gpus, random_seed=a.random_weights_seed
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts, ids_col = table["text"].tolist(), table["id"].to_numpy()
    items, n_tokens = sum(len(c) for c in chunks), 0
    with ctx.progress(items) as bar:
        for chunk in chunks:
            enc = tokenizer(
                texts[chunk.start : chunk.stop],
                truncation=True,
                max_length=a.max_length,
                return_special_tokens_mask=True,
            )
            lengths = [len(e) for e in enc["input_ids"]]
            out = np.zeros((len(a.layers), len(chunk), 0), dtype=np.float16)
            for batch in batches(lengths, a.batch_tokens):
                ids, mask = right_padded([enc["input_ids"][j] for j in batch], pad)
                special, _ = right_padded([enc["special_tokens_mask"][j] for j in batch], 1)
                content = 1 - special  # real tokens that are not BOS/EOS/... (pads are special here)
                if (content.sum(1) == 0).any():
                    j = batch[int((content.sum(1) == 0).nonzero()[0])]
                    raise ShardError(f"{ctx.plan.name}: item {chunk.start + j} has no content tokens")
                with torch.inference_mode():
                    states = pooled_states(
                        model, ids.to(device), mask.to(device), content, a.layers, a.pooling
                    )
                if not torch.isfinite(states).all():
                    bad = batch[int((~torch.isfinite(states)).any(0).any(1).nonzero()[0])]
                    raise ShardError(f"{ctx.plan.name}: item {chunk.start + bad} has non-finite activations")
                stored = storable(states.cpu().numpy())
                if stored.dtype != np.float16:
                    _warn_range(ctx.plan.name, a.layers, stored, [chunk.start + j for j in batch])
                if out.shape[2] == 0:
                    out = np.zeros((stored.shape[0], len(chunk), stored.shape[2]), dtype=np.float16)
                if out.dtype != stored.dtype:
                    out = out.astype(np.float32)  # exact: float16 values widen without change
                out[:, batch] = stored
                n_tokens += sum(lengths[j] for j in batch)
                bar.update(len(batch))
            ctx.commit(
                chunk,
                {"activations": out, "item_ids": ids_col[chunk.start : chunk.stop], "layers": a.layers},
            )
    ctx.record_speed(model, items=items, tokens=n_tokens)


def _warn_range(name: str, layers: Sequence[int], stored: np.ndarray, items: Sequence[int]) -> None:
    """One log line per batch with values beyond float16's range: which layers, the largest |value|."""
    big = np.abs(stored) > FLOAT16_MAX
    where = [layers[int(i)] for i in np.flatnonzero(big.any(axis=(1, 2)))]
    log.warning(
        "%s: %d pooled value(s) beyond float16's range (largest |value| %.6g) in layer(s) %s, items "
        "%d-%d: stored in float32 (the merged file will be float32)",
        name,
        int(big.sum()),
        float(np.abs(stored).max()),
        ", ".join(map(str, where)),
        min(items),
        max(items),
    )


STAGE: ShardedStage[ActivationsArgs] = ShardedStage(
    name="activations",
    outputs="activations",
    key=("probe_set", "model"),
    items="data",
    ext=ActivationsCodec.ext,
    prepare=prepare,
    compute=compute_shard,
)

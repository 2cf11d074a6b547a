"""Teacher logits on disk (docs/design.md §3 "Teacher logits"): the HDF5 layout, a reader, a torch
Dataset and the knowledge-distillation loss that uses them.

Layout of a file (a shard, a committed chunk and the merged ``results/teacher_logits/<teacher>.h5``
all have it)::

    item_ids       int64   [N]      the corpus ids, in corpus order
    offsets        int64   [N + 1]  item i's tokens are rows offsets[i] : offsets[i + 1]
    token_ids      int32   [T]      the item's tokens (after truncation to max_length)
    topk_ids       uint16  [T, k]   (int32 when the vocabulary has more than 65,536 entries)
    topk_logprobs  float16 [T, k]   log-softmax over the full vocabulary, largest first
    attrs: teacher, model, revision, tokenizer_sha256, k, vocab_size, max_length, fingerprint, version

Row t of an item holds the teacher's distribution of the *next* token after its tokens 0..t, so
row t is the target for the student's logits at position t (the usual causal-LM alignment; the
last row predicts past the end of the text). Log-probs are normalised over the full vocabulary:
``1 - exp(topk_logprobs).sum(-1)`` is the probability mass outside the top k.

260 bytes per token at k = 64 with a vocabulary <= 65,536 (2 + 2 bytes per entry, 4 for the token),
plus 16 bytes per item; chunked datasets, no compression (gzip costs ~2.7x throughput, ml-facts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shardwise.errors import ShardError

DATASETS = ("item_ids", "offsets", "token_ids", "topk_ids", "topk_logprobs")
CHECKED_ATTRS = ("teacher", "revision", "tokenizer_sha256", "k", "vocab_size", "fingerprint")
CHUNK_BYTES = 512 * 1024  # HDF5 chunks of ~0.5 MiB (10 KiB - 1 MiB is the sweet spot)
LOG_REST_FLOOR = -27.6  # log(1e-12): see kd_loss
REST_RESOLUTION = 1e-4
COPY_ROWS = 1 << 18  # tokens copied per step when joining files (bounded memory)


def topk_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _chunks(n_rows: int, row_bytes: int, width: int | None = None) -> tuple[int, ...]:
    """Chunk rows: ~CHUNK_BYTES each, split evenly so the last chunk is not mostly empty."""
    target = max(1, CHUNK_BYTES // row_bytes)
    n_chunks = max(1, -(-n_rows // target))
    rows = max(1, -(-n_rows // n_chunks))
    return (rows,) if width is None else (rows, width)


def _create(f: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    width = shape[1] if len(shape) > 1 else None
    row_bytes = dtype.itemsize * (width or 1)
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=_chunks(shape[0], row_bytes, width))


def write_file(path: str | Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    """Write one file of the layout from in-memory arrays (a committed chunk)."""
    import h5py

    with h5py.File(path, "w") as f:
        for name in DATASETS:
            data = np.asarray(arrays[name])
            _create(f, name, data.shape, data.dtype)[...] = data
        f.attrs.update(dict(attrs))


def read_attrs(path: str | Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if callable(item) and np.ndim(value) == 0 else value


def check_attrs(path: str | Path, expected: Mapping[str, Any], label: str) -> None:
    """Refuse a file whose layout attrs differ from `expected` (another teacher, revision, k...)."""
    try:
        attrs = read_attrs(path)
    except OSError as exc:
        raise ShardError(f"{label}: {path} is not a readable HDF5 file ({exc})") from None
    for key in CHECKED_ATTRS:
        if key in expected and attrs.get(key) != expected[key]:
            raise ShardError(
                f"{label}: {key} is {attrs.get(key)!r}, expected {expected[key]!r} "
                f"(a shard of another teacher, tokenizer or config)"
            )


def concat_files(sources: Sequence[str | Path], dest: str | Path, attrs: Mapping[str, Any]) -> None:
    """Join files of the layout, in order, into `dest` (a copy: no virtual datasets, whose sources
    may move). Offsets are rebased; memory stays bounded by COPY_ROWS tokens, and one source is
    open at a time: an open file keeps its HDF5 chunk caches (measured: joining 512 shards of 1 MB
    held 408 MiB with every source open, 68 MiB one at a time)."""
    import h5py

    shapes = []
    for p in sources:
        with h5py.File(p, "r") as h:
            shapes.append(
                (
                    h["item_ids"].shape[0],
                    h["token_ids"].shape[0],
                    h["topk_ids"].shape[1:],
                    h["topk_ids"].dtype,
                )
            )
    n_items = sum(s[0] for s in shapes)
    n_tokens = sum(s[1] for s in shapes)
    (k,), id_dtype = shapes[0][2], shapes[0][3]
    for p, (_, _, width, dtype) in zip(sources, shapes, strict=True):
        if width != (k,) or dtype != id_dtype:
            raise ShardError(
                f"{p}: topk_ids (.., {width[0]})/{dtype} do not match {sources[0]} (.., {k})/{id_dtype}"
            )
    with h5py.File(dest, "w") as out:
        ids = _create(out, "item_ids", (n_items,), np.dtype(np.int64))
        offsets = _create(out, "offsets", (n_items + 1,), np.dtype(np.int64))
        tokens = _create(out, "token_ids", (n_tokens,), np.dtype(np.int32))
        top_ids = _create(out, "topk_ids", (n_tokens, k), id_dtype)
        top_lp = _create(out, "topk_logprobs", (n_tokens, k), np.dtype(np.float16))
        offsets[0] = 0
        item0 = tok0 = 0
        for p, (n, t, _, _) in zip(sources, shapes, strict=True):
            with h5py.File(p, "r") as h:
                ids[item0 : item0 + n] = h["item_ids"][...]
                offsets[item0 + 1 : item0 + n + 1] = h["offsets"][1:] + tok0
                for a in range(0, t, COPY_ROWS):
                    b = min(a + COPY_ROWS, t)
                    tokens[tok0 + a : tok0 + b] = h["token_ids"][a:b]
                    top_ids[tok0 + a : tok0 + b] = h["topk_ids"][a:b]
                    top_lp[tok0 + a : tok0 + b] = h["topk_logprobs"][a:b]
            item0, tok0 = item0 + n, tok0 + t
        out.attrs.update(dict(attrs))


# --------------------------------------------------------------------------- reading


class Item(NamedTuple):
    token_ids: np.ndarray  # int64 [n]
    topk_ids: np.ndarray  # int64 [n, k]
    topk_logprobs: np.ndarray  # float32 [n, k]


class TeacherLogits:
    """Random access to a teacher-logits file: ``len(t)``, ``t[i]`` -> :class:`Item`.

    Only `offsets` and `item_ids` are read up front (16 bytes per item); ``t[i]`` reads item i's
    rows. The file is opened lazily and again in each process (safe with DataLoader workers).
    ``t.index(item_id)`` gives the position of a corpus id.
    """

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            missing = [d for d in DATASETS if d not in f]
            if missing:
                raise ShardError(f"{self.path}: not a teacher-logits file (missing {', '.join(missing)})")
            self.offsets = f["offsets"][...]
            self.item_ids = f["item_ids"][...]
            self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        self._file: Any = None
        self._pid: int | None = None
        self._positions: dict[int, int] | None = None

    @property
    def k(self) -> int:
        return int(self.attrs["k"])

    def __len__(self) -> int:
        return len(self.item_ids)

    def _h5(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, i: int) -> Item:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        f = self._h5()
        return Item(
            f["token_ids"][a:b].astype(np.int64),
            f["topk_ids"][a:b].astype(np.int64),
            f["topk_logprobs"][a:b].astype(np.float32),
        )

    def index(self, item_id: int) -> int:
        if self._positions is None:
            self._positions = {int(v): j for j, v in enumerate(self.item_ids)}
        return self._positions[int(item_id)]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}


class TeacherLogitsDataset:
    """A map-style torch Dataset over a teacher-logits file: item i -> dict of tensors
    (input_ids [n], topk_ids [n, k], topk_logprobs [n, k]); batch with :func:`collate`. Picklable,
    so DataLoader workers (fork or spawn) each open the file themselves."""

    def __init__(self, path: str | Path):
        self.logits = TeacherLogits(path)

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.logits[i]
        return {
            "input_ids": torch.from_numpy(item.token_ids),
            "topk_ids": torch.from_numpy(item.topk_ids),
            "topk_logprobs": torch.from_numpy(item.topk_logprobs),
        }


def collate(items: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a list of dataset items: input_ids, attention_mask [B, T], topk_* [B, T, k]."""
    import torch

    width = max(len(it["input_ids"]) for it in items)
    k = items[0]["topk_ids"].shape[1]
    out = {
        "input_ids": torch.full((len(items), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
        "topk_ids": torch.zeros((len(items), width, k), dtype=torch.long),
        "topk_logprobs": torch.zeros((len(items), width, k), dtype=torch.float32),
    }
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        out["input_ids"][r, :n] = it["input_ids"]
        out["attention_mask"][r, :n] = 1
        out["topk_ids"][r, :n] = it["topk_ids"]
        out["topk_logprobs"][r, :n] = it["topk_logprobs"]
    return out


# --------------------------------------------------------------------------- the loss


def kd_loss(
    student_logits: Any,
    topk_ids: Any,
    topk_logprobs: Any,
    temperature: float = 1.0,
    mask: Any = None,
) -> Any:
    """Forward KL(teacher || student) on the teacher's top-k support plus one "rest" bucket.

    The teacher is known on its top k tokens (log-probs normalised over the full vocabulary) and as
    the remaining mass ``r = 1 - sum(p_topk)``. The student's full distribution is coarse-grained
    onto the same k + 1 outcomes (its own mass outside the teacher's top k goes to the rest bucket),
    and the loss is the exact KL between these two (k + 1)-way distributions:

        sum_i p_i (log p_i - log q_i) + r (log r - log q_rest)

    It is a lower bound on the full-vocabulary KL, equal to it when k covers the vocabulary or the
    tail is negligible; unlike renormalising the top k, it penalises a student that puts too much
    mass outside the teacher's top k. With ``temperature`` tau != 1 the student is first reduced to
    the same k + 1 buckets at tau = 1, then both (k + 1)-way distributions are tempered the same way
    (p ∝ p^(1/tau), q ∝ q^(1/tau)) and the loss is multiplied by tau^2 (Hinton et al.): it is 0 at
    student = teacher for every tau and k, and with k = vocabulary it is the usual tempered KD loss.
    (Tempering the student's logits over the full vocabulary instead, but the teacher's rest as one
    token, is not 0 at the teacher - 4.8 nats/token at tau = 2, k = 64 - and drives the student's
    tail mass to ~0.)

    Numerics: the teacher's rest is a difference of k fp16-rounded probabilities, so a rest below
    REST_RESOLUTION (1e-4) counts as 0 (else tempering, r^(1/tau), would inflate rounding noise);
    the student's rest is floored at ~1e-12 (LOG_REST_FLOOR) unless it is exactly 0 (k = V), which
    stays 0 so that tempering cannot inflate the floor into spurious mass.

    Shapes: student_logits [..., V], topk_ids [..., k] (int), topk_logprobs [..., k]; mask [...]
    (1 = a real token). Returns the mean over (unmasked) positions.
    """
    import torch

    tau = float(temperature)
    log_q_all = torch.log_softmax(student_logits.float(), dim=-1)  # coarse-grained at tau = 1
    ids = topk_ids.long()
    log_q = log_q_all.gather(-1, ids)
    log_q_rest = torch.logsumexp(log_q_all.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    # floor a tiny rest, but keep an exact 0 (k = V): tempering would inflate a floored 1e-12 to
    # 1e-12^(1/tau) (~1e-3 at tau = 4) and bias the k = V loss
    log_q_rest = torch.where(torch.isneginf(log_q_rest), log_q_rest, log_q_rest.clamp_min(LOG_REST_FLOOR))

    log_p = topk_logprobs.float()
    rest = 1.0 - log_p.exp().sum(-1, keepdim=True)
    rest = rest.masked_fill(rest < REST_RESOLUTION, 0.0)
    log_p = torch.cat([log_p, torch.log(rest)], dim=-1)  # [..., k + 1]; log 0 = -inf is fine
    log_q = torch.cat([log_q, log_q_rest], dim=-1)
    if tau != 1.0:  # temper both (k + 1)-way distributions the same way
        log_p = torch.log_softmax(log_p / tau, dim=-1)
        log_q = torch.log_softmax(log_q / tau, dim=-1)
    p = log_p.exp()
    cross = torch.where(p > 0, p * log_q, 0.0)  # 0 * log 0 = 0 (both rests 0 when k = V)
    per_position = (torch.xlogy(p, p) - cross).sum(-1) * tau**2  # xlogy: 0 log 0 = 0
    if mask is None:
        return per_position.mean()
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)

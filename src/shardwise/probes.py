"""Stage `train_probes`: one logistic probe per (layer, label), all trained at once
(docs/design.md §3 "Probes"); the activations they read come from :mod:`shardwise.activations`.

The trainer (:func:`fit`) holds every probe of every L2 strength in one tensor [L, D + 1, G x K']
(L layers, G grid values, K' labels: the K real ones and, when the table has a `control_type`
column, K control tasks in the sense of Hewitt & Liang 2019: every type keeps one random label in
train and test, so only memorising types solves it; selectivity = auroc - control_auroc) and runs
L-BFGS on all of them at once, one batched matmul forward and one back per step, on the GPU when
there is one; every probe has its own curvature pairs, line search and stopping (:func:`fit`).
Features are standardised per layer with train statistics; the logistic loss is class-balanced
(each class weighs half); each probe keeps the weights of its best validation loss, and per
(layer, label) the L2 strength with the best validation loss wins.
The split (:func:`group_split`) keeps every `group` on one side and balances each label's
classes across train/val/test.

Outputs in ``results/probes/<probe set>/<model>/`` (``labelled``: probes.data; ``toxicity``: the
generations' own toxicity, :mod:`shardwise.toxicity_probe_data`): ``metrics.csv`` (label, layer, auroc, auprc,
f1, accuracy, balanced_accuracy, precision, recall, n_train, n_test, control_auroc, selectivity,
n_test_positive, auroc_ci_low, auroc_ci_high, auroc_ci_method, n_test_groups: the 95 % interval of
:func:`auroc_interval`, resampling the test split's groups; threshold, val_auroc, l2, status,
p_value, null_auroc_mean, null_auroc_q95: the permutation null of :func:`permutation_null`),
``probes.safetensors`` (W [L, K, D] and b [L, K] in the raw activation space:
p = sigmoid(x @ W[l, k] + b[l, k])), ``aggregate_metrics.json`` (per label the layer with the best
validation AUROC and its test metrics), ``auroc_heatmap.png`` and ``selectivity_by_layer.png``
(:func:`layer_plot`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from shardwise.atomic import atomic_path, atomic_write_json, atomic_write_text
from shardwise.config import ProbesConfig, load_config
from shardwise.environment import available_memory
from shardwise.errors import InputError
from shardwise.splits import SPLITS, check_split, group_split
from shardwise.tables import load_labelled

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "numpy")

# how each probe's optimisation ended (Fit.status, metrics.csv `status`; fit() says when each applies)
CONVERGED, EARLY_STOP, STEP_LIMIT, STALLED = 1, 2, 3, 4
STATUS = {CONVERGED: "converged", EARLY_STOP: "early_stop", STEP_LIMIT: "step_limit", STALLED: "stalled"}


@dataclass
class Fit:
    W: Any  # [L, K, D] raw-space weights (torch, on the training device)
    b: Any  # [L, K]
    l2: Any  # [L, K] chosen L2 strength
    steps: int
    seconds: float
    status: Any = None  # [L, K] how the chosen probe's optimisation ended (STATUS codes)
    all_status: Any = None  # [L, G x K] the same for every probe of the grid

    def status_names(self) -> np.ndarray:
        return np.vectorize(STATUS.get)(self.status.cpu().numpy())

    def not_converged(self) -> dict[str, int]:
        """Counts of the chosen probes that did not converge, by how they ended."""
        codes = self.status.cpu().numpy()
        return {STATUS[c]: int((codes == c).sum()) for c in (STEP_LIMIT, STALLED) if (codes == c).any()}


class _Objective:
    """The class-balanced, L2-regularised logistic loss of P independent probes per layer.

    z [L, n, D + 1] standardised features with a ones column (the bias), y and c [n, P] the labels
    and per-row weights (each class of each probe weighs half), lam [D + 1, P] the L2 strength of
    each weight (0 for the bias). theta [L, D + 1, P] holds every probe: one bmm gives all logits."""

    def __init__(self, z: Any, y: Any, lam: Any) -> None:
        n_pos = y.sum(0).clamp_min(1.0)
        n_neg = (1 - y).sum(0).clamp_min(1.0)
        self.z, self.y, self.lam = z, y, lam
        self.c = y * (0.5 / n_pos) + (1 - y) * (0.5 / n_neg)

    def logits(self, theta: Any) -> Any:
        return self.z.bmm(theta)

    def nll(self, logits: Any) -> Any:
        """[L, P] weighted negative log-likelihood, without the penalty."""
        import torch.nn.functional as F

        return (self.c * (F.softplus(logits) - self.y * logits)).sum(1)

    def loss(self, logits: Any, theta: Any) -> Any:
        return self.nll(logits) + 0.5 * (self.lam * theta**2).sum(1)

    def grad(self, logits: Any, theta: Any) -> Any:
        residual = self.c * (logits.sigmoid() - self.y)
        return self.z.transpose(1, 2).bmm(residual) + self.lam * theta

    def gap(self, logits: Any, g: Any) -> Any:
        """[L, P] how far each probe's loss is above its minimum, at most (the weights) or about
        (the bias): ||g_w||^2 / (2 lam), which bounds it over the weights at this bias (the loss is
        lam-strongly convex in them; it is the duality gap when the bias is optimal), plus
        g_b^2 / (2 h_b), h_b the loss's curvature along the bias here (a Newton estimate). inf when
        lam = 0: without a penalty nothing bounds it (on separable data no minimum exists)."""
        import torch

        lam = self.lam[..., 0, :]  # the weights' strength (the last row, the bias, is 0)
        weights = (g[:, :-1] ** 2).sum(1)
        p = logits.sigmoid()
        curvature = (self.c * p * (1 - p)).sum(1)
        bias = g[:, -1] ** 2 / (2 * curvature.clamp_min(1e-30))
        return torch.where(lam > 0, weights / (2 * lam.clamp_min(1e-30)), torch.inf) + bias


def _two_loop(g: Any, history: list[tuple[Any, Any, Any]], h0: Any) -> Any:
    """L-BFGS search direction -H g for every probe at once (dot products along dim 1), from the
    (s, y, 1 / s.y) pairs; pairs with 1 / s.y = 0 (no positive curvature) are inert. The initial
    inverse Hessian is h0 scaled per probe by s.y / y.h0.y of the newest pair."""
    q = g.clone()
    alphas = []
    for s, yv, rho in reversed(history):
        a = rho * (s * q).sum(1, keepdim=True)
        q -= a * yv
        alphas.append(a)
    if history:
        s, yv, rho = history[-1]
        gamma = (s * yv).sum(1, keepdim=True) / (yv * h0 * yv).sum(1, keepdim=True).clamp_min(1e-30)
        h0 = h0 * gamma.where(rho > 0, 1.0)
    r = h0 * q
    for (s, yv, rho), a in zip(history, reversed(alphas), strict=True):
        r += s * (a - rho * (yv * r).sum(1, keepdim=True))
    return -r


def fit(
    x: Any,
    y: Any,
    split: Any,
    l2_grid: Sequence[float],
    max_steps: int = 200,
    patience: int | None = 10,
    tolerance: float = 2e-3,
    memory: int = 10,
    backtracking: int = 50,
    l2_from: Sequence[int] | None = None,
    l2_columns: Any = None,
) -> Fit:
    """Train every (layer, label) probe for every L2 strength at once, with batched L-BFGS.

    x [L, N, D] float (any device), y [N, K] 0/1, split [N] (0 train, 1 val, 2 test). The weights
    of all probes are one tensor [L, D + 1, G x K] (bias last): a step costs one batched matmul
    forward and one back, whatever the number of probes. Each probe runs its own L-BFGS (own
    curvature pairs, own Armijo backtracking of up to `backtracking` halvings). The first step, and
    every restart, goes along the gradient scaled to at most unit length (real residual streams have
    dominant directions whose curvature is ~D times the average: a unit Newton-like step there
    overshoots by orders of magnitude); an L-BFGS direction that is not a descent direction, or
    whose line search fails, drops that probe's curvature pairs and restarts it along the scaled
    gradient. A probe stops as `converged` when its loss is within `tolerance` x itself of its
    minimum: ||g_w||^2 / (2 L2) bounds that over the weights (the loss is L2-strongly convex in the
    standardised weights; this is the duality gap when the bias is optimal), and g_b^2 / (2 h_b)
    estimates it for the bias (h_b the curvature along it; an estimate, not a bound), so the test is
    relative to the problem and no L2 = 0 probe ever converges. It stops as `early_stop` when its
    validation loss has not improved for `patience` steps (it keeps the weights of its best
    validation loss; patience None: no early stopping, the weights it stopped at), as `stalled`
    when even a tiny step along the gradient does not descend or two steps in a row no longer
    decrease its loss at float32 precision before the gap test holds, and as `step_limit` after
    `max_steps` (Fit.status). The start is zero, so there is no seed. Per (layer, label) the L2
    strength with the best validation loss is chosen; `l2_from[k]` = j makes label k use label j's
    choice instead (a control task takes its real probe's L2). `l2_columns` [L, K] fixes every
    probe's L2 strength instead (no grid: one probe per column, as the permutation null needs)."""
    import torch

    started = time.perf_counter()
    device = x.device
    y = torch.as_tensor(y, dtype=torch.float32, device=device)
    split = torch.as_tensor(split, device=device)
    tr, va = split == 0, split == 1
    mean = x[:, tr].mean(1, keepdim=True)
    std = x[:, tr].std(1, keepdim=True).clamp_min(1e-6)
    n_layers, _, dim = x.shape
    if l2_columns is not None:
        l2_grid = [0.0]
    n_grid, n_labels = len(l2_grid), y.shape[1]
    n_probes = n_grid * n_labels  # per layer; column g * K + k is label k at L2 strength g

    def design(rows: Any) -> Any:
        z = (x[:, rows] - mean) / std
        return torch.cat([z, torch.ones_like(z[:, :, :1])], 2)

    if l2_columns is not None:  # [L, D + 1, K]: every probe its own strength
        lam = torch.as_tensor(l2_columns, dtype=torch.float32, device=device).reshape(n_layers, 1, n_labels)
        lam_rows = torch.cat([lam.expand(n_layers, dim, n_labels), torch.zeros_like(lam)], 1)
    else:  # [D + 1, G x K], the same for every layer
        lam = torch.tensor(list(l2_grid), dtype=torch.float32, device=device).repeat_interleave(n_labels)
        lam_rows = torch.cat([lam.expand(dim, n_probes), torch.zeros(1, n_probes, device=device)])
    train = _Objective(design(tr), y[tr].repeat(1, n_grid), lam_rows)
    val = _Objective(design(va), y[va].repeat(1, n_grid), lam_rows)
    # initial inverse Hessian: the logistic curvature is at most 1/4 per unit-variance feature
    h0 = (1.0 / (0.25 + lam_rows)).expand(n_layers, dim + 1, n_probes)

    theta = torch.zeros(n_layers, dim + 1, n_probes, device=device)
    logits = train.logits(theta)
    f, g = train.loss(logits, theta), train.grad(logits, theta)
    # the zero start is no candidate: a probe keeps the best-validation weights among its steps, so
    # it never ends at W = 0 unless its optimum is 0 (a label the features do not predict would
    # otherwise stop at 0 and score every item alike: AUROC 0.5 by ties, not by a fit)
    best_val = torch.full((n_layers, n_probes), float("inf"), device=device)
    best = theta.clone()
    since = torch.zeros(n_layers, n_probes, device=device)
    status = torch.zeros(n_layers, n_probes, dtype=torch.int64, device=device)  # 0 = still running
    fresh = torch.ones(n_layers, n_probes, dtype=torch.bool, device=device)  # no usable curvature pairs
    flat = torch.zeros(n_layers, n_probes, device=device)  # consecutive steps without progress
    pairs: list[tuple[Any, Any, Any]] = []
    step = 0
    for step in range(1, max_steps + 1):  # noqa: B007
        running = status == 0
        d = _two_loop(g, pairs, h0)
        slope = (g * d).sum(1)
        # the first step, a restart and a lost-curvature (uphill) direction: the scaled gradient,
        # at most unit length (the curvature of a dominant direction can be ~D times the average)
        restart = fresh | (slope >= 0)
        grad_dir = -h0 * g
        grad_dir = grad_dir / grad_dir.norm(dim=1, keepdim=True).clamp_min(1.0)
        d = torch.where(restart.unsqueeze(1), grad_dir, d) * running.unsqueeze(1)
        slope = (g * d).sum(1)
        t = torch.ones(n_layers, 1, n_probes, device=device)
        new_logits = train.logits(theta + d)
        f_new = train.loss(new_logits, theta + d)
        for _ in range(backtracking):  # Armijo backtracking, per probe (with float32 round-off slack)
            ok = ~running | (f_new <= f + 1e-4 * t[:, 0] * slope + 1e-7 * f.abs())
            if bool(ok.all()):
                break
            t = t.where(ok.unsqueeze(1), t * 0.5)
            new_logits = new_logits.where(ok.unsqueeze(1), train.logits(theta + t * d))
            f_new = f_new.where(ok, train.loss(new_logits, theta + t * d))
        else:
            ok = ~running | (f_new <= f + 1e-4 * t[:, 0] * slope + 1e-7 * f.abs())
        keep = ok.unsqueeze(1)
        theta_new = torch.where(keep, theta + t * d, theta)
        logits = torch.where(keep, new_logits, logits)
        f_new = f_new.where(ok, f)
        g_new = train.grad(logits, theta_new)
        s, yv = theta_new - theta, g_new - g
        sy = (s * yv).sum(1, keepdim=True)
        rho = torch.where(sy > 1e-12 * (s * s).sum(1, keepdim=True).sqrt().clamp_min(1e-30), 1.0 / sy, 0.0)
        failed = running & ~ok  # no descent even with a tiny step
        # a failed L-BFGS direction drops that probe's pairs and retries along the gradient next
        # step; a failed gradient step means the probe is stuck (float32 cannot resolve a decrease)
        status = torch.where(failed & restart, STALLED, status)
        forget = (failed & ~restart).unsqueeze(1)
        pairs = [(ps, py, pr.where(~forget, 0.0)) for ps, py, pr in pairs]
        pairs = [*pairs[-(memory - 1) :], (s, yv, rho.where(~forget, 0.0))]
        fresh = failed & ~restart
        progress = f - f_new
        flat = torch.where(ok & (progress <= 1e-7 * f.abs().clamp_min(1e-3)), flat + 1, 0.0)
        theta, f, g = theta_new, f_new, g_new
        v = val.nll(val.logits(theta))
        better = v < best_val if patience is not None else torch.ones_like(running)
        best_val = best_val.where(~better, v)
        best = best.where(~better.unsqueeze(1), theta)
        since = torch.where(better, 0.0, since + 1)
        running = status == 0
        converged = running & (train.gap(logits, g) <= tolerance * f)
        status = torch.where(converged, CONVERGED, status)
        # float32 no longer resolves a decrease, short of the gap test: stuck, not converged
        status = torch.where((status == 0) & (flat >= 2), STALLED, status)
        if patience is not None:
            status = torch.where((status == 0) & (since >= patience), EARLY_STOP, status)
        if not bool((status == 0).any()):
            break
    status = torch.where(status == 0, STEP_LIMIT, status)
    choice = best_val.view(n_layers, n_grid, n_labels).argmin(1)  # [L, K]: the L2 strength per probe
    if l2_from is not None:
        choice = choice[:, torch.as_tensor(list(l2_from), device=device)]
    chosen = best.view(n_layers, dim + 1, n_grid, n_labels)
    chosen = chosen.gather(2, choice.view(n_layers, 1, 1, n_labels).expand(n_layers, dim + 1, 1, n_labels))
    w_std, b_std = chosen[:, :dim, 0], chosen[:, dim, 0]  # [L, D, K], [L, K]
    w_raw = (w_std / std.transpose(1, 2)).transpose(1, 2)  # [L, K, D]
    b_raw = b_std - torch.einsum("lkd,ld->lk", w_raw, mean[:, 0])
    fixed = l2_columns is not None
    l2 = lam[:, 0].clone() if fixed else torch.tensor(list(l2_grid), device=device)[choice]
    chosen_status = status.view(n_layers, n_grid, n_labels).gather(1, choice.unsqueeze(1))[:, 0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Fit(
        W=w_raw,
        b=b_raw,
        l2=l2,
        steps=step,
        seconds=time.perf_counter() - started,
        status=chosen_status,
        all_status=status,
    )


def scores(x: Any, probe: Fit) -> Any:
    """Probabilities [L, N, K] of every probe on x [L, N, D]."""
    import torch

    return torch.sigmoid(torch.matmul(x, probe.W.transpose(1, 2)) + probe.b.unsqueeze(1))


def auroc_bootstrap(
    y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0, groups: Any = None
) -> np.ndarray:
    """AUROC of n_boot resamples (with replacement) of the groups of items (y, p): [n_boot].

    `groups` [n] keeps a group's rows together (as the split does): a resample draws G of the G
    groups with replacement and takes every row of each draw; None = every row its own group (a
    row bootstrap, the same draws as before groups existed). The scores are ranked once; a
    resample is a vector of counts per distinct score, so each one costs O(n + G) (Mann-Whitney
    with ties counted half) instead of a sort. Resamples with one class only are NaN."""
    values, inverse = np.unique(p, return_inverse=True)
    n_values = len(values)
    if groups is None:
        member = np.arange(len(y))
    else:
        _, member = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(member.max()) + 1 if len(member) else 0
    positive = np.asarray(y) == 1
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for lo in range(0, n_boot, 64):  # blocks of resamples bound the memory: 64 x n counts
        b = min(64, n_boot - lo)
        draw = rng.integers(0, n_groups, size=(b, n_groups))
        taken = np.bincount((np.arange(b)[:, None] * n_groups + draw).ravel(), minlength=b * n_groups)
        weight = taken.reshape(b, n_groups)[:, member].astype(float)  # [b, n] copies of each row
        cell = np.arange(b)[:, None] * n_values + inverse
        size = b * n_values
        pos = np.bincount(cell[:, positive].ravel(), weight[:, positive].ravel(), size).reshape(b, n_values)
        neg = np.bincount(cell[:, ~positive].ravel(), weight[:, ~positive].ravel(), size).reshape(b, n_values)
        below = np.cumsum(neg, 1) - neg
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + b] = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    return out


def auroc_leave_one_group_out(y: np.ndarray, p: np.ndarray, groups: Any) -> np.ndarray:
    """AUROC of the items (y, p) without each group in turn: [G] in the order of np.unique(groups)
    (NaN where one class is left). O(n log n) for all G together, not G AUROCs: each positive's
    count of negatives below it (ties half) and each negative's of positives above, summed per
    group, take away that group's pairs; its pairs within itself, subtracted twice, come back."""
    y = np.asarray(y) == 1
    _, member = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(member.max()) + 1
    values, inverse = np.unique(p, return_inverse=True)
    pos_at = np.bincount(inverse[y], minlength=len(values)).astype(float)
    neg_at = np.bincount(inverse[~y], minlength=len(values)).astype(float)
    neg_below = np.cumsum(neg_at) - neg_at
    pos_above = pos_at.sum() - np.cumsum(pos_at)
    n_pos, n_neg = pos_at.sum(), neg_at.sum()
    pairs = float((pos_at * (neg_below + 0.5 * neg_at)).sum())
    below, above = neg_below + 0.5 * neg_at, pos_above + 0.5 * pos_at
    credit = np.where(y, below[inverse], above[inverse])
    by_group = np.bincount(member, credit, n_groups)
    # pairs within a group: cells (group, score value), sorted by group then value
    cells, cell = np.unique(member * len(values) + inverse, return_inverse=True)
    cell_pos = np.bincount(cell[y], minlength=len(cells)).astype(float)
    cell_neg = np.bincount(cell[~y], minlength=len(cells)).astype(float)
    cell_group = cells // len(values)
    running = np.cumsum(cell_neg) - cell_neg  # negatives in earlier cells, all groups
    first = np.searchsorted(cell_group, cell_group)  # each cell's group's first cell
    within = np.bincount(cell_group, cell_pos * (running - running[first] + 0.5 * cell_neg), n_groups)
    left_pos = n_pos - np.bincount(member[y], minlength=n_groups)
    left_neg = n_neg - np.bincount(member[~y], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pairs - by_group + within) / (left_pos * left_neg)
    return np.where((left_pos > 0) & (left_neg > 0), out, np.nan)


AUROC_CI_METHOD = "group_bca_expanded"


def auroc_interval(
    y: np.ndarray, p: np.ndarray, groups: Any = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """A `level` confidence interval for the AUROC of (y, p) whose rows are correlated within their
    `groups` (None: independent rows, each its own group): BCa over a group bootstrap
    (:func:`auroc_bootstrap`; bias from the share of resamples below the AUROC, acceleration from
    the leave-one-group-out jackknife, :func:`auroc_leave_one_group_out`) with the normal quantile
    z replaced by the t-expanded one, sqrt(G / (G - 1)) t_{G-1} (Hesterberg 2015), G = number of
    groups. Plain percentiles over groups under-cover with few groups (88-91 % at 15 groups x 20
    rows in simulations like that of tests/test_probes.py), a row bootstrap far more (68 % and 82 %
    at 15 x 20 and 30 x 10 there); this covered 93.0 % and 94.5 % there (docs/analysis.md).
    Resamples with one class are left out. (NaN, NaN) with fewer than 2 groups or no
    resample with both classes. Cost O(n_boot (n + G) + n log n)."""
    from shardwise.intervals import bca

    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(groups))
    auroc = _auroc(y, p)
    boot = auroc_bootstrap(y, p, n_boot, seed, groups)
    if n_groups < 2 or not np.isfinite(boot).any() or not np.isfinite(auroc):
        return float("nan"), float("nan")
    return bca(boot, auroc, auroc_leave_one_group_out(y, p, groups), level, expand=n_groups)


def f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold (predict 1 at p >= t) with the best F1 on (y, p): chosen on validation."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    last = np.r_[ps[1:] != ps[:-1], True]  # only cut between distinct scores
    f1 = 2 * tp / (np.arange(1, len(ys) + 1) + ys.sum())
    return float(ps[np.flatnonzero(last)[np.argmax(f1[last])]]) if len(ys) else 0.5


def auroc_columns(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of every column of p [n, M] against the 0/1 labels y [n] (Mann-Whitney, ties
    counted half, as scikit-learn's roc_auc_score): [M]."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.full(p.shape[1], np.nan)
    ranks = rankdata(p, axis=0)
    return (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def permuted_labels(y: np.ndarray, split: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """The permutation null's labels [N, K x n_perm] (column k x n_perm + r: label k, shuffle r):
    the labels the probe learns from (train, and val, which picks its weights) shuffled, each split
    within itself, so its class balance stays; test labels stay real, so a probe's test AUROC under
    the shuffle is a draw from the null of "the features say nothing about the label"."""
    rng = np.random.default_rng([seed, 2])
    k = y.shape[1]
    out = np.repeat(y, n_perm, axis=1)
    for s in (0, 1):
        rows = np.flatnonzero(split == s)
        order = rng.permuted(np.tile(rows, (k * n_perm, 1)), axis=1)
        out[rows] = out[order.T, np.arange(k * n_perm)]
    return out


def permutation_null(
    x: Any,
    y: np.ndarray,
    split: np.ndarray,
    l2: Any,
    n_perm: int,
    pr: ProbesConfig,
    memory_bytes: float = 2e9,
) -> tuple[np.ndarray, int]:
    """Test AUROCs [L, K, n_perm] of probes trained on shuffled labels (:func:`permuted_labels`),
    each with its real probe's L2 strength `l2` [L, K]; as many shuffles per batch as fit in
    `memory_bytes` of optimiser state. Returns (null AUROCs, probes that did not converge)."""
    import torch

    n_layers, _, dim = x.shape
    k = y.shape[1]
    labels = permuted_labels(y, split, n_perm, pr.seed)
    te = split == 2
    null = np.empty((n_layers, k, n_perm))
    per_column = n_layers * (dim + 1) * 4 * (2 * 10 + 8)  # theta, best, grads, 10 L-BFGS pairs, ...
    step = max(1, min(n_perm, int(memory_bytes // (per_column * k))))
    unconverged = 0
    for lo in range(0, n_perm, step):
        r = range(lo, min(lo + step, n_perm))
        cols = [j * n_perm + i for j in range(k) for i in r]
        fixed = l2.repeat_interleave(len(r), dim=1)  # [L, K x len(r)], label-major like cols
        probe = fit(
            x, labels[:, cols], split, [0.0], pr.max_steps, pr.patience, pr.tolerance, l2_columns=fixed
        )
        unconverged += sum(probe.not_converged().values())
        with torch.no_grad():
            p = scores(x[:, torch.as_tensor(np.flatnonzero(te), device=x.device)], probe).cpu().numpy()
        for j in range(k):
            part = slice(j * len(r), (j + 1) * len(r))
            for layer in range(n_layers):
                null[layer, j, lo : lo + len(r)] = auroc_columns(y[te, j], p[layer][:, part])
    return null, unconverged


def p_values(auroc: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values (1 + #{null >= auroc}) / (1 + n_perm), along the last axis."""
    return (1 + (null >= auroc[..., None]).sum(-1)) / (1 + null.shape[-1])


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def metrics_table(
    p: np.ndarray,
    y: np.ndarray,
    split: np.ndarray,
    layers: Sequence[int],
    labels: Sequence[str],
    controls: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Any = None,
) -> pd.DataFrame:
    """Metrics per (label, layer) on the test split (and the validation AUROC): p [L, N, K'] holds
    the real probes, then (controls) the control-task probes in the same order; y [N, K'] likewise.
    auroc_ci_low/high: the 95 % interval of :func:`auroc_interval` over `n_boot` resamples of the
    test split's `groups` [N] (the split's groups; None = every row its own group), named in
    auroc_ci_method, with n_test_groups the number of groups it resamples;
    f1, precision, recall, accuracy and balanced_accuracy at `threshold`, the score with the best F1
    on validation (not 0.5: class-balanced probes are not calibrated to the base rate);
    selectivity = auroc - control_auroc (NaN without a control task)."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
    )

    te, va = split == 2, split == 1
    n_train = int((split == 0).sum())
    k = len(labels)
    test_groups = np.arange(len(split))[te] if groups is None else np.asarray(groups, dtype=str)[te]
    n_test_groups = len(np.unique(test_groups))
    rows = []
    for j, label in enumerate(labels):
        for i, layer in enumerate(layers):
            threshold = f1_threshold(y[va, j], p[i, va, j])
            pred = p[i, te, j] >= threshold
            auroc = _auroc(y[te, j], p[i, te, j])
            ci_low, ci_high = auroc_interval(y[te, j], p[i, te, j], test_groups, n_boot, seed)
            control = _auroc(y[te, k + j], p[i, te, k + j]) if controls else float("nan")
            rows.append(
                {
                    "label": label,
                    "layer": layer,
                    "auroc": auroc,
                    "auprc": average_precision_score(y[te, j], p[i, te, j]),
                    "f1": f1_score(y[te, j], pred, zero_division=0),
                    "accuracy": accuracy_score(y[te, j], pred),
                    "balanced_accuracy": balanced_accuracy_score(y[te, j], pred),
                    "precision": precision_score(y[te, j], pred, zero_division=0),
                    "recall": recall_score(y[te, j], pred, zero_division=0),
                    "n_train": n_train,
                    "n_test": int(te.sum()),
                    "control_auroc": control,
                    "selectivity": auroc - control,
                    "n_test_positive": int(y[te, j].sum()),
                    "auroc_ci_low": ci_low,
                    "auroc_ci_high": ci_high,
                    "auroc_ci_method": AUROC_CI_METHOD,
                    "n_test_groups": n_test_groups,
                    "threshold": threshold,
                    "val_auroc": _auroc(y[va, j], p[i, va, j]),
                }
            )
    return pd.DataFrame(rows)


def control_labels(
    y: np.ndarray, types: npt.ArrayLike, seed: int, split: Any = None, tries: int = 1000
) -> np.ndarray:
    """The control task of Hewitt & Liang (2019): every control type gets one seeded random label
    per label column, drawn with that label's positive rate, and keeps it in train, val and test;
    only a probe that tells the types apart can solve it. [N, K] 0/1.

    With `split` [N], a column whose control lacks a class in train, val or test is drawn again
    (seeded by seed, column and try; at most `tries` times), so the draw is the random labelling
    conditional on both classes in every split; a column that never gets there keeps its last
    draw, which :func:`control_task` refuses. Columns that have both already keep the first draw."""
    _, inverse = np.unique(np.asarray(types, dtype=str), return_inverse=True)
    n_types = int(inverse.max()) + 1
    rng = np.random.default_rng([seed, 1])
    rate = y.mean(0)
    per_type = (rng.random((n_types, y.shape[1])) < rate).astype(y.dtype)
    if split is not None:
        present = np.zeros((len(SPLITS), n_types), dtype=bool)  # which types each split has
        present[np.asarray(split), inverse] = True

        def usable(column: np.ndarray) -> bool:
            return all(0 < column[present[s]].sum() < present[s].sum() for s in range(len(SPLITS)))

        for k in range(y.shape[1]):
            for attempt in range(1, tries + 1):
                if usable(per_type[:, k]):
                    break
                redraw = np.random.default_rng([seed, 1, k, attempt])
                per_type[:, k] = redraw.random(n_types) < rate[k]
    return per_type[inverse]


def control_task(
    y: np.ndarray, types: npt.ArrayLike, split: np.ndarray, labels: Sequence[str], seed: int, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The control labels [N, K] (:func:`control_labels`, conditional on both classes in every
    split) after checking that the control can be learned at all: some control types must occur
    in both train and test (types nested in the split's groups never do: the control's test AUROC
    would sit at chance and selectivity would be inflated) - InputError otherwise, and also when a
    label's control cannot get both classes into train, val and test. Returns the labels and what
    was checked: n_types, n_types_train_and_test (types in both), test_rows_seen_type (share of
    test rows whose type is also in train: the rows the control can be learned for)."""
    types = np.asarray(types, dtype=str)
    names, inverse = np.unique(types, return_inverse=True)
    tr, te = split == 0, split == 2
    in_train = np.zeros(len(names), dtype=bool)
    in_train[inverse[tr]] = True
    in_test = np.zeros(len(names), dtype=bool)
    in_test[inverse[te]] = True
    crossing = int((in_train & in_test).sum())
    seen = float(in_train[inverse[te]].mean()) if te.any() else 0.0
    if crossing == 0:
        raise InputError(
            f"{where}: none of the {len(names)} control types occurs in both the train and the test "
            "split (as when types are nested in the split's groups), so the control task cannot be "
            "learned and selectivity would be inflated; use a control_type that recurs across groups, "
            "or drop the column"
        )
    tries = 1000
    control = control_labels(y, types, seed, split, tries)
    for k, label in enumerate(labels):
        for s, name in enumerate(SPLITS):
            classes = np.unique(control[split == s, k])
            if len(classes) < 2:
                raise InputError(
                    f"{where}: the control task of label {label!r} has only class {int(classes[0])} in the "
                    f"{name} split in {tries} seeded draws ({len(names)} control types, "
                    f"{int(in_train.sum())} in train); add control types, or drop the control_type column"
                )
    info = {
        "n_types": len(names),
        "n_types_train_and_test": crossing,
        "test_rows_seen_type": round(seen, 4),
    }
    return control, info


def heatmap(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = table.pivot(index="layer", columns="label", values="auroc")
    width = max(5.0, 1.6 + 0.45 * grid.shape[1])  # room for the title and the colour bar
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.22 * grid.shape[0]), dpi=120)
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("label")
    ax.set_ylabel("layer (0 = embeddings)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="test AUROC")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def layer_plot(table: pd.DataFrame, path: Path, title: str) -> None:
    """Per label, across layers: test AUROC with its 95 % CI, the control task's AUROC and the
    permutation null's 95th percentile (top); selectivity = AUROC - control AUROC (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_control = table["control_auroc"].notna().any()
    fig, axes = plt.subplots(
        2 if has_control else 1,
        1,
        figsize=(7, 6 if has_control else 3.6),
        dpi=120,
        sharex=True,
        squeeze=False,
    )
    top = axes[0, 0]
    for i, (label, rows) in enumerate(table.groupby("label", sort=False)):
        rows = rows.sort_values("layer")
        colour = f"C{i}"
        top.plot(rows.layer, rows.auroc, color=colour, label=label)
        top.fill_between(rows.layer, rows.auroc_ci_low, rows.auroc_ci_high, color=colour, alpha=0.15, lw=0)
        if has_control:
            top.plot(rows.layer, rows.control_auroc, color=colour, ls="--", lw=1)
            axes[1, 0].plot(rows.layer, rows.selectivity, color=colour, label=label)
        if "null_auroc_q95" in rows:
            top.plot(rows.layer, rows.null_auroc_q95, color=colour, ls=":", lw=0.8)
    top.set_ylabel("test AUROC")
    top.set_ylim(min(0.4, float(table.auroc.min()) - 0.05), 1.02)
    top.set_title(
        title + "\nsolid: probe (band: 95 % CI), dashed: control task, dotted: null q95", fontsize=8
    )
    top.legend(fontsize=7, loc="lower right")
    if has_control:
        axes[1, 0].axhline(0, color="grey", lw=0.6)
        axes[1, 0].set_ylabel("selectivity (AUROC - control)")
    axes[-1, 0].set_xlabel("layer (0 = embeddings)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def layer_bytes(n: int, dim: int, n_columns: int) -> int:
    """Peak bytes of training one layer's probes: the layer's float32 activations [N, D] three times
    over (the features, their standardised design and its temporaries), plus L-BFGS state (~28
    copies of the weights) and logits for `n_columns` probes (L2 grid x labels, with controls)."""
    return 3 * n * dim * 4 + 28 * (dim + 1) * n_columns * 4 + 4 * n * n_columns * 4


def layer_blocks(n_layers: int, per_layer: int, budget: float) -> list[range]:
    """Consecutive blocks of layers that each fit `budget` bytes (at least one layer per block)."""
    size = max(1, min(n_layers, int(budget // max(per_layer, 1))))
    return [range(lo, min(lo + size, n_layers)) for lo in range(0, n_layers, size)]


def _join(fits: list[Fit]) -> Fit:
    import torch

    def cat(name: str) -> Any:
        return torch.cat([getattr(f, name) for f in fits])

    return Fit(
        W=cat("W"),
        b=cat("b"),
        l2=cat("l2"),
        steps=max(f.steps for f in fits),
        seconds=sum(f.seconds for f in fits),
        status=cat("status"),
        all_status=cat("all_status"),
    )


NULL_MEMORY = 2e9  # bytes of optimiser state per batch of permutation-null probes


def run(
    activations: str | Path,
    pr: ProbesConfig,
    out_dir: str | Path,
    name: str,
    memory_bytes: float | None = None,
) -> dict[str, Any]:
    """Train and evaluate every probe of one model; write the four outputs.

    The activations [L, N, D] are read and trained a block of layers at a time, each block within
    `memory_bytes` (default: half of what the training device has free, :func:`available_memory`,
    less the permutation null's NULL_MEMORY), so an 8B model's 33 x 20,000 x 4,096 toxicity set
    (10.8 GB in float32) trains on a GPU or a job with less. Probes are independent per layer:
    the blocks give the same probes as one pass over all layers."""
    import h5py
    import torch
    from safetensors.torch import save_file

    table = load_labelled(pr.data, list(pr.labels))
    labels = list(pr.labels)
    y = table[labels].to_numpy()
    split = group_split(table["group"].tolist(), y, pr.val_fraction, pr.test_fraction, pr.seed)
    check_split(split, y, labels, f"probes data file {pr.data}")
    k = len(labels)
    controls = "control_type" in table.columns
    control_info: dict[str, Any] | None = None
    if controls:  # the control task's probes train in the same batch, each with its probe's L2
        where = f"probes data file {pr.data}"
        control, control_info = control_task(y, table["control_type"], split, labels, pr.seed, where)
        log.info(
            "control task: %d of %d control types occur in train and test (%.0f %% of test rows have "
            "a type seen in train)",
            control_info["n_types_train_and_test"],
            control_info["n_types"],
            100 * control_info["test_rows_seen_type"],
        )
        if control_info["test_rows_seen_type"] < 0.5:
            log.warning(
                "%s: only %.0f %% of test rows have a control type seen in train; the others pull the "
                "control AUROC towards 0.5 and selectivity up",
                where,
                100 * control_info["test_rows_seen_type"],
            )
        y_all = np.concatenate([y, control], axis=1)
        l2_from = [*range(k), *range(k)]
    else:
        log.info("%s has no control_type column: no control task, selectivity is NaN", pr.data)
        y_all, l2_from = y, None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fits, probabilities, nulls = [], [], []
    null_unconverged, null_seconds = 0, 0.0
    with h5py.File(activations, "r") as f:
        item_ids = f["item_ids"][...]
        layers = f["layers"][...].tolist()
        if not np.array_equal(item_ids, table["id"].to_numpy()):
            raise InputError(f"{activations}: item ids do not match {pr.data} (rerun the activations stage)")
        n_layers, n, dim = f["activations"].shape
        if memory_bytes is None:
            memory_bytes = max(available_memory(str(device)) / 2 - NULL_MEMORY, 2**28)
        per_layer = layer_bytes(n, dim, len(pr.l2_grid) * y_all.shape[1])
        blocks = layer_blocks(n_layers, per_layer, memory_bytes)
        log.info(
            "[%d layers, %d items, %d dims]: %d block(s) of <= %d layers (%.2f GB per layer, budget %.2f GB)",
            n_layers,
            n,
            dim,
            len(blocks),
            len(blocks[0]),
            per_layer / 1e9,
            memory_bytes / 1e9,
        )
        for block in blocks:
            x = torch.from_numpy(f["activations"][block.start : block.stop].astype(np.float32)).to(device)
            probe = fit(x, y_all, split, pr.l2_grid, pr.max_steps, pr.patience, pr.tolerance, l2_from=l2_from)
            with torch.no_grad():
                probabilities.append(scores(x, probe).cpu().numpy())
            started = time.perf_counter()
            null, unconverged = permutation_null(
                x, y, split, probe.l2[:, :k], pr.permutations, pr, memory_bytes=NULL_MEMORY
            )
            null_seconds += time.perf_counter() - started
            null_unconverged += unconverged
            fits.append(probe)
            nulls.append(null)
            del x
    probe, p, null = _join(fits), np.concatenate(probabilities), np.concatenate(nulls)
    metrics = metrics_table(p, y_all, split, layers, labels, controls, seed=pr.seed, groups=table["group"])
    cells = [  # each metrics row's (layer, label) position in the [layers, labels] arrays
        (layers.index(layer), labels.index(label))
        for layer, label in zip(metrics["layer"].tolist(), metrics["label"].tolist(), strict=True)
    ]
    metrics["l2"] = [float(probe.l2[i, j]) for i, j in cells]
    names = probe.status_names()
    metrics["status"] = [names[i, j] for i, j in cells]
    log.info(
        "permutation null: %d shuffles x %d labels x %d layers trained in %.2f s",
        pr.permutations,
        k,
        len(layers),
        null_seconds,
    )
    null_rows = np.stack([null[i, j] for i, j in cells])  # [rows, P]
    metrics["p_value"] = p_values(metrics["auroc"].to_numpy(), null_rows)
    metrics["null_auroc_mean"] = null_rows.mean(1)
    metrics["null_auroc_q95"] = np.quantile(null_rows, 0.95, axis=1)
    if null_unconverged:
        log.warning("%d of %d permutation-null probes did not converge", null_unconverged, null.size)
    unconverged = metrics[~metrics.status.isin(["converged", "early_stop"])]
    if len(unconverged):
        log.warning(
            "%d of %d probes did not converge (%s): %s; raise probes.max_steps or look at the features",
            len(unconverged),
            len(metrics),
            ", ".join(f"{n} {s}" for s, n in unconverged.status.value_counts().items()),
            ", ".join(f"{r.label}@{r.layer}" for r in unconverged.itertuples()),
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False, float_format="%.6g"))
    with atomic_path(out / "probes.safetensors") as tmp:
        save_file(
            {
                "W": probe.W[:, :k].contiguous().cpu(),
                "b": probe.b[:, :k].contiguous().cpu(),
                "layers": torch.tensor(layers),
            },
            str(tmp),
            metadata={"labels": json.dumps(labels), "pooling": pr.pooling, "model": name},
        )
    best = {}
    for label, rows in metrics.groupby("label", sort=False):
        # pandas-stubs types idxmax as Hashable, which no overload of .loc takes; it is a row label.
        top = rows.loc[rows.val_auroc.idxmax()]  # type: ignore[call-overload]
        best[label] = {
            "best_layer": int(top.layer),
            "chosen_by": "validation AUROC",
            **{
                m: float(top[m])
                for m in (
                    "auroc",
                    "auroc_ci_low",
                    "auroc_ci_high",
                    "auprc",
                    "f1",
                    "accuracy",
                    "balanced_accuracy",
                    "control_auroc",
                    "selectivity",
                    "p_value",
                    "l2",
                )
            },
            "max_test_auroc_any_layer": float(rows.auroc.max()),
        }
    summary = {
        "model": name,
        "data": str(pr.data),
        "labels": best,
        "mean_test_auroc": float(metrics.auroc.mean()),
        "mean_control_auroc": float(metrics.control_auroc.mean()),
        "control_task": (
            "Hewitt & Liang: a random label per control_type, drawn (seeded) until train, val and "
            "test each have both classes"
            if controls
            else None
        ),
        "control_types": control_info,
        "auroc_ci": f"95 % {AUROC_CI_METHOD}: BCa over bootstrap resamples of the test split's groups, "
        "t-expanded quantiles (auroc_interval)",
        "permutations": pr.permutations,
        "p_value": "(1 + #{null AUROC >= AUROC}) / (1 + permutations), train and val labels shuffled",
        "n_rows": {s: int((split == i).sum()) for i, s in enumerate(SPLITS)},
        "n_groups": int(table["group"].nunique()),
        "n_probes": len(layers) * k,
        "layers": layers,
        "pooling": pr.pooling,
        "l2_grid": list(pr.l2_grid),
        "steps": probe.steps,
        "probe_status": metrics.status.value_counts().to_dict(),
        "train_seconds": round(probe.seconds, 3),
        "null_seconds": round(null_seconds, 3),
        "device": str(device),
        "seed": pr.seed,
    }
    atomic_write_json(out / "aggregate_metrics.json", summary)
    title = f"{name} on {pr.data.name}: linear probes, test AUROC ({pr.pooling} pooling)"
    heatmap(metrics, out / "auroc_heatmap.png", title)
    layer_plot(metrics, out / "selectivity_by_layer.png", f"{name} on {pr.data.name} ({pr.pooling} pooling)")
    log.info(
        "%d probes (%d layers x %d labels) x %d L2 values trained in %.2f s on %s (%d steps)",
        len(layers) * k,
        len(layers),
        k,
        len(pr.l2_grid),
        probe.seconds,
        device,
        probe.steps,
    )
    return summary


def train(smk: Any) -> None:
    """Snakemake rule `train_probes`: one model on one probe set (Config.probe_sets)."""
    cfg = load_config(smk.config)
    pr = cfg.probe_sets()[smk.wildcards.probe_set]
    run(smk.input.activations, pr, Path(smk.output.metrics).parent, smk.wildcards.model)

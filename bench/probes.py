"""Probe training: all probes at once vs one probe at a time, in one run.

    python bench/probes.py                      # CPU: 22 layers x 45 labels, 2,000 rows x 128 dims
    python bench/probes.py --device cuda --rows 20000 --dim 2048 --sample 45   # the GPU size
    python bench/probes.py --data factor --layers 2 --labels 3 --rows 400 --dim 4096   # real-width stress

Synthetic data with a planted linear signal per label (stronger in higher layers). Three trainers,
each with the same L2 strength (--l2) on standardised features and the class-balanced loss:
  vectorised  shardwise.probes.fit: every (layer, label) probe in one tensor, batched L-BFGS
  loop        the same fit() called once per probe (same optimiser and stopping rules)
  sklearn     LogisticRegression(class_weight="balanced", C matched, lbfgs) per probe, on the CPU
`--data factor` gives every feature one shared dominant direction (as real residual streams have
massive activations) with the labels in weak directions: the case where a solver tuned at small D
stalls at W = 0. Prints wall time and mean test AUROC of each, the speed-ups, and the gap between
fit()'s objective without early stopping and scikit-learn's on the same probes, and the cost of one
probe's AUROC interval (auroc_interval over groups of --group-size rows). --sample N times the loop and
scikit-learn on N probes and extrapolates to all (said so in the output). Numbers measured so far:
docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def planted(layers: int, rows: int, dim: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = (rng.normal(size=(rows, dim)) * rng.uniform(0.5, 3, size=dim)).astype(np.float32)
    directions = rng.normal(size=(dim, labels)).astype(np.float32)
    z = top @ directions / np.sqrt(dim) + rng.normal(size=(rows, labels)) * 0.7
    cut = np.array([np.quantile(z[:, k], q) for k, q in enumerate(rng.uniform(0.3, 0.8, size=labels))])
    y = (z > cut).astype(np.float32)
    x = np.empty((layers, rows, dim), dtype=np.float32)
    for i in range(layers):
        x[i] = top + rng.normal(size=(rows, dim)).astype(np.float32) * (layers - 1 - i) / layers * 3
    return x, y


def factor(layers: int, rows: int, dim: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((rows, labels)) < 0.4).astype(np.float32)
    x = np.empty((layers, rows, dim), dtype=np.float32)
    for i in range(layers):
        shared = rng.standard_normal((rows, 1)) * 30.0 * (1.0 + 0.1 * rng.standard_normal((1, dim)))
        directions = rng.standard_normal((labels, dim)) / np.sqrt(dim)
        x[i] = shared + rng.standard_normal((rows, dim)) + (2 * y - 1) @ directions * 3 * (0.5 + i)
    return x, y


def objective(z: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float) -> float:
    """fit()'s objective of one probe in the standardised space (class weights sum to 1)."""
    t = z @ w + b
    c = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    return float((c * (np.logaddexp(0, t) - y * t)).sum() + 0.5 * l2 * (w @ w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--data", choices=["planted", "factor"], default="planted")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--labels", type=int, default=45)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--sample", type=int, default=0, help="time loop/sklearn on this many probes (0 = all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=4, help="rows per group for the AUROC CI timing")
    a = ap.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from shardwise.probes import fit, group_split, scores

    if a.threads:
        torch.set_num_threads(a.threads)
    x_np, y = (planted if a.data == "planted" else factor)(a.layers, a.rows, a.dim, a.labels)
    split = group_split([str(i) for i in range(a.rows)], y, 0.2, 0.2, seed=0)
    tr, te = split == 0, split == 2
    device = torch.device(a.device)
    x = torch.from_numpy(x_np).to(device)
    n_probes = a.layers * a.labels
    probes = [(i, j) for i in range(a.layers) for j in range(a.labels)]
    sample = (
        probes if not a.sample else [probes[t] for t in np.linspace(0, n_probes - 1, a.sample).astype(int)]
    )
    scale = n_probes / len(sample)
    where = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"probes: {a.layers} layers x {a.labels} labels = {n_probes} probes, {a.rows} rows x {a.dim} dims")
    print(f"  on {where}; train/val/test {tr.sum()}/{(split == 1).sum()}/{te.sum()}; L2 {a.l2}")

    def auroc(p: np.ndarray, i: int, j: int) -> float:
        return roc_auc_score(y[te, j], p[te])

    fit(x, y, split, [a.l2], max_steps=3)  # warm-up
    started = time.perf_counter()
    probe = fit(x, y, split, [a.l2])
    vec_s = time.perf_counter() - started
    p = scores(x, probe).cpu().numpy()
    vec_auc = np.mean([auroc(p[i, :, j], i, j) for i, j in probes])
    print(f"  vectorised  {vec_s:10.2f} s   mean test AUROC {vec_auc:.4f}   ({probe.steps} steps)")

    started = time.perf_counter()
    loop_auc = []
    for i, j in sample:
        one = fit(x[i : i + 1], y[:, j : j + 1], split, [a.l2])
        loop_auc.append(auroc(scores(x[i : i + 1], one)[0, :, 0].cpu().numpy(), i, j))
    loop_s = (time.perf_counter() - started) * scale
    note = f" (extrapolated from {len(sample)} probes)" if scale > 1 else ""
    print(f"  loop        {loop_s:10.2f} s   mean test AUROC {np.mean(loop_auc):.4f}{note}")

    started = time.perf_counter()
    sk_auc, sk_fits = [], {}
    for i, j in sample:
        mean, std = x_np[i, tr].mean(0), x_np[i, tr].std(0, ddof=1)
        z = (x_np[i] - mean) / std
        clf = LogisticRegression(class_weight="balanced", C=1.0 / (a.l2 * tr.sum()), max_iter=2000)
        clf.fit(z[tr], y[tr, j])
        sk_auc.append(auroc(clf.predict_proba(z)[:, 1], i, j))
        sk_fits[i, j] = (
            z[tr].astype(np.float64),
            objective(z[tr], y[tr, j], clf.coef_[0], clf.intercept_[0], a.l2),
        )
    sk_s = (time.perf_counter() - started) * scale
    print(f"  sklearn     {sk_s:10.2f} s   mean test AUROC {np.mean(sk_auc):.4f}{note}")
    vec_sample = np.mean([auroc(p[i, :, j], i, j) for i, j in sample])
    print(f"  speed-up    {loop_s / vec_s:10.1f}x over the loop, {sk_s / vec_s:.1f}x over sklearn")
    print(f"  AUROC gap   {abs(vec_sample - np.mean(sk_auc)):.4f} vs sklearn on the timed probes")
    from shardwise.probes import AUROC_CI_METHOD, auroc_interval

    groups = np.arange(a.rows) // a.group_size  # rows of a group stay together, as a prompt's samples
    started = time.perf_counter()
    auroc_interval(y[te, 0], p[-1, te, 0], groups[te], n_boot=1000)
    ci_s = time.perf_counter() - started
    print(
        f"  AUROC CI    {ci_s:10.3f} s per probe ({AUROC_CI_METHOD}, 1,000 resamples of "
        f"{len(np.unique(groups[te]))} groups, {te.sum()} test rows); {ci_s * n_probes:.1f} s for all probes"
    )
    full = fit(x, y, split, [a.l2], patience=None, max_steps=500)  # the L2 optimum, as sklearn's
    gaps = []
    for (i, j), (z, ref) in sk_fits.items():
        std, mean = x_np[i, tr].std(0, ddof=1), x_np[i, tr].mean(0)
        w = full.W[i, j].cpu().numpy().astype(np.float64) * std
        b = float(full.b[i, j].cpu()) + float(full.W[i, j].cpu().numpy() @ mean)
        gaps.append((objective(z, y[tr, j], w, b, a.l2) - ref) / ref)
    print(
        f"  objective   max gap {max(gaps):+.4%} to sklearn (no early stopping, {full.steps} steps); "
        f"not converged: {full.not_converged() or 'none'}"
    )


if __name__ == "__main__":
    main()

"""Peer methods as operators with the common index map: A-ToMe-style adjacent merging, Samp-style group merging and
FastV-style attention pruning (each from its paper's description; our own code)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress.affinity import cosine_band
from speech_redundancy.compress.core import (
    Compressed,
    acc_dtype,
    check_features,
    check_finite,
    check_ratio,
    check_threshold,
    check_x,
    empty,
    n_kept,
    pool_groups,
)


def adjacent_merge(x: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """A-ToMe style: link the T - T' most similar adjacent pairs (T' = n_kept(ratio, T)); linked chains
    collapse into one mean-pooled token, so exactly T' tokens remain. Equal similarities: earlier pair first."""
    check_x(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    if T == 0:
        check_features(x, features)
        return empty(x)
    adjacent = cosine_band(x, 1, features)[1:, 0]  # cos(t, t-1) for t = 1..T-1
    n_links = T - n_kept(ratio, T)
    order = np.argsort(-adjacent, kind="stable")
    start = np.ones(T, dtype=bool)
    start[order[:n_links] + 1] = False
    return pool_groups(x, np.cumsum(start) - 1)


def _unit_rows(f: Tensor) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 (float64 for float64 input), on the host."""
    f = f.detach().to(acc_dtype(f.dtype))
    n = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    return torch.where(n > 0, f / n, torch.zeros((), dtype=f.dtype, device=f.device)).cpu().numpy()


def group_merge(x: Tensor, threshold: float, features: Tensor | None = None) -> Compressed:
    """Samp style: token t joins the current group iff its MEAN cosine similarity to all current members is
    >= ``threshold`` (clamped to [-1, 1]; zero vectors have cosine 0); otherwise it starts a new group.
    Computed on the host with a running sum of unit vectors (float32; float64 for float64 input)."""
    check_x(x)
    threshold = check_threshold(threshold)
    f = check_features(x, features)
    check_finite(x)
    if f is not x:
        check_finite(f, "features")
    T = x.shape[0]
    if T == 0:
        return empty(x)
    u = _unit_rows(f)
    start = np.zeros(T, dtype=bool)
    start[0] = True
    total, size = u[0].copy(), 1
    for t in range(1, T):
        mean_cos = min(1.0, max(-1.0, float(u[t] @ total) / size))
        if mean_cos >= threshold:
            total += u[t]
            size += 1
        else:
            start[t] = True
            total, size = u[t].copy(), 1
    return pool_groups(x, np.cumsum(start) - 1)


def attention_prune(x: Tensor, scores: Tensor, ratio: float) -> Compressed:
    """FastV style: keep the n_kept(ratio, T) tokens with the highest ``scores`` [T] (the attention the
    text paid them at layer l-1), in temporal order; equal scores favour earlier tokens.

    The adapter must run layer l-1 with eager attention to get these scores (SDPA/FlashAttention return none).
    """
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    if scores is None:
        raise ValueError("attention_prune needs scores= ([T] attention per audio token from layer l-1)")
    s = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    if s.shape != (T,):
        raise ValueError(f"scores must have shape ({T},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; all must be finite")
    if T == 0:
        return empty(x)
    keep = np.sort(np.argsort(-s, kind="stable")[: n_kept(ratio, T)])
    groups = np.full(T, -1, dtype=np.int64)
    groups[keep] = np.arange(keep.size)
    return pool_groups(x, groups)

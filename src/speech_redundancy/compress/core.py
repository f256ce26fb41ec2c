"""What every operator shares: the index-map result, group pooling, similarity features and argument checks."""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

GAPS = ("unit", "keep")
FEATURE_MODES = ("hidden", "normed", "centered", "keys")


@dataclass
class Compressed:
    """An operator's output: the new tokens and where each input token went (the index-map contract).

    ``groups`` is any partition of the kept input tokens: a group's members need not be neighbours (interleaved
    groups, e.g. a bipartite matching or tokens assigned to distant targets, are allowed), and -1 marks a dropped
    token. Output tokens are ordered by each group's first (earliest) member, so the group ids first appear in the
    order 0, 1, 2, ... along the input, and ``positions[k]`` is the input index of group k's first member (strictly
    increasing). Each output token then takes its first member's place in the sequence: what the engine, the word
    windows of later points and the group plots rely on. Contiguous runs (Algorithm 1, the oracle) are the special
    case where the kept ids are also non-decreasing. :func:`check_index_map` checks the contract.
    """

    tokens: Tensor  # [T', d] (batched: [B, T', d], padded)
    groups: Tensor  # [T] long: output index per input token, -1 = dropped (batched: [B, T], -1 also at padding)
    positions: Tensor  # [T'] long: first input position of each output token (batched: [B, T'], -1 at padding)
    mask: Tensor | None = None  # batched only: [B, T'] bool, True at real output tokens

    @property
    def n_out(self) -> int:
        return int(self.tokens.shape[-2])


def first_members(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept input indices, index into them of each group's first member) for ``groups`` [T] (numpy, -1 = dropped);
    raises ValueError unless the kept ids are numbered 0..T'-1 in the order of their first appearance."""
    if np.any(groups < -1):
        raise ValueError("groups must be >= -1 (-1 = dropped)")
    kept = np.flatnonzero(groups >= 0)
    gk = groups[kept]
    # ids appear first in the order 0, 1, 2, ...: every id is at most one above the largest id before it, and a
    # group's first member is where its id is exactly one above them all
    before = np.maximum.accumulate(np.concatenate([[-1], gk[:-1]])) if gk.size else gk
    if np.any(gk > before + 1):
        raise ValueError("groups must number kept tokens 0, 1, 2, ... in the temporal order of each group's first "
                         "member")
    first = np.flatnonzero(gk == before + 1)
    return kept, first


def check_index_map(out: Compressed, n_in: int, *, first_only: bool = True) -> None:
    """Raise ValueError unless ``out`` (one sample) keeps the index-map contract for ``n_in`` input tokens: groups
    [n_in] long in -1..T'-1, ids numbered by first member, positions = each group's first member (``first_only=False``:
    positions only strictly increasing input indices, the one rule the engine needs; ``interpolate`` places its
    samples at their rounded source positions)."""
    g = out.groups.detach().cpu().numpy().astype(np.int64, copy=False)
    if g.shape != (n_in,):
        raise ValueError(f"groups must have shape ({n_in},), got {g.shape}")
    kept, first = first_members(g)
    if first.size != out.n_out:
        raise ValueError(f"groups name {first.size} output tokens but there are {out.n_out}")
    pos = out.positions.detach().cpu().numpy()
    if first_only and not np.array_equal(pos, kept[first]):
        raise ValueError("positions must be the input index of each group's first member")
    if pos.shape != (out.n_out,) or (pos.size and (pos[0] < 0 or pos[-1] >= n_in or np.any(np.diff(pos) <= 0))):
        raise ValueError(f"positions must be {out.n_out} strictly increasing input indices in 0..{n_in - 1}")


# ------------------------------------------------------------------------------------------ small rules


def n_kept(ratio: float, n_tokens: int) -> int:
    """Tokens kept at retention ratio K of ``n_tokens``: max(1, floor(K * T + 0.5)); 0 when T = 0."""
    if n_tokens <= 0:
        return 0
    return max(1, min(n_tokens, int(math.floor(ratio * n_tokens + 0.5))))


def seed_for(run_seed: int, utt_id: str) -> int:
    """A stable 63-bit seed for one utterance of a run (sha256 of both; independent of Python's hash())."""
    digest = hashlib.sha256(f"{int(run_seed)}:{utt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and means are accumulated in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ argument checks


def check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [T, d] tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def raise_nonfinite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {int(bad.sum()) - n_nan} inf values; all must be finite")


def check_finite(x: Tensor, name: str = "x") -> None:
    """One cheap pass (a float32/64 sum); the exact check runs only when the sum is not finite."""
    if x.numel() and not bool(torch.isfinite(x.sum(dtype=acc_dtype(x.dtype)))):
        raise_nonfinite(x, name)


def check_features(x: Tensor, features: Tensor | None) -> Tensor:
    """The tensor similarity is measured on: ``features`` (same T as x) when given, else x."""
    if features is None:
        return x
    check_x(features, "features")
    if features.shape[0] != x.shape[0]:
        raise ValueError(f"features has {features.shape[0]} tokens but x has {x.shape[0]}; they must match")
    return features


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a real number (in [-1, 1] for runs), got {threshold!r}")
    return float(threshold)


def check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    return int(window)


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    return int(budget)


# ------------------------------------------------------------------------------------------ pooling


def empty(x: Tensor) -> Compressed:
    long = dict(dtype=torch.long, device=x.device)
    return Compressed(x[:0].clone(), torch.empty(0, **long), torch.empty(0, **long))


def pool_groups(x: Tensor, groups: Tensor | np.ndarray) -> Compressed:
    """Mean-pool ``x`` [T, d] over ``groups`` [T] (any partition of the kept tokens, ids 0..T'-1 numbered in the
    order of each group's first member, -1 = drop; see :class:`Compressed`).

    Groups of one token are copied exactly; the others are averaged as the in-order sum of their rows each
    weighted by 1/size (``embedding_bag`` with per-sample weights: one pass over the rows, taken group by group,
    each group's members in temporal order), in float32 (float64 for float64 input); this differs from
    sum-then-divide by at most a few ulps.
    """
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    g = g.astype(np.int64, copy=False)
    if g.shape != (x.shape[0],):
        raise ValueError(f"groups must have shape ({x.shape[0]},), got {g.shape}")
    kept, first = first_members(g)
    gk = g[kept]
    n_out = int(first.size)
    positions = kept[first]
    device = x.device
    groups_t = torch.from_numpy(g).to(device)
    positions_t = torch.from_numpy(positions).to(device)
    if n_out == gk.size:  # only singletons: an exact copy
        tokens = x.index_select(0, positions_t)
    else:
        acc = acc_dtype(x.dtype)
        src = x if x.dtype == acc else x.to(acc)
        # the kept rows group by group (a stable sort: members stay in temporal order; for contiguous groups this
        # is the identity), so each group is one contiguous "bag" of rows; every row weighted by 1 / its group's size
        order = np.argsort(gk, kind="stable")
        counts = np.bincount(gk, minlength=n_out)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        weights = np.repeat(1.0 / counts, counts)
        tokens = torch.nn.functional.embedding_bag(
            torch.from_numpy(kept[order]).to(device), src, torch.from_numpy(offsets).to(device), mode="sum",
            per_sample_weights=torch.from_numpy(weights).to(device=device, dtype=acc))
        tokens = tokens.to(x.dtype)
    return Compressed(tokens, groups_t, positions_t)


def pool_weighted(x: Tensor, groups: Tensor | np.ndarray, weights: Tensor | np.ndarray) -> Compressed:
    """Like :func:`pool_groups`, but each group's token is the mean of its members weighted by ``weights`` [T]
    (>= 0, e.g. the attention they received); a group whose weights sum to 0 takes the plain mean. Sums in float32
    (float64 for float64 input) with ``index_add``; singletons are exact copies."""
    base = pool_groups(x, groups)  # checks the groups; positions; plain means
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    g = g.astype(np.int64, copy=False)
    w = weights.detach().cpu().double().numpy() if isinstance(weights, Tensor) else np.asarray(weights, np.float64)
    if w.shape != g.shape:
        raise ValueError(f"weights must have shape {g.shape}, got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    kept = np.flatnonzero(g >= 0)
    n_out = base.n_out
    if n_out == kept.size:
        return base
    gk = g[kept]
    total = np.bincount(gk, weights=w[kept], minlength=n_out)
    size = np.bincount(gk, minlength=n_out)
    coef = np.where(total[gk] > 0, w[kept] / np.where(total[gk] > 0, total[gk], 1.0), 1.0 / size[gk])
    acc = acc_dtype(x.dtype)
    dev = x.device
    rows = x.index_select(0, torch.from_numpy(kept).to(dev)).to(acc)
    rows = rows * torch.from_numpy(coef).to(device=dev, dtype=acc).unsqueeze(1)
    tokens = torch.zeros(n_out, x.shape[1], dtype=acc, device=dev).index_add_(0, torch.from_numpy(gk).to(dev), rows)
    return Compressed(tokens.to(x.dtype), base.groups, base.positions)


def from_partition(x: Tensor, labels: np.ndarray, tokens: Tensor) -> Compressed:
    """A result from ANY partition of the kept tokens: ``labels`` [T] (ids 0..G-1 in any order, groups need not be
    contiguous; -1 = dropped) and ``tokens`` [G, d] (the output token of each id). The outputs are renumbered in the
    order of each group's first member, which is its position."""
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != (x.shape[0],) or np.any(lab < -1):
        raise ValueError(f"labels must have shape ({x.shape[0]},) with ids >= -1")
    kept = np.flatnonzero(lab >= 0)
    n = int(lab.max()) + 1 if kept.size else 0
    if tokens.shape[0] != n:
        raise ValueError(f"tokens has {tokens.shape[0]} rows for {n} group ids")
    first = np.full(n, -1, dtype=np.int64)
    first[lab[kept][::-1]] = kept[::-1]  # the earliest member wins (the last write)
    if np.any(first < 0):
        raise ValueError("every group id 0..G-1 must have a member")
    order = np.argsort(first, kind="stable")  # output j is old id order[j]
    new_id = np.empty(n, dtype=np.int64)
    new_id[order] = np.arange(n)
    groups = np.where(lab >= 0, new_id[np.maximum(lab, 0)], -1)
    dev = x.device
    out = tokens.index_select(0, torch.from_numpy(order).to(dev)).to(x.dtype)
    return Compressed(out, torch.from_numpy(groups).to(dev), torch.from_numpy(first[order]).to(dev))


def identity(x: Tensor) -> Compressed:
    """No compression: every token is its own group (tokens is a copy of x)."""
    check_x(x)
    check_finite(x)
    T = x.shape[0]
    return pool_groups(x, np.arange(T)) if T else empty(x)


# ------------------------------------------------------------------------------------------ features


def similarity_features(
    x: Tensor,
    mode: str,
    *,
    norm: Callable[[Tensor], Tensor] | None = None,
    keys: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Features that similarity is measured on, per ``mode``:

    "hidden" x itself (the paper); "normed" norm(x), the layer's own input LayerNorm/RMSNorm passed as a
    callable; "centered" x minus the utterance's mean token (with ``mask`` [B, T] for a padded batch
    [B, T, d], the mean over real tokens); "keys" the given ``keys`` (same leading shape as x).
    """
    if mode == "hidden":
        return x
    if mode == "normed":
        if norm is None:
            raise ValueError("features mode 'normed' needs norm= (the layer's input LayerNorm/RMSNorm callable)")
        with torch.no_grad():
            return norm(x)
    if mode == "centered":
        if mask is None:
            return x - x.mean(dim=-2, keepdim=True)
        m = mask.to(x.dtype).unsqueeze(-1)
        mean = (x * m).sum(dim=-2, keepdim=True) / m.sum(dim=-2, keepdim=True).clamp_min(1)
        return x - mean
    if mode == "keys":
        if keys is None:
            raise ValueError("features mode 'keys' needs keys= (the layer's keys for the same tokens)")
        if keys.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"keys have shape {tuple(keys.shape)}; leading dims must match x {tuple(x.shape[:-1])}")
        return keys
    raise ValueError(f"unknown features mode {mode!r}; allowed: {', '.join(FEATURE_MODES)}")

"""Compression operators: pure tensor functions (no model, no config, no I/O).

CONTRACT (shared by every model adapter):

Every operator maps audio tokens ``x`` of shape [T, d] to a :class:`Compressed`:
``tokens`` [T', d], ``groups`` [T] (output index of each input token, -1 where the token was dropped) and
``positions`` [T'] (the input position that represents each output token: the first member of its group).
``compress(x, operator, **params)`` dispatches by name; ``affinity_groups(x, threshold, window)`` is
Algorithm 1 of the paper. ``compress_batch`` does the same for a padded batch.

Conventions shared by all operators
- Output tokens stay in temporal order; groups are contiguous runs of input tokens, so ``groups`` is
  non-decreasing over kept tokens and its ids are 0..T'-1.
- Cosine similarity is computed in float32 (float64 for float64 input) as dot(a, b) / (|a| |b|), clamped to
  [-1, 1]; the cosine with a zero vector is 0. Threshold comparisons are made in float64 on the host.
- Means are accumulated in float32 for half-precision input and cast back to the input dtype.
- A retention ``ratio`` keeps ``budget_for(ratio, T) = max(1, floor(ratio * T + 0.5))`` tokens.
- ``x`` (and ``features``) containing NaN or inf raise ValueError; T = 0 gives an empty result.
- Random operators use their own CPU ``torch.Generator`` seeded by ``seed``; see :func:`seed_for`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor


@dataclass
class Compressed:
    tokens: Tensor  # [T', d] (batched: [B, T', d], padded)
    groups: Tensor  # [T] long: output index per input token, -1 = dropped (batched: [B, T], -1 also at padding)
    positions: Tensor  # [T'] long: representative (first) input position per output token (batched: [B, T'], -1 at padding)
    mask: Tensor | None = None  # batched only: [B, T'] bool, True at real output tokens

    @property
    def n_out(self) -> int:
        return int(self.tokens.shape[-2])


GAPS = ("unit", "keep")
FEATURE_MODES = ("hidden", "normed", "centered", "keys")


# ----------------------------------------------------------------------------------------------- helpers


def budget_for(ratio: float, n_tokens: int) -> int:
    """Tokens kept at retention ``ratio`` of ``n_tokens``: max(1, floor(ratio * n + 0.5)); 0 when n = 0."""
    if n_tokens <= 0:
        return 0
    return max(1, min(n_tokens, int(math.floor(ratio * n_tokens + 0.5))))


def seed_for(run_seed: int, utt_id: str) -> int:
    """A stable 63-bit seed for one utterance of a run (sha256 of both; independent of Python's hash())."""
    digest = hashlib.sha256(f"{int(run_seed)}:{utt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [T, d] tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _raise_nonfinite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {int(bad.sum()) - n_nan} inf values; all must be finite")


def _check_finite(x: Tensor, name: str = "x") -> None:
    """One cheap pass (a float32/64 sum); the exact check runs only when the sum is not finite."""
    if x.numel() and not bool(torch.isfinite(x.sum(dtype=_acc_dtype(x.dtype)))):
        _raise_nonfinite(x, name)


def _check_features(x: Tensor, features: Tensor | None) -> Tensor:
    if features is None:
        return x
    _check_x(features, "features")
    if features.shape[0] != x.shape[0]:
        raise ValueError(f"features has {features.shape[0]} tokens but x has {x.shape[0]}; they must match")
    return features


def _empty(x: Tensor) -> Compressed:
    long = dict(dtype=torch.long, device=x.device)
    return Compressed(x[:0].clone(), torch.empty(0, **long), torch.empty(0, **long))


def pool_groups(x: Tensor, groups: Tensor | np.ndarray) -> Compressed:
    """Mean-pool ``x`` [T, d] over ``groups`` [T] (ids 0..T'-1, non-decreasing over kept tokens, -1 = drop).

    Groups of one token are copied exactly; the others are averaged as the in-order sum of their rows each
    weighted by 1/size (``embedding_bag`` with per-sample weights: one pass over the rows), in float32 (float64 for
    float64 input); this differs from sum-then-divide by at most a few ulps.
    """
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    g = g.astype(np.int64, copy=False)
    if g.shape != (x.shape[0],):
        raise ValueError(f"groups must have shape ({x.shape[0]},), got {g.shape}")
    kept = np.flatnonzero(g >= 0)
    gk = g[kept]
    step = np.diff(gk)
    if gk.size and (gk[0] != 0 or np.any((step < 0) | (step > 1))):
        raise ValueError("groups must number kept tokens 0, 1, 2, ... in temporal order (steps of 0 or 1)")
    if np.any(g < -1):
        raise ValueError("groups must be >= -1 (-1 = dropped)")
    n_out = int(gk[-1]) + 1 if gk.size else 0
    first = np.searchsorted(gk, np.arange(n_out))
    positions = kept[first]
    counts = np.diff(np.append(first, gk.size))
    device = x.device
    groups_t = torch.from_numpy(g).to(device)
    positions_t = torch.from_numpy(positions).to(device)
    if n_out == gk.size:  # only singletons: an exact copy
        tokens = x.index_select(0, positions_t)
    else:
        acc = _acc_dtype(x.dtype)
        src = x if x.dtype == acc else x.to(acc)
        # group means in one fused pass: each group is a contiguous "bag" of kept rows starting at offset `first`,
        # every row weighted by 1 / its group's size
        weights = np.repeat(1.0 / counts, counts)
        tokens = torch.nn.functional.embedding_bag(
            torch.from_numpy(kept).to(device), src, torch.from_numpy(first).to(device), mode="sum",
            per_sample_weights=torch.from_numpy(weights).to(device=device, dtype=acc))
        tokens = tokens.to(x.dtype)
    return Compressed(tokens, groups_t, positions_t)


# ------------------------------------------------------------------------------------ similarity features


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


# ------------------------------------------------------------------------------ Algorithm 1: the band


def _band_and_norms(f: Tensor, window: int) -> Tensor:
    """[T, window + 1] on f's device: column 0 = squared norm of token t, column j = cos(f_t, f_{t-j}).

    Lags reaching before the first token hold -inf. One batched matmul over overlapping row windows
    (a strided view of f, no copy), so f is read once.
    """
    f = f.contiguous()
    if not f.is_floating_point() or f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    T, F = f.shape
    w = window
    h = min(T, w)
    head_src = torch.cat([f.new_zeros(w, F), f[:h]])
    head = torch.matmul(f[:h].unsqueeze(1), head_src.as_strided((h, F, w + 1), (F, 1, F))).squeeze(1)
    if T > w:  # row t = i + w, column k holds f_t . f_{i+k}, i.e. lag w - k
        main = torch.matmul(f[w:].unsqueeze(1), f.as_strided((T - w, F, w + 1), (F, 1, F))).squeeze(1)
        dots = torch.cat([head, main]).flip(1)
    else:
        dots = head.flip(1)
    n2 = dots[:, 0]
    n = n2.sqrt()
    n_prev = torch.cat([n.new_zeros(w), n]).unfold(0, w + 1, 1).flip(1)[:, 1:]  # [t, j-1] = |f_{t-j}|
    denom = n.unsqueeze(1) * n_prev
    cos = torch.where(denom > 0, dots[:, 1:] / denom, torch.zeros((), dtype=f.dtype, device=f.device))
    cos = cos.clamp(-1.0, 1.0)
    lag = torch.arange(1, w + 1, device=f.device)
    before_start = torch.arange(T, device=f.device).unsqueeze(1) < lag
    cos = cos.masked_fill(before_start, float("-inf"))
    return torch.cat([n2.unsqueeze(1), cos], dim=1)


def _host_band(x: Tensor, features: Tensor | None, window: int) -> np.ndarray:
    """The cosine band [T, window] as float64 numpy, with the finiteness checks, in one device-to-host copy."""
    f = _check_features(x, features)
    packed = _band_and_norms(f, window).flatten()
    if f is not x and x.numel():
        packed = torch.cat([packed, x.sum(dtype=_acc_dtype(x.dtype)).to(packed.dtype).view(1)])
    host = packed.cpu().numpy().astype(np.float64)
    return _unpack_band(host, x, f, window)


def _unpack_band(host: np.ndarray, x: Tensor, f: Tensor, window: int) -> np.ndarray:
    T = x.shape[0]
    band = host[: T * (window + 1)].reshape(T, window + 1)
    if not np.isfinite(band[:, 0]).all():
        _raise_nonfinite(f, "x" if f is x else "features")
        raise ValueError("squared token norms overflow float32; rescale the similarity features")
    if host.size > band.size and not np.isfinite(host[-1]):
        _raise_nonfinite(x, "x")
    return band[:, 1:]


def similarity_band(features: Tensor, window: int) -> Tensor:
    """cos(f_t, f_{t-j}) for j = 1..window as a [T, window] tensor (-inf where t - j < 0)."""
    _check_x(features, "features")
    _check_window(window)
    return _band_and_norms(features, window)[:, 1:]


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be a real number (in [-1, 1] for runs), got {threshold!r}")
    return float(threshold)


def _check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    return int(window)


def _groups_from_band(cos: np.ndarray, threshold: float) -> np.ndarray:
    """Algorithm 1's grouping from the band, vectorised.

    Token t-1 always belongs to the current group, so lag 1 decides alone when it passes (join) or when no lag
    passes (new group). Only tokens that fail lag 1 but pass a farther lag j need the current group size:
    they join iff their nearest passing lag j* <= size. Those few are resolved in order on the host.
    """
    T = cos.shape[0]
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    passes = cos >= threshold
    passes[0] = False
    start = ~passes[:, 0]
    candidates = np.flatnonzero(start & passes.any(axis=1))
    if candidates.size:
        nearest = passes[candidates].argmax(axis=1) + 1  # 1-based smallest passing lag
        idx = np.arange(T)
        fixed = start.copy()
        fixed[candidates] = False
        last_fixed = np.maximum.accumulate(np.where(fixed, idx, 0))
        last = 0
        for t, j in zip(candidates.tolist(), nearest.tolist()):
            size = t - max(last, int(last_fixed[t - 1]))
            if j <= size:
                start[t] = False
            else:
                last = t
    start[0] = True
    return np.cumsum(start) - 1


def affinity_groups(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Tensor:
    """Algorithm 1: group id [T] per token (0, 1, ... rising by one at each new group).

    Token t joins the current group G iff max cos(f_t, g) over the last min(|G|, window) members g is
    >= ``threshold`` (ties join). Similarity uses ``features`` (same T, any width) when given, else ``x``.
    A threshold above 1 merges nothing; one at or below -1 merges everything. One device-to-host copy.
    """
    return torch.from_numpy(_affinity_groups_np(x, threshold, window, features)).to(x.device)


def _affinity_groups_np(x: Tensor, threshold: float, window: int, features: Tensor | None) -> np.ndarray:
    _check_x(x)
    threshold, window = _check_threshold(threshold), _check_window(window)
    if x.shape[0] == 0:
        _check_features(x, features)
        return np.zeros(0, dtype=np.int64)
    return _groups_from_band(_host_band(x, features, window), threshold)


def literal_affinity_groups(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Tensor:
    """Algorithm 1 transcribed line by line, one token at a time (the reference for tests and benchmarks).

    Each cosine comes from the same primitive as :func:`affinity_groups` (the band row of token t computed on
    the few tokens before it), so ties at the threshold behave identically. Slow: syncs at every token.
    """
    _check_x(x)
    threshold, window = _check_threshold(threshold), _check_window(window)
    f = _check_features(x, features)
    _check_finite(x)
    if f is not x:
        _check_finite(f, "features")
    T = x.shape[0]
    if T == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    groups = [0]  # G_curr <- [h_1]
    size = 1
    for t in range(1, T):
        k = min(size, window)
        # K = the last k members h_{t-1} .. h_{t-k}; column j holds cos(h_t, h_{t-j})
        cos = _band_and_norms(f[max(0, t - window) : t + 1], window)[-1, 1 : k + 1]
        s_max = float(cos.max())
        if s_max >= threshold:
            groups.append(groups[-1])  # append h_t to G_curr
            size += 1
        else:
            groups.append(groups[-1] + 1)  # emit the mean of G_curr; G_curr <- [h_t]
            size = 1
    return torch.tensor(groups, dtype=torch.long, device=x.device)


def affinity_pool(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Compressed:
    """Affinity Pooling (Algorithm 1): mean of each group found by :func:`affinity_groups`."""
    groups = _affinity_groups_np(x, threshold, window, features)
    return pool_groups(x, groups) if groups.size else _empty(x)


# --------------------------------------------------------------------------- fixed-budget Affinity Pooling


def _count_groups(cos: np.ndarray, threshold: float) -> int:
    return int(_groups_from_band(cos, threshold)[-1]) + 1


def _budget_threshold(cos: np.ndarray, budget: int) -> float:
    """Largest threshold whose group count is <= budget (counts never decrease as the threshold rises)."""
    values = np.unique(cos[np.isfinite(cos)])
    candidates = np.append(values, np.inf)  # counts change only at these values; inf merges nothing
    lo, hi = 0, candidates.size - 1  # count(candidates[0]) == 1 <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_groups(cos, float(candidates[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return float(candidates[lo])


def affinity_budget(x: Tensor, ratio: float, window: int, features: Tensor | None = None) -> Compressed:
    """Affinity Pooling at a fixed budget of ``budget_for(ratio, T)`` tokens (paper Table 3).

    The threshold is searched over the band's distinct similarities (group counts rise monotonically with
    the threshold). When no threshold gives exactly the budget, the largest reachable count below it is
    used, so the result never keeps more tokens than the budget.
    """
    _check_x(x)
    ratio, window = _check_ratio(ratio), _check_window(window)
    T = x.shape[0]
    if T == 0:
        return _empty(x)
    cos = _host_band(x, features, window)
    threshold = _budget_threshold(cos, budget_for(ratio, T))
    return pool_groups(x, _groups_from_band(cos, threshold))


# ------------------------------------------------------------------------------ oracle operators (§3.1)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    return int(budget)


def spans_from_words(starts_s, ends_s, token_rate: float, n_tokens: int) -> Tensor:
    """Token spans [U, 2] ([start, end) indices) of words given their start/end times in seconds.

    start = floor(start_s * rate), end = ceil(end_s * rate), clipped to [0, n_tokens]. Words are taken in
    order of (start, end); a span overlapping the previous one starts at the previous end; every span gets
    at least one token (end >= start + 1). Words with no token left before n_tokens are dropped (U <= words).
    """
    starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
    ends = np.asarray(ends_s, dtype=np.float64).reshape(-1)
    if starts.shape != ends.shape:
        raise ValueError(f"starts_s has {starts.size} words but ends_s has {ends.size}")
    if not (np.isfinite(starts).all() and np.isfinite(ends).all()) or np.any(ends < starts):
        raise ValueError("word times must be finite with end >= start")
    if not (token_rate > 0 and math.isfinite(token_rate)):
        raise ValueError(f"token_rate must be a positive number, got {token_rate!r}")
    order = np.lexsort((ends, starts))
    lo = np.clip(np.floor(starts[order] * token_rate), 0, n_tokens).astype(np.int64)
    hi = np.clip(np.ceil(ends[order] * token_rate), 0, n_tokens).astype(np.int64)
    spans, prev_end = [], 0
    for s, e in zip(lo.tolist(), hi.tolist()):
        s = max(s, prev_end)
        e = min(max(e, s + 1), n_tokens)
        if s < e:
            spans.append((s, e))
            prev_end = e
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 2)


def _units(spans: Tensor | np.ndarray | None, n_tokens: int, gaps: str) -> list[tuple[int, int, bool]]:
    """Partition [0, n_tokens) into word units and the gaps around them: (start, end, compressed?).

    Empty spans (start == end, e.g. a word whose tokens an earlier point merged away) are ignored.
    """
    if gaps not in GAPS:
        raise ValueError(f"gaps must be one of {GAPS}, got {gaps!r}")
    if spans is None:
        raise ValueError("a budget needs word spans (spans=[U, 2] token indices); use ratio= for no alignment")
    s = spans.detach().cpu().numpy() if isinstance(spans, Tensor) else np.asarray(spans)
    s = s.astype(np.int64).reshape(-1, 2)
    if s.size and (s[:, 0].min() < 0 or s[:, 1].max() > n_tokens or np.any(s[:, 1] < s[:, 0])
                   or np.any(s[1:, 0] < s[:-1, 1])):
        raise ValueError(f"spans must be sorted, non-overlapping [start, end) pairs within [0, {n_tokens}]")
    s = s[s[:, 1] > s[:, 0]]
    units, pos = [], 0
    for a, b in s.tolist():
        if a > pos:
            units.append((pos, a, gaps == "unit"))
        units.append((a, b, True))
        pos = b
    if pos < n_tokens:
        units.append((pos, n_tokens, gaps == "unit"))
    return units


def _oracle_groups(n_tokens: int, budget, spans, gaps: str, ratio, pick: Callable[[int, int], np.ndarray]):
    """Group ids [T] for an oracle operator: ``pick(n, R)`` gives a group id (or -1) per offset of a unit."""
    if (budget is None) == (ratio is None):
        raise ValueError("oracle operators take either budget= (with spans=) or ratio=, not both or neither")
    if ratio is not None:
        units = [(0, n_tokens, True)]
        budget = budget_for(_check_ratio(ratio), n_tokens)
    else:
        budget = _check_budget(budget)
        units = _units(spans, n_tokens, gaps)
    groups = np.empty(n_tokens, dtype=np.int64)
    n_out = 0
    for a, b, squeeze in units:
        n = b - a
        if squeeze and n > budget:  # a unit no longer than the budget is kept as is
            local = pick(n, budget)
            groups[a:b] = np.where(local >= 0, local + n_out, -1)
            n_out += budget
        else:
            groups[a:b] = np.arange(n_out, n_out + n)
            n_out += n
    return groups


def _uniform_drop_pick(n: int, budget: int) -> np.ndarray:
    # keep the token at the centre of each of R equal bins: offset floor((i + 1/2) * n / R)
    local = np.full(n, -1, dtype=np.int64)
    local[(2 * np.arange(budget) + 1) * n // (2 * budget)] = np.arange(budget)
    return local


def _uniform_merge_pick(n: int, budget: int) -> np.ndarray:
    # bin i covers offsets [floor(i n / R), floor((i + 1) n / R)): sizes differ by at most one
    edges = np.arange(budget) * n // budget
    return np.searchsorted(edges, np.arange(n), side="right") - 1


def random_drop(x: Tensor, *, budget: int | None = None, spans=None, gaps: str = "unit",
                ratio: float | None = None, seed: int) -> Compressed:
    """Random Drop: keep ``budget`` tokens drawn uniformly without replacement in each unit (word window;
    gaps too when gaps="unit", kept whole when "keep"), or ``budget_for(ratio, T)`` over the whole sequence.

    Units no longer than the budget are kept as is. Draws come from a CPU generator seeded with ``seed``,
    consumed unit by unit in temporal order.
    """
    _check_x(x)
    _check_finite(x)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"random_drop needs an integer seed, got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed))

    def pick(n: int, r: int) -> np.ndarray:
        local = np.full(n, -1, dtype=np.int64)
        local[np.sort(torch.randperm(n, generator=gen)[:r].numpy())] = np.arange(r)
        return local

    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, pick)
    return pool_groups(x, groups) if x.shape[0] else _empty(x)


def uniform_drop(x: Tensor, *, budget: int | None = None, spans=None, gaps: str = "unit",
                 ratio: float | None = None) -> Compressed:
    """Uniform Drop: in each unit of n > R tokens keep the R tokens at bin centres floor((i + 1/2) n / R)."""
    _check_x(x)
    _check_finite(x)
    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, _uniform_drop_pick)
    return pool_groups(x, groups) if x.shape[0] else _empty(x)


def uniform_merge(x: Tensor, *, budget: int | None = None, spans=None, gaps: str = "unit",
                  ratio: float | None = None) -> Compressed:
    """Uniform Merge: split each unit of n > R tokens into R contiguous bins [floor(i n / R),
    floor((i + 1) n / R)) and mean-pool each bin."""
    _check_x(x)
    _check_finite(x)
    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, _uniform_merge_pick)
    return pool_groups(x, groups) if x.shape[0] else _empty(x)


# ------------------------------------------------------------------------------------ baselines (§5.3)


def interpolate(x: Tensor, ratio: float) -> Compressed:
    """Linear interpolation of the token sequence to T' = budget_for(ratio, T) tokens.

    Output i samples source position p_i = (i + 1/2) T / T' - 1/2 (half-pixel centres, as
    ``F.interpolate(mode="linear", align_corners=False)``). groups: each input token goes to the output with
    the nearest p_i (ties to the earlier); positions: floor(p_i + 1/2), the rounded source position.
    """
    _check_x(x)
    _check_finite(x)
    ratio = _check_ratio(ratio)
    T = x.shape[0]
    if T == 0:
        return _empty(x)
    n_out = budget_for(ratio, T)
    p = np.clip((np.arange(n_out) + 0.5) * (T / n_out) - 0.5, 0, T - 1)
    lo = np.floor(p).astype(np.int64)
    hi = np.minimum(lo + 1, T - 1)
    device = x.device
    acc = _acc_dtype(x.dtype)
    frac = torch.from_numpy(p - lo).to(device=device, dtype=acc).unsqueeze(1)
    a = x.index_select(0, torch.from_numpy(lo).to(device)).to(acc)
    b = x.index_select(0, torch.from_numpy(hi).to(device)).to(acc)
    tokens = a.lerp_(b, frac).to(x.dtype)
    t = np.arange(T, dtype=np.float64)
    right = np.clip(np.searchsorted(p, t, side="left"), 0, n_out - 1)
    left = np.clip(right - 1, 0, n_out - 1)
    groups = np.where(np.abs(t - p[left]) <= np.abs(p[right] - t), left, right)
    positions = np.clip(np.floor(p + 0.5), 0, T - 1).astype(np.int64)
    return Compressed(tokens, torch.from_numpy(groups).to(device), torch.from_numpy(positions).to(device))


# ----------------------------------------------------------------------------------------- peer methods


def adjacent_merge(x: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """A-ToMe style: link the T - T' most similar adjacent pairs (T' = budget_for(ratio, T)); linked chains
    collapse into one mean-pooled token, so exactly T' tokens remain. Equal similarities: earlier pair first."""
    _check_x(x)
    ratio = _check_ratio(ratio)
    T = x.shape[0]
    if T == 0:
        _check_features(x, features)
        return _empty(x)
    adjacent = _host_band(x, features, 1)[1:, 0]  # cos(t, t-1) for t = 1..T-1
    n_links = T - budget_for(ratio, T)
    order = np.argsort(-adjacent, kind="stable")
    start = np.ones(T, dtype=bool)
    start[order[:n_links] + 1] = False
    return pool_groups(x, np.cumsum(start) - 1)


def _unit_rows(f: Tensor) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 (float64 for float64 input), on the host."""
    f = f.detach().to(_acc_dtype(f.dtype))
    n = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    return torch.where(n > 0, f / n, torch.zeros((), dtype=f.dtype, device=f.device)).cpu().numpy()


def group_merge(x: Tensor, threshold: float, features: Tensor | None = None) -> Compressed:
    """Samp style: token t joins the current group iff its MEAN cosine similarity to all current members is
    >= ``threshold`` (clamped to [-1, 1]; zero vectors have cosine 0); otherwise it starts a new group.
    Computed on the host with a running sum of unit vectors (float32; float64 for float64 input)."""
    _check_x(x)
    threshold = _check_threshold(threshold)
    f = _check_features(x, features)
    _check_finite(x)
    if f is not x:
        _check_finite(f, "features")
    T = x.shape[0]
    if T == 0:
        return _empty(x)
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
    """FastV style: keep the budget_for(ratio, T) tokens with the highest ``scores`` [T] (the attention the
    text paid them at layer l-1), in temporal order; equal scores favour earlier tokens.

    The adapter must run layer l-1 with eager attention to get these scores (SDPA/FlashAttention return none).
    """
    _check_x(x)
    _check_finite(x)
    ratio = _check_ratio(ratio)
    T = x.shape[0]
    if scores is None:
        raise ValueError("attention_prune needs scores= ([T] attention per audio token from layer l-1)")
    s = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    if s.shape != (T,):
        raise ValueError(f"scores must have shape ({T},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; all must be finite")
    if T == 0:
        return _empty(x)
    keep = np.sort(np.argsort(-s, kind="stable")[: budget_for(ratio, T)])
    groups = np.full(T, -1, dtype=np.int64)
    groups[keep] = np.arange(keep.size)
    return pool_groups(x, groups)


def identity(x: Tensor) -> Compressed:
    """No compression: every token is its own group (tokens is a copy of x)."""
    _check_x(x)
    _check_finite(x)
    T = x.shape[0]
    return pool_groups(x, np.arange(T)) if T else _empty(x)


# ------------------------------------------------------------------------------------------------ dispatch

OPERATORS: dict[str, Callable[..., Compressed]] = {
    "none": identity,
    "random_drop": random_drop,
    "uniform_drop": uniform_drop,
    "uniform_merge": uniform_merge,
    "affinity": affinity_pool,
    "affinity_budget": affinity_budget,
    "interpolate": interpolate,
    "adjacent_merge": adjacent_merge,
    "group_merge": group_merge,
    "attention_prune": attention_prune,
}

ORACLE_OPERATORS = ("random_drop", "uniform_drop", "uniform_merge")  # keep R per word window, or a ratio K
SIMILARITY_OPERATORS = ("affinity", "affinity_budget", "adjacent_merge", "group_merge")  # take features=
# operator -> (required params, optional params)
_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "none": ((), ()),
    "random_drop": ((), ("budget", "ratio", "gaps")),
    "uniform_drop": ((), ("budget", "ratio", "gaps")),
    "uniform_merge": ((), ("budget", "ratio", "gaps")),
    "affinity": (("threshold", "window"), ()),
    "affinity_budget": (("ratio", "window"), ()),
    "interpolate": (("ratio",), ()),
    "adjacent_merge": (("ratio",), ()),
    "group_merge": (("threshold",), ()),
    "attention_prune": (("ratio",), ()),
}


def validate(operator: str, *, strict: bool = False, **params: Any) -> None:
    """Raise a one-line ValueError for an unknown operator, missing/unexpected parameters or a bad value.

    Allowed: threshold a real number (strict=True, the run-level check: in [-1, 1]); window and budget integers
    >= 1; ratio in (0, 1]; gaps in ("unit", "keep"); oracle operators need budget (with spans) or ratio, not
    both. ``features`` (a mode name) is accepted for the similarity operators.
    """
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; allowed: {', '.join(OPERATORS)}")
    required, optional = _PARAMS[operator]
    allowed = set(required) | set(optional) | ({"features"} if operator in SIMILARITY_OPERATORS else set())
    unexpected = sorted(set(params) - allowed)
    if unexpected:
        raise ValueError(f"{operator} got unexpected parameter(s) {unexpected}; allowed: {sorted(allowed) or 'none'}")
    missing = [k for k in required if params.get(k) is None]
    if missing:
        raise ValueError(f"{operator} needs parameter(s) {missing}")
    if operator in ORACLE_OPERATORS:
        has_budget, has_ratio = params.get("budget") is not None, params.get("ratio") is not None
        if has_budget == has_ratio:
            raise ValueError(f"{operator} needs either budget (with word spans) or ratio, not both or neither")
        if "gaps" in params and not has_budget:
            raise ValueError(f"{operator}: gaps applies only with budget (word windows)")
    if params.get("threshold") is not None:
        t = _check_threshold(params["threshold"])
        if strict and not -1 <= t <= 1:
            raise ValueError(f"threshold must be in [-1, 1], got {t}")
    if params.get("window") is not None:
        _check_window(params["window"])
    if params.get("budget") is not None:
        _check_budget(params["budget"])
    if params.get("ratio") is not None:
        _check_ratio(params["ratio"])
    if params.get("gaps") is not None and params["gaps"] not in GAPS:
        raise ValueError(f"gaps must be one of {GAPS}, got {params['gaps']!r}")
    if params.get("features") is not None and params["features"] not in FEATURE_MODES:
        raise ValueError(f"unknown features mode {params['features']!r}; allowed: {', '.join(FEATURE_MODES)}")


def _resolve_features(x: Tensor, features: Tensor | str | None) -> Tensor | None:
    if isinstance(features, str):
        return similarity_features(x, features)  # "normed"/"keys" raise: they need an ingredient
    return features


def compress(
    x: Tensor,
    operator: str,
    *,
    features: Tensor | str | None = None,
    spans=None,
    scores: Tensor | None = None,
    seed: int | None = None,
    **params: Any,
) -> Compressed:
    """Apply operator ``operator`` (a name in OPERATORS) with ``params`` to one sequence x [T, d].

    ``features`` (a tensor, or the mode "hidden"/"centered") is used by the similarity operators, ``spans`` by
    the oracle operators with a budget, ``scores`` by attention_prune, ``seed`` by random_drop; operators
    ignore the keywords they do not use.
    """
    validate(operator, **params)
    if operator in SIMILARITY_OPERATORS:
        features = _resolve_features(x, features)
        return OPERATORS[operator](x, features=features, **params)
    if operator in ORACLE_OPERATORS:
        extra = {"seed": seed} if operator == "random_drop" else {}
        spans = spans if params.get("budget") is not None else None
        return OPERATORS[operator](x, spans=spans, **params, **extra)
    if operator == "attention_prune":
        return attention_prune(x, scores, **params)
    return OPERATORS[operator](x, **params)


# ------------------------------------------------------------------------------------------------- batched


def compress_batch(
    x: Tensor,
    mask: Tensor,
    operator: str,
    *,
    spans: list | None = None,
    scores: Tensor | None = None,
    seeds: list[int] | None = None,
    features: Tensor | str | None = None,
    **params: Any,
) -> Compressed:
    """:func:`compress` over a padded batch x [B, T, d] whose real tokens are ``mask`` [B, T] (bool).

    Sample b is x[b][mask[b]]; its result equals (torch.equal) the single call on that sample. Returns
    tokens [B, T'max, d] (zeros at padding), groups [B, T] (-1 at padding), positions [B, T'max] (indices
    within the sample, -1 at padding) and mask [B, T'max]. ``spans`` and ``seeds`` are per-sample lists;
    ``scores`` and ``features`` are [B, T] / [B, T, F] (or a features mode, applied per sample). Affinity bands of all samples come back to the host
    in one copy.
    """
    validate(operator, **params)
    if x.dim() != 3:
        raise ValueError(f"x must be a [B, T, d] tensor, got {tuple(x.shape)}")
    B, T, d = x.shape
    if mask is None or tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({B}, {T})")
    if operator == "random_drop" and (seeds is None or len(seeds) != B):
        raise ValueError(f"random_drop needs seeds= (one int per sample, {B} in all)")
    if spans is not None and len(spans) != B:
        raise ValueError(f"spans must be a list of {B} per-sample spans, got {len(spans)}")
    keep = mask.cpu().numpy()
    rows = [torch.from_numpy(np.flatnonzero(keep[b])) for b in range(B)]
    prefix = [bool(keep[b, : len(r)].all()) for b, r in enumerate(rows)]

    def take(t: Tensor | str | None, b: int) -> Tensor | str | None:
        if t is None or isinstance(t, str):
            return t
        return t[b, : len(rows[b])] if prefix[b] else t[b].index_select(0, rows[b].to(t.device))

    if operator == "affinity":
        xs = [take(x, b) for b in range(B)]
        fs = [_resolve_features(xb, take(features, b)) for b, xb in enumerate(xs)]
        results = _affinity_batch(xs, fs, **params)
    else:
        results = [
            compress(take(x, b), operator, features=take(features, b), scores=take(scores, b),
                     spans=None if spans is None else spans[b], seed=None if seeds is None else seeds[b], **params)
            for b in range(B)
        ]
    n_max = max([r.n_out for r in results], default=0)
    tokens = x.new_zeros(B, n_max, d)
    groups = torch.full((B, T), -1, dtype=torch.long, device=x.device)
    positions = torch.full((B, n_max), -1, dtype=torch.long, device=x.device)
    out_mask = torch.zeros(B, n_max, dtype=torch.bool, device=x.device)
    for b, r in enumerate(results):
        n = r.n_out
        tokens[b, :n] = r.tokens
        positions[b, :n] = r.positions
        out_mask[b, :n] = True
        groups[b].index_copy_(0, rows[b].to(x.device), r.groups)
    return Compressed(tokens, groups, positions, out_mask)


def _affinity_batch(xs: list[Tensor], fs: list[Tensor | None], threshold: float, window: int) -> list[Compressed]:
    """Affinity Pooling per sample with every sample's band copied to the host at once."""
    threshold, window = _check_threshold(threshold), _check_window(window)
    packed, sizes = [], []
    for xb, fb in zip(xs, fs):
        _check_x(xb)
        f = _check_features(xb, fb)
        p = _band_and_norms(f, window).flatten() if xb.shape[0] else xb.new_zeros(0, dtype=torch.float32)
        if f is not xb and xb.numel():
            p = torch.cat([p, xb.sum(dtype=_acc_dtype(xb.dtype)).to(p.dtype).view(1)])
        packed.append(p.to(torch.float64))
        sizes.append(p.numel())
    host = torch.cat(packed).cpu().numpy() if packed else np.zeros(0)
    results, offset = [], 0
    for xb, fb, n in zip(xs, fs, sizes):
        chunk, offset = host[offset: offset + n], offset + n
        if xb.shape[0] == 0:
            results.append(_empty(xb))
            continue
        cos = _unpack_band(chunk, xb, _check_features(xb, fb), window)
        results.append(pool_groups(xb, _groups_from_band(cos, threshold)))
    return results

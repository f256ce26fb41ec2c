"""Affinity Pooling (paper Algorithm 1): the plain transcription, the same groups vectorised, and its fixed-ratio
variant (paper Table 3).

Algorithm 1. Token h_t joins the current group G when its largest cosine similarity to the last
k = min(|G|, omega) members of G is >= tau; otherwise G is emitted as its mean and h_t starts a new group.
:func:`algorithm1` is that loop written out; :func:`affinity_groups` computes the same groups from a band of
cosines (see its docstring for the identity it relies on).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress.core import (
    Compressed,
    check_features,
    check_finite,
    check_ratio,
    check_threshold,
    check_window,
    check_x,
    empty,
    n_kept,
    pool_groups,
    raise_nonfinite,
)


# ------------------------------------------------------------------------------------------ the paper's loop


def algorithm1(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Tensor:
    """Algorithm 1 of the paper, line by line: the group id [T] of every token (0, 1, ... in order).

    Cosines are computed here, in float64: cos(a, b) = a.b / sqrt(|a|^2 |b|^2), 0 against a zero vector, so
    identical vectors have cosine exactly 1 and small integer vectors (3, 4, 0), (4, 3, 0) exactly 24/25.
    Similarity is measured on ``features`` when given, else on x. One token at a time: slow, the reference.
    """
    check_x(x)
    threshold, window = check_threshold(threshold), check_window(window)
    f = check_features(x, features)
    check_finite(x)
    check_finite(f, "x" if f is x else "features")
    h = f.detach().to("cpu", torch.float64)

    def cos(a: Tensor, b: Tensor) -> float:
        den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        return 0.0 if den == 0 else max(-1.0, min(1.0, float((a * b).sum()) / den))

    if h.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    groups = [0]
    current = [0]  # G_curr <- [h_1]   (indices of its members)
    for t in range(1, h.shape[0]):
        k = min(len(current), window)  # k <- min(|G_curr|, omega)
        K = current[-k:]  # K <- the last k tokens of G_curr
        s_max = max(cos(h[t], h[i]) for i in K)
        if s_max >= threshold:
            current.append(t)  # append h_t to G_curr
            groups.append(groups[-1])
        else:
            current = [t]  # emit mean(G_curr); G_curr <- [h_t]
            groups.append(groups[-1] + 1)
    return torch.tensor(groups, dtype=torch.long, device=x.device)


# ------------------------------------------------------------------------------------------ vectorised


def _band_dots(f: Tensor, window: int) -> Tensor:
    """[T, window + 1] on f's device: column j = f_t . f_{t-j} (column 0: |f_t|^2), 0 where t - j < 0.

    One batched matmul over overlapping row windows (a strided view of f, no copy), so f is read once; float32
    (float64 for float64 input).
    """
    f = f.contiguous()
    if f.dtype != torch.float64:
        f = f.float()
    T, F = f.shape
    w = window
    h = min(T, w)
    head_src = torch.cat([f.new_zeros(w, F), f[:h]])
    head = torch.matmul(f[:h].unsqueeze(1), head_src.as_strided((h, F, w + 1), (F, 1, F))).squeeze(1)
    if T > w:  # row t = i + w, column k holds f_t . f_{i+k}, i.e. lag w - k
        main = torch.matmul(f[w:].unsqueeze(1), f.as_strided((T - w, F, w + 1), (F, 1, F))).squeeze(1)
        return torch.cat([head, main]).flip(1)
    return head.flip(1)


def _cosines(dots: np.ndarray) -> np.ndarray:
    """The band of cosines [T, window] (float64) from ``_band_dots``: cos(f_t, f_{t-j}) = dot / sqrt(n_t n_{t-j})
    with n = |f|^2 (column 0); 0 against a zero vector; -inf where t - j < 0.

    The squared norms multiply exactly in float64 (they are float32 values, or float64 where sqrt(n * n) == n),
    so a token and its exact duplicate have cosine exactly 1.
    """
    T, w = dots.shape[0], dots.shape[1] - 1
    n = dots[:, 0]
    n_prev = np.full((T, w), np.nan)
    for j in range(1, w + 1):
        n_prev[j:, j - 1] = n[:-j] if T > j else n[:0]
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt(n[:, None] * n_prev)
        cos = np.where(den > 0, dots[:, 1:] / np.where(den > 0, den, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    cos[np.isnan(n_prev)] = -np.inf
    return cos


def cosine_band(x: Tensor, window: int, features: Tensor | None = None) -> np.ndarray:
    """cos(f_t, f_{t-j}) for j = 1..window as float64 [T, window] on the host (-inf where t - j < 0), with the
    finiteness checks of x and features, in one device-to-host copy.

    Cosines within the rounding bound of 1 (and the few whose float32 value cannot be bounded, see ``_band``) are
    recomputed in float64 as :func:`algorithm1` computes them, so a token and its exact duplicate have cosine
    exactly 1 (a second copy, only when there are such pairs).
    """
    cos, doubt, f, bound = _band(x, window, features)
    return _recompute(cos, doubt | (np.isfinite(cos) & (cos >= 1.0 - bound)), f)


def _band(x: Tensor, window: int, features: Tensor | None) -> tuple[np.ndarray, np.ndarray, Tensor, float]:
    """The band of cosines from the float32 (float64 for float64 input) dot products, unrefined.

    Returns (cos [T, window], doubt [T, window], f, bound). Where ``doubt`` is False, the cosine is within ``bound``
    of the one :func:`algorithm1` computes, so a comparison with tau decides as algorithm1 does whenever
    |cos - tau| > bound. ``bound`` = 2 F eps: a dot product of F terms is within F u |a| |b| of the exact one
    (u = eps / 2, any summation order), each squared norm within F u n, so the cosine is within about 2 F u (1 + |cos|)
    <= 4 F u of the exact value, and algorithm1's own float64 value within F 2^-53 of it. That holds as long as no
    product underflows: ``doubt`` marks the pairs with a squared norm below ``_TINY`` (zero rows included) or a
    non-finite dot product, whose cosines must be recomputed whatever tau is.
    """
    f = check_features(x, features)
    dots = _band_dots(f, window).flatten()
    if f is not x and x.numel():  # x's own finiteness rides along in the same copy
        dots = torch.cat([dots, x.sum(dtype=dots.dtype).view(1)])
    host = dots.cpu().numpy().astype(np.float64)
    T = x.shape[0]
    band = host[: T * (window + 1)].reshape(T, window + 1)
    if not np.isfinite(band[:, 0]).all():
        raise_nonfinite(f, "x" if f is x else "features")
        raise ValueError("squared token norms overflow float32; rescale the similarity features")
    if host.size > band.size and not np.isfinite(host[-1]):
        raise_nonfinite(x, "x")
    cos = _cosines(band)
    exact64 = f.dtype == torch.float64
    small = band[:, 0] < _TINY[exact64]
    doubt = ~np.isfinite(band[:, 1:])
    for j in range(1, window + 1):
        doubt[:, j - 1] |= small
        doubt[j:, j - 1] |= small[:-j] if T > j else small[:0]
    doubt &= np.isfinite(cos)  # nothing to recompute before the start
    return cos, doubt, f, 2 * f.shape[1] * _dot_eps(f)


# A squared norm below this (2^-100 in float32, 2^-900 in float64) may hide underflowed products: the absolute error
# of a dot product (about F times the smallest subnormal) is then no longer negligible beside F eps |a| |b|.
_TINY = {False: 2.0**-100, True: 2.0**-900}


def _dot_eps(f: Tensor) -> float:
    """The machine epsilon of the band's matrix products: float64's for float64; float32's, or TF32's (2^-10) /
    bfloat16's (2^-7) where torch is allowed to use them for float32 matrix products."""
    if f.dtype == torch.float64:
        return torch.finfo(torch.float64).eps
    precision = torch.get_float32_matmul_precision()
    if f.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and precision == "highest":
        precision = "high"
    return {"highest": torch.finfo(torch.float32).eps, "high": 2.0**-10}.get(precision, 2.0**-7)


def _recompute(cos: np.ndarray, mask: np.ndarray, f: Tensor) -> np.ndarray:
    """cos with the pairs in ``mask`` recomputed in float64 as algorithm1 computes them."""
    if mask.any():
        t, lag = np.nonzero(mask)
        cos[mask] = _float64_cosines(f, t, t - (lag + 1))
    return cos


def _float64_cosines(f: Tensor, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """cos(f_i, f_j) for index pairs, in float64 from elementwise products, as algorithm1 computes it (one
    device-to-host copy). Each row's squared norm is summed once; the pairs' rows go in chunks of at most 2^22
    float64 values per operand."""
    rows, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    dev = f.device
    chunk = max(1, 2**22 // max(1, f.shape[1]))
    rows_t = torch.from_numpy(rows).to(dev)
    norms = torch.cat([(r * r).sum(-1) for r in (f.index_select(0, rows_t[s : s + chunk]).double()
                                                 for s in range(0, rows.size, chunk))])
    inverse_t = torch.from_numpy(inverse).to(dev)
    den = (norms[inverse_t[: i.size]] * norms[inverse_t[i.size :]]).sqrt()
    i_t, j_t = torch.from_numpy(i).to(dev), torch.from_numpy(j).to(dev)
    dot = torch.cat([(f.index_select(0, i_t[s : s + chunk]).double() * f.index_select(0, j_t[s : s + chunk]).double())
                     .sum(-1) for s in range(0, i.size, chunk)])
    cos = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)
    return cos.cpu().numpy()


def similarity_band(features: Tensor, window: int) -> Tensor:
    """cos(f_t, f_{t-j}) for j = 1..window as a float64 [T, window] tensor (-inf where t - j < 0)."""
    check_x(features, "features")
    check_window(window)
    return torch.from_numpy(cosine_band(features, window)).to(features.device)


def groups_from_band(cos: np.ndarray, threshold: float) -> np.ndarray:
    """Algorithm 1's group ids from the band cos[t, j-1] = cos(h_t, h_{t-j}), j = 1..omega.

    The identity: the members of the current group G are the |G| tokens just before t, so its last
    min(|G|, omega) members are the lags 1..min(|G|, omega), and t joins G iff some lag j <= |G| passes
    (cos >= tau). Let j* be t's smallest passing lag. Three cases:
    - j* = 1 (t-1 is always in G): t joins, whatever |G| is;
    - no lag passes: t starts a new group;
    - 1 < j* <= omega (a "candidate"): t joins iff j* <= |G|, and |G| = t - (start of G) depends on earlier choices.
    Tokens of the first two kinds are fixed without knowing any size. The candidates are resolved in order: the
    start of G before t is the later of the last fixed start (``last_fixed``) and the last candidate that started
    a group (``last``), so |G| = t - max(last, last_fixed[t-1]). Only candidates go through the Python loop.
    """
    T = cos.shape[0]
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    passes = cos >= threshold
    passes[0] = False
    start = ~passes[:, 0]
    candidates = np.flatnonzero(start & passes.any(axis=1))
    if candidates.size:
        nearest = passes[candidates].argmax(axis=1) + 1  # j*, 1-based
        fixed = start.copy()  # starts known without sizes: no lag passes (token 0 is one)
        fixed[candidates] = False
        last_fixed = np.maximum.accumulate(np.where(fixed, np.arange(T), 0))
        last = 0
        for t, j in zip(candidates.tolist(), nearest.tolist()):
            size = t - max(last, int(last_fixed[t - 1]))
            if j <= size:
                start[t] = False  # joins G
            else:
                last = t  # starts a new group
    start[0] = True
    return np.cumsum(start) - 1


def affinity_groups(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Tensor:
    """The groups of :func:`algorithm1`, vectorised: one cosine band (``window`` lags per token, one batched matmul
    and one device-to-host copy), then :func:`groups_from_band`. Ties (cos == tau) join; a threshold above 1 merges
    nothing, one at or below -1 everything."""
    return torch.from_numpy(_groups(x, threshold, window, features)).to(x.device)


def _groups(x: Tensor, threshold: float, window: int, features: Tensor | None) -> np.ndarray:
    check_x(x)
    threshold, window = check_threshold(threshold), check_window(window)
    if x.shape[0] == 0:
        check_features(x, features)
        return np.zeros(0, dtype=np.int64)
    cos, doubt, f, bound = _band(x, window, features)
    # Only a cosine within the rounding bound of tau can compare with tau otherwise than algorithm1's: those (few,
    # on any input) are recomputed in float64 as algorithm1 computes them, so ties and exact duplicates at tau = 1
    # decide exactly as there.
    near = doubt | (np.abs(cos - threshold) <= bound)
    return groups_from_band(_recompute(cos, near, f), threshold)


def affinity_pool(x: Tensor, threshold: float, window: int, features: Tensor | None = None) -> Compressed:
    """Affinity Pooling (Algorithm 1): the mean of each group of :func:`affinity_groups`."""
    groups = _groups(x, threshold, window, features)
    return pool_groups(x, groups) if groups.size else empty(x)


# ------------------------------------------------------------------------------------------ fixed ratio K


def _threshold_for_count(cos: np.ndarray, count: int) -> float:
    """The largest threshold whose group count is <= ``count`` (counts never fall as the threshold rises)."""
    values = np.unique(cos[np.isfinite(cos)])
    candidates = np.append(values, np.inf)  # counts change only at these values; inf merges nothing
    lo, hi = 0, candidates.size - 1  # the count at candidates[0] is 1 <= count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(groups_from_band(cos, float(candidates[mid]))[-1]) + 1 <= count:
            lo = mid
        else:
            hi = mid - 1
    return float(candidates[lo])


def affinity_ratio(x: Tensor, ratio: float, window: int, features: Tensor | None = None) -> Compressed:
    """Affinity Pooling that keeps ``n_kept(ratio, T)`` tokens (paper Table 3's fixed-budget AP at retention K).

    The threshold is searched over the band's distinct similarities (group counts rise monotonically with it).
    When no threshold gives exactly that count, the largest reachable count below it is used, so the result never
    keeps more tokens than asked.
    """
    check_x(x)
    ratio, window = check_ratio(ratio), check_window(window)
    T = x.shape[0]
    if T == 0:
        return empty(x)
    cos = cosine_band(x, window, features)
    return pool_groups(x, groups_from_band(cos, _threshold_for_count(cos, n_kept(ratio, T))))

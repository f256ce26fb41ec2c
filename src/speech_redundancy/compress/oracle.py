"""The paper's oracle interventions (§3.1): inside every word window keep a budget of R tokens, by random choice,
at uniform bin centres or as uniform bin means; or a retention ratio K over the whole sequence without alignment.

Word windows are token spans [U, 2] from word times (:func:`spans_from_words`); the gaps between words are units of
their own (``gaps="unit"``) or kept whole (``gaps="keep"``).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress.core import (
    GAPS,
    Compressed,
    check_budget,
    check_finite,
    check_ratio,
    check_x,
    empty,
    n_kept,
    pool_groups,
)


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
        budget = n_kept(check_ratio(ratio), n_tokens)
    else:
        budget = check_budget(budget)
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
    gaps too when gaps="unit", kept whole when "keep"), or ``n_kept(ratio, T)`` over the whole sequence.

    Units no longer than the budget are kept as is. Draws come from a CPU generator seeded with ``seed``,
    consumed unit by unit in temporal order.
    """
    check_x(x)
    check_finite(x)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"random_drop needs an integer seed, got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed))

    def pick(n: int, r: int) -> np.ndarray:
        local = np.full(n, -1, dtype=np.int64)
        local[np.sort(torch.randperm(n, generator=gen)[:r].numpy())] = np.arange(r)
        return local

    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, pick)
    return pool_groups(x, groups) if x.shape[0] else empty(x)


def uniform_drop(x: Tensor, *, budget: int | None = None, spans=None, gaps: str = "unit",
                 ratio: float | None = None) -> Compressed:
    """Uniform Drop: in each unit of n > R tokens keep the R tokens at bin centres floor((i + 1/2) n / R)."""
    check_x(x)
    check_finite(x)
    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, _uniform_drop_pick)
    return pool_groups(x, groups) if x.shape[0] else empty(x)


def uniform_merge(x: Tensor, *, budget: int | None = None, spans=None, gaps: str = "unit",
                  ratio: float | None = None) -> Compressed:
    """Uniform Merge: split each unit of n > R tokens into R contiguous bins [floor(i n / R),
    floor((i + 1) n / R)) and mean-pool each bin."""
    check_x(x)
    check_finite(x)
    groups = _oracle_groups(x.shape[0], budget, spans, gaps, ratio, _uniform_merge_pick)
    return pool_groups(x, groups) if x.shape[0] else empty(x)

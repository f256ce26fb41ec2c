"""Choosing which utterances a run evaluates: first n, a seeded sample, duration buckets, SLURM shards.

Every choice depends only on the utterance ids (and the seed), never on the order a loader produced them,
so two runs, or the shards of one run, agree on the subset.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

from speech_redundancy.data.records import Utterance


def limit(utts: list[Utterance], n: int | None) -> list[Utterance]:
    """The first ``n`` utterances (all of them when ``n`` is None)."""
    if n is None:
        return list(utts)
    if n < 0:
        raise ValueError(f"limit must be >= 0, got {n}")
    return list(utts[:n])


def _rank(seed: int, uid: str) -> str:
    return hashlib.sha1(f"{seed}:{uid}".encode()).hexdigest()


def sample(utts: list[Utterance], n: int | None, seed: int = 0) -> list[Utterance]:
    """``n`` utterances drawn by a seeded hash of their ids, returned in id order.

    Independent of input order; a larger ``n`` with the same seed contains every smaller sample.
    """
    if n is None or n >= len(utts):
        return sorted(utts, key=lambda u: u.id)
    if n < 0:
        raise ValueError(f"sample must be >= 0, got {n}")
    chosen = sorted(utts, key=lambda u: (_rank(seed, u.id), u.id))[:n]
    return sorted(chosen, key=lambda u: u.id)


def bucket_label(lo: float, hi: float) -> str:
    """``"0-20"`` for the bucket [0 s, 20 s)."""
    return f"{lo:g}-{hi:g}"


def duration_buckets(
    utts: list[Utterance],
    edges: Sequence[float] = (0, 20, 40, 60),
    n_per_bucket: int | None = 100,
    seed: int = 0,
) -> dict[str, list[Utterance]]:
    """Utterances grouped by duration into [edges[i], edges[i+1]) and sampled to ``n_per_bucket`` each.

    Keys are ``"0-20"``, ``"20-40"``, ... (paper Table 2: D1..D3 with n=100 each); a bucket with fewer
    utterances keeps all it has. Each returned utterance carries ``extra["bucket"]``.
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must be increasing and at least two, got {edges}")
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        label = bucket_label(lo, hi)
        inside = [u for u in utts if lo <= u.duration < hi]
        out[label] = [dataclasses.replace(u, extra={**u.extra, "bucket": label}) for u in sample(inside, n_per_bucket, seed)]
    return out


def shard(utts: list[Utterance], index: int, count: int) -> list[Utterance]:
    """Part ``index`` of ``count`` (0-based): every count-th utterance in id order, so parts are disjoint and even."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}) with count >= 1, got index={index}, count={count}")
    return sorted(utts, key=lambda u: u.id)[index::count]

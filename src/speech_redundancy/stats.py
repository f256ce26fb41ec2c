"""Uncertainty of the scores: bootstrap intervals over utterances, paired comparisons, Holm's correction.

Every interval resamples *utterances* (rows), never words: a corpus rate Σ_i a_i / Σ_i b_i (WER: edits over
reference words; cWER: clamped edits over reference words; a share such as the loop rate or QA accuracy:
b_i = 1) is recomputed on each resample of the utterances, so an utterance's edits stay with its own reference
length. The interval is the percentile interval of :func:`scipy.stats.bootstrap` at ``level`` (default 95 %).
BLEU is resampled the same way on sacrebleu's own sentence statistics (n-gram matches, lengths; the corpus score
of a resample is sacrebleu's ``_compute_score_from_stats`` of their sum, as in its ``--confidence`` option).

Paired comparisons (:func:`paired_rate`, :func:`paired_bleu`) take two systems over the *same* utterances, in the
same order: the difference A − B with a paired bootstrap interval (both systems resampled with the same indices)
and a two-sided approximate-randomisation p-value (each utterance's two results swapped at random;
:func:`scipy.stats.permutation_test` with ``permutation_type="samples"``, exact when 2^n is at most the number of
resamples; for BLEU on sacrebleu's sentence statistics). :func:`holm` corrects a family of p-values (Holm 1979).

Everything is seeded (:class:`Bootstrap`: ``resamples``, ``seed``, ``level``; the run setting ``bootstrap.*``),
so the same rows give the same interval on every call. Degenerate inputs: no utterance gives NaN; one utterance,
or utterances that all score the same, give the point itself as both ends.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``resamples`` bootstrap / randomisation draws, ``seed``, ``level`` (0.95 = 95 %)."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if int(self.resamples) < 1:
            raise ValueError(f"bootstrap.resamples must be at least 1, got {self.resamples}")
        if not 0.0 < float(self.level) < 1.0:
            raise ValueError(f"bootstrap.level must lie in (0, 1), got {self.level}")

    @classmethod
    def from_config(cls, cfg: Any) -> "Bootstrap":
        """From a ``bootstrap`` config node or dict (missing keys keep their defaults; None: all defaults)."""
        if cfg is None:
            return cls()
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        d = cls()
        return cls(resamples=int(get("resamples", d.resamples) or d.resamples),
                   seed=int(get("seed", d.seed) if get("seed", d.seed) is not None else d.seed),
                   level=float(get("level", d.level) or d.level))

    def describe(self) -> dict[str, Any]:
        return {"resamples": int(self.resamples), "seed": int(self.seed), "level": float(self.level),
                "method": "percentile bootstrap over utterances"}

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(salt)])


DEFAULT = Bootstrap()
NAN_PAIR = (math.nan, math.nan)


def _arrays(*cols: Sequence[float]) -> list[np.ndarray]:
    arrs = [np.asarray(c, dtype=float) for c in cols]
    if len({a.shape for a in arrs}) > 1 or any(a.ndim != 1 for a in arrs):
        raise ValueError(f"expected 1-D columns of one length, got shapes {[a.shape for a in arrs]}")
    return arrs


def _ratio(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    n, d = np.sum(num, axis=axis), np.sum(den, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)


def _percentile_bootstrap(data: tuple[np.ndarray, ...], statistic, boot: Bootstrap, salt: int) -> tuple[float, float]:
    """scipy's percentile bootstrap of ``statistic`` over paired observations (rows of ``data``)."""
    from scipy import stats as ss

    point = float(statistic(*data))
    if math.isnan(point):
        return NAN_PAIR
    if len(data[0]) < 2 or all(np.all(d == d[0]) for d in data):
        return point, point  # every resample is the sample itself
    with warnings.catch_warnings():  # resamples of only empty references (no unit: NaN) are left out below
        warnings.simplefilter("ignore", ss.DegenerateDataWarning)
        res = ss.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=int(boot.resamples),
                           confidence_level=float(boot.level), method="percentile", rng=boot.rng(salt))
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    if not np.isnan(dist).any():
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    dist = dist[~np.isnan(dist)]
    return _percentiles(dist, boot.level) if dist.size else NAN_PAIR


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def rate_interval(num: Sequence[float], den: Sequence[float] | None = None, boot: Bootstrap = DEFAULT,
                  salt: int = 0) -> tuple[float, float]:
    """Interval of the corpus rate Σ num / Σ den over utterances (``den`` None: the mean of ``num``)."""
    num_a = _arrays(num)[0]
    den_a = np.ones_like(num_a) if den is None else _arrays(num, den)[1]
    if num_a.size == 0:
        return NAN_PAIR
    return _percentile_bootstrap((num_a, den_a), lambda x, y, axis=-1: _ratio(x, y, axis), boot, salt)


# ----------------------------------------------------------------------------------------------- BLEU


def bleu_statistics(refs: Sequence[str], hyps: Sequence[str], tokenize: str) -> tuple[Any, np.ndarray]:
    """sacrebleu's BLEU metric for ``tokenize`` and its sentence statistics (one row per pair)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize=tokenize)
    stats = np.asarray(bleu._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=float)
    return bleu, stats.reshape(len(hyps), -1)


def _bleu_of(bleu: Any, stats: np.ndarray) -> float:
    return float(bleu._compute_score_from_stats(list(stats)).score)


def _bleu_statistic(bleu: Any, stats: np.ndarray):
    """BLEU of the utterances whose indices a (resampled) index array holds; rows of a 2-D array each."""
    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray | float:
        idx = np.asarray(idx).astype(int)
        if idx.ndim == 1:
            return _bleu_of(bleu, stats[idx].sum(0))
        return np.array([_bleu_of(bleu, stats[i].sum(0)) for i in idx.reshape(-1, idx.shape[-1])]).reshape(idx.shape[:-1])
    return statistic


def bleu_interval(refs: Sequence[str], hyps: Sequence[str], tokenize: str, boot: Bootstrap = DEFAULT,
                  salt: int = 0) -> tuple[float, float]:
    """Percentile interval of corpus BLEU (0-100) over utterances, resampling sacrebleu's sentence statistics."""
    if len(hyps) == 0:
        return NAN_PAIR
    bleu, stats = bleu_statistics(refs, hyps, tokenize)
    idx = np.arange(len(hyps), dtype=float)
    return _percentile_bootstrap((idx,), _bleu_statistic(bleu, stats), boot, salt) if len(hyps) > 1 else \
        (_bleu_of(bleu, stats.sum(0)),) * 2


# ----------------------------------------------------------------------------------------------- paired


@dataclass(frozen=True)
class Comparison:
    """A − B over ``n`` shared utterances: the difference, its interval, the two-sided p-value."""

    diff: float
    low: float
    high: float
    p: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "p": self.p, "n": self.n}


def paired_rate(num_a: Sequence[float], num_b: Sequence[float], den: Sequence[float], boot: Bootstrap = DEFAULT,
                salt: int = 0) -> Comparison:
    """Σ num_a / Σ den − Σ num_b / Σ den for two systems on the same utterances (same ``den``: the references'
    lengths), with a paired bootstrap interval and an approximate-randomisation p-value (each utterance's
    ``num_a``/``num_b`` swapped at random)."""
    from scipy import stats as ss

    a, b, d = _arrays(num_a, num_b, den)
    n = int(a.size)
    if n == 0 or d.sum() <= 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, n)
    diff = float((a.sum() - b.sum()) / d.sum())
    lo, hi = _percentile_bootstrap((a, b, d), lambda x, y, z, axis=-1: _ratio(x, z, axis) - _ratio(y, z, axis),
                                   boot, salt)
    if np.array_equal(a, b):
        p = 1.0
    else:
        res = ss.permutation_test((a, b), lambda x, y, axis=-1: np.sum(x, axis=axis) - np.sum(y, axis=axis),
                                  permutation_type="samples", vectorized=True, n_resamples=int(boot.resamples),
                                  alternative="two-sided", rng=boot.rng(salt + 1))
        p = float(res.pvalue)
    return Comparison(diff, lo, hi, p, n)


def paired_bleu(refs: Sequence[str], hyps_a: Sequence[str], hyps_b: Sequence[str], tokenize: str,
                boot: Bootstrap = DEFAULT, salt: int = 0) -> Comparison:
    """BLEU(A) − BLEU(B) (0-100) on the same utterances, from sacrebleu's sentence statistics: a paired bootstrap
    interval and an approximate-randomisation p-value (each utterance's two hypotheses swapped at random).

    The randomisation is scipy's (counting draws at least as extreme as the observed difference, exact for small
    n), not sacrebleu's ``paired-ar``, which counts only strictly larger ones and so reports p = 1/(R+1) for a
    handful of sentences however small the possible number of distinct swaps."""
    from scipy import stats as ss

    n = len(refs)
    if n == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, 0)
    bleu, sa = bleu_statistics(refs, hyps_a, tokenize)
    _, sb = bleu_statistics(refs, hyps_b, tokenize)
    both = np.concatenate([sa, sb])  # row i: A's utterance i; row n + i: B's
    score = _bleu_statistic(bleu, both)
    diff = float(score(np.arange(n)) - score(np.arange(n) + n))
    idx = np.arange(n, dtype=float)
    lo, hi = _percentile_bootstrap((idx,), lambda i, axis=-1: score(i) - score(np.asarray(i).astype(int) + n),
                                   boot, salt) if n > 1 else (diff, diff)
    if np.array_equal(sa, sb):
        p = 1.0
    else:
        res = ss.permutation_test((idx, idx + n), lambda x, y: score(x) - score(y), permutation_type="samples",
                                  n_resamples=int(boot.resamples), alternative="two-sided", rng=boot.rng(salt + 1))
        p = float(res.pvalue)
    return Comparison(diff, float(lo), float(hi), p, n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out

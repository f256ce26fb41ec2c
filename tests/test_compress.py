"""Every compression operator against a plain reference written here, plus the index-map contract."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speech_redundancy import compress as C
from speech_redundancy.compress import (
    FEATURE_MODES,
    OPERATORS,
    Compressed,
    adjacent_merge,
    affinity_ratio,
    affinity_groups,
    affinity_pool,
    attention_prune,
    n_kept,
    compress,
    compress_batch,
    group_merge,
    interpolate,
    algorithm1,
    pool_groups,
    random_drop,
    seed_for,
    similarity_band,
    similarity_features,
    spans_from_words,
    uniform_drop,
    uniform_merge,
    validate,
)

# ------------------------------------------------------------------------------------ plain references


def ref_cos(a: list[float], b: list[float]) -> float:
    """cos(a, b) in Python floats: dot / sqrt(|a|^2 |b|^2), 0 for a zero vector."""
    dot = sum(p * q for p, q in zip(a, b))
    den = math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
    return 0.0 if den == 0 else max(-1.0, min(1.0, dot / den))


def exact_at_least(a: list[float], b: list[float], threshold: float) -> bool:
    """cos(a, b) >= threshold decided exactly, in rationals (Fraction of each float): no rounding anywhere."""
    a, b, tau = [Fraction(v) for v in a], [Fraction(v) for v in b], Fraction(threshold)
    dot = sum(p * q for p, q in zip(a, b))
    nn = sum(p * p for p in a) * sum(q * q for q in b)
    if nn == 0:
        return 0 >= tau
    if dot >= 0:
        return tau <= 0 or dot * dot >= tau * tau * nn
    return tau < 0 and dot * dot <= tau * tau * nn


def exact_algorithm1(rows: list[list[float]], threshold: float, window: int) -> list[int]:
    """Algorithm 1 with every comparison decided exactly (the mathematics the fast path must agree with)."""
    groups, current = [0], [rows[0]]
    for h in rows[1:]:
        k = min(len(current), window)
        if any(exact_at_least(h, m, threshold) for m in current[-k:]):
            current.append(h)
            groups.append(groups[-1])
        else:
            current = [h]
            groups.append(groups[-1] + 1)
    return groups


def ref_algorithm1(rows: list[list[float]], threshold: float, window: int) -> list[int]:
    """Algorithm 1 over explicit groups of vectors, straight from the paper's pseudocode."""
    groups, current = [0], [rows[0]]
    for h in rows[1:]:
        k = min(len(current), window)
        s_max = max(ref_cos(h, m) for m in current[-k:])
        if s_max >= threshold:
            current.append(h)
            groups.append(groups[-1])
        else:
            current = [h]
            groups.append(groups[-1] + 1)
    return groups


def ref_means(x: torch.Tensor, groups: list[int]) -> torch.Tensor:
    n = max(groups) + 1
    return torch.stack([x[[t for t, g in enumerate(groups) if g == i]].double().mean(0) for i in range(n)])


def check_contract(c: Compressed, T: int, positions_first: bool = True) -> None:
    """Index-map invariants: ids 0..T'-1 in temporal order, -1 = dropped, positions = first member."""
    g = c.groups.tolist()
    kept = [v for v in g if v >= 0]
    assert len(g) == T and all(v >= -1 for v in g)
    assert kept == sorted(kept)
    assert sorted(set(kept)) == list(range(c.n_out))
    assert c.positions.shape == (c.n_out,) and c.groups.dtype == torch.long and c.positions.dtype == torch.long
    if positions_first:
        assert c.positions.tolist() == [g.index(i) for i in range(c.n_out)]


# Integer vectors with integer norms: every cosine is a ratio of small integers, computed exactly.
PYTHAGOREAN = [(3, 4, 0), (4, 3, 0), (0, 3, 4), (0, 4, 3), (5, 0, 0), (0, 0, 5), (3, 0, 4), (-3, 4, 0),
               (0, -4, 3), (1, 2, 2), (2, 1, 2), (2, 2, -1), (2, 3, 6), (6, 2, 3), (0, 0, 0), (6, 8, 0)]


# ----------------------------------------------------------------------------------- Algorithm 1


def test_band_matches_plain_cosine():
    torch.manual_seed(0)
    x = torch.randn(30, 16, dtype=torch.float64)
    x[7] = 0
    band = similarity_band(x, 4)
    for t in range(30):
        for j in range(1, 5):
            want = ref_cos(x[t].tolist(), x[t - j].tolist()) if t - j >= 0 else -math.inf
            assert band[t, j - 1].item() == pytest.approx(want, abs=1e-12)


def test_exact_ties_match_independent_reference():
    rng = random.Random(1)
    for case in range(60):
        T, window = rng.randint(1, 25), rng.randint(1, 4)
        rows = [[v * rng.choice((1, 2)) for v in rng.choice(PYTHAGOREAN)] for _ in range(T)]
        cosines = sorted({ref_cos(a, b) for a in rows for b in rows})
        threshold = rng.choice(cosines)  # an exact tie for some pairs
        x = torch.tensor(rows, dtype=torch.float64)
        want = ref_algorithm1(rows, threshold, window)
        assert affinity_groups(x, threshold, window).tolist() == want, (case, threshold)
        assert algorithm1(x, threshold, window).tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_duplicates_join_at_threshold_one(dtype):
    """Identical vectors (and exact positive multiples) have cosine exactly 1, so tau = 1 merges runs of copies of one
    random row and nothing else: token t joins iff one of the group's last min(|G|, omega) members copies its row."""
    rng = np.random.default_rng(7)
    for case in range(150):
        T, d, window = int(rng.integers(2, 30)), int(rng.choice([3, 64, 512, 4096])), int(rng.integers(1, 5))
        base = torch.randn(T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(case)).to(dtype)
        source = np.sort(rng.integers(0, T, size=T))  # runs of copies
        x = base[torch.from_numpy(source)] * float(rng.uniform(0.01, 100))
        if case % 3 == 0:
            x[::2] *= 2  # exact multiples are parallel too
        want, current = [0], [0]
        for t in range(1, T):
            if any(source[m] == source[t] for m in current[-min(len(current), window):]):
                current.append(t)
                want.append(want[-1])
            else:
                current = [t]
                want.append(want[-1] + 1)
        assert affinity_groups(x, 1.0, window).tolist() == want, case
        assert algorithm1(x, 1.0, window).tolist() == want, case


def test_pythagorean_ties_agree_with_exact_arithmetic():
    rng = random.Random(8)
    for case in range(80):
        T, window = rng.randint(1, 20), rng.randint(1, 4)
        rows = [[v * rng.choice((1, 2, 4)) for v in rng.choice(PYTHAGOREAN)] for _ in range(T)]
        for x in (torch.tensor(rows, dtype=torch.float32), torch.tensor(rows, dtype=torch.float64)):
            tau = rng.choice([24 / 25, 3 / 5, 0.0, -3 / 5, 1.0, 8 / 9, 4 / 9, 12 / 25])
            want = exact_algorithm1(rows, tau, window)
            assert affinity_groups(x, tau, window).tolist() == want, (case, tau)
            assert algorithm1(x, tau, window).tolist() == want, (case, tau)


def test_ties_join():
    x = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, 5.0]], dtype=torch.float64)  # cos = 24/25, then 3/5
    assert affinity_groups(x, 24 / 25, 1).tolist() == [0, 0, 1]
    assert affinity_groups(x, math.nextafter(24 / 25, 1), 1).tolist() == [0, 1, 2]
    assert affinity_groups(x, 3 / 5, 1).tolist() == [0, 0, 0]


def test_vectorised_equals_literal_on_many_small_cases():
    rng = np.random.default_rng(2)
    for case in range(200):
        T, d, window = int(rng.integers(1, 30)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        x = torch.from_numpy(rng.integers(-2, 3, size=(T, d)).astype(np.float32))  # zero rows and ties galore
        band = similarity_band(x, window)
        finite = band[torch.isfinite(band)]
        if finite.numel() and case % 2 == 0:
            threshold = float(finite[int(rng.integers(finite.numel()))])  # a computed similarity: an exact tie
        else:
            threshold = float(rng.uniform(-1.1, 1.1))
        got = affinity_groups(x, threshold, window)
        assert torch.equal(got, algorithm1(x, threshold, window)), (case, threshold, window)


def test_vectorised_equals_literal_d64():
    gen = torch.Generator().manual_seed(3)
    for case in range(12):
        T = [2, 17, 60][case % 3]
        base = torch.randn(T // 3 + 1, 64, generator=gen)
        x = base.repeat_interleave(3, 0)[:T] + 0.7 * torch.randn(T, 64, generator=gen)
        for window in (1, 2, 3, 7):
            for threshold in (0.2, 0.5, 0.7):
                assert torch.equal(affinity_groups(x, threshold, window), algorithm1(x, threshold, window))


def test_random_inputs_match_reference():
    gen = torch.Generator().manual_seed(4)
    for case in range(25):
        T, window = 5 + case, 1 + case % 4
        x = torch.randn(T, 6, dtype=torch.float64, generator=gen).cumsum(0)  # drifting: neighbours alike
        threshold = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 1.6 - 0.6
        want = ref_algorithm1(x.tolist(), threshold, window)
        assert affinity_groups(x, threshold, window).tolist() == want


def test_features_decide_groups_and_x_is_pooled():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=gen)
    feats = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    want = ref_algorithm1(feats.tolist(), 0.3, 2)
    c = affinity_pool(x, 0.3, 2, features=feats)
    assert c.groups.tolist() == want
    torch.testing.assert_close(c.tokens.double(), ref_means(x, want), rtol=1e-6, atol=1e-6)
    assert torch.equal(algorithm1(x, 0.3, 2, feats), c.groups)


def test_affinity_pool_means_and_contract():
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(40, 5, generator=gen).cumsum(0).to(dtype)
        c = affinity_pool(x, 0.8, 3)
        check_contract(c, 40)
        assert c.tokens.dtype == dtype and 1 < c.n_out < 40
        torch.testing.assert_close(c.tokens.double(), ref_means(x, c.groups.tolist()).to(dtype).double())


def test_threshold_outside_unit_range():
    x = torch.randn(12, 4).cumsum(0)
    c = affinity_pool(x, 1.5, 3)
    assert torch.equal(c.tokens, x) and c.groups.tolist() == list(range(12))
    c = affinity_pool(x, -1.0, 1)
    assert c.groups.tolist() == [0] * 12
    torch.testing.assert_close(c.tokens, x.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="threshold must be in"):
        validate("affinity", strict=True, threshold=1.5, window=3)
    validate("affinity", threshold=1.5, window=3)


def test_zero_vectors_have_cosine_zero():
    x = torch.zeros(5, 3)
    assert affinity_groups(x, 0.0, 2).tolist() == [0] * 5
    assert affinity_groups(x, 0.01, 2).tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(similarity_band(x, 1)[1:], torch.zeros(4, 1))


# Hard inputs for the fast path: neighbours whose cosines crowd near 1 (deep layers), where the float32 band cannot
# tell values apart that the float64 cosine of algorithm1 does. The reference below is written here, token by token.


class Literal64:
    """Algorithm 1 as a literal loop, every cosine in float64 from elementwise products of one pair of rows:
    cos = a.b / sqrt(|a|^2 |b|^2), 0 against a zero vector, clipped to [-1, 1]."""

    def __init__(self, x: torch.Tensor):
        self.h = x.double()
        self.memo: dict[tuple[int, int], float] = {}

    def cos(self, t: int, s: int) -> float:
        if (t, s) not in self.memo:
            a, b = self.h[t], self.h[s]
            den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
            self.memo[t, s] = 0.0 if den == 0 else max(-1.0, min(1.0, float((a * b).sum()) / den))
        return self.memo[t, s]

    def groups(self, threshold: float, window: int) -> list[int]:
        groups, current = [0], [0]
        for t in range(1, self.h.shape[0]):
            if max(self.cos(t, m) for m in current[-min(len(current), window):]) >= threshold:
                current.append(t)
                groups.append(groups[-1])
            else:
                current = [t]
                groups.append(groups[-1] + 1)
        return groups


def hard_rows(kind: str, T: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "walk":  # a random walk: neighbours' cosines between about 0.9 and 1 - 1e-4
        return torch.randn(T, d, generator=gen).cumsum(0)
    if kind == "massive":  # a few dimensions shared by every token and ~100x the others (massive activations)
        x = torch.randn(T, d, generator=gen)
        x[:, :3] += torch.tensor([80.0, -120.0, 60.0])
        return x
    if kind == "tiny":  # float32 rows whose squared entries underflow float32 (but not float64)
        return torch.randn(T, d, generator=gen).cumsum(0) * 1e-30
    raise ValueError(kind)


def tie_thresholds(ref: Literal64, window: int, bound: float, rng: np.random.Generator) -> list[float]:
    """Some neighbours' float64 cosines (exact ties), the floats just above and below them, and values just inside
    and just outside the rounding bound (2 F eps) around them."""
    T = ref.h.shape[0]
    out = []
    for _ in range(4):
        t = int(rng.integers(window, T))
        c = ref.cos(t, t - int(rng.integers(1, window + 1)))
        out += [c, math.nextafter(c, 2), math.nextafter(c, -2), c + 0.99 * bound, c - 0.99 * bound,
                c + 1.01 * bound, c - 1.01 * bound]
    return out


@pytest.mark.parametrize("kind", ["walk", "massive", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_inputs_tie_exactly_as_the_literal_float64_loop(kind, dtype):
    rng = np.random.default_rng(21)
    T, d = 120, 384
    x = hard_rows(kind, T, d, seed=3).to(dtype)
    ref = Literal64(x)
    bound = 2 * d * torch.finfo(dtype).eps
    for window in (1, 3):
        for tau in tie_thresholds(ref, window, bound, rng) + [0.8, 0.999]:
            want = ref.groups(tau, window)
            assert affinity_groups(x, tau, window).tolist() == want, (window, tau)
            assert affinity_pool(x, tau, window).groups.tolist() == want, (window, tau)
            assert algorithm1(x, tau, window).tolist() == want, (window, tau)


@pytest.mark.parametrize("kind", ["walk", "massive"])
def test_duplicates_among_near_neighbours_at_threshold_one(kind):
    """At tau = 1 only exact copies (and exact multiples) merge, even where every neighbour is within 1e-4 of them."""
    rng = np.random.default_rng(22)
    for case in range(6):
        T, window = 80, int(rng.integers(1, 5))
        base = hard_rows(kind, T, 1024, seed=case)
        source = np.sort(rng.integers(0, T, size=T))  # runs of copies of rows of the walk
        x = base[torch.from_numpy(source)] * torch.from_numpy(rng.choice([1.0, 2.0, 0.5], size=(T, 1))).float()
        want = Literal64(x).groups(1.0, window)
        assert affinity_groups(x, 1.0, window).tolist() == want, case
        assert algorithm1(x, 1.0, window).tolist() == want, case
        assert 1 < max(want) + 1 < T  # both joins and new groups


# ------------------------------------------------------------------------------------- oracle (§3.1)


def ref_units(spans, T, gaps):
    """Label every token with the word it lies in (None between words); each run of one label is a unit."""
    label = [None] * T
    for k, (a, b) in enumerate(spans):
        label[a:b] = [k] * (b - a)
    units = []
    for t in range(T):
        if t == 0 or label[t] != label[t - 1]:
            units.append([t, t + 1, label[t] is not None or gaps == "unit"])
        else:
            units[-1][1] = t + 1
    return [tuple(u) for u in units]


def ref_oracle(T, spans, budget, gaps, kind):
    """Per-unit loops: kept offsets (drop) or bins (merge), as group lists over the whole sequence."""
    groups, n_out = [], 0
    for a, b, squeeze in ref_units(spans, T, gaps):
        n = b - a
        if not squeeze or n <= budget:
            groups += list(range(n_out, n_out + n))
            n_out += n
            continue
        if kind == "uniform_drop":
            centres = [int(((i + 0.5) * n) // budget) for i in range(budget)]
            groups += [n_out + centres.index(k) if k in centres else -1 for k in range(n)]
        else:
            bins = [i for i in range(budget) for _ in range((i + 1) * n // budget - i * n // budget)]
            groups += [n_out + i for i in bins]
        n_out += budget
    return groups


@pytest.mark.parametrize("kind", ["uniform_drop", "uniform_merge"])
@pytest.mark.parametrize("gaps", ["unit", "keep"])
def test_uniform_operators_match_reference(kind, gaps):
    rng = random.Random(7)
    for _ in range(30):
        T = rng.randint(1, 60)
        cuts = sorted(rng.sample(range(T + 1), min(T + 1, 2 * rng.randint(0, 5))))
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        budget = rng.randint(1, 6)
        x = torch.randn(T, 4)
        c = OPERATORS[kind].fn(x, budget=budget, spans=torch.tensor(spans, dtype=torch.long).reshape(-1, 2), gaps=gaps)
        want = ref_oracle(T, spans, budget, gaps, kind)
        assert c.groups.tolist() == want
        check_contract(c, T)
        torch.testing.assert_close(c.tokens.double(), ref_means(x, [g for g in want]) if T else c.tokens.double())


def test_random_drop_budget_seed_and_rows():
    x = torch.randn(50, 3)
    spans = torch.tensor([[3, 13], [13, 16], [20, 41]])
    a = random_drop(x, budget=4, spans=spans, seed=11)
    check_contract(a, 50)
    g = a.groups
    for lo, hi, n_keep in [(0, 3, 3), (3, 13, 4), (13, 16, 3), (16, 20, 4), (20, 41, 4), (41, 50, 4)]:
        assert int((g[lo:hi] >= 0).sum()) == n_keep
    assert torch.equal(a.tokens, x[a.positions])
    torch.manual_seed(123)
    assert torch.equal(random_drop(x, budget=4, spans=spans, seed=11).groups, g)  # global RNG irrelevant
    assert not torch.equal(random_drop(x, budget=4, spans=spans, seed=12).groups, g)
    kept = random_drop(x, budget=4, spans=spans, gaps="keep", seed=11).groups
    assert (kept[:3] >= 0).all() and (kept[16:20] >= 0).all() and (kept[41:] >= 0).all()


def test_budget_larger_than_windows_is_a_no_op():
    x = torch.randn(10, 3)
    for op in ("uniform_drop", "uniform_merge", "random_drop"):
        c = compress(x, op, budget=16, spans=torch.tensor([[0, 4], [6, 10]]), seed=0)
        assert torch.equal(c.tokens, x) and c.groups.tolist() == list(range(10))


@pytest.mark.parametrize("op", ["random_drop", "uniform_drop", "uniform_merge"])
def test_oracle_ratio_mode(op):
    for T in (1, 7, 40):
        x = torch.randn(T, 2)
        c = compress(x, op, ratio=0.3, seed=1)
        assert c.n_out == max(1, math.floor(0.3 * T + 0.5))
        check_contract(c, T)


def test_spans_from_words():
    # 25 tokens/s: floor start, ceil end, overlaps start at the previous end, at least one token each
    s = spans_from_words([0.0, 0.3, 0.31, 1.0, 5.0], [0.3, 0.32, 0.5, 1.2, 6.0], 25, 28)
    assert s.tolist() == [[0, 8], [8, 9], [9, 13], [25, 28]]
    assert spans_from_words([0.5, 0.0], [0.6, 0.1], 10, 100).tolist() == [[0, 1], [5, 6]]  # sorted by time
    assert spans_from_words([0.2], [0.2], 25, 30).tolist() == [[5, 6]]  # zero-length word gets one token
    assert spans_from_words([], [], 25, 30).shape == (0, 2)
    with pytest.raises(ValueError, match="end >= start"):
        spans_from_words([1.0], [0.5], 25, 30)


def test_spans_must_be_ordered():
    with pytest.raises(ValueError, match="non-overlapping"):
        uniform_merge(torch.randn(10, 2), budget=2, spans=torch.tensor([[0, 5], [4, 8]]))
    with pytest.raises(ValueError, match="within"):
        uniform_merge(torch.randn(10, 2), budget=2, spans=torch.tensor([[0, 12]]))
    with pytest.raises(ValueError, match="pairs"):
        uniform_merge(torch.randn(10, 2), budget=2, spans=torch.tensor([[5, 4]]))
    x = torch.randn(10, 2)  # empty spans (words merged away by an earlier point) are ignored
    with_empty = uniform_merge(x, budget=2, spans=torch.tensor([[0, 0], [2, 7], [7, 7]]))
    assert same(with_empty, uniform_merge(x, budget=2, spans=torch.tensor([[2, 7]])))


# ---------------------------------------------------------------------- fixed budget and baselines


def test_affinity_ratio_hits_reachable_budgets():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(60, 8, generator=gen).cumsum(0)
    for ratio in (0.1, 0.5, 0.9, 1.0):  # window 1: every count is reachable with distinct similarities
        c = affinity_ratio(x, ratio, 1)
        assert c.n_out == n_kept(ratio, 60)
        check_contract(c, 60)


def test_affinity_ratio_is_closest_count_not_above():
    rng = np.random.default_rng(9)
    for case in range(20):
        T, window = int(rng.integers(1, 25)), int(rng.integers(1, 4))
        x = torch.from_numpy(rng.integers(-2, 3, size=(T, 2)).astype(np.float64))
        ratio = float(rng.uniform(0.05, 1.0))
        band = similarity_band(x, window)
        thresholds = sorted(set(band[torch.isfinite(band)].tolist())) + [2.0]
        counts = [max(algorithm1(x, t, window).tolist()) + 1 for t in thresholds]
        want = max(n for n in counts if n <= n_kept(ratio, T))
        assert affinity_ratio(x, ratio, window).n_out == want


def test_interpolate_matches_torch():
    for T, ratio in [(1, 0.5), (10, 0.5), (37, 0.6), (100, 0.9), (9, 1.0)]:
        x = torch.randn(T, 5, dtype=torch.float64)
        c = interpolate(x, ratio)
        n = n_kept(ratio, T)
        want = F.interpolate(x.T.unsqueeze(0), size=n, mode="linear", align_corners=False)[0].T
        torch.testing.assert_close(c.tokens, want)
        p = [(i + 0.5) * T / n - 0.5 for i in range(n)]
        assert c.positions.tolist() == [min(T - 1, max(0, math.floor(q + 0.5))) for q in p]
        nearest = [min(range(n), key=lambda i: (abs(t - p[i]), i)) for t in range(T)]
        assert c.groups.tolist() == nearest
        assert [c.groups[q].item() for q in c.positions.tolist()] == list(range(n))


def test_adjacent_merge_matches_reference():
    gen = torch.Generator().manual_seed(10)
    for T in (1, 2, 9, 30):
        x = torch.randn(T, 6, generator=gen, dtype=torch.float64).cumsum(0)
        for ratio in (0.2, 0.5, 1.0):
            n = n_kept(ratio, T)
            sims = [ref_cos(x[t].tolist(), x[t + 1].tolist()) for t in range(T - 1)]
            links = set(sorted(range(T - 1), key=lambda t: (-sims[t], t))[: T - n])
            want = [0]
            for t in range(1, T):
                want.append(want[-1] + (0 if t - 1 in links else 1))
            c = adjacent_merge(x, ratio)
            assert c.groups.tolist() == want and c.n_out == n
            torch.testing.assert_close(c.tokens, ref_means(x, want))


def test_group_merge_matches_reference():
    gen = torch.Generator().manual_seed(11)
    for case in range(10):
        x = torch.randn(25, 4, generator=gen, dtype=torch.float64).cumsum(0)
        threshold = 0.1 * case - 0.2
        rows = x.tolist()
        want, members = [0], [rows[0]]
        for h in rows[1:]:
            mean_cos = sum(ref_cos(h, m) for m in members) / len(members)
            if mean_cos >= threshold:
                members.append(h)
                want.append(want[-1])
            else:
                members = [h]
                want.append(want[-1] + 1)
        c = group_merge(x, threshold)
        assert c.groups.tolist() == want
        check_contract(c, 25)


def test_attention_prune_matches_reference():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.05, 0.9, 0.5, 0.2, 0.0])
    x = torch.randn(8, 3)
    c = attention_prune(x, scores, 0.5)
    assert c.positions.tolist() == [1, 2, 4, 5] and torch.equal(c.tokens, x[[1, 2, 4, 5]])
    check_contract(c, 8)
    gen = torch.Generator().manual_seed(13)
    for T in (1, 40, 300):
        scores = torch.randint(0, 5, (T,), generator=gen).float()  # many equal scores
        want = sorted(sorted(range(T), key=lambda t: (-scores[t].item(), t))[: max(1, round(0.3 * T))])
        assert attention_prune(torch.randn(T, 2), scores, 0.3).positions.tolist() == want  # FastV: round()
    with pytest.raises(ValueError, match="NaN"):
        attention_prune(x, torch.full((8,), float("nan")), 0.5)
    with pytest.raises(ValueError, match="scores="):
        compress(x, "attention_prune", ratio=0.5)


# ---------------------------------------------------------------------------------- features, dispatch


def test_similarity_features():
    x = torch.randn(6, 4)
    assert similarity_features(x, "hidden") is x
    ln = torch.nn.LayerNorm(4)
    torch.testing.assert_close(similarity_features(x, "normed", norm=ln), ln(x).detach())
    torch.testing.assert_close(similarity_features(x, "centered"), x - x.mean(0))
    k = torch.randn(6, 2)
    assert similarity_features(x, "keys", keys=k) is k
    xb, mask = torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    cb = similarity_features(xb, "centered", mask=mask)
    torch.testing.assert_close(cb[0, :3], xb[0, :3] - xb[0, :3].mean(0))
    for mode, match in [("normed", "norm="), ("keys", "keys="), ("pca", "allowed")]:
        with pytest.raises(ValueError, match=match):
            similarity_features(x, mode)
    assert set(FEATURE_MODES) == {"hidden", "normed", "centered", "keys"}


CALLS = {
    "none": ({}, lambda x, **k: C.identity(x)),
    "random_drop": (dict(budget=2, seed=5), lambda x, spans, seed, **k: random_drop(x, budget=2, spans=spans, seed=seed)),
    "uniform_drop": (dict(budget=2), lambda x, spans, **k: uniform_drop(x, budget=2, spans=spans)),
    "uniform_merge": (dict(ratio=0.4), lambda x, **k: uniform_merge(x, ratio=0.4)),
    "affinity": (dict(threshold=0.5, window=3), lambda x, features, **k: affinity_pool(x, 0.5, 3, features)),
    "affinity_ratio": (dict(ratio=0.5, window=2), lambda x, features, **k: affinity_ratio(x, 0.5, 2, features)),
    "interpolate": (dict(ratio=0.7), lambda x, **k: interpolate(x, 0.7)),
    "adjacent_merge": (dict(ratio=0.5), lambda x, features, **k: adjacent_merge(x, 0.5, features)),
    "group_merge": (dict(threshold=0.3), lambda x, features, **k: group_merge(x, 0.3, features)),
    "attention_prune": (dict(ratio=0.5), lambda x, scores, **k: attention_prune(x, scores, 0.5)),
    # the peer operators of compress/peers.py (checked against references in tests/test_peers.py)
    "samp": (dict(ratio=0.5), lambda x, scores, features, **k: C.samp(x, scores, 0.5, features=features)),
    "visionzip": (dict(ratio=0.5), lambda x, scores, features, **k: C.visionzip(x, scores, 0.5, features=features)),
    "cdpruner": (dict(ratio=0.5), lambda x, query, **k: C.cdpruner(x, query, 0.5)),
    "fastadasp": (dict(ratio=0.5), lambda x, scores, features, **k: C.fastadasp(x, scores, 0.5, features=features)),
    "speechprune": (dict(ratio=0.5, segment=5), lambda x, query, scores, **k: C.speechprune(x, query, scores, 0.5, 5)),
    "segment_topk": (dict(ratio=0.5, segment=5), lambda x, scores, **k: C.segment_topk(x, scores, 0.5, 5)),
    "ltbm": (dict(ratio=0.5), lambda x, features, **k: C.ltbm(x, 0.5, features)),
    # adapted variants under their own names
    "attention_prune_k": (dict(ratio=0.5), lambda x, scores, **k: C.attention_prune_k(x, scores, 0.5)),
    "samp_k": (dict(ratio=0.5), lambda x, scores, features, **k: C.samp_k(x, scores, 0.5, features=features)),
    "visionzip_contiguous": (dict(ratio=0.5), lambda x, scores, features, **k: C.visionzip_contiguous(
        x, scores, 0.5, features=features)),
    "cdpruner_exp": (dict(ratio=0.5), lambda x, query, **k: C.cdpruner_exp(x, query, 0.5)),
    "fastadasp_k": (dict(ratio=0.5), lambda x, scores, features, **k: C.fastadasp_k(x, scores, 0.5, features=features)),
}


def same(a: Compressed, b: Compressed) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.groups, b.groups) and torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("op", list(OPERATORS))
def test_compress_dispatches_and_batches(op):
    params, direct = CALLS[op]
    gen = torch.Generator().manual_seed(12)
    B, T, d = 3, 24, 5
    x = torch.randn(B, T, d, generator=gen).cumsum(1)
    feats = torch.randn(B, T, 3, generator=gen).cumsum(1)
    scores = torch.rand(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 15:] = False  # right padding
    mask[2, :4] = False  # left padding
    mask[2, 10] = False  # a hole
    spans = [torch.tensor([[2, 8], [9, 14]]), torch.tensor([[0, 5]]), torch.tensor([[3, 9]])]
    seeds = [seed_for(0, f"utt{b}") for b in range(B)]
    use_feats = "features" in OPERATORS[op].inputs
    queries = [torch.randn(2, d, generator=gen) for _ in range(B)]
    cb = compress_batch(x, mask, op, spans=spans, scores=scores, seeds=seeds, queries=queries,
                        features=feats if use_feats else None, **{k: v for k, v in params.items() if k != "seed"})
    for b in range(B):
        rows = mask[b].nonzero().flatten()
        xb, fb, sb = x[b, rows].clone(), feats[b, rows].clone(), scores[b, rows].clone()
        kw = dict(spans=spans[b], scores=sb, features=fb if use_feats else None, seed=seeds[b], query=queries[b])
        single = compress(xb, op, **kw, **{k: v for k, v in params.items() if k != "seed"})
        assert same(single, direct(xb, **kw))
        n = single.n_out
        assert torch.equal(cb.tokens[b, :n], single.tokens) and not cb.tokens[b, n:].any()
        assert torch.equal(cb.positions[b, :n], single.positions) and (cb.positions[b, n:] == -1).all()
        assert cb.mask[b].tolist() == [True] * n + [False] * (cb.tokens.shape[1] - n)
        assert torch.equal(cb.groups[b, rows], single.groups) and (cb.groups[b, ~mask[b]] == -1).all()
    if use_feats:
        cb = compress_batch(x, mask, op, features="centered", scores=scores, **params)
        for b in range(B):
            xb = x[b, mask[b]]
            assert torch.equal(cb.groups[b, mask[b]], compress(xb, op, features=xb - xb.mean(0), scores=scores[b, mask[b]],
                                                               **params).groups)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("op", list(OPERATORS))
def test_empty_and_single_token(op):
    params, _ = CALLS[op]
    kw = dict(spans=torch.zeros(0, 2, dtype=torch.long), scores=torch.zeros(0), seed=params.get("seed"),
              query=torch.randn(2, 4))
    p = {k: v for k, v in params.items() if k != "seed"}
    c = compress(torch.zeros(0, 4), op, **kw, **p)
    assert c.tokens.shape == (0, 4) and c.groups.shape == (0,) and c.positions.shape == (0,)
    x = torch.randn(1, 4)
    c = compress(x, op, **{**kw, "spans": torch.tensor([[0, 1]]), "scores": torch.ones(1)}, **p)
    assert torch.equal(c.tokens, x) and c.groups.tolist() == [0] and c.positions.tolist() == [0]


@pytest.mark.parametrize("op", list(OPERATORS))
def test_nan_and_inf_are_rejected(op):
    params, _ = CALLS[op]
    p = {k: v for k, v in params.items() if k != "seed"}
    for bad in (float("nan"), float("inf")):
        x = torch.randn(10, 4)
        x[3, 1] = bad
        with pytest.raises(ValueError, match="NaN|inf"):
            compress(x, op, spans=torch.tensor([[0, 5]]), scores=torch.rand(10), seed=0, query=torch.randn(2, 4), **p)
    if op in ("affinity", "group_merge"):
        f = torch.randn(10, 2)
        f[0, 0] = float("nan")
        with pytest.raises(ValueError, match="features contains 1 NaN"):
            compress(torch.randn(10, 4), op, features=f, **p)


@pytest.mark.parametrize(
    "op, params, match",
    [
        ("affinty", {}, "unknown operator 'affinty'; allowed: none, random_drop"),
        ("affinity", dict(threshold=0.5), r"needs parameter\(s\) \['window'\]"),
        ("affinity", dict(threshold=0.5, window=0), "window must be an integer >= 1, got 0"),
        ("affinity", dict(threshold=0.5, window=2.5), "window must be an integer >= 1, got 2.5"),
        ("affinity", dict(threshold=float("nan"), window=1), "threshold must be a real number"),
        ("affinity", dict(threshold=0.5, window=1, ratio=0.5), r"unexpected parameter\(s\) \['ratio'\]"),
        ("uniform_drop", {}, "needs either budget"),
        ("uniform_drop", dict(budget=2, ratio=0.5), "not both"),
        ("uniform_drop", dict(budget=0), "budget must be an integer >= 1, got 0"),
        ("uniform_merge", dict(budget=2, gaps="drop"), "gaps must be one of"),
        ("uniform_merge", dict(ratio=0.5, gaps="keep"), "gaps applies only with budget"),
        ("interpolate", dict(ratio=0.0), r"ratio must be in \(0, 1\], got 0.0"),
        ("interpolate", dict(ratio=1.2), r"ratio must be in \(0, 1\], got 1.2"),
        ("group_merge", dict(threshold=0.5, features="pca"), "unknown features mode"),
    ],
)
def test_validate_errors(op, params, match):
    with pytest.raises(ValueError, match=match):
        validate(op, **params)


def test_runtime_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="needs word spans"):
        compress(x, "uniform_merge", budget=2)
    with pytest.raises(ValueError, match="integer seed"):
        compress(x, "random_drop", ratio=0.5)
    with pytest.raises(ValueError, match="features has 9 tokens but x has 10"):
        affinity_pool(x, 0.5, 1, features=torch.randn(9, 3))
    with pytest.raises(ValueError, match=r"x must be a \[T, d\] tensor"):
        affinity_pool(torch.randn(10), 0.5, 1)
    with pytest.raises(ValueError, match="needs norm="):
        compress(x, "affinity", threshold=0.5, window=1, features="normed")
    with pytest.raises(ValueError, match="seeds="):
        compress_batch(x[None], torch.ones(1, 10, dtype=torch.bool), "random_drop", ratio=0.5)
    with pytest.raises(ValueError, match="temporal order"):  # id 1 appears before id 0
        pool_groups(x, torch.tensor([1, 0, 0, 1, 2, 3, 4, 5, 6, 7]))


def test_seed_for_is_stable_and_spread():
    assert seed_for(0, "utt-1") == seed_for(0, "utt-1")
    seeds = {seed_for(r, f"utt-{i}") for r in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


def test_affinity_copies_to_host_once(monkeypatch):
    """Algorithm 1 needs one device-to-host copy per sequence (no per-token sync), plus one when a cosine is within
    rounding of tau (recomputed in float64); smooth inputs, whose neighbours are all near 1, need no second one."""
    calls = []
    for name in ("cpu", "item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    x = torch.randn(50, 8).cumsum(0)
    affinity_pool(x, 0.9, 3, features=x * 2)
    assert calls == ["cpu"]
    calls.clear()
    affinity_pool(torch.cat([x, x[-1:]]), 0.9, 3)  # an exact duplicate at the end: cosine 1, far from tau
    assert calls == ["cpu"]
    calls.clear()
    affinity_pool(torch.cat([x, x[-1:]]), 1.0, 3)  # the same at tau = 1: recomputed in float64
    assert calls == ["cpu", "cpu"]
    calls.clear()
    walk = torch.randn(300, 4096).cumsum(0)  # neighbours within 1e-3 of 1, none near tau
    affinity_pool(walk, 0.8, 3)
    assert calls == ["cpu"]

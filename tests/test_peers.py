"""The peer operators (compress/peers.py) against plain references written here, one loop at a time, in float64.

Each reference follows the operator's docstring, not its code: cosines one pair at a time, the DPP's greedy MAP as
"add the item that most increases det(L_S)", allocations by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speech_redundancy.compress import (
    OPERATORS,
    Point,
    cdpruner,
    cdpruner_exp,
    compress,
    dpp_greedy,
    compress_batch,
    fastadasp,
    fastadasp_k,
    ltbm,
    n_kept,
    pool_weighted,
    samp,
    samp_k,
    schedule,
    segment_topk,
    speechprune,
    visionzip,
    visionzip_contiguous,
)

PEERS = ("samp", "visionzip", "cdpruner", "fastadasp", "speechprune", "segment_topk", "ltbm", "samp_k",
         "visionzip_contiguous", "cdpruner_exp", "fastadasp_k")


# ------------------------------------------------------------------------------------------ plain references
def cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return 0.0 if den == 0 else max(-1.0, min(1.0, float(a @ b) / den))


def groups_from_starts(starts: list[bool]) -> list[int]:
    out, g = [], -1
    for s in starts:
        g += 1 if s else 0
        out.append(g)
    return out


def weighted_means(x: np.ndarray, groups: list[int], w: np.ndarray) -> np.ndarray:
    n = max(groups) + 1 if any(g >= 0 for g in groups) else 0
    out = np.zeros((n, x.shape[1]))
    for g in range(n):
        members = [t for t, gt in enumerate(groups) if gt == g]
        total = sum(w[t] for t in members)
        if total > 0:
            out[g] = sum(w[t] * x[t] for t in members) / total
        else:
            out[g] = sum(x[t] for t in members) / len(members)
    return out


def keep_groups(T: int, keep: list[int]) -> list[int]:
    keep = sorted(keep)
    return [keep.index(t) if t in keep else -1 for t in range(T)]


def top(values, k: int) -> list[int]:
    """The k largest, earlier first among equals, returned in temporal order."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def greedy_det(unit: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    """Greedy MAP: add the item whose addition gives the largest det(L_S); exhausted gains (relative < 1e-9) count
    as 0, so those items come last, earliest first."""
    L = (unit @ unit.T) * q[:, None] * q[None, :]
    chosen: list[int] = []
    det_s = 1.0
    for _ in range(k):
        best, best_gain = None, -1.0
        for j in range(len(q)):
            if j in chosen:
                continue
            idx = chosen + [j]
            gain = float(np.linalg.det(L[np.ix_(idx, idx)])) / det_s
            if gain < 1e-9 * float(q.max()) ** 2:
                gain = 0.0
            if gain > best_gain + 1e-12 * float(q.max()) ** 2:  # equal within rounding: the earlier item
                best, best_gain = j, gain
        chosen.append(best)
        if best_gain > 0:
            det_s *= best_gain
    return chosen


def units(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0.0)


def quality(r: np.ndarray, theta: float) -> np.ndarray:
    span = r.max() - r.min()
    return np.exp(theta * ((r - r.min()) / span if span > 0 else np.zeros_like(r)))


def ref_samp(x, s, ratio, threshold=0.9, relevance=1.0):
    T = len(x)
    k = n_kept(ratio, T)
    pairs = sorted(((cos(x[t], x[t + 1]), t) for t in range(T - 1)), key=lambda p: (-p[0], p[1]))
    links = [t for c, t in pairs if c >= threshold][: T - k]
    groups = groups_from_starts([t == 0 or (t - 1) not in links for t in range(T)])
    merged = weighted_means(x, groups, s)
    n1 = len(merged)
    if n1 > k:
        gathered = np.array([sum(s[t] for t in range(T) if groups[t] == g) for g in range(n1)])
        keep = sorted(greedy_det(units(merged), quality(gathered, relevance), k))
        groups = [keep.index(g) if g in keep else -1 for g in groups]
        merged = weighted_means(x, groups, s)
    return groups, merged


def ref_visionzip(x, s, ratio, dominant=0.85):
    T = len(x)
    k = n_kept(ratio, T)
    n_dom = min(k, max(1, math.floor(dominant * k + 0.5)))
    n_ctx = k - n_dom
    dom = set(top(list(s), n_dom))
    runs, cur = [], []
    for t in range(T):
        if t in dom:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(cur)
    label = {t: ("d", t) for t in dom}  # group label per kept token
    if n_ctx and len(runs) <= n_ctx:
        inner = [(cos(x[t], x[t + 1]), t) for run in runs for t in run[:-1]]
        inner.sort(key=lambda p: (-p[0], p[1]))
        links = {t for _, t in inner[: sum(map(len, runs)) - n_ctx]}
        for run in runs:
            head = run[0]
            for t in run:
                if t != run[0] and (t - 1) not in links:
                    head = t
                label[t] = ("c", head)
    elif n_ctx:
        mass = [sum(s[t] for t in run) for run in runs]
        for i in top(mass, n_ctx):
            for t in runs[i]:
                label[t] = ("c", runs[i][0])
    order = sorted(set(label.values()), key=lambda lab: lab[1])
    return [order.index(label[t]) if t in label else -1 for t in range(T)]


def ref_cdpruner(x, query, ratio, relevance=1.0):
    r = np.array([np.mean([cos(xt, qj) for qj in query]) for xt in x])
    keep = greedy_det(units(x), quality(r, relevance), n_kept(ratio, len(x)))
    return keep_groups(len(x), keep)


def ref_fastadasp(x, s, ratio):
    T = len(x)
    pairs = sorted(((cos(x[t], x[t + 1]), t) for t in range(T - 1)), key=lambda p: (-p[0], p[1]))
    links = {t for _, t in pairs[: T - n_kept(ratio, T)]}
    groups = groups_from_starts([t == 0 or (t - 1) not in links for t in range(T)])
    return groups, weighted_means(x, groups, s)


def allocate(sizes: list[int], total: int) -> list[int]:
    share = [total * n / sum(sizes) for n in sizes]
    out = [min(math.floor(v), n) for v, n in zip(share, sizes)]
    for i in sorted(range(len(sizes)), key=lambda i: (-(share[i] - out[i]), i)):
        if sum(out) < total and out[i] < sizes[i]:
            out[i] += 1
    return out


def ref_segment_topk(s, ratio, segment):
    T = len(s)
    segs = [list(range(a, min(T, a + segment))) for a in range(0, T, segment)]
    keep = []
    for seg, c in zip(segs, allocate([len(g) for g in segs], n_kept(ratio, T))):
        keep += [seg[i] for i in top([s[t] for t in seg], c)]
    return keep_groups(T, keep)


def ref_speechprune(x, query, s, ratio, segment):
    T = len(x)
    k = n_kept(ratio, T)
    sim = [max(cos(xt, qj) for qj in query) for xt in x]
    segs = [list(range(a, min(T, a + segment))) for a in range(0, T, segment)]
    stage1 = []
    for seg, c in zip(segs, allocate([len(g) for g in segs], k + (T - k) // 2)):
        stage1 += [seg[i] for i in top([sim[t] for t in seg], c)]
    stage1.sort()
    keep = [stage1[i] for i in top([s[t] for t in stage1], k)]
    return keep_groups(T, keep)


def ref_ltbm(x, ratio):
    T = len(x)
    k = n_kept(ratio, T)
    members = [[t] for t in range(T)]  # current tokens as lists of original members
    while len(members) > k:
        feats = [x[m].mean(0) for m in members]
        n = len(members)
        cands = []
        for a in range(0, n, 2):
            left = cos(feats[a], feats[a - 1]) if a > 0 else -math.inf
            right = cos(feats[a], feats[a + 1]) if a < n - 1 else -math.inf
            if max(left, right) > -math.inf:
                cands.append((max(left, right), a, a - 1 if left >= right else a + 1))
        cands.sort(key=lambda c: (-c[0], c[1]))
        into = {a: b for _, a, b in cands[: n - k]}
        new = []
        for i in range(n):
            if i in into:
                continue
            group = list(members[i])
            for a, b in into.items():
                if b == i:
                    group += members[a]
            new.append(sorted(group))
        members = new
    groups = [-1] * T
    for g, m in enumerate(members):
        for t in m:
            groups[t] = g
    return groups, np.stack([x[m].mean(0) for m in members]) if members else np.zeros((0, x.shape[1]))


# ------------------------------------------------------------------------------------------ fixtures
def data(seed: int, T: int = 17, d: int = 24, Q: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).cumsum(0) * 0.3 + torch.randn(T, d, generator=g, dtype=torch.float64)
    s = torch.rand(T, generator=g, dtype=torch.float64)
    q = torch.randn(Q, d, generator=g, dtype=torch.float64)
    return x, s, q


def check_map(c, groups, T):
    assert c.groups.tolist() == list(groups)
    kept = [t for t in range(T) if groups[t] >= 0]
    first = {}
    for t in kept:
        first.setdefault(groups[t], t)
    assert c.positions.tolist() == [first[g] for g in sorted(first)]


# ------------------------------------------------------------------------------------------ against references
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.35])
def test_samp_matches_reference(seed, ratio):
    x, s, _ = data(seed)
    for threshold in (0.5, 0.9):
        c = samp_k(x, s, ratio, threshold=threshold)
        groups, tokens = ref_samp(x.numpy(), s.numpy(), ratio, threshold)
        check_map(c, groups, len(x))
        np.testing.assert_allclose(c.tokens.numpy(), tokens, rtol=1e-12, atol=1e-12)
        assert c.n_out == n_kept(ratio, len(x))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio,dominant", [(0.9, 0.85), (0.6, 0.85), (0.6, 0.3), (0.4, 0.5), (0.7, 1.0), (0.5, 0.0)])
def test_visionzip_matches_reference(seed, ratio, dominant):
    x, s, _ = data(seed)
    c = visionzip_contiguous(x, s, ratio, dominant=dominant)
    want = ref_visionzip(x.numpy(), s.numpy(), ratio, dominant)
    check_map(c, want, len(x))
    assert c.n_out == n_kept(ratio, len(x))
    np.testing.assert_allclose(c.tokens.numpy(), weighted_means(x.numpy(), want, np.ones(len(x))), rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio,relevance", [(0.8, 1.0), (0.5, 0.0), (0.3, 3.0)])
def test_cdpruner_matches_reference(seed, ratio, relevance):
    x, _, q = data(seed)
    c = cdpruner_exp(x, q, ratio, relevance=relevance)
    check_map(c, ref_cdpruner(x.numpy(), q.numpy(), ratio, relevance), len(x))
    assert torch.equal(c.tokens, x[c.positions])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.2])
def test_fastadasp_matches_reference(seed, ratio):
    x, s, _ = data(seed)
    c = fastadasp_k(x, s, ratio)
    groups, tokens = ref_fastadasp(x.numpy(), s.numpy(), ratio)
    check_map(c, groups, len(x))
    np.testing.assert_allclose(c.tokens.numpy(), tokens, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio,segment", [(0.8, 5), (0.6, 4), (0.3, 25), (0.5, 1)])
def test_segment_topk_and_speechprune_match_references(seed, ratio, segment):
    x, s, q = data(seed)
    check_map(segment_topk(x, s, ratio, segment=segment), ref_segment_topk(s.numpy(), ratio, segment), len(x))
    c = speechprune(x, q, s, ratio, segment=segment)
    check_map(c, ref_speechprune(x.numpy(), q.numpy(), s.numpy(), ratio, segment), len(x))
    assert torch.equal(c.tokens, x[c.positions])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.9, 0.6, 0.5, 0.3, 0.05])
def test_ltbm_matches_reference(seed, ratio):
    x, _, _ = data(seed)
    c = ltbm(x, ratio)
    groups, tokens = ref_ltbm(x.numpy(), ratio)
    check_map(c, groups, len(x))
    np.testing.assert_allclose(c.tokens.numpy(), tokens, rtol=1e-12, atol=1e-12)


def test_pool_weighted_reference_and_zero_weights():
    x, s, _ = data(1, T=9)
    groups = [0, 0, 1, -1, 2, 2, 2, 3, 3]
    w = s.numpy().copy()
    w[7:] = 0  # a group whose weights sum to 0: plain mean
    c = pool_weighted(x, np.array(groups), w)
    np.testing.assert_allclose(c.tokens.numpy(), weighted_means(x.numpy(), groups, w), rtol=1e-12)
    assert torch.equal(c.tokens[1], x[2])  # a singleton is copied
    with pytest.raises(ValueError, match="finite and >= 0"):
        pool_weighted(x, np.array(groups), -w)


# ------------------------------------------------------------------------------------------ shared properties
def call(op: str, x, s, q, ratio: float):
    kw = {"ratio": ratio}
    if "scores" in OPERATORS[op].inputs:
        kw["scores"] = s
    if "query" in OPERATORS[op].inputs:
        kw["query"] = q
    if op in ("speechprune", "segment_topk"):
        kw["segment"] = 4
    return compress(x, op, **kw)


def released_count(op: str, ratio: float, T: int) -> int:
    """The kept count each operator promises: n_kept(K, T), except where the released code counts otherwise."""
    if T == 0:
        return 0
    if op == "samp":  # at most max(round(T K), 2): fewer when merging leaves fewer groups (tau sets the retention)
        return min(T, max(round(T * ratio), 2))
    if op == "fastadasp":  # removes int(T r), r = 1 - K
        return T - int(T * round(1 - ratio, 9))
    return n_kept(ratio, T)


@pytest.mark.parametrize("op", PEERS)
def test_retention_for_every_length(op):
    g = torch.Generator().manual_seed(3)
    for T in range(0, 31):
        x = torch.randn(T, 6, generator=g)
        s, q = torch.rand(T, generator=g), torch.randn(2, 6, generator=g)
        for ratio in (1.0, 0.9, 0.61, 0.5, 0.1):
            c = call(op, x, s, q, ratio)
            if op == "samp":
                assert c.n_out <= released_count(op, ratio, T), (T, ratio)
            else:
                assert c.n_out == released_count(op, ratio, T), (T, ratio)
            assert c.groups.shape == (T,) and c.tokens.shape == (c.n_out, 6)
            kept = c.groups[c.groups >= 0]
            assert set(kept.tolist()) == set(range(c.n_out))
            if op != "visionzip":  # the one operator with non-contiguous groups
                assert kept.tolist() == sorted(kept.tolist())
            # outputs in the order of each group's first member, which is its position
            assert c.positions.tolist() == [int((c.groups == i).nonzero()[0]) for i in range(c.n_out)]
            assert c.positions.tolist() == sorted(c.positions.tolist())


@pytest.mark.parametrize("op", PEERS)
def test_one_token_and_empty(op):
    x = torch.randn(1, 5)
    c = call(op, x, torch.ones(1), torch.randn(2, 5), 0.5)
    assert torch.equal(c.tokens, x) and c.groups.tolist() == [0] and c.positions.tolist() == [0]
    c = call(op, torch.zeros(0, 5), torch.zeros(0), torch.randn(2, 5), 0.5)
    assert c.tokens.shape == (0, 5) and c.groups.shape == (0,) and c.positions.shape == (0,)


@pytest.mark.parametrize("op", PEERS)
def test_zero_vectors_and_ties(op):
    """All-zero tokens (cosine 0 everywhere, every score equal): deterministic, earlier tokens win the ties."""
    T = 10
    x = torch.zeros(T, 4)
    c = call(op, x, torch.zeros(T), torch.zeros(2, 4), 0.5)
    assert c.n_out == 5 and not c.tokens.any()
    again = call(op, x, torch.zeros(T), torch.zeros(2, 4), 0.5)
    assert torch.equal(c.groups, again.groups)
    if op in ("cdpruner", "segment_topk", "speechprune"):  # pure selection: the earliest of equals
        if op == "cdpruner":
            assert c.positions.tolist() == [0, 1, 2, 3, 4]
        elif op == "segment_topk":  # per 4-token segment: 2, 2, 1 of the segments [0..3], [4..7], [8, 9]
            assert c.positions.tolist() == [0, 1, 4, 5, 8]
        else:  # stage 1 keeps 3, 3, 1 of those segments (7 in all), stage 2 the first 5 of them
            assert c.positions.tolist() == [0, 1, 2, 4, 5]


def test_dpp_prefers_diverse_tokens_and_puts_duplicates_last():
    e = torch.eye(3, dtype=torch.float64)
    x = torch.stack([e[0], e[0], e[0], e[1], e[2]])  # three copies of one direction
    c = cdpruner_exp(x, e[:1], 0.6, relevance=0.0)  # keep 3: one of each direction
    assert c.positions.tolist() == [0, 3, 4]
    c = cdpruner_exp(x, e[:1], 0.8, relevance=0.0)  # a 4th pick: the gain is exhausted, the earliest duplicate
    assert c.positions.tolist() == [0, 1, 3, 4]
    x2 = torch.cat([x, torch.zeros(1, 3, dtype=torch.float64)])  # a zero vector is never preferred
    assert 5 not in cdpruner_exp(x2, e[:1], 0.5, relevance=0.0).positions.tolist()


def test_samp_threshold_above_one_is_pure_dpp_and_weights_follow_attention():
    x, s, _ = data(5, T=12)
    c = samp_k(x, s, 0.5, threshold=1.01)  # no merging: a selection
    assert (c.groups >= 0).sum() == c.n_out == 6 and torch.equal(c.tokens, x[c.positions])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64) + torch.tensor([[0, 0], [0, 0.01], [0, 0]], dtype=torch.float64)
    c = samp_k(y, torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64), 0.67, threshold=0.9)
    assert c.groups.tolist() == [0, 0, 1]
    torch.testing.assert_close(c.tokens[0], (3 * y[0] + y[1]) / 4)


@pytest.mark.parametrize("op", PEERS)
def test_nan_refused(op):
    x = torch.randn(8, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call(op, x, torch.rand(8), torch.randn(2, 4), 0.5)
    if "scores" in OPERATORS[op].inputs:
        with pytest.raises(ValueError, match="scores contain NaN"):
            call(op, torch.randn(8, 4), torch.full((8,), float("nan")), torch.randn(2, 4), 0.5)
    if "query" in OPERATORS[op].inputs:
        bad = torch.randn(2, 4)
        bad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="query contains 1 NaN"):
            call(op, torch.randn(8, 4), torch.rand(8), bad, 0.5)


@pytest.mark.parametrize("op", PEERS)
def test_missing_inputs_are_named(op):
    x = torch.randn(6, 4)
    if "scores" in OPERATORS[op].inputs:
        with pytest.raises(ValueError, match=f"{op} needs scores="):
            compress(x, op, ratio=0.5, query=torch.randn(2, 4), **({"segment": 2} if "segment" in OPERATORS[op].params else {}))
    if "query" in OPERATORS[op].inputs:
        with pytest.raises(ValueError, match=f"{op} needs query="):
            compress(x, op, ratio=0.5, scores=torch.rand(6))
        with pytest.raises(ValueError, match="width 3 but x has 4"):
            compress(x, op, ratio=0.5, scores=torch.rand(6), query=torch.randn(2, 3))


@pytest.mark.parametrize("op", PEERS)
def test_batched_equals_one_by_one(op):
    g = torch.Generator().manual_seed(11)
    B, T, d = 3, 20, 6
    x = torch.randn(B, T, d, generator=g).cumsum(1)
    scores = torch.rand(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 13:] = False
    mask[2, :5] = False
    queries = [torch.randn(b + 1, d, generator=g) for b in range(B)]
    params = {"ratio": 0.55, **({"segment": 4} if "segment" in OPERATORS[op].params else {})}
    cb = compress_batch(x, mask, op, scores=scores, queries=queries, **params)
    for b in range(B):
        rows = mask[b].nonzero().flatten()
        one = compress(x[b, rows], op, scores=scores[b, rows], query=queries[b], **params)
        n = one.n_out
        assert torch.equal(cb.tokens[b, :n], one.tokens) and torch.equal(cb.positions[b, :n], one.positions)
        assert torch.equal(cb.groups[b, rows], one.groups) and (cb.groups[b, ~mask[b]] == -1).all()


# ------------------------------------------------------------------------------------------ table and schedules
def test_every_operator_names_its_source():
    for name, op in OPERATORS.items():
        assert op.summary, name
        if name != "none":
            assert op.source, name


@pytest.mark.parametrize("params,match", [
    (dict(ratio=0.5, dominant=1.5), r"dominant must be in \[0, 1\]"),
    (dict(ratio=0.5, segment=0), "segment must be an integer >= 1"),
])
def test_parameter_checks(params, match):
    op = "visionzip" if "dominant" in params else "segment_topk"
    with pytest.raises(ValueError, match=match):
        Point(0, op, params)
    with pytest.raises(ValueError, match="relevance must be a finite real number >= 0"):
        Point(0, "cdpruner_exp", {"ratio": 0.5, "relevance": -1})


def test_schedules_expand_to_one_point_per_layer():
    const = schedule("fastadasp", 2, 5, 0.9, "constant", {"features": "keys"})
    assert [(p.layer, p.params) for p in const] == [(i, {"features": "keys", "ratio": 0.9}) for i in (2, 3, 4)]
    decay = schedule("fastadasp", 0, 4, 0.6, "decay")
    assert [p.layer for p in decay] == [0, 1, 2, 3]
    assert [p.params["ratio"] for p in decay] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    with pytest.raises(ValueError, match="schedule kind='linear'"):
        schedule("fastadasp", 0, 4, 0.6, "linear")
    with pytest.raises(ValueError, match="0 <= start < stop"):
        schedule("fastadasp", 4, 4, 0.6)


# ------------------------------------------------------------------------------------------ the Whisper adapter
@pytest.fixture(scope="module")
def whisper_eager():
    from speech_redundancy.models.whisper import WhisperModel
    from speech_redundancy.weights import load_whisper

    model, processor = load_whisper("whisper-tiny.en", attn_implementation="eager")
    return WhisperModel(model, processor, name="whisper-tiny.en")


@pytest.fixture(scope="module")
def one_request(demo_manifest):
    from speech_redundancy.audio import load_audio
    from speech_redundancy.data.records import read_manifest
    from speech_redundancy.models.base import Request

    utt = next(u for u in read_manifest(demo_manifest) if u.extra.get("kind") == "real")
    return Request(utt=utt, audio=load_audio(utt.audio), seed=3)


def encoder_output(adapter, req, points):
    """What the decoder reads: the encoder's output with ``points`` applied (captured by a hook on the encoder)."""
    got = {}

    def keep(module, args, output):
        got.setdefault("h", output.last_hidden_state[0].clone())

    hook = adapter.encoder.register_forward_hook(keep)
    try:
        out = adapter.generate([req], points, max_new_tokens=4)[0]
    finally:
        hook.remove()
    return got["h"], out


def test_whisper_point_at_the_encoder_output(whisper_eager, one_request):
    """layer = n_layers compresses what the decoder reads, after the final layer norm; the padding frames follow."""
    from speech_redundancy.compress import interpolate
    from speech_redundancy.models.whisper import frames_for

    adapter = whisper_eager
    L = adapter.n_layers
    stock, _ = encoder_output(adapter, one_request, [])
    n = frames_for(len(one_request.audio) / 16000)
    got, out = encoder_output(adapter, one_request, [Point(L, "interpolate", {"ratio": 0.5})])
    want = interpolate(stock[:n], 0.5).tokens
    assert out.tokens_in == n and out.tokens_out == want.shape[0] == n_kept(0.5, n)
    torch.testing.assert_close(got[: want.shape[0]], want)
    assert torch.equal(got[want.shape[0]:], stock[n:])
    with pytest.raises(ValueError, match=f"allowed 0..{L}"):
        adapter.check_points([Point(L + 1, "none")])


def test_whisper_attention_scores_come_from_the_layer_before(whisper_eager, one_request):
    from speech_redundancy.models.whisper import frames_for

    adapter = whisper_eager
    L = adapter.n_layers
    n = frames_for(len(one_request.audio) / 16000)
    got = {}

    def keep(module, args, output):
        got.setdefault("w", output[1][0, :, :n, :n].float().mean(dim=(0, 1)))

    hook = adapter.encoder.layers[L - 1].self_attn.register_forward_hook(keep)
    try:
        stock, _ = encoder_output(adapter, one_request, [])
    finally:
        hook.remove()
    out_h, out = encoder_output(adapter, one_request, [Point(L, "attention_prune", {"ratio": 0.6})])
    keep = torch.sort(torch.argsort(-got["w"].double(), stable=True)[: n_kept(0.6, n)]).values
    assert out.groups[0] == [int((keep == t).nonzero()[0]) if (keep == t).any() else -1 for t in range(n)]
    torch.testing.assert_close(out_h[: keep.numel()], stock[keep])
    for op in ("samp_k", "visionzip_contiguous", "fastadasp_k", "segment_topk"):
        params = {"ratio": 0.7, **({"segment": 50} if op == "segment_topk" else {})}
        assert adapter.generate([one_request], [Point(L, op, params)], 4)[0].tokens_out == n_kept(0.7, n)


def test_whisper_refuses_before_compute(whisper_tiny, whisper_eager):
    from speech_redundancy.models.whisper import WhisperModel

    sdpa = WhisperModel(*whisper_tiny, name="whisper-tiny.en")
    with pytest.raises(ValueError, match="operator=visionzip needs attention weights.*model.attn_implementation=eager"):
        sdpa.check_points([Point(3, "visionzip", {"ratio": 0.5})])
    with pytest.raises(ValueError, match="operator=fastadasp scores frames by attention.*layer=0 has none"):
        whisper_eager.check_points([Point(0, "fastadasp", {"ratio": 0.5})])
    for op in ("cdpruner", "speechprune"):
        with pytest.raises(ValueError, match=f"operator={op} needs a text prompt"):
            whisper_eager.check_points([Point(4, op, {"ratio": 0.5})])


# ------------------------------------------------------------------------------------------ the LLM engine
def _llm_request(uid: str, seconds: float):
    from speech_redundancy.compress import seed_for
    from speech_redundancy.data.records import Utterance
    from speech_redundancy.models.base import Request

    audio = (0.1 * np.random.default_rng(len(uid)).standard_normal(int(16000 * seconds))).astype(np.float32)
    return Request(utt=Utterance(id=uid, audio=f"{uid}.wav", text="x", duration=seconds), audio=audio,
                   seed=seed_for(0, uid))


def test_llm_engine_supplies_scores_and_the_prompt_query(tiny_qwen, monkeypatch):
    from speech_redundancy import engine

    adapter = tiny_qwen["eager"]
    reqs = [_llm_request("a", 2.0), _llm_request("bb", 3.1)]
    batch = adapter.inputs(reqs)
    audio = adapter.reach.find_audio((), batch)
    real = batch["attention_mask"].bool()
    after = [int((real[b] & ~audio[b] & (torch.arange(audio.shape[1]) > audio[b].nonzero().max())).sum())
             for b in range(len(reqs))]
    seen = []
    step = engine.compress_step

    def spy(x, point, state, **kw):
        seen.append((point.operator, None if kw.get("query") is None else kw["query"].shape[0], kw.get("scores")))
        return step(x, point, state, **kw)

    monkeypatch.setattr(engine, "compress_step", spy)
    points = [Point(1, "cdpruner", {"ratio": 0.8}), Point(2, "speechprune", {"ratio": 0.9, "segment": 25}),
              Point(3, "samp_k", {"ratio": 0.9})]
    outs = adapter.generate(reqs, points, 2)
    for b, out in enumerate(outs):
        n = out.tokens_in
        want = [n_kept(0.8, n)]
        want.append(n_kept(0.9, want[-1]))
        want.append(n_kept(0.9, want[-1]))
        assert out.tokens_per_point == want
    queries = [(op, qn) for op, qn, _ in seen if op in ("cdpruner", "speechprune")]
    assert queries == [("cdpruner", after[0]), ("speechprune", after[0]), ("cdpruner", after[1]),
                       ("speechprune", after[1])]  # batch_size=1: one request after the other
    assert all(s is not None for op, _, s in seen if op in ("speechprune", "samp_k"))


def test_llm_engine_refuses_attention_operators_without_eager(tiny_qwen):
    from speech_redundancy.engine import CompressionError

    for op in ("samp", "visionzip", "fastadasp", "speechprune", "segment_topk"):
        with pytest.raises(CompressionError, match=f"operator={op} needs attention weights.*attn_implementation=eager"):
            tiny_qwen["sdpa"].check_points([Point(2, op, {"ratio": 0.5})])
        with pytest.raises(CompressionError, match=f"operator={op} at layer=0 needs the audio encoder's attention"):
            tiny_qwen["sdpa"].check_points([Point(0, op, {"ratio": 0.5})])
        tiny_qwen["eager"].check_points([Point(0, op, {"ratio": 0.5})])  # scored by the audio encoder there
    tiny_qwen["sdpa"].check_points([Point(0, "cdpruner", {"ratio": 0.5}), Point(1, "ltbm", {"ratio": 0.5})])


# ------------------------------------------------------------------------------------------ tables
def _rec(**kw):
    base = dict(model="whisper-base", data="demo/real", context="c1", experiment="peer_comparison_demo", n=4,
                n_points=1, protocol="paper", retention=kw.get("ratio", 1.0))
    return {**base, **kw}


def test_peer_table_and_fixed_ratio_layers():
    import pandas as pd

    from speech_redundancy.experiments import fixed_ratio_table, peer_table

    rows = [_rec(intervention="none", n_points=0, wer=0.1, ratio=None, retention=1.0, layer=None, operator=None)]
    for op, w in (("samp", 0.2), ("ltbm", 0.3)):
        for k in (0.8, 0.6):
            rows.append(_rec(intervention="peer", layer=6, operator=op, ratio=k, wer=w + (0.8 - k)))
    for layer in (6, 0):
        rows.append(_rec(intervention="fixed_ratio", layer=layer, operator="interpolate", ratio=0.6, wer=0.1 + layer / 100))
    t = peer_table(pd.DataFrame(rows), "c1")
    assert list(t["Operator"]) == ["Vanilla", "LTBM", "Samp / SA-MAP (τ-set)"]
    assert list(t.columns) == ["Layer", "Operator", "K=80% WER", "K=80% WER CI", "K=80% Ret.", "K=80% n",
                               "K=60% WER", "K=60% WER CI", "K=60% Ret.", "K=60% n", "Ret. (mean)"]
    assert t.iloc[2]["K=60% Ret."] == pytest.approx(60.0)
    assert t.iloc[2]["K=60% WER"] == pytest.approx(40.0) and t.iloc[0]["K=80% WER"] == pytest.approx(10.0)
    f = fixed_ratio_table(pd.DataFrame(rows), "whisper-base")
    assert list(f["Method"]) == ["Vanilla", "interpolate (l=6)", "interpolate (l=0)"]
    assert list(f["demo/real"]) == pytest.approx([10.0, 16.0, 10.0])


def test_fastadasp_schedule_intervention_expands_in_build_points():
    from conftest import compose

    from speech_redundancy.runner import RunError, build_points

    points = build_points(compose(["intervention=fastadasp_schedule", "layer=2", "schedule_stop=5", "ratio=0.8",
                                   "schedule_kind=decay"]))
    assert [(p.layer, p.operator, p.params["ratio"]) for p in points] == [
        (2, "fastadasp", pytest.approx(0.8 + 0.2 / 3 * 0)), (3, "fastadasp", pytest.approx(1 - 0.2 * 2 / 3)),
        (4, "fastadasp", pytest.approx(1 - 0.2 / 3))]
    assert all(p.params["features"] == "keys" for p in points)
    with pytest.raises(RunError, match="schedule kind='linear'"):
        build_points(compose(["intervention=fastadasp_schedule", "schedule_kind=linear"]))
    peer = build_points(compose(["intervention=peer", "operator=visionzip", "ratio=0.7", "layer=3", "dominant=0.5"]))
    assert [(p.layer, p.operator, p.params) for p in peer] == [(3, "visionzip", {"ratio": 0.7, "dominant": 0.5,
                                                                                 "features": "hidden"})]


def test_from_partition_orders_interleaved_groups_by_their_first_member():
    from speech_redundancy.compress import from_partition

    x = torch.arange(12.0).reshape(6, 2)
    labels = np.array([1, 0, 1, -1, 0, 2])  # ids in any order; groups 0 and 1 interleave; token 3 dropped
    c = from_partition(x, labels, torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]))
    assert c.groups.tolist() == [0, 1, 0, -1, 1, 2] and c.positions.tolist() == [0, 1, 5]
    assert c.tokens[:, 0].tolist() == [20.0, 10.0, 30.0]
    with pytest.raises(ValueError, match="every group id"):
        from_partition(x, np.array([0, 0, 2, 2, 0, 0]), torch.zeros(3, 2))


def test_dpp_float32_picks_equal_float64():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(300, 400, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    q = torch.rand(300, generator=g) + 0.01
    for k in (30, 150, 280):
        assert np.array_equal(dpp_greedy(u, q, k), dpp_greedy(u.double(), q.double(), k))
    assert dpp_greedy(u[:0], q[:0], 5).size == 0


def test_peer_comparison_keys_preset_measures_on_keys():
    from conftest import compose

    from speech_redundancy.runner import build_points

    for op in ("adjacent_merge", "fastadasp", "visionzip"):
        cfg = compose(["experiment=peer_comparison_keys", f"operator={op}", "ratio=0.8", "data.root=/tmp"])
        assert [p.params["features"] for p in build_points(cfg)] == ["keys"]
    cfg = compose(["experiment=peer_comparison", "operator=samp", "ratio=0.8", "data.root=/tmp"])
    assert build_points(cfg)[0].params["threshold"] == 0.85

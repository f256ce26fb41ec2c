"""The peer operators as released, against outputs of their authors' code (tests/fixtures/peers_golden/, README there).

The inputs are regenerated here from the seeds stored with each case (the recipe is the one the generator used, checked
by the stored sum of x); the outputs are data, produced by the released code in a throwaway environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_redundancy.compress import attention_prune, cdpruner, fastadasp, samp, schedule, visionzip

GOLDEN = Path(__file__).parent / "fixtures" / "peers_golden"


def make_x(kind: str, T: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((T, d)).astype(np.float32)
    lengths = rng.integers(1, 9, size=T)
    run = np.repeat(np.arange(T), lengths)[:T]
    base = rng.standard_normal((T, d))
    if kind == "runs":
        return (base[run] + 0.02 * rng.standard_normal((T, d))).astype(np.float32)
    return base[run].astype(np.float32)  # "ties": runs of exact duplicates


def make_scores(kind: str, T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    if kind == "ties":
        return (rng.integers(1, 4, size=T) / 4).astype(np.float32)
    return rng.random(T).astype(np.float32) + np.float32(0.01)


def load(peer: str):
    z = np.load(GOLDEN / f"{peer}.npz")
    return json.loads(str(z["cases"])), z


def cases(peer: str):
    rows, z = load(peer)
    return [pytest.param(row, z, id=f"{row['kind']}-T{row['T']}-K{row['K']}") for row in rows]


def inputs(row) -> torch.Tensor:
    x = make_x(row["kind"], row["T"], row["d"], row["seed"]) if "d" in row else None
    if x is not None and "x_sum" in row:
        assert float(x.astype(np.float64).sum()) == pytest.approx(row["x_sum"], rel=0, abs=1e-6), "input recipe drift"
    return None if x is None else torch.from_numpy(x)


def key(z, row_index: int, name: str):
    return z[f"{row_index}_{name}"]


def index_of(peer: str, row) -> int:
    """The case's number in the archive (stored as "n" where the generator skipped cases)."""
    if "n" in row:
        return row["n"]
    rows, _ = load(peer)
    return rows.index(row)


def same_partition(groups: np.ndarray, expected: np.ndarray) -> bool:
    """Two group maps describe the same partition (same kept tokens, same members together)."""
    if not np.array_equal(groups >= 0, expected >= 0):
        return False
    kept = groups >= 0
    pairs = set(zip(groups[kept].tolist(), expected[kept].tolist()))
    return len(pairs) == len(set(groups[kept].tolist())) == len(set(expected[kept].tolist()))


def settled_picks(gains: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """The released picks up to the first one float32 rounding could have decided: its gain within
    64 sqrt(i + 1) eps g_0 of the next pick's (a near tie; the bound the project's float64 check uses), at or
    below 100 eps g_0 (exhausted), or NaN. Past that the released loop's order is rounding (then NaN, past the
    kernel's rank), where the project re-decides in float64 and picks exhausted items earliest first."""
    g = gains.astype(np.float64)
    eps = np.finfo(np.float32).eps
    g0 = max(g[0], 0.0) if g.size else 0.0
    for i in range(g.size):
        if not np.isfinite(g[i]) or g[i] <= 100 * eps * g0:
            return picks[:i]
        if i + 1 < g.size and abs(g[i] - g[i + 1]) <= 64 * np.sqrt(i + 1) * eps * g0:
            return picks[:i]
    return picks[: g.size]


# ------------------------------------------------------------------------------------------ FastV
@pytest.mark.parametrize("row, z", cases("fastv"))
def test_fastv_kept_set(row, z):
    T, K = row["T"], row["K"]
    s = torch.from_numpy(make_scores(row["kind"], T, row["seed"]))
    expected = key(z, index_of("fastv", row), "keep")
    out = attention_prune(torch.zeros(T, 2), s, K)
    kept = np.flatnonzero(out.groups.numpy() >= 0)
    if row["count"] == 0:  # FastV keeps nothing; the project keeps one token
        assert kept.size == 1
        return
    assert kept.size == row["count"]
    if row["kind"] == "ties":  # torch.topk orders equal values as it likes; the project takes the earlier
        assert np.array_equal(np.sort(s.numpy()[kept]), np.sort(s.numpy()[expected]))
    else:
        assert np.array_equal(kept, expected)


# ------------------------------------------------------------------------------------------ FastAdaSP
@pytest.mark.parametrize("row, z", cases("fastadasp"))
def test_fastadasp_groups_and_values(row, z):
    i = index_of("fastadasp", row)
    x = inputs(row)
    keys = torch.from_numpy(make_x(row["kind"], row["T"], row["d"], row["seed"] + 5))
    s = torch.from_numpy(make_scores(row["kind"], row["T"], row["seed"]))
    out = fastadasp(x, s, row["K"], features=keys)
    expected = key(z, i, "groups")
    if row["kind"] == "ties" and not np.array_equal(out.groups.numpy(), expected):
        # exact duplicates tie in cosine; torch.topk orders ties as it likes, the project takes the earlier pair:
        # the same number of links, and the linked cosines alike
        cos = torch.nn.functional.cosine_similarity(keys[:-1], keys[1:], dim=1).numpy()
        ours, theirs = (np.flatnonzero(np.diff(g) == 0) for g in (out.groups.numpy(), expected))
        assert ours.size == theirs.size
        assert np.array_equal(np.sort(cos[ours]), np.sort(cos[theirs]))
        return
    assert np.array_equal(out.groups.numpy(), expected)
    assert torch.allclose(out.tokens, torch.from_numpy(key(z, i, "tokens")), atol=1e-5, rtol=0)


def test_fastadasp_released_schedule():
    """The released decay slope (start layer 10, r = 0.2, 32 layers): T = 750 ends at 76 tokens."""
    rows, z = load("fastadasp")
    meta = json.loads((GOLDEN / "fastadasp.json").read_text())["schedule"]
    points = schedule("fastadasp", 10, 32, 0.8, kind="fastadasp_decay")
    T = 750
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(0))
    lengths = {p.layer: p for p in points}
    n = [T]
    for layer in range(32):
        if layer in lengths:
            x = fastadasp(x, torch.ones(x.shape[0]), lengths[layer].params["ratio"]).tokens
        n.append(x.shape[0])
    assert n == meta["decay"]["lengths"]
    assert n[-1] == 76


# ------------------------------------------------------------------------------------------ SA-MAP
@pytest.mark.parametrize("row, z", cases("samp"))
def test_samp_groups_picks_values(row, z):
    i = index_of("samp", row)
    x = inputs(row)
    w = torch.from_numpy(key(z, i, "merge_weight"))
    diag = torch.from_numpy(key(z, i, "quality_diag"))
    out = samp(x, w, row["K"], threshold=0.85, quality=diag)
    groups = out.groups.numpy()
    merge_groups = key(z, i, "groups")
    picks = key(z, i, "picks")
    if row["n_groups"] <= row["count"]:  # retention set by tau: every group kept (the released code pads)
        assert np.array_equal(groups, merge_groups)
        assert out.n_out == row["n_groups"] == np.unique(picks).size
        expected = torch.from_numpy(key(z, i, "tokens"))  # released rows (sorted picks, duplicates included)
        ours = out.tokens[torch.from_numpy(np.sort(picks).astype(np.int64))]
        rows_kept = torch.from_numpy(key(z, i, "token_rows").astype(np.int64))
        assert torch.allclose(ours[rows_kept], expected, atol=1e-5, rtol=0)
        return
    assert out.n_out == row["count"]
    settled = settled_picks(key(z, i, "gains"), picks)
    kept_groups = np.unique(merge_groups[groups >= 0])
    if row["kind"] == "ties" and not set(settled.tolist()) <= set(kept_groups.tolist()):
        # uniform attention: every group has the same quality and the merged duplicates the same cosines, so the
        # released float32 loop decides between equal gains by rounding; only the count is comparable
        assert np.array_equal(groups >= 0, np.isin(merge_groups, kept_groups))
        return
    assert set(settled.tolist()) <= set(kept_groups.tolist())
    assert same_partition(groups, np.where(groups >= 0, merge_groups, -1))
    if settled.size == picks.size:  # the released selection never ran out of rank
        assert np.array_equal(kept_groups, np.sort(picks))
        expected = torch.from_numpy(key(z, i, "tokens"))
        rows_kept = torch.from_numpy(key(z, i, "token_rows").astype(np.int64))
        assert torch.allclose(out.tokens[rows_kept], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ CDPruner
@pytest.mark.parametrize("row, z", cases("cdpruner"))
def test_cdpruner_picks(row, z):
    i = index_of("cdpruner", row)
    x = inputs(row)
    q = torch.from_numpy(np.random.default_rng(row["seed"] + 2).standard_normal((3, row["d"])).astype(np.float32))
    out = cdpruner(x, q, row["K"])
    kept = np.flatnonzero(out.groups.numpy() >= 0)
    assert kept.size == row["count"]
    settled = settled_picks(key(z, i, "gains"), key(z, i, "picks"))
    assert set(settled.tolist()) <= set(kept.tolist())
    if settled.size == row["count"]:
        assert np.array_equal(kept, np.sort(settled))


# ------------------------------------------------------------------------------------------ VisionZip
@pytest.mark.parametrize("row, z", cases("visionzip"))
def test_visionzip_groups_and_values(row, z):
    i = index_of("visionzip", row)
    x = inputs(row)
    keys = torch.from_numpy(make_x(row["kind"], row["T"], row["d"], row["seed"] + 5))
    s = torch.from_numpy(make_scores(row["kind"], row["T"], row["seed"]))
    out = visionzip(x, s, row["K"], features=keys)
    expected_groups = key(z, i, "groups")
    groups = out.groups.numpy()
    assert out.n_out == row["dominant"] + row["contextual"]
    if row["kind"] == "ties" and not same_partition(groups, expected_groups):
        # equal scores: torch.topk picks among them as it likes, the project the earlier ones; the released
        # dominant tokens carry the top-D scores all the same (what follows depends on which were taken)
        D = row["dominant"]
        released_dominant = np.flatnonzero((expected_groups >= 0) & (expected_groups < D))
        assert np.array_equal(np.sort(s.numpy()[released_dominant]), np.sort(s.numpy())[-D:])
        return
    assert same_partition(groups, expected_groups)
    # released rows are labelled by expected_groups; ours by groups: compare through the shared partition
    mapping = dict(zip(expected_groups[groups >= 0].tolist(), groups[groups >= 0].tolist()))
    expected = torch.from_numpy(key(z, i, "tokens"))
    order = torch.tensor([mapping[j] for j in range(expected.shape[0])])
    assert torch.allclose(out.tokens[order], expected, atol=1e-5, rtol=0)
    # outputs in the order of each group's first member, which is its position
    firsts = [int(np.flatnonzero(groups == g)[0]) for g in range(out.n_out)]
    assert out.positions.tolist() == firsts == sorted(firsts)


# ------------------------------------------------------------------------------------------ SA-MAP's merge step alone
@pytest.mark.parametrize("row, z", cases("samp")[::5])
def test_group_merge_is_samps_released_merge_step(row, z):
    """group_merge (plain means) groups exactly as SA-MAP's merge loop does at tau = 0.85."""
    from speech_redundancy.compress import group_merge

    i = index_of("samp", row)
    out = group_merge(inputs(row), 0.85)
    assert same_partition(out.groups.numpy(), key(z, i, "groups"))

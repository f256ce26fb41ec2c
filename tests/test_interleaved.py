"""Non-contiguous groups (issue 19 item 3): the index-map contract admits any partition, and the engine, the word
windows of later points, batching, positions, KV pooling and group plots take it.

The operator here is a test-only one (registered for this module): in every block of four tokens a, b, c, d it
joins a with c and b with d (two interleaved groups), drops b in every third block, and averages the members. The
references are plain: pre-pooled embeddings through the stock model, or the stock decoder layers run by hand on the
pooled sequence with a causal mask written here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speech_redundancy import compress as ops
from speech_redundancy.compress import Operator, Point
from speech_redundancy.compress.core import check_index_map
from speech_redundancy.data.records import Utterance, Word
from speech_redundancy.engine import compression
from speech_redundancy.models import qwen2audio as q
from speech_redundancy.models.base import Request

NEW = 3


def interleaved_labels(T: int) -> list[int]:
    """Output index per token: blocks of four a, b, c, d -> {a, c}, {b, d}; b dropped in every third block."""
    raw = []
    for t in range(T):
        block, r = divmod(t, 4)
        raw.append(-1 if (block % 3 == 2 and r == 1) else 2 * block + r % 2)
    ids: dict[int, int] = {}
    return [-1 if v < 0 else ids.setdefault(v, len(ids)) for v in raw]


def plain_pool(x: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Mean of each group's members (in float64), output tokens ordered by first member; first members."""
    n = max(labels) + 1
    members = [[t for t, g in enumerate(labels) if g == k] for k in range(n)]
    tokens = torch.stack([x[m].double().mean(0) for m in members]).to(x.dtype)
    return tokens, [m[0] for m in members]


def interleave(x, *, features=None):
    return ops.pool_groups(x, torch.tensor(interleaved_labels(x.shape[0])))


@pytest.fixture(scope="module", autouse=True)
def registered():
    ops.OPERATORS["interleave"] = Operator(interleave, inputs=("features",), summary="test only")
    yield
    del ops.OPERATORS["interleave"]


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    return tiny_qwen


def _request(uid: str, seconds: float, seed: int) -> Request:
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    words = [Word(f"w{i}", 0.1 + 0.5 * i, 0.5 + 0.5 * i) for i in range(int(seconds / 0.5) - 1)]
    return Request(utt=Utterance(id=uid, audio=f"{uid}.wav", text="x", duration=seconds, words=words), audio=audio,
                   seed=ops.seed_for(0, uid))


@pytest.fixture(scope="module")
def requests_():
    return [_request("a", 1.6, 1), _request("b", 2.4, 2)]


def _generate(model, batch, points, **kw):
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    with torch.inference_mode(), compression(model, points, q.reach(model), **kw) as session:
        out = model.generate(**batch, **args)
    return out.sequences, torch.stack(out.logits, 1), session


# ----------------------------------------------------------------------------- the contract
def test_pool_groups_takes_interleaved_groups():
    torch.manual_seed(0)
    x = torch.randn(23, 5)
    labels = interleaved_labels(23)
    c = ops.pool_groups(x, torch.tensor(labels))
    tokens, first = plain_pool(x, labels)
    assert c.positions.tolist() == first and c.groups.tolist() == labels
    assert torch.allclose(c.tokens, tokens, atol=1e-6, rtol=0)
    singles = [k for k in range(c.n_out) if labels.count(k) == 1]
    assert singles and all(torch.equal(c.tokens[k], x[first[k]]) for k in singles)  # exact copies
    check_index_map(c, 23)
    w = torch.rand(23)
    cw = ops.pool_weighted(x, torch.tensor(labels), w)
    for k in range(c.n_out):
        m = [t for t, g in enumerate(labels) if g == k]
        assert torch.allclose(cw.tokens[k], (x[m] * w[m, None]).sum(0) / w[m].sum(), atol=1e-5)


def test_index_map_contract_is_checked():
    x = torch.randn(4, 2)
    good = ops.Compressed(x[:2], torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1]))
    check_index_map(good, 4)
    with pytest.raises(ValueError, match="first member"):  # ids must appear in order 0, 1, ...
        check_index_map(ops.Compressed(x[:2], torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1])), 4)
    with pytest.raises(ValueError, match="first member"):  # positions must be the first members
        check_index_map(ops.Compressed(x[:2], torch.tensor([0, 1, 0, 1]), torch.tensor([2, 3])), 4)
    with pytest.raises(ValueError, match="3 output tokens but there are 2"):
        check_index_map(ops.Compressed(x[:2], torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2])), 4)
    bad = Operator(lambda x, **_: ops.Compressed(x[:2], torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1])))
    ops.OPERATORS["bad_map"] = bad
    try:
        with pytest.raises(ValueError, match="first member"):  # the step refuses it before anything uses it
            ops.compress_step(x, Point(0, "bad_map"), ops.SpanState.start(4))
    finally:
        del ops.OPERATORS["bad_map"]


def test_compress_batch_with_interleaved_groups():
    torch.manual_seed(1)
    x = torch.randn(2, 11, 3)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False
    out = ops.compress_batch(x, mask, "interleave")
    for b in range(2):
        one = ops.compress(x[b][mask[b]], "interleave")
        n = one.n_out
        assert torch.equal(out.tokens[b, :n], one.tokens) and torch.equal(out.positions[b, :n], one.positions)
        assert torch.equal(out.groups[b][mask[b]], one.groups)


# ----------------------------------------------------------------------------- the engine
def _plain_tail(model, h: torch.Tensor, pos: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of the stock decoder layers start.. run by hand on h [1, T, d] at positions pos [1, T]."""
    lm = model.model.language_model
    T = h.shape[1]
    mask = torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None]
    cos_sin = lm.rotary_emb(h, pos)
    for layer in lm.layers[start:]:
        h = layer(h, attention_mask=mask, position_embeddings=cos_sin)
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("positions", ["first", "centroid", "renumber"])
def test_interleaved_point_equals_plain_recomputation(tiny, requests_, layer, positions):
    """The audio span entering layer l pooled by hand (interleaved groups, a dropped token), each output token at
    its first member's place and position policy, through the stock layers l.. by hand."""
    model = tiny["sdpa"].model
    batch = tiny["sdpa"].inputs(requests_[:1])
    with torch.inference_mode():
        x = model(**batch, output_hidden_states=True).hidden_states[layer][0]
        audio = batch["input_ids"][0] == model.config.audio_token_id
        idx = audio.nonzero().squeeze(1)
        s, e = int(idx[0]), int(idx[-1]) + 1
        labels = interleaved_labels(e - s)
        tokens, first = plain_pool(x[s:e], labels)
        n = len(first)
        members = [[t for t, g in enumerate(labels) if g == k] for k in range(n)]
        audio_pos = {"first": [s + f for f in first], "centroid": [s + sum(m) / len(m) for m in members],
                     "renumber": [s + k for k in range(n)]}[positions]
        tail = list(range(e, x.shape[0]))
        if positions == "renumber":
            tail = [t - (e - s - n) for t in tail]
        pos = torch.tensor([list(range(s)) + audio_pos + tail], dtype=torch.float32 if positions == "centroid"
                           else torch.long)
        ref = _plain_tail(model, torch.cat([x[:s], tokens, x[e:]])[None], pos, layer)[0, -1]
        with compression(model, [Point(layer, "interleave")], q.reach(model), positions=positions) as session:
            got = model(**batch, use_cache=False).logits[0, -1]
    assert list(session.records[0].groups[0]) == labels
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()


def _points():  # built inside the tests: the operator is registered for this module only
    return [Point(0, "interleave"), Point(2, "interleave")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_interleaved_batch_equals_one_by_one(tiny, requests_, attn):
    adapter = tiny[attn]
    batch = adapter.inputs(requests_)
    assert (batch["attention_mask"] == 0).any()
    seq, logits, session = _generate(adapter.model, batch, _points(), pool_early_kv=True)
    T = batch["input_ids"].shape[1]
    for b, req in enumerate(requests_):
        one = adapter.inputs([req])
        s1, l1, single = _generate(adapter.model, one, _points(), pool_early_kv=True)
        assert torch.equal(seq[b, T:], s1[0, one["input_ids"].shape[1]:])
        assert torch.allclose(logits[b], l1[0], atol=1e-4, rtol=0)
        assert single.records[0].groups == session.records[b].groups
        assert single.records[0].kv_tokens == session.records[b].kv_tokens


@pytest.mark.parametrize("positions,pool", [("first", False), ("centroid", False), ("renumber", False),
                                            ("first", True)])
def test_interleaved_cached_generation_equals_recomputation(tiny, requests_, positions, pool):
    """Decode steps after interleaved points against recomputing the padded batch without a cache (pooled early KV:
    against the same run, whose cache is the only thing pooling changes, so only the layout is checked there)."""
    model = tiny["eager"].model
    batch = tiny["eager"].inputs(requests_)
    seq, logits, session = _generate(model, batch, _points(), positions=positions, pool_early_kv=pool)
    assert all(r.tokens_out < r.tokens_in for r in session.records)
    if pool:
        assert all(len(set(r.kv_tokens)) == 1 for r in session.records)  # every layer holds the shortest layout
        return
    T = batch["input_ids"].shape[1]
    with torch.inference_mode(), compression(model, _points(), q.reach(model), positions=positions):
        for k in range(logits.shape[1]):
            mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, T:T + k])], 1)
            pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
            full = model(**{**batch, "input_ids": seq[:, :T + k], "attention_mask": mask, "position_ids": pos},
                         use_cache=False).logits[:, -1]
            assert torch.allclose(full, logits[:, k], atol=2e-5, rtol=0), (k, (full - logits[:, k]).abs().max())


def test_word_windows_follow_interleaved_merges(tiny, requests_):
    """After an interleaved point at l = 0, uniform_merge with R = 1 at l = 2 joins, per word, the current tokens
    whose first original member lies in that word (gaps kept token by token)."""
    adapter = tiny["sdpa"]
    req = requests_[1]
    out = adapter.generate([req], [Point(0, "interleave"), Point(2, "uniform_merge", {"budget": 1, "gaps": "keep"})],
                           2)[0]
    labels = interleaved_labels(out.tokens_in)
    assert out.groups[0] == labels
    first = [labels.index(k) for k in range(max(labels) + 1)]  # each current token's first original member
    words = [(int(np.floor(w.start * 25)), int(np.ceil(w.end * 25))) for w in req.utt.words]
    keys = []  # per current token: the word its first member lies in, else a gap of its own
    for c, f in enumerate(first):
        inside = [i for i, (s, e) in enumerate(words) if s <= f < e]
        keys.append(("word", inside[0]) if inside else ("gap", c))
    expected = [0]
    for c in range(1, len(keys)):
        expected.append(expected[-1] + (keys[c] != keys[c - 1]))
    assert out.groups[1] == expected
    assert out.tokens_per_point[1] < out.tokens_per_point[0]


def test_group_plot_draws_interleaved_groups(tmp_path):
    from speech_redundancy import figures

    labels = interleaved_labels(40)
    strips = [{"layer": 0, "groups": labels, "hypothesis": "a b"},
              {"layer": 2, "groups": list(range(40)), "hypothesis": "a b"}]
    paths = figures.group_strips(strips, [(0, 12), (14, 40)], tmp_path / "groups", words=["a", "b"])
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)
    colours = figures.group_colours(np.asarray(labels))
    assert (colours[0] == colours[2]).all() and (colours[1] == colours[3]).all()  # members of a group alike
    assert not (colours[0] == colours[1]).all()
    dropped = labels.index(-1)
    assert (colours[dropped] == figures.DROPPED_COLOUR).all()


def test_kimi_batch_equals_one_by_one_with_interleaved_and_after_attention_points(tmp_path_factory):
    """The tiny Kimi-Audio (its own decoding loop, stock Qwen2 layers): interleaved groups at l = 0, after the
    attention of layer 1 and at l = 3, batched as one by one."""
    from speech_redundancy.models import kimi
    from speech_redundancy.models import kimi_checkpoint as ckpt

    root = tmp_path_factory.mktemp("kimi")
    ckpt_dir, tok_dir = ckpt.write_tiny(root / "tiny-kimiaudio", root / "tiny-glm4-voice-tokenizer")
    model = kimi.load({"family": "kimi", "name": "tiny-kimiaudio", "path": str(ckpt_dir),
                       "speech_tokenizer": str(tok_dir), "dtype": "float32", "device": "cpu", "n_layers": 4})
    points = [Point(0, "interleave"), Point(1, "interleave", stage="after_attention"), Point(3, "interleave")]
    reqs = [_request("k0", 0.9, 3), _request("k1", 2.4, 4)]
    model.batch_size = 2
    many = model.generate(reqs, points, NEW)
    model.batch_size = 1
    for req, got in zip(reqs, many):
        (one,) = model.generate([req], points, NEW)
        assert got.text == one.text
        assert (got.groups, got.tokens_per_point) == (one.groups, one.tokens_per_point)
        assert got.stats["layer_tokens"] == one.stats["layer_tokens"]
        assert got.groups[0] == interleaved_labels(got.tokens_in)
        n = got.stats["layer_tokens"]  # layers 0 and 1 after the first point, 2 after layer 1's attention, 3 after l=3
        assert n[0] == n[1] > n[2] > n[3]

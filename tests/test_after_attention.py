"""Where a method acts (issue 19 item 4): points after the attention of decoder layer l (FastAdaSP's place), the
attention each token received from all queries and heads as a score source, and features=keys from the layer's own
keys there. Tiny random Qwen2-Audio, CPU.

The references run the stock decoder layer's parts by hand (input norm, attention, residual, post-attention norm,
MLP) with a causal mask and RoPE written here, and read attention from ``output_attentions``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speech_redundancy import compress as ops
from speech_redundancy import engine
from speech_redundancy.compress import Operator, Point
from speech_redundancy.data.records import Utterance
from speech_redundancy.engine import CompressionError, compression
from speech_redundancy.models import qwen2audio as q
from speech_redundancy.models.base import Request

NEW = 3
SEEN: list[dict] = []  # what the test operator received, one entry per call


def labels_for(T: int) -> list[int]:
    """Pairs (2k, 2k+1) joined, every fifth token dropped, the rest alone; numbered by first member."""
    raw = [-1 if t % 5 == 4 else (t // 2 if t % 3 else 1000 + t) for t in range(T)]
    ids: dict[int, int] = {}
    return [-1 if v < 0 else ids.setdefault(v, len(ids)) for v in raw]


def spy(x, *, features=None, scores=None):
    SEEN.append({"x": x.clone(), "features": None if features is None else features.clone(),
                 "scores": None if scores is None else scores.clone()})
    return ops.pool_groups(x, torch.tensor(labels_for(x.shape[0])))


@pytest.fixture(scope="module", autouse=True)
def registered():
    ops.OPERATORS["spy"] = Operator(spy, inputs=("features", "scores"), summary="test only")
    ops.OPERATORS["spy_plain"] = Operator(spy, inputs=("features",), summary="test only")
    ops.OPERATORS["spy_late"] = Operator(spy, inputs=("features",), summary="test only", stage="after_attention")
    yield
    for name in ("spy", "spy_plain", "spy_late"):
        del ops.OPERATORS[name]


@pytest.fixture(autouse=True)
def clear_seen():
    SEEN.clear()


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    return tiny_qwen


def _request(uid: str, seconds: float, seed: int) -> Request:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)
    return Request(utt=Utterance(id=uid, audio=f"{uid}.wav", text="x", duration=seconds), audio=audio,
                   seed=ops.seed_for(0, uid))


@pytest.fixture(scope="module")
def requests_():
    return [_request("a", 1.6, 1), _request("b", 2.4, 2)]


# ----------------------------------------------------------------------------- the point
def test_point_stage_and_scores_are_validated_once():
    p = Point(1, "fastadasp", {"ratio": 0.8})
    assert p.stage == "input" and p.scores == "last_query" and p.acts_at == 1
    assert "stage" not in p.as_dict()  # run fingerprints of input points unchanged
    late = Point(1, "fastadasp", {"ratio": 0.8, "scores": "received", "features": "keys"}, stage="after_attention")
    assert late.after_attention and late.acts_at == 2 and late.as_dict()["stage"] == "after_attention"
    assert late.operator_params() == {"ratio": 0.8}
    assert Point(0, "spy_late").stage == "after_attention"  # the operator's default stage
    assert Point(0, "spy_late", stage="input").stage == "input"
    parsed = Point.parse({"layer": 3, "operator": "fastadasp", "stage": "after_attention",
                          "params": {"ratio": 0.9, "scores": "received", "threshold": 0.5, "window": None}})
    assert parsed.stage == "after_attention" and parsed.params == {"ratio": 0.9, "scores": "received"}
    assert Point.parse({"layer": 3, "operator": "affinity", "params": {"threshold": 0.5, "window": 1,
                                                                       "scores": "received"}}).params == \
        {"threshold": 0.5, "window": 1}  # a shared key the operator does not take is left out
    with pytest.raises(ValueError, match="stage='middle' is not allowed"):
        Point(1, "fastadasp", {"ratio": 0.8}, stage="middle")
    with pytest.raises(ValueError, match="unknown scores source 'first_query'"):
        Point(1, "fastadasp", {"ratio": 0.8, "scores": "first_query"})
    with pytest.raises(ValueError, match="unexpected parameter"):
        Point(1, "affinity", {"threshold": 0.5, "window": 1, "scores": "received"})
    assert [p.stage for p in ops.schedule("fastadasp", 1, 3, 0.9, params={"features": "keys"},
                                          stage="after_attention")] == ["after_attention"] * 2


def _no_compute(model):
    def boom(*_):
        raise AssertionError("forward ran")
    return model.register_forward_pre_hook(boom)


def test_refusals_before_compute(tiny, requests_):
    adapter = tiny["sdpa"]
    h = _no_compute(adapter.model)
    try:
        for point in [Point(1, "spy", {"scores": "received"}, stage="after_attention"),
                      Point(2, "spy", {"scores": "received"})]:
            with pytest.raises(ValueError, match="model.attn_implementation=eager"):
                adapter.generate(requests_[:1], [point], 2)
        with pytest.raises(ValueError, match="no decoder layer follows the last one"):
            adapter.generate(requests_[:1], [Point(3, "spy_plain", stage="after_attention")], 2)
        with pytest.raises(ValueError, match="distinct and increasing"):
            adapter.generate(requests_[:1], [Point(1, "spy_plain", stage="after_attention"), Point(1, "spy_plain")], 2)
    finally:
        h.remove()


# ----------------------------------------------------------------------------- the reference, by hand
def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, heads, T, hd] with cos/sin [B, T, hd]: t cos + rotate_half(t) sin."""
    half = t.shape[-1] // 2
    rot = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos[:, None] + rot * sin[:, None]


def _causal(T: int, dtype) -> torch.Tensor:
    return torch.full((T, T), torch.finfo(dtype).min).triu(1)[None, None]


def _reference(model, batch, l: int, mode: str):
    """Logits of the last position with layer l's post-attention audio states pooled by ``labels_for`` (each output
    token at its first member's position), plus the features and received scores the operator must see."""
    lm = model.model.language_model
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        x = out.hidden_states[l][0:1]  # input of layer l
        T = x.shape[1]
        audio = (batch["input_ids"][0] == model.config.audio_token_id).nonzero().squeeze(1)
        s, e = int(audio[0]), int(audio[-1]) + 1
        layer = lm.layers[l]
        pos = torch.arange(T)[None]
        cos, sin = lm.rotary_emb(x, pos)
        normed = layer.input_layernorm(x)
        attn, weights = layer.self_attn(normed, position_embeddings=(cos, sin), attention_mask=_causal(T, x.dtype))
        h = x + attn
        att = out.attentions[l][0]  # the stock forward's own weights at layer l [H, T, T]
        assert torch.allclose(att, weights[0], atol=1e-6)
        received = att.sum(0).sum(0)[s:e]  # from every query and head
        keys = layer.self_attn.k_proj(normed).view(1, T, -1, layer.self_attn.head_dim).transpose(1, 2)
        keys = _rotate(keys, cos, sin).transpose(1, 2).reshape(1, T, -1)[0, s:e]
        feats = {"hidden": h[0, s:e], "normed": layer.post_attention_layernorm(h)[0, s:e], "keys": keys}[mode]
        labels = labels_for(e - s)
        n = max(labels) + 1
        members = [[t for t, g in enumerate(labels) if g == k] for k in range(n)]
        pooled = torch.stack([h[0, s:e][m].double().mean(0) for m in members]).float()
        seq = torch.cat([h[0, :s], pooled, h[0, e:]])[None]
        seq = seq + layer.mlp(layer.post_attention_layernorm(seq))  # layer l's MLP on the merged sequence
        kept_pos = torch.tensor([list(range(s)) + [s + m[0] for m in members] + list(range(e, T))])
        cs = lm.rotary_emb(seq, kept_pos)
        for later in lm.layers[l + 1:]:
            seq = later(seq, attention_mask=_causal(seq.shape[1], seq.dtype), position_embeddings=cs)
        logits = model.lm_head(lm.norm(seq))[0, -1]
    return logits, feats, received, labels, h[0, s:e]


@pytest.mark.parametrize("l,mode", [(0, "keys"), (1, "hidden"), (1, "normed"), (1, "keys"), (2, "keys")])
def test_after_attention_point_equals_plain_recomputation(tiny, requests_, l, mode):
    model = tiny["eager"].model
    batch = tiny["eager"].inputs(requests_[:1])
    ref, feats, received, labels, states = _reference(model, batch, l, mode)
    point = Point(l, "spy", {"features": mode, "scores": "received"}, stage="after_attention")
    with torch.inference_mode(), compression(model, [point], q.reach(model)) as session:
        got = model(**batch, use_cache=False).logits[0, -1]
    (seen,) = SEEN
    assert torch.allclose(seen["x"], states, atol=1e-5, rtol=0)  # the post-attention states
    assert torch.allclose(seen["x"] if seen["features"] is None else seen["features"], feats, atol=1e-5, rtol=0)
    assert torch.allclose(seen["scores"], received, atol=1e-5, rtol=1e-6)
    assert list(session.records[0].groups[0]) == labels
    rec = session.records[0]
    T = batch["input_ids"].shape[1]
    short = T - rec.tokens_in + rec.tokens_out
    assert list(rec.layer_tokens) == [T] * (l + 1) + [short] * (3 - l)  # layer l's input and cache are whole
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()


@pytest.mark.parametrize("source", ["last_query", "received"])
def test_scores_at_an_input_point_come_from_layer_l_minus_1(tiny, requests_, source):
    """An input point at layer 2 reads layer 1's attention: the last query's (mean over heads) or that received
    from every query and head. In a padded batch, padding rows are left out (each sample's scores as alone)."""
    adapter = tiny["eager"]
    point = Point(2, "spy", {"scores": source})
    batch = adapter.inputs(requests_)
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode(), compression(adapter.model, [point], q.reach(adapter.model)):
        adapter.model(**batch, use_cache=False)
    batched = [s["scores"] for s in SEEN]
    for b, req in enumerate(requests_):
        one = adapter.inputs([req])
        with torch.inference_mode():
            att = adapter.model(**one, output_attentions=True).attentions[1][0]  # layer 1, [H, T, T]
        audio = one["input_ids"][0] == adapter.model.config.audio_token_id
        ref = att[:, -1, :].mean(0) if source == "last_query" else att.sum(0).sum(0)
        assert torch.allclose(batched[b], ref[audio], atol=1e-5, rtol=1e-5)


def test_no_merge_after_attention_is_bit_identical(tiny, requests_):
    model = tiny["eager"].model
    batch = tiny["eager"].inputs(requests_)
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(**batch, **args)
        with compression(model, [Point(1, "none", stage="after_attention")], q.reach(model)):
            got = model.generate(**batch, **args)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(torch.stack(got.logits), torch.stack(ref.logits))


def _generate(model, batch, points, **kw):
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    with torch.inference_mode(), compression(model, points, q.reach(model), **kw) as session:
        out = model.generate(**batch, **args)
    return out.sequences, torch.stack(out.logits, 1), session


def _late_points(merge: str = "fastadasp"):
    """Input and after-attention points at layers 0, 0, 1, 2; ``merge="spy"``: groups that do not depend on the
    scores (recomputing a prefix with one more query changes the attention received, so FastAdaSP's weights)."""
    second = Point(0, "spy", {"scores": "received"}, stage="after_attention") if merge == "spy" else \
        Point(0, "fastadasp", {"ratio": 0.8, "features": "keys", "scores": "received"}, stage="after_attention")
    return [Point(0, "spy_plain"), second, Point(1, "spy_plain"),
            Point(2, "spy", {"scores": "received"}, stage="after_attention")]


@pytest.mark.parametrize("positions", ["first", "renumber"])
def test_after_attention_cached_generation_equals_recomputation(tiny, requests_, positions):
    model = tiny["eager"].model
    batch = tiny["eager"].inputs(requests_)
    points = _late_points("spy")
    seq, logits, session = _generate(model, batch, points, positions=positions)
    assert all(len(r.tokens_per_point) == 4 and r.tokens_out < r.tokens_in for r in session.records)
    T = batch["input_ids"].shape[1]
    with torch.inference_mode(), compression(model, points, q.reach(model), positions=positions):
        for k in range(logits.shape[1]):
            mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, T:T + k])], 1)
            pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
            full = model(**{**batch, "input_ids": seq[:, :T + k], "attention_mask": mask, "position_ids": pos},
                         use_cache=False).logits[:, -1]
            assert torch.allclose(full, logits[:, k], atol=2e-5, rtol=0), (k, (full - logits[:, k]).abs().max())


@pytest.mark.parametrize("pool_early_kv", [False, True])
def test_after_attention_batch_equals_one_by_one(tiny, requests_, pool_early_kv):
    adapter = tiny["eager"]
    points = _late_points()
    batch = adapter.inputs(requests_)
    seq, logits, session = _generate(adapter.model, batch, points, pool_early_kv=pool_early_kv)
    T = batch["input_ids"].shape[1]
    for b, req in enumerate(requests_):
        one = adapter.inputs([req])
        s1, l1, single = _generate(adapter.model, one, points, pool_early_kv=pool_early_kv)
        assert torch.equal(seq[b, T:], s1[0, one["input_ids"].shape[1]:])
        assert torch.allclose(logits[b], l1[0], atol=1e-4, rtol=0)
        got, want = session.records[b], single.records[0]
        assert (got.groups, got.layer_tokens, got.kv_tokens) == (want.groups, want.layer_tokens, want.kv_tokens)
    rec = session.records[0]
    n = [rec.tokens_in, *rec.tokens_per_point]
    text = rec.layer_tokens[0] - n[1]
    # layer 0: its input whole (the after-attention point at 0 shortens layer 1's); layer 1's input point; layer 3
    assert list(rec.layer_tokens) == [text + n[1], text + n[3], text + n[3], text + n[4]]
    kv = [text + n[1], text + n[3], text + n[3], text + n[4]]
    assert list(rec.kv_tokens) == ([text + n[4]] * 4 if pool_early_kv else kv)


def test_kv_cache_after_attention(tiny, requests_):
    """Layer l's cache keeps every token (its attention ran before the merge); layers > l the merged ones."""
    model = tiny["eager"].model
    batch = tiny["eager"].inputs(requests_[:1])
    with torch.inference_mode(), compression(model, [Point(1, "spy_plain", stage="after_attention")],
                                             q.reach(model)) as s:
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    rec = s.records[0]
    T = batch["input_ids"].shape[1]
    cache = getattr(out, "past_key_values", None) or out.cache
    got = [layer.keys.shape[-2] for layer in cache.layers]
    short = T - rec.tokens_in + rec.tokens_out
    assert got == [T + 1, T + 1, short + 1, short + 1] and list(rec.kv_tokens) == [T, T, short, short]


def test_presets_reach_the_points():
    """``stage`` and ``scores`` from the command line reach every point of a FastAdaSP schedule and a peer point."""
    from conftest import compose

    from speech_redundancy.runner import build_points

    points = build_points(compose(["model=tiny_qwen2audio", "intervention=fastadasp_schedule", "layer=1",
                                   "schedule_stop=3", "stage=after_attention", "scores=received"]))
    assert [(p.layer, p.stage, p.scores, p.features) for p in points] == \
        [(1, "after_attention", "received", "keys"), (2, "after_attention", "received", "keys")]
    (peer,) = build_points(compose(["model=tiny_qwen2audio", "intervention=peer", "operator=attention_prune",
                                    "ratio=0.5", "layer=2", "scores=received"]))
    assert (peer.stage, peer.scores) == ("input", "received")
    (plain,) = build_points(compose(["model=tiny_qwen2audio", "intervention=peer", "operator=adjacent_merge",
                                     "ratio=0.5", "layer=2"]))
    assert plain.as_dict() == {"layer": 2, "operator": "adjacent_merge", "params": {"ratio": 0.5, "features": "hidden"}}


def test_whisper_refuses_what_its_encoder_cannot_do():
    from types import SimpleNamespace

    from speech_redundancy.models.whisper import WhisperModel

    fake = SimpleNamespace(n_layers=4, name="whisper-tiny", attn_implementation="eager")
    with pytest.raises(ValueError, match="stage=after_attention"):
        WhisperModel.check_points(fake, [Point(1, "spy_plain", stage="after_attention")])
    with pytest.raises(ValueError, match="scores=last_query"):
        WhisperModel.check_points(fake, [Point(1, "attention_prune", {"ratio": 0.5, "scores": "last_query"})])
    WhisperModel.check_points(fake, [Point(1, "attention_prune", {"ratio": 0.5, "scores": "received"})])

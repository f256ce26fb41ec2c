"""The LSLM compression engine on stock transformers models (tiny random weights, CPU).

Exactness first: with nothing compressed the hooked model must give torch.equal logits and tokens to the stock one;
compression at l=0 must equal the stock model run on pre-pooled embeddings; cached decoding must equal recomputing
every step without a cache under the same hooks; a padded batch must give the tokens of one-by-one runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speech_redundancy import compress as ops
from speech_redundancy import efficiency as eff
from speech_redundancy.data.records import Utterance, Word
from speech_redundancy.engine import CompressionError, audio_hidden_states, compression
from speech_redundancy.models import qwen2audio as q
from speech_redundancy.compress import Point
from speech_redundancy.models.base import Request

NEW = 4  # generated tokens per check (EOS suppressed until then)

NO_MERGE = [Point(0, "affinity", {"threshold": 1.5, "window": 1}), Point(2, "affinity", {"threshold": 1.5, "window": 3})]
DAP = [Point(0, "affinity", {"threshold": 0.5, "window": 1}), Point(2, "affinity", {"threshold": 0.3, "window": 3})]


def _request(uid: str, seconds: float, seed: int) -> Request:
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    words = [Word(f"w{i}", 0.1 + 0.5 * i, 0.5 + 0.5 * i) for i in range(int(seconds / 0.5) - 1)]
    utt = Utterance(id=uid, audio=f"{uid}.wav", text="x", duration=seconds, words=words)
    return Request(utt=utt, audio=audio, seed=ops.seed_for(0, uid))


@pytest.fixture(scope="session")
def tiny(tiny_qwen):
    """attn implementation -> adapter over one random tiny Qwen2-Audio (conftest.tiny_qwen)."""
    return tiny_qwen


@pytest.fixture(scope="session")
def requests_():
    return [_request("a", 2.0, 1), _request("b", 3.2, 2)]


@pytest.fixture(scope="session")
def batches(tiny, requests_):
    return {"one": tiny["sdpa"].inputs(requests_[1:]), "two": tiny["sdpa"].inputs(requests_)}


@pytest.fixture(scope="session")
def stock(tiny, batches):
    """(attn, batch name) -> stock (sequences, logits), computed once."""
    memo = {}

    def get(attn, name):
        if (attn, name) not in memo:
            memo[attn, name] = _generate(tiny[attn].model, batches[name])[:2]
        return memo[attn, name]

    return get


def _generate(model, batch, points=None, gen=None, **kw):
    """Greedy generate (extra generate keywords in ``gen``); returns (sequences, per-step logits, session or None)."""
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True, **(gen or {}))
    with torch.inference_mode():
        if points is None:
            out = model.generate(**batch, **args)
            return out.sequences, torch.stack(out.logits, 1), None
        with compression(model, points, q.reach(model), **kw) as session:
            out = model.generate(**batch, **args)
    return out.sequences, torch.stack(out.logits, 1), session


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("points", [[], [Point(1, "none")], NO_MERGE], ids=["observe", "none@1", "tau>1@0,2"])
def test_no_compression_is_bit_identical(tiny, batches, stock, attn, points):
    model = tiny[attn].model
    for name, batch in batches.items():
        ref_seq, ref_logits = stock(attn, name)
        seq, logits, session = _generate(model, batch, points)
        assert torch.equal(seq, ref_seq)
        assert torch.equal(logits, ref_logits)
        for rec in session.records:
            assert rec.tokens_out == rec.tokens_in


@pytest.mark.parametrize("positions", ["first", "centroid", "renumber"])
def test_no_merge_is_bit_identical_for_every_position_policy_and_pooled_kv(tiny, batches, stock, positions):
    model = tiny["eager"].model
    ref_seq, ref_logits = stock("eager", "two")
    seq, logits, _ = _generate(model, batches["two"], NO_MERGE, positions=positions, pool_early_kv=True)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


def test_hooks_are_removed(tiny, batches):
    model = tiny["sdpa"].model
    with pytest.raises(RuntimeError):
        with compression(model, DAP, q.reach(model)):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- l = 0 equals pre-pooled embeddings
def _spliced_embeddings(model, batch):
    """The stock input of the decoder stack (placeholders replaced by projected audio features)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"]

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.inference_mode():
        model(**batch)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("positions", ["first", "centroid", "renumber"])
def test_layer0_equals_stock_on_prepooled_embeddings(tiny, batches, positions):
    model = tiny["sdpa"].model
    batch = batches["one"]
    x = _spliced_embeddings(model, batch)[0]
    audio = batch["input_ids"][0] == model.config.audio_token_id
    idx = audio.nonzero().squeeze(1)
    s, e = int(idx[0]), int(idx[-1]) + 1
    c = ops.compress(x[s:e], "affinity", threshold=0.5, window=1)
    assert 1 < c.n_out < e - s  # something merged
    pooled = torch.cat([x[:s], c.tokens, x[e:]]).unsqueeze(0)
    T = x.shape[0]
    pos_audio = {
        "first": s + c.positions.float(),
        "centroid": s + torch.zeros(c.n_out).index_add_(0, c.groups, torch.arange(e - s).float())
        / torch.bincount(c.groups, minlength=c.n_out).float(),
        "renumber": s + torch.arange(c.n_out).float(),
    }[positions]
    tail = torch.arange(e, T).float() - (0 if positions != "renumber" else (e - s - c.n_out))
    pos = torch.cat([torch.arange(s).float(), pos_audio, tail]).unsqueeze(0)
    if positions != "centroid":
        pos = pos.long()
    with torch.inference_mode():
        # a 2-D all-ones mask keeps the stock stack from reading gapped ids as packed sequences
        ref = model(inputs_embeds=pooled, position_ids=pos, attention_mask=torch.ones_like(pos, dtype=torch.long),
                    use_cache=False).logits
        with compression(model, [Point(0, "affinity", {"threshold": 0.5, "window": 1})], q.reach(model),
                         positions=positions):
            got = model(**batch, use_cache=False).logits
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    if positions != "centroid":
        assert torch.equal(got, ref)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("mode", ["hidden", "normed", "centered", "keys"])
def test_point_acts_on_hf_hidden_states_of_layer(tiny, batches, layer, mode):
    """Point(l) compresses HF hidden_states[l] (the input of decoder layer l); similarity features come from that
    layer's own input RMSNorm / key projection."""
    model = tiny["sdpa"].model
    batch = batches["one"]
    with torch.inference_mode():
        hs = model(**batch, output_hidden_states=True).hidden_states[layer][0]
        audio = batch["input_ids"][0] == model.config.audio_token_id
        x = hs[audio]
        dec = model.model.language_model.layers[layer]
        feats = {"hidden": x, "normed": dec.input_layernorm(x), "centered": x - x.mean(0, keepdim=True),
                 "keys": dec.self_attn.k_proj(dec.input_layernorm(x))}[mode]
        expected = ops.affinity_groups(x, 0.6, 3, features=feats)
        if mode != "hidden":  # the check tells the feature modes apart
            assert not torch.equal(expected, ops.affinity_groups(x, 0.6, 3))
        with compression(model, [Point(layer, "affinity", {"threshold": 0.6, "window": 3, "features": mode})],
                         q.reach(model)) as s:
            model(**batch)
    assert list(s.records[0].groups[0]) == expected.tolist()


# ----------------------------------------------------------------------------- cache == recompute
@pytest.mark.parametrize("attn,positions", [("sdpa", "first"), ("eager", "first"), ("eager", "centroid"),
                                            ("eager", "renumber")])
def test_cached_generation_equals_recomputation(tiny, batches, attn, positions):
    """Decode steps (masks per layer against its own cache, positions, renumber shifts) against recomputing the
    whole padded batch without a cache under the same hooks."""
    model = tiny[attn].model
    for batch in [batches["two"]]:
        seq, logits, session = _generate(model, batch, DAP, positions=positions)
        assert all(r.tokens_out < r.tokens_in for r in session.records)
        T = batch["input_ids"].shape[1]
        with torch.inference_mode(), compression(model, DAP, q.reach(model), positions=positions):
            for k in range(logits.shape[1]):
                mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, T:T + k])], 1)
                pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)  # as generate builds them
                inputs = {**batch, "input_ids": seq[:, :T + k], "attention_mask": mask, "position_ids": pos}
                full = model(**inputs, use_cache=False).logits[:, -1]
                assert torch.allclose(full, logits[:, k], atol=2e-5, rtol=0), (k, (full - logits[:, k]).abs().max())


@pytest.mark.parametrize("pool_early_kv", [False, True])
def test_kv_lengths_per_layer(tiny, batches, pool_early_kv):
    model = tiny["eager"].model
    batch = batches["one"]
    T = batch["input_ids"].shape[1]
    with torch.inference_mode(), compression(model, DAP, q.reach(model), pool_early_kv=pool_early_kv) as s:
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    rec = s.records[0]
    a0, (a1, a2) = rec.tokens_in, rec.tokens_per_point
    t0, t1, t2 = T, T - a0 + a1, T - a0 + a2
    assert list(rec.layer_tokens) == [t1, t1, t2, t2]
    assert list(rec.kv_tokens) == ([t2] * 4 if pool_early_kv else [t1, t1, t2, t2])
    cache = getattr(out, "past_key_values", None) or out.cache
    n_new = out.sequences.shape[1] - T
    got = [layer.keys.shape[-2] for layer in cache.layers]
    assert got == [n + n_new - 1 for n in rec.kv_tokens]
    assert t0 > t1 > t2


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_equals_one_by_one(tiny, requests_, attn):
    adapter = tiny[attn]
    batch = adapter.inputs(requests_)
    assert (batch["attention_mask"] == 0).any()  # really padded
    seeds = [r.seed for r in requests_]
    seq, logits, session = _generate(adapter.model, batch, DAP, seeds=seeds)
    recs = session.records
    assert all(r.tokens_out < r.tokens_in for r in recs)
    assert recs[0].layer_tokens[0] != recs[1].layer_tokens[0]  # compressed lengths differ: re-padded per point
    T = batch["input_ids"].shape[1]
    for b, req in enumerate(requests_):
        one = adapter.inputs([req])
        s1, l1, s1_session = _generate(adapter.model, one, DAP, seeds=[req.seed])
        assert torch.equal(seq[b, T:], s1[0, one["input_ids"].shape[1]:])
        assert torch.allclose(logits[b], l1[0], atol=1e-4, rtol=0)
        assert s1_session.records[0].tokens_per_point == session.records[b].tokens_per_point
        assert s1_session.records[0].groups == session.records[b].groups


def test_adapter_batch_equals_single_with_oracle_and_random_ops(tiny, requests_):
    adapter = tiny["sdpa"]
    points = [Point(0, "random_drop", {"budget": 3}), Point(2, "uniform_merge", {"budget": 2})]
    adapter.batch_size = 2
    try:
        both = adapter.generate(requests_, points, NEW)
    finally:
        adapter.batch_size = 1
    single = [adapter.generate([r], points, NEW)[0] for r in requests_]
    for a, b in zip(both, single):
        assert a.text == b.text and a.groups == b.groups and a.tokens_per_point == b.tokens_per_point


def test_engine_timing_covers_each_point_and_the_records(tiny, batches):
    """point_seconds: one entry per point of the last prefill, whose sum the samples' records share out exactly;
    engine_seconds holds them and lies inside the prefill's time to first token."""
    _, _, session = _generate(tiny["sdpa"].model, batches["two"], DAP)
    assert sorted(session.point_seconds) == [0, 2] and min(session.point_seconds.values()) > 0
    total = sum(session.point_seconds.values())
    assert math.isclose(sum(r.seconds for r in session.records), total, rel_tol=1e-9)
    assert total <= session.engine_seconds <= session.ttft_seconds
    _, _, observed = _generate(tiny["sdpa"].model, batches["two"], [])
    assert observed.point_seconds == {} and 0 < observed.engine_seconds <= observed.ttft_seconds


# ----------------------------------------------------------------------------- the adapter's outputs
def test_adapter_outputs(tiny, requests_):
    adapter = tiny["sdpa"]
    outs = adapter.generate(requests_, DAP, NEW)
    for req, out in zip(requests_, outs):
        assert out.tokens_in == q.audio_tokens_for(len(req.audio))
        assert len(out.tokens_per_point) == 2 and out.tokens_out == out.tokens_per_point[-1] < out.tokens_in
        assert len(out.groups[0]) == out.tokens_in and len(out.groups[1]) == out.tokens_per_point[0]
        assert max(out.groups[0]) + 1 == out.tokens_per_point[0]
        st = out.stats
        assert "frr" not in st and "retention" not in st  # retention is the row's one field (tokens_out / tokens_in)
        assert st["compress_seconds"] > 0 and st["ttft_seconds"] > 0
        assert st["compress_seconds"] < st["engine_seconds"] < st["ttft_seconds"]  # one sample's share < the batch's
        assert st["peak_memory_bytes"] is None  # CPU
        assert len(st["layer_tokens"]) == adapter.n_layers and st["prefill_flops"] > 0
        assert isinstance(out.text, str)
    vanilla = adapter.generate(requests_[:1], [], NEW)[0]
    assert vanilla.tokens_out == vanilla.tokens_in and vanilla.tokens_per_point == []
    assert vanilla.stats["prefill_flops"] > outs[0].stats["prefill_flops"]


def test_oracle_spans_follow_earlier_merges(tiny, requests_):
    """Word windows are mapped through the first point's groups: uniform_merge with budget 1 at layer 2 leaves
    one token per word window (plus one per gap unit)."""
    adapter = tiny["sdpa"]
    req = requests_[0]
    out = adapter.generate([req], [Point(0, "affinity", {"threshold": 0.5, "window": 1}),
                                   Point(2, "uniform_merge", {"budget": 1, "gaps": "keep"})], 2)[0]
    n_audio = out.tokens_in
    spans = ops.spans_from_words([w.start for w in req.utt.words], [w.end for w in req.utt.words], 25.0, n_audio)
    assert out.tokens_per_point[1] < out.tokens_per_point[0]
    assert out.tokens_per_point[1] >= len(spans) - 1


# ----------------------------------------------------------------------------- degenerate outputs, long audio
class _Force:
    """A logits processor that forces ``token`` at the given generated steps (0-based), as a model stuck in a
    degenerate loop would emit it."""

    def __init__(self, token: int, steps: set[int], prompt_len: int):
        self.token, self.steps, self.prompt_len = token, steps, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len in self.steps:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0.0
        return scores


@pytest.mark.parametrize("name", ["one", "two"])
def test_decode_step_feeding_back_the_audio_placeholder_is_a_decode(tiny, batches, requests_, name):
    """A decode step whose one new token is <|AUDIO|> (a degenerate output fed back) is a decode step: one prefill,
    records as without it, and a batch still equals its samples one by one."""
    from transformers import LogitsProcessorList

    adapter = tiny["sdpa"]
    model, batch = adapter.model, batches[name]
    audio_id = model.config.audio_token_id
    T = batch["input_ids"].shape[1]
    force = LogitsProcessorList([_Force(audio_id, {1, 3}, T)])
    seq, _, session = _generate(model, batch, DAP, gen={"logits_processor": force})
    _, _, plain = _generate(model, batch, DAP)
    assert session.prefills == 1
    assert (seq[:, T + 1] == audio_id).all() and (seq[:, T + 3] == audio_id).all()
    for got, want in zip(session.records, plain.records):
        assert (got.tokens_in, got.tokens_per_point, got.groups) == (want.tokens_in, want.tokens_per_point, want.groups)
    if name == "two":
        for b, req in enumerate(requests_):
            one = adapter.inputs([req])
            s1, _, _ = _generate(model, one, DAP, gen={"logits_processor": LogitsProcessorList(
                [_Force(audio_id, {1, 3}, one["input_ids"].shape[1])])})
            assert torch.equal(seq[b, T:], s1[0, one["input_ids"].shape[1]:])


def test_long_audio_is_fed_as_consecutive_windows(tiny):
    """45 s on Qwen2-Audio: two 30 s windows (750 + 375 tokens) in one audio span; word windows map at 25 tokens/s
    across both windows (uniform_merge with R = 1 makes exactly one group per word window)."""
    adapter = tiny["sdpa"]
    req = _request("long45", 45.0, 7)
    batch = adapter.inputs([req])
    audio = batch["input_ids"][0] == adapter.model.config.audio_token_id
    idx = audio.nonzero().squeeze(1)
    assert int(audio.sum()) == 750 + 375 and bool((idx.diff() == 1).all())  # one contiguous span
    out = adapter.generate([req], [Point(0, "uniform_merge", {"budget": 1, "gaps": "keep"})], 2)[0]
    assert out.tokens_in == 1125
    groups = out.groups[0]
    for w in req.utt.words:
        lo, hi = math.floor(w.start * 25), math.ceil(w.end * 25)
        assert len(set(groups[lo:hi])) == 1, w  # one group per word window ...
        assert hi >= 1125 or groups[hi] != groups[lo]  # ... and only that window
    covered = sum(math.ceil(w.end * 25) - math.floor(w.start * 25) for w in req.utt.words)
    assert out.tokens_out == len(req.utt.words) + 1125 - covered  # gaps kept token by token
    assert out.stats["encoder_flops"] == eff.audio_encoder_flops(adapter.encoder_shape, 2)


# ----------------------------------------------------------------------------- clear errors before compute
def _no_compute(model):
    """A hook that fails if the model's forward is entered."""
    def boom(*_):
        raise AssertionError("forward ran")
    return model.register_forward_pre_hook(boom)


def test_errors_before_compute(tiny, requests_):
    adapter = tiny["sdpa"]
    h = _no_compute(adapter.model)
    try:
        with pytest.raises(ValueError, match=r"layer=4 is beyond .* 0\.\.3"):
            adapter.generate(requests_, [Point(4, "none")], 2)
        with pytest.raises(ValueError, match="eager"):
            adapter.generate(requests_, [Point(2, "attention_prune", {"ratio": 0.5})], 2)
        with pytest.raises(ValueError, match=r"long: 90\.0 s of audio gives 2250 audio tokens; with the prompt and max_new_tokens=2 .* beyond .* context of 2048"):
            adapter.generate([_request("long", 90.0, 3)], [], 2)
        nowords = _request("nw", 1.0, 4)
        nowords.utt.words = None
        with pytest.raises(ValueError, match="nw: the oracle operators need word alignments"):
            adapter.generate([nowords], [Point(0, "uniform_merge", {"budget": 2})], 2)
        twice = _request("p2", 1.0, 5)
        twice.prompt = "<|audio_bos|><|AUDIO|><|audio_eos|><|AUDIO|>"
        with pytest.raises(ValueError, match="exactly one"):
            adapter.generate([twice], [], 2)
        with pytest.raises(ValueError, match="threshold"):
            adapter.generate(requests_, [Point(0, "affinity", {"window": 3})], 2)
        with pytest.raises(ValueError, match="positions"):
            q.Qwen2AudioModel(adapter.model, adapter.processor, positions="middle").generate(requests_, DAP, 2)
    finally:
        h.remove()
    # a text-only prompt under compression: refused by the engine's first hook, before the forward body
    model = adapter.model
    ids = adapter.processor.tokenizer(["hello there"], return_tensors="pt")
    with pytest.raises(CompressionError, match="holds no audio"):
        with torch.inference_mode(), compression(model, DAP, q.reach(model)):
            model(**ids)


def test_attention_prune_under_eager(tiny, requests_):
    adapter = tiny["eager"]
    out = adapter.generate(requests_[:1], [Point(2, "attention_prune", {"ratio": 0.5})], 2)[0]
    assert out.tokens_out == max(1, round(0.5 * out.tokens_in))  # FastV as released: round(), halves to even


def test_missing_weights_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        q.load({"family": "qwen2audio", "path": str(tmp_path / "nowhere"), "device": "cpu", "dtype": "float32"})
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-cli download Qwen/Qwen2-Audio-7B " in msg and "model.path=" in msg


def test_tiny_config_composes_and_runs(requests_):
    from conftest import compose

    cfg = compose(["model=tiny_qwen2audio", "intervention=dap", "layer_deep=2", "data=librispeech"])
    adapter = q.load(cfg.model)
    assert adapter.n_layers == cfg.model.n_layers == 4
    from speech_redundancy.runner import build_points

    points = build_points(cfg)
    out = adapter.generate(requests_[:1], points, 3)[0]
    assert [p.layer for p in points] == [0, 2] and len(out.tokens_per_point) == 2
    real = compose(["model=qwen2audio", "data=librispeech"]).model
    assert real.path == "Qwen/Qwen2-Audio-7B" and real.n_layers == 32 and real.token_rate == 25


# ----------------------------------------------------------------------------- other stock audio LLMs
def _tiny_hf(family: str):
    import transformers as tf

    text = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "initializer_range": 0.2, "head_dim": 8}
    enc = {"num_mel_bins": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
           "hidden_size": 16}
    if family == "voxtral":
        config = tf.VoxtralConfig(audio_config={**enc, "model_type": "voxtral_encoder", "intermediate_size": 64},
                                  text_config={**text, "model_type": "llama"}, audio_token_id=7)
        cls = tf.VoxtralForConditionalGeneration
    elif family == "glmasr":
        config = tf.GlmAsrConfig(audio_config={**enc, "model_type": "glmasr_encoder", "intermediate_size": 64},
                                 text_config={**text, "model_type": "llama"}, audio_token_id=7)
        cls = tf.GlmAsrForConditionalGeneration
    else:
        config = tf.AudioFlamingo3Config(audio_config={**enc, "model_type": "audioflamingo3_encoder"},
                                         text_config={**text, "model_type": "qwen2"}, audio_token_id=7)
        cls = tf.AudioFlamingo3ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    feats = torch.randn(1, 16, 3000)
    mask = torch.ones(1, 3000, dtype=torch.long)
    with torch.inference_mode():
        if family == "voxtral":
            n = model.model.get_audio_features(feats).pooler_output.shape[0]
        else:
            n = model.model.get_audio_features(feats, mask).pooler_output.shape[0]
    ids = torch.tensor([[1, 2] + [7] * n + [3, 4, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "input_features": feats}
    if family != "voxtral":
        batch["input_features_mask"] = mask
    return model, batch


@pytest.mark.parametrize("family", ["voxtral", "glmasr", "audioflamingo3"])
def test_generic_adapter_on_other_audio_llms(family):
    from speech_redundancy.models import lslm

    model, batch = _tiny_hf(family)
    reach = lslm.stock_reach(model)
    args = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.inference_mode():
        ref = model.generate(**batch, **args)
        with compression(model, NO_MERGE, reach):
            same = model.generate(**batch, **args)
        with compression(model, DAP, reach) as s:
            squeezed = model.generate(**batch, **args)
    assert torch.equal(same.sequences, ref.sequences)
    assert torch.equal(torch.stack(same.logits), torch.stack(ref.logits))
    rec = s.records[0]
    assert rec.tokens_out < rec.tokens_in and squeezed.sequences.shape == ref.sequences.shape
    states = audio_hidden_states(model, reach, batch)  # Fig. 3 on these families too
    n_audio = int((batch["input_ids"] == 7).sum())
    assert [tuple(h.shape) for h in states] == [(n_audio, 32)] * (reach.n_layers + 1)


def test_hidden_states_are_the_audio_span_entering_each_layer(tiny, requests_):
    """Fig. 3's input: the audio rows of what each decoder layer receives, uncompressed, plus the normed output."""
    adapter, req = tiny["sdpa"], requests_[0]
    seen = {}

    def grab(layer_idx):
        def hook(module, args, kwargs):
            seen[layer_idx] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [adapter.reach.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(adapter.n_layers)]
    try:
        states = adapter.hidden_states(req)
    finally:
        for h in handles:
            h.remove()
    batch = adapter.inputs([req])
    audio = batch["input_ids"][0] == adapter.model.config.audio_token_id
    assert len(states) == adapter.n_layers + 1
    assert all(s.shape == (int(audio.sum()), adapter.shape.hidden) for s in states)
    for i in range(adapter.n_layers):
        assert torch.equal(states[i], seen[i][0, audio].float())
    assert not torch.equal(states[-1], states[-2])  # the final norm was applied
    with torch.inference_mode():
        normed = adapter.model(**batch, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(states[-1], normed[0, audio].float())

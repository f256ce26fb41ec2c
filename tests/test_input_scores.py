"""Attention scores at l = 0 on Qwen2-Audio (tiny random model, CPU): the audio encoder's last layer, received
attention, mean over heads and real query positions, averaged over the pooled pairs, windows concatenated.

The reference runs the stock audio tower on each 30 s window alone, with its own additive padding mask and
``output_attentions=True``, and averages by hand; it shares no code with the adapter's ``encoder_scores``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speech_redundancy import engine
from speech_redundancy.compress import Point, n_kept, seed_for
from speech_redundancy.data.records import Utterance
from speech_redundancy.engine import CompressionError, check_points
from speech_redundancy.models import lslm
from speech_redundancy.models.base import Request


@pytest.fixture(scope="session")
def tiny(tiny_qwen):
    """attn implementation -> adapter over one random tiny Qwen2-Audio (conftest.tiny_qwen)."""
    return tiny_qwen


def _request(uid: str, seconds: float, seed: int) -> Request:
    audio = (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)
    return Request(utt=Utterance(id=uid, audio=f"{uid}.wav", text="x", duration=seconds), audio=audio,
                   seed=seed_for(0, uid))


def _reference(adapter, audio: np.ndarray) -> torch.Tensor:
    """Per audio token of the clip: attention received in the tower's last layer, by hand, window by window."""
    tower = adapter.model.model.audio_tower
    fe = adapter.processor.feature_extractor
    out = []
    for start in range(0, len(audio), 30 * 16000):
        window = audio[start:start + 30 * 16000]
        feats = fe(window, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                   return_tensors="pt")
        frames = int(feats["attention_mask"].sum())
        n = (frames - 1) // 2 + 1  # encoder positions after the stride-2 conv
        t = n // 2  # audio tokens after the pool of 2 (whole pairs only)
        mask = torch.zeros(1, 1, 1500, 1500)
        mask[..., n:] = torch.finfo(torch.float32).min  # padding keys
        with torch.inference_mode():
            att = tower(feats["input_features"], attention_mask=mask, output_attentions=True).attentions[-1][0]
        received = torch.stack([att[:, qi, :n] for qi in range(n)]).mean(0).mean(0)  # over queries, then heads
        out.append(torch.tensor([(received[2 * j] + received[2 * j + 1]) / 2 for j in range(t)]))
    return torch.cat(out)


def _seen_scores(monkeypatch, adapter, requests, points):
    """The scores the engine hands the step at each point (one entry per sample and point), and the outputs."""
    seen = []
    step = engine.compress_step

    def spy(x, point, state, **kw):
        seen.append(None if kw.get("scores") is None else kw["scores"].clone())
        return step(x, point, state, **kw)

    monkeypatch.setattr(engine, "compress_step", spy)
    outs = adapter.generate(requests, points, 3)
    monkeypatch.setattr(engine, "compress_step", step)
    return seen, outs


@pytest.mark.parametrize("seconds", [2.3, 31.7])
def test_scores_at_the_input_are_the_encoders_last_layer(tiny, monkeypatch, seconds):
    adapter = tiny["eager"]
    req = _request("a", seconds, 3)
    seen, outs = _seen_scores(monkeypatch, adapter, [req], [Point(0, "attention_prune", {"ratio": 0.6})])
    want = _reference(adapter, req.audio)
    assert want.numel() == adapter.audio_tokens(req) == outs[0].tokens_in
    assert len(seen) == 1 and seen[0].shape == want.shape
    torch.testing.assert_close(seen[0].float(), want, rtol=1e-5, atol=1e-7)
    assert outs[0].tokens_out == n_kept(0.6, want.numel())
    # attention_prune keeps the most attended: the kept tokens' scores are the top ones
    kept = torch.tensor(outs[0].groups[0]) >= 0
    assert float(want[kept].min()) >= float(want[~kept].max())


def test_batch_equals_one_by_one(tiny, monkeypatch):
    adapter = tiny["eager"]
    reqs = [_request("a", 2.3, 3), _request("bb", 31.7, 4), _request("c", 5.0, 5)]
    points = [Point(0, "segment_topk", {"ratio": 0.7, "segment": 25}), Point(2, "samp", {"ratio": 0.8})]
    single_scores, single_outs = [], []
    for r in reqs:
        s, o = _seen_scores(monkeypatch, adapter, [r], points)
        single_scores += s[:1]
        single_outs += o
    adapter.batch_size = 3
    try:
        seen, outs = _seen_scores(monkeypatch, adapter, reqs, points)
    finally:
        adapter.batch_size = 1
    batched = seen[:3]  # the step runs sample by sample at each point: layer 0 first
    for a, b in zip(batched, single_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert [o.groups for o in outs] == [o.groups for o in single_outs]
    assert [o.text for o in outs] == [o.text for o in single_outs]


def test_refused_without_eager_before_compute(tiny, monkeypatch):
    adapter = tiny["sdpa"]
    ran = []
    handle = adapter.model.model.audio_tower.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        for op in ("attention_prune", "samp", "visionzip", "fastadasp", "speechprune", "segment_topk"):
            with pytest.raises(CompressionError) as err:
                adapter.generate([_request("a", 2.0, 1)], [Point(0, op, {"ratio": 0.5})], 2)
            msg = str(err.value)
            assert "\n" not in msg
            assert msg.startswith(f"operator={op} at layer=0 needs the audio encoder's attention weights")
            assert msg.endswith("set model.attn_implementation=eager")
    finally:
        handle.remove()
    assert ran == []
    adapter.check_points([Point(0, "cdpruner", {"ratio": 0.5})])  # no scores needed: allowed


def test_models_without_encoder_scores_keep_the_refusal(tiny):
    stock = lslm.stock_reach(tiny["eager"].model, "no-encoder-scores")
    assert stock.input_scores is None
    with pytest.raises(CompressionError, match="operator=samp scores tokens by attention at layer l-1; layer=0 has "
                                               "none on no-encoder-scores"):
        check_points([Point(0, "samp", {"ratio": 0.5})], stock)
    check_points([Point(1, "samp", {"ratio": 0.5})], stock)  # eager LLM: layer 1 reads layer 0

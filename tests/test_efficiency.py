"""Efficiency accounting: analytic FLOPs against torch's FlopCounterMode, KV bytes against the real cache, the
prefill benchmark end to end on a tiny model."""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from speech_redundancy import efficiency as eff
from speech_redundancy.data.records import Utterance
from speech_redundancy.engine import compression
from speech_redundancy.models import qwen2audio as q
from speech_redundancy.compress import Point
from speech_redundancy.models.base import Request

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eager():
    model, processor = q.build_tiny(seed=1, attn_implementation="eager")
    adapter = q.Qwen2AudioModel(model, processor)
    rng = np.random.default_rng(0)
    reqs = [Request(utt=Utterance(id=f"e{i}", audio="", text="", duration=s), audio=(0.1 * rng.standard_normal(
        int(16000 * s))).astype(np.float32)) for i, s in enumerate((2.4, 1.3))]
    return adapter, reqs


@pytest.mark.parametrize("points", [
    [],
    [Point(0, "uniform_merge", {"ratio": 0.5})],
    [Point(1, "uniform_drop", {"ratio": 0.3})],
    [Point(0, "uniform_merge", {"ratio": 0.7864}), Point(3, "uniform_merge", {"ratio": 0.2})],
], ids=["vanilla", "in", "mid", "dual"])
def test_analytic_flops_equal_flop_counter(eager, points):
    """Prefill FLOPs counted by torch (eager attention) = audio tower + projector + decoder layers + LM head, with
    and without compression (fixed-ratio operators do no matrix products of their own)."""
    adapter, reqs = eager
    for req in reqs:
        batch = adapter.inputs([req])
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), compression(adapter.model, points, adapter.reach) as session, counter:
            adapter.model(**batch)
        rec = session.records[0]
        expected = eff.prefill_flops(adapter.shape, rec.layer_tokens) + eff.audio_encoder_flops(adapter.encoder_shape)
        assert counter.get_total_flops() == expected
        if points:
            assert rec.layer_tokens[-1] < batch["input_ids"].shape[1]


def test_llm_flops_by_module_match(eager):
    """The LLM part alone (per decoder layer) against the counter's per-module totals."""
    adapter, reqs = eager
    batch = adapter.inputs(reqs[:1])
    points = [Point(2, "uniform_merge", {"ratio": 0.25})]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), compression(adapter.model, points, adapter.reach) as session, counter:
        adapter.model(**batch)
    counts = counter.get_flop_counts()
    rec = session.records[0]
    for j, t in enumerate(rec.layer_tokens):
        key = f"Qwen2AudioForConditionalGeneration.model.language_model.layers.{j}"
        assert sum(counts[key].values()) == eff.layer_flops(adapter.shape, t)


def test_kv_bytes_and_ttft_recorded(eager):
    adapter, reqs = eager
    batch = adapter.inputs(reqs[:1])
    points = [Point(0, "uniform_merge", {"ratio": 0.5}), Point(2, "uniform_merge", {"ratio": 0.5})]
    with torch.inference_mode(), compression(adapter.model, points, adapter.reach) as session:
        adapter.model.generate(**batch, max_new_tokens=1, do_sample=False)
    rec = session.records[0]
    assert session.kv_bytes == eff.kv_bytes_analytic(adapter.shape, rec.kv_tokens, 4)
    assert session.ttft_seconds > 0 and session.peak_memory_bytes is None and session.memory_increment_bytes is None
    assert rec.retention == rec.tokens_out / rec.tokens_in < 0.3


def test_7b_shapes_and_formula():
    from transformers import Qwen2AudioConfig

    spec = importlib.util.spec_from_file_location("bench_prefill", ROOT / "scripts" / "bench_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = Qwen2AudioConfig(**bench.QWEN2_AUDIO_7B)
    s = eff.DecoderShape.from_config(config.text_config)
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.ffn, s.vocab, s.n_layers) == \
        (4096, 32, 32, 128, 11008, 156032, 32)
    d, ff = 4096, 11008
    T = 100
    assert eff.layer_flops(s, T) == 2 * T * (4 * d * d + 3 * d * ff) + 4 * d * T * T
    vanilla = eff.prefill_flops(s, [T] * 32)
    squeezed = eff.prefill_flops(s, [T] * 29 + [20] * 3)
    assert vanilla - squeezed == 3 * (eff.layer_flops(s, T) - eff.layer_flops(s, 20)) + 2 * d * s.vocab * (T - 20)
    enc = eff.WhisperEncoderShape.from_qwen2audio(config)
    assert (enc.mels, enc.hidden, enc.n_layers, enc.frames, enc.out_dim) == (128, 1280, 32, 3000, 4096)
    assert eff.audio_encoder_flops(enc, windows=2) == 2 * eff.audio_encoder_flops(enc)
    with pytest.raises(ValueError, match="32 layers"):
        eff.prefill_flops(s, [T] * 31)


def test_cpu_timers():
    watch = eff.Stopwatch("cpu").start()
    time.sleep(0.02)
    assert watch.stop() >= 0.02  # seconds of wall clock (sleep lasts at least as long as asked)
    assert eff.memory_probe("cpu").stop() == (None, None)
    from speech_redundancy.compress import Record

    assert Record().retention is None  # no audio tokens: no retention


def test_bench_prefill_tiny_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_prefill_run", ROOT / "scripts" / "bench_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--buckets", "0-20,40-60", "--per-bucket", "1", "--repeats", "1", "--warmup", "0",
                       "--breakdown", "--out", str(tmp_path)])
    assert len(rows) == 8
    with (tmp_path / "bench_prefill.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table[:4]] == ["Vanilla", "AP_in", "AP_deep", "DAP"]
    saved = json.loads((tmp_path / "bench_prefill.json").read_text())
    assert saved["meta"]["tiny"] is True and len(saved["rows"]) == 8 and saved["meta"]["deep_layer"] == 3
    by = {(r["bucket"], r["method"]): r for r in rows}
    for bucket in ("0-20 s", "40-60 s"):
        assert by[bucket, "Vanilla"]["flops_ideal_speedup"] == 1.0 and by[bucket, "Vanilla"]["retention"] == 1.0
        assert abs(by[bucket, "AP_in"]["retention"] - 0.7864) < 0.01
        assert abs(by[bucket, "AP_deep"]["retention"] - 0.1430) < 0.01
        assert abs(by[bucket, "DAP"]["retention"] - 0.1491) < 0.01
        assert by[bucket, "DAP"]["flops_ideal_speedup"] > by[bucket, "AP_in"]["flops_ideal_speedup"] > 1.0
        assert by[bucket, "DAP"]["t_ap_s"] > 0 and by[bucket, "Vanilla"]["t_ap_s"] is None
        assert 0 < by[bucket, "DAP"]["t_ap_fraction"] < 1
        dap = by[bucket, "DAP"]["clips"][0]
        assert sorted(dap["t_ap_points_s"]) == ["0", "3"] and len(dap["audio_tokens_per_point"]) == 2
        # layer 0 already gets the l = 0 point's tokens, layer 3 = l_deep those of both
        assert dap["sequence"] > dap["layer_tokens"][0] == dap["layer_tokens"][2] > dap["layer_tokens"][3]
    for r in rows:  # --breakdown: the parts lie inside the call; the points are no layer's time
        p = r["parts_s"]
        assert len(p["layers"]) == 4 and min(p["layers"]) > 0 and p["encoder"] > 0 and p["head"] > 0 and p["rest"] > 0
        assert p["points"] == (r["t_ap_s"] or 0.0)
        assert p["encoder"] + sum(p["layers"]) + p["head"] + p["points"] + p["rest"] == pytest.approx(r["ttft_s"])
    # a 50 s clip is fed as two 30 s windows whose tokens fill one placeholder run (25 tokens/s)
    assert by["40-60 s", "Vanilla"]["audio_tokens"] == 1250 and by["0-20 s", "Vanilla"]["audio_tokens"] == 250
    assert by["40-60 s", "Vanilla"]["clips"][0]["windows"] == 2


def test_bench_prefill_deep_point_keeps_the_paper_fraction():
    spec = importlib.util.spec_from_file_location("bench_prefill_deep", ROOT / "scripts" / "bench_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 29 of 32; with fewer layers round(29 N / 32), never beyond the last layer
    assert [bench.deep_layer(n) for n in (32, 16, 8, 4, 2)] == [29, 14, 7, 3, 1]

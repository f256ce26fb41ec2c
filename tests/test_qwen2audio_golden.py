"""Qwen2-Audio's model inputs against golden data made outside the project (tests/fixtures/qwen2audio_golden/README.md):
input ids built by transformers' own Qwen2AudioProcessor and chat template with the real Qwen2 BPE, from the
prompt strings of eval_audio, Kimi-Audio-Evalkit and lmms-eval, for 7, 30 and 45 s clips under both presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from speech_redundancy.data.records import Utterance
from speech_redundancy.models import qwen2audio as q
from speech_redundancy.models.base import Request

GOLDEN = Path(__file__).parent / "fixtures" / "qwen2audio_golden"
CASES = json.loads((GOLDEN / "input_ids.json").read_text())["cases"]
TASKS = {"asr_en": ("asr", "en"), "asr_zh": ("asr", "zh"), "st_en2zh": ("st_en2zh", "en"),
         "st_zh2en": ("st_zh2en", "zh"), "qa": ("qa", "en")}


@pytest.fixture(scope="module")
def processor():
    """transformers' Qwen2AudioProcessor over the golden tokenizer (the real BPE's tokens and merges these prompts
    use, with their real ids, and the six special ids)."""
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    tok = PreTrainedTokenizerFast(tokenizer_file=str(GOLDEN / "tokenizer.json"), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|AUDIO|>",
                                                             "<|audio_bos|>", "<|audio_eos|>"])
    return Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)


@pytest.fixture(scope="module")
def tiny_model():
    return q.build_tiny(seed=0)[0]


def _preset(name: str):
    from conftest import compose

    return compose([f"model={name}", "data=librispeech"]).model


def _adapter(preset: str, long_audio: str, model, processor) -> q.Qwen2AudioModel:
    cfg = _preset(preset)
    return q.Qwen2AudioModel(model, processor, name=preset, prompt_family=cfg.prompt_family, chat=cfg.chat,
                             long_audio=long_audio)


def _request(case) -> Request:
    task, language = TASKS[case["task"]]
    target = task.split("2")[1] if task.startswith("st_") else None
    utt = Utterance(id=f"{case['task']}-{case['seconds']}", audio="x.wav", text="x", duration=case["seconds"],
                    language=language, task=task, extra={"target_language": target} if target else {})
    audio = np.zeros(case["n_samples"], dtype=np.float32)
    return Request(utt=utt, audio=audio)


def test_presets_name_their_layouts():
    base, instruct = _preset("qwen2audio"), _preset("qwen2audio_instruct")
    assert (base.path, base.chat, base.long_audio, base.prompt_family, base.min_new_tokens) == (
        "Qwen/Qwen2-Audio-7B", False, "truncate", "qwen2_audio", 1)
    assert (instruct.path, instruct.chat, instruct.long_audio, instruct.prompt_family, instruct.min_new_tokens) == (
        "Qwen/Qwen2-Audio-7B-Instruct", True, "items", "qwen2_audio_instruct", 1)
    assert {c["preset"] for c in CASES} == {"qwen2audio", "qwen2audio_instruct"}
    assert {(c["task"], c["seconds"]) for c in CASES} == {(t, s) for t in TASKS for s in (7.0, 30.0, 45.0)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['preset']}-{c['task']}-{c['seconds']:g}s-{c['long_audio']}")
def test_input_ids_equal_the_golden_ones(case, processor, tiny_model):
    adapter = _adapter(case["preset"], case["long_audio"], tiny_model, processor)
    req = _request(case)
    windows = q.windows(req.audio, adapter.long_audio)
    assert adapter.prompt_text(req, len(windows)).replace(q.AUDIO_TOKEN, q.AUDIO_TOKEN * (
        len(windows) if adapter.long_audio == "span" else 1), 1) == case["text"]
    ids = adapter.inputs([req])["input_ids"][0].tolist()
    assert ids == case["input_ids"]
    assert adapter.audio_tokens(req) == case["n_audio_tokens"] == ids.count(151646)


def test_items_needs_the_chat_template(tiny_model, processor):
    with pytest.raises(ValueError, match="long_audio=items .* needs model.chat=true"):
        q.Qwen2AudioModel(tiny_model, processor, chat=False, long_audio="items")
    with pytest.raises(ValueError, match="long_audio='cut' is unknown; allowed: truncate, span, items"):
        q.Qwen2AudioModel(tiny_model, processor, long_audio="cut")


def test_min_new_tokens_reaches_generate(tiny_model, processor, monkeypatch):
    """The presets' min_new_tokens=1 (eval_audio, lmms-eval) is handed to the stock generate."""
    from conftest import compose

    cfg = compose(["model=tiny_qwen2audio", "data=librispeech"]).model
    adapter = q.load(cfg)
    assert adapter.min_new_tokens == 1
    seen = {}
    real = adapter.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(adapter.model, "generate", spy)
    case = CASES[0]
    out = adapter.generate([_request(case)], [], 2)[0]
    assert seen["min_new_tokens"] == 1 and out.stats["new_tokens"] >= 1


def test_items_layout_runs_with_compression():
    """45 s under the Instruct preset's items layout: two `Audio k:` items (750 + 375 audio slots, text between
    them); word windows map at 25 tokens/s across both (uniform_merge with R = 1: one group per word window)."""
    import math

    from conftest import compose

    from speech_redundancy.compress import Point
    from speech_redundancy.data.records import Word

    adapter = q.load(compose(["model=tiny_qwen2audio_instruct", "data=librispeech"]).model)
    assert (adapter.chat, adapter.long_audio) == (True, "items")
    rng = np.random.default_rng(3)
    words = [Word(f"w{i}", 0.1 + 0.5 * i, 0.5 + 0.5 * i) for i in range(89)]
    utt = Utterance(id="long45", audio="x.wav", text="x", duration=45.0, words=words)
    req = Request(utt=utt, audio=(0.1 * rng.standard_normal(45 * 16000)).astype(np.float32))
    text = adapter.prompt_text(req, 2)
    assert text.count("Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n") == 1
    out = adapter.generate([req], [Point(0, "uniform_merge", {"budget": 1, "gaps": "keep"})], 2)[0]
    assert out.tokens_in == 1125
    groups = out.groups[0]
    for w in words:
        lo, hi = math.floor(w.start * 25), math.ceil(w.end * 25)
        assert len(set(groups[lo:hi])) == 1, w
    truncated = q.Qwen2AudioModel(adapter.model, adapter.processor, chat=True, long_audio="truncate")
    assert truncated.audio_tokens(req) == 750


# ----------------------------------------------------------------------------------------------- checkpoint layout
LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"


def _tiny_dims(config) -> dict[str, int]:
    a, t = config.audio_config, config.text_config
    return {"audio.d_model": a.d_model, "audio.num_mel_bins": a.num_mel_bins, "audio.encoder_ffn_dim": a.encoder_ffn_dim,
            "audio.max_source_positions": a.max_source_positions, "text.hidden_size": t.hidden_size,
            "text.intermediate_size": t.intermediate_size, "text.vocab_size": t.vocab_size,
            "text.kv_dim": t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)}


def _expected_tiny(record: dict, config) -> dict[str, list[int]]:
    """The record's names with layer indices the tiny model has, each axis resolved from the tiny config."""
    import re

    dims = _tiny_dims(config)
    n = {"audio_tower": config.audio_config.encoder_layers, "language_model": config.text_config.num_hidden_layers}
    out = {}
    for name, t in record["tensors"].items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= n[name.split(".")[0]]:
            continue
        out[name] = [dims.get(d, d) for d in t["dims"]]
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return q.write_tiny(tmp_path_factory.mktemp("tiny_qwen2audio"))


@pytest.mark.parametrize("record", ["qwen2audio_7b.json", "qwen2audio_7b_instruct.json"])
def test_tiny_writer_uses_the_published_layout(record, tiny_checkpoint):
    from safetensors import safe_open
    from transformers import Qwen2AudioConfig

    rec = json.loads((LAYOUTS / record).read_text())
    real = Qwen2AudioConfig(audio_config=rec["config"]["audio_config"], text_config=rec["config"]["text_config"])
    assert _expected_tiny(rec, real) == {k: v["shape"] for k, v in rec["tensors"].items()}  # the record agrees with itself
    assert rec["special_tokens"]["<|AUDIO|>"] == rec["config"]["audio_token_index"] == 151646
    config = Qwen2AudioConfig.from_pretrained(tiny_checkpoint)
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        written = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == _expected_tiny(rec, config)


def test_loader_accepts_exactly_the_published_names(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = {"family": "qwen2audio", "path": str(tiny_checkpoint), "device": "cpu", "dtype": "float32", "n_layers": 4}
    adapter = q.load(cfg)
    assert adapter.n_layers == 4 and adapter.model.config.audio_token_id == adapter.tokenizer.convert_tokens_to_ids(
        "<|AUDIO|>")
    bad = tmp_path / "renamed"
    shutil.copytree(tiny_checkpoint, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["multi_modal_projector.weight"] = weights.pop("multi_modal_projector.linear.weight")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not the Qwen2-Audio checkpoint layout: missing .*multi_modal_projector"
                                         r"\.linear\.weight.*unexpected .*multi_modal_projector\.weight"):
        q.load({**cfg, "path": str(bad)})

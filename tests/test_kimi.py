"""Kimi-Audio, natively (models/kimi*.py, models/glm4_speech_tokenizer.py) on a random tiny checkpoint written in the
official layout: loading by the shard index, the ignored MIMO branch, fusion, prompt layouts, token counts of the
two audio paths, decoding (cache, repetition penalty, stop), batches, ablations, FLOPs, bad input, a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import CONF, compose
from speech_redundancy import compress as ops
from speech_redundancy import efficiency
from speech_redundancy.data.records import Utterance
from speech_redundancy.models import glm4_speech_tokenizer as glm
from speech_redundancy.models import kimi
from speech_redundancy.models import kimi_checkpoint as ckpt
from speech_redundancy.compress import Point
from speech_redundancy.models.base import Request
from speech_redundancy.models.kimi_prompt import layout

# Kimi-Audio's special ids (shared/FACTS.md §8), written out here as the reference
MSG_END, MEDIA_BEGIN, MEDIA_END, BLANK, EOS = 151645, 151661, 151663, 151666, 151667
USER, ASSISTANT, SPEECH_CT, OFFSET = 151670, 151671, 151675, 152064


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi")
    return ckpt.write_tiny(root / "tiny-kimiaudio", root / "tiny-glm4-voice-tokenizer")


def _cfg(folders, **over):
    ckpt_dir, tok_dir = folders
    return {"family": "kimi", "name": "tiny-kimiaudio", "path": str(ckpt_dir), "speech_tokenizer": str(tok_dir),
            "dtype": "float32", "device": "cpu", "n_layers": 4, **over}


@pytest.fixture(scope="session")
def model(folders):
    return kimi.load(_cfg(folders))


def _request(seconds: float, i: int = 0, task: str = "asr", seed: int = 0, **extra) -> Request:
    rng = np.random.default_rng(seed + i)
    n = max(1, int(round(seconds * 16000)))
    audio = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return Request(utt=Utterance(id=f"u{i}", audio="", text="a b", duration=n / 16000, task=task, extra=extra),
                   audio=audio)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read by the test itself from the files the index names."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in set(index.values()):
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False, copy_function=os.link)  # hard links: cheap, and files can be replaced
    return dst


# ----------------------------------------------------------------------------- loading
def test_tiny_is_written_in_the_official_layout(folders):
    ckpt_dir, tok_dir = folders
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "whisper-large-v3", "model-1-of-2.safetensors", "model-3-of-3.safetensors"} <= set(names)
    assert {p.name for p in (ckpt_dir / "whisper-large-v3").iterdir()} >= {"config.json", "model.safetensors",
                                                                           "preprocessor_config.json"}
    assert {p.name for p in tok_dir.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    keys = set(_state(ckpt_dir))
    assert any(k.startswith("model.mimo_layers.1.") for k in keys) and {"mimo_output.weight", "model.mimo_norm.weight"} <= keys
    assert sum(k.endswith("rotary_emb.inv_freq") for k in keys) == 4 + 2
    with safe_open(str(ckpt_dir / "whisper-large-v3" / "model.safetensors"), framework="pt") as f:
        wkeys = list(f.keys())
    assert any(k.startswith("model.decoder.") for k in wkeys) and any(k.startswith("model.encoder.") for k in wkeys)
    # built once: a second call keeps the folders
    stamp = (ckpt_dir / "model-3-of-3.safetensors").stat().st_mtime_ns
    ckpt.write_tiny(ckpt_dir, tok_dir)
    assert (ckpt_dir / "model-3-of-3.safetensors").stat().st_mtime_ns == stamp


def test_tiny_is_deterministic(folders, tmp_path):
    import hashlib

    again = ckpt.write_tiny(tmp_path / "a", tmp_path / "b")

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    for first, second in zip(folders, again):
        assert digest(first) == digest(second)


def test_loading_fits_every_tensor_and_ignores_only_mimo_and_rotary(folders, model):
    ckpt_dir, _ = folders
    stored = _state(ckpt_dir)
    ignored = {k for k in stored if re.match(r"model\.(mimo_layers|mimo_norm)|mimo_output|.*rotary_emb\.inv_freq", k)}
    assert len(ignored) == 2 * 12 + 1 + 1 + 6
    backbone = model.text.backbone.state_dict()
    adaptor = {f"model.vq_adaptor.layers.{k}": v for k, v in model.frontend.continuous.adaptor.state_dict().items()}
    loaded = {**{k: v for k, v in backbone.items() if "rotary_emb" not in k}, **adaptor}
    assert set(loaded) == set(stored) - ignored
    for k, v in loaded.items():
        assert torch.equal(v, stored[k].float()), k
    raw = json.loads((ckpt_dir / "config.json").read_text())
    assert model.text.backbone.config.rope_parameters["rope_theta"] == raw["rope_theta"]
    assert torch.allclose(model.text.backbone.model.rotary_emb.inv_freq,  # stored in bf16, as the real checkpoint
                          stored["model.layers.0.self_attn.rotary_emb.inv_freq"].float(), rtol=4e-3)
    assert type(model.text.backbone).__name__ == "Qwen2ForCausalLM" and not hasattr(model.text.backbone.model, "mimo_layers")
    enc = model.frontend.continuous.encoder.state_dict()
    with safe_open(str(ckpt_dir / "whisper-large-v3" / "model.safetensors"), framework="pt") as f:
        for k, v in enc.items():
            assert torch.equal(v, f.get_tensor(f"model.encoder.{k}").float()), k


def _variant(folders, tmp_path, change) -> Path:
    """A copy of the tiny checkpoint whose MIMO tensors ``change`` rewrites ("nan" or "remove")."""
    dst = _copy(folders[0], tmp_path / "variant")
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    mimo = re.compile(r"model\.mimo_layers\.|model\.mimo_norm\.|mimo_output\.")
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(dst / shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not any(mimo.match(k) for k in tensors):
            continue
        if change == "nan":
            tensors = {k: torch.full_like(v, float("nan")) if mimo.match(k) else v for k, v in tensors.items()}
        else:
            tensors = {k: v for k, v in tensors.items() if not mimo.match(k)}
        (dst / shard).unlink()
        save_file(tensors, str(dst / shard))
    if change == "remove":
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not mimo.match(k)}
        index_path.unlink()
        index_path.write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("change", ["nan", "remove"])
def test_text_logits_do_not_depend_on_the_mimo_branch(folders, model, tmp_path, change):
    other = kimi.load({**_cfg(folders), "path": str(_variant(folders, tmp_path, change))})
    reqs = [_request(1.3, 0), _request(2.1, 1)]
    for m in (model, other):
        m.batch_size = 2
    a = kimi.greedy(model.text, model.batch(*model.prompts(reqs)[:2]), max_new_tokens=4, eos=EOS, blank=BLANK,
                    keep_logits=True)
    b = kimi.greedy(other.text, other.batch(*other.prompts(reqs)[:2]), max_new_tokens=4, eos=EOS, blank=BLANK,
                    keep_logits=True)
    assert a.tokens == b.tokens
    assert all(torch.equal(x, y) and torch.isfinite(x).all() for x, y in zip(a.logits, b.logits))


# ----------------------------------------------------------------------------- fusion and prompts
def test_fused_embedding_equals_hand_computation(folders, model):
    E = _state(folders[0])["model.embed_tokens.weight"].float()
    audio = torch.tensor([[USER, BLANK, MEDIA_BEGIN, OFFSET + 3, OFFSET + 7, MEDIA_END, SPEECH_CT]])
    text = torch.tensor([[BLANK, 80, BLANK, BLANK, BLANK, BLANK, BLANK]])
    mask = torch.tensor([[False, False, False, True, True, False, False]])
    feats = torch.randn(1, 7, E.shape[1])
    got = model.text.embed(text, audio, feats, mask)
    for t in range(7):
        a, x = E[audio[0, t]], E[text[0, t]]
        want = ((a + feats[0, t]) * math.sqrt(2) if mask[0, t] else a) + x
        assert torch.allclose(got[0, t], want, atol=1e-6), t
    # no features (decode steps, discrete ablation): the plain two-stream sum
    assert torch.allclose(model.text.embed(text, audio), E[audio[0]] + E[text[0]], atol=1e-6)
    # the step's logits are the stock Qwen2 decoder + head on these embeddings
    step = model.text(input_ids=text, audio_ids=audio, audio_embeds=feats, audio_mask=mask, logits_to_keep=0)
    with torch.inference_mode():
        ref = model.text.backbone(inputs_embeds=got).logits
    assert torch.allclose(step.logits, ref, atol=1e-5) and step.cache.get_seq_length() == 7


ASR_EN = list(b"Please transcribe the spoken content into written text.")
ST_ZH = list(b"Translate the speech into Chinese and only output the translation:")


@pytest.mark.parametrize("task, extra, instruction", [
    ("asr", {}, ASR_EN),
    ("qa", {}, []),
    ("st", {"target_language": "zh"}, ST_ZH),
])
def test_prompt_layout_golden(model, task, extra, instruction):
    codes = [OFFSET + 5, OFFSET + 1, OFFSET + 5]
    k = len(instruction)
    golden_audio = [USER] + [BLANK] * k + [MEDIA_BEGIN] + codes + [MEDIA_END, SPEECH_CT, MSG_END, ASSISTANT]
    golden_text = [BLANK] + instruction + [BLANK] * 5 + [BLANK, BLANK, BLANK]
    req = _request(0.2, task=task, **extra)
    p = layout(model.tokenizer.ids, model.instruction(req), codes)
    assert p.audio_ids == golden_audio and p.text_ids == golden_text
    assert p.audio_slots == [False] * (k + 2) + [True] * 3 + [False] * 4
    # the adapter's own prompt for a 0.2 s clip: 3 tokens from the speech tokenizer at the same slots
    prompts, embeds, _ = model.prompts([req])
    got = prompts[0]
    assert len(got.audio_ids) == len(golden_audio) and got.text_ids == golden_text
    assert [a for a, s in zip(got.audio_ids, got.audio_slots) if not s] == [a for a, s in zip(golden_audio, p.audio_slots) if not s]
    assert all(OFFSET <= a < OFFSET + 256 for a, s in zip(got.audio_ids, got.audio_slots) if s)
    assert embeds[0].shape == (3, model.config.hidden)


def test_chinese_asr_prompt(model):
    req = _request(0.2)
    req.utt.language = "zh"
    assert model.tokenizer.decode(model.instruction(req)) == "请把这段语音转录成文本。"


def test_decoded_text_keeps_special_tokens_as_the_official_decoding(model):
    """kimia_infer keeps every generated id below 152064 and decodes it with the tokenizer: a special token stays as
    its literal string; audio ids go; the Evalkit's remove_sp (protocol kimi_evalkit) takes the strings out."""
    from speech_redundancy import normalize as N

    tok = model.tokenizer
    ids = tok.encode("ab") + [BLANK, MSG_END] + [OFFSET + 5] + tok.encode(" c")
    assert tok.decode(ids) == "ab<|im_kimia_text_blank|><|im_msg_end|> c"
    assert tok.batch_decode(torch.tensor([ids + [tok.pad_token_id] * 2])) == ["ab<|im_kimia_text_blank|><|im_msg_end|> c"]
    assert N.strip_special_tokens(tok.decode(ids), "en") == "ab c"


@pytest.mark.parametrize("samples", [1, 1280, 1281, 16000, 479_999, 480_000, 480_001, 725_000, 976_000])
def test_audio_token_counts_agree_between_the_two_paths(model, samples):
    audio = (0.1 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    want = sum((min(480_000, samples - s) - 1) // 1280 + 1 for s in range(0, samples, 480_000))
    codes = model.frontend.speech.tokenize(audio)
    feats = model.frontend.continuous.features([audio])[0]
    assert len(codes) == feats.shape[0] == want == glm.codes_for(samples)
    assert feats.shape[1] == 4 * model.frontend.continuous.encoder.config.d_model


def test_speech_tokenizer_is_causal_and_block_causal(model):
    tok = model.frontend.speech.module
    torch.manual_seed(0)
    feats = torch.randn(1, 128, 2000)  # 20 s: 1000 frames at 50 Hz, five 200-frame blocks, 250 codes
    mask = torch.ones(1, 2000, dtype=torch.long)
    with torch.inference_mode():
        base, valid = tok(feats, mask)
        later = feats.clone()
        later[..., 1300:] += 1.0  # from frame 650 on: inside the fourth block (600..799)
        moved, _ = tok(later, mask)
        padded = torch.cat([feats, torch.randn(1, 128, 400)], dim=-1)  # padding frames, masked out
        with_pad, valid_pad = tok(padded, torch.cat([mask, torch.zeros(1, 400, dtype=torch.long)], dim=1))
    assert valid.all() and base.shape == (1, 250)
    assert torch.equal(base[:, :150], moved[:, :150]) and not torch.equal(base, moved)
    assert torch.equal(with_pad[valid_pad], base[0])
    # the attention rule, literally
    v = torch.tensor([[True] * 9 + [False] * 2])
    allowed = glm.attention_allowed(v, 4, causal=False)[0]
    for i in range(11):
        for j in range(11):
            assert bool(allowed[i, j]) == ((j <= i or j // 4 == i // 4) and j < 9)
    x, c = torch.randn(6, 8), torch.randn(10, 8)
    assert glm.nearest_code(x, c).tolist() == [int(torch.argmin(((c - r) ** 2).sum(1))) for r in x]


# ----------------------------------------------------------------------------- decoding
def test_cached_decoding_equals_recomputation(model):
    req = _request(1.7)
    prompts, embeds, _ = model.prompts([req])
    b = model.batch(prompts, embeds)
    out = kimi.greedy(model.text, b, max_new_tokens=6, eos=EOS, blank=BLANK, keep_logits=True, stop_at_eos=False)
    fed = out.tokens[0][:-1]
    n = len(fed)
    text = torch.cat([b.input_ids, torch.tensor([fed])], dim=1)
    audio = torch.cat([b.audio_ids, torch.full((1, n), BLANK)], dim=1)
    mask = torch.cat([b.audio_mask, torch.zeros(1, n, dtype=torch.bool)], dim=1)
    feats = torch.cat([b.audio_embeds, torch.zeros(1, n, b.audio_embeds.shape[-1])], dim=1)
    with torch.inference_mode():
        full = model.text(input_ids=text, audio_ids=audio, audio_embeds=feats, audio_mask=mask,
                          attention_mask=torch.ones_like(text), position_ids=torch.arange(text.shape[1])[None],
                          logits_to_keep=0).logits[0]
    T = b.input_ids.shape[1]
    for i, step in enumerate(out.logits):
        assert (step[0] - full[T - 1 + i]).abs().max() < 1e-4, (i, float((step[0] - full[T - 1 + i]).abs().max()))
    assert out.tokens[0] == [int(full[T - 1 + i].argmax()) for i in range(6)]


def _penalised(history: list[int], scores: torch.Tensor, penalty=1.1, window=16) -> torch.Tensor:
    """Plain reference: after more than ``window`` tokens, each distinct token of the last ``window`` once."""
    out = scores.clone()
    if len(history) > window:
        for tok in set(history[-window:]):
            s = float(scores[tok])
            out[tok] = s * penalty if s < 0 else s / penalty
    return out


def test_repetition_penalty_acts_only_on_the_last_16_after_16(model):
    proc = kimi.WindowedRepetitionPenalty(1.1, 16)
    torch.manual_seed(0)
    for n in (0, 5, 16, 17, 20, 40):
        history = torch.randint(0, 30, (2, n))
        history[1, :3] = 29  # token 29 early only in row 1
        scores = torch.randn(2, 40)
        got = proc(history, scores.clone())
        for b in range(2):
            assert torch.allclose(got[b], _penalised(history[b].tolist(), scores[b])), (n, b)
        if n <= 16:
            assert torch.equal(got, scores)
        else:
            changed = set((got[1] != scores[1]).nonzero().flatten().tolist())
            assert changed <= set(history[1, -16:].tolist())
    assert len(kimi.processors(1.0, 16)) == 0 and len(model.logits_processor) == 1


def test_decoding_feeds_generated_tokens_to_the_processor_and_stops_at_eos(model):
    seen = []

    def spy(ids, scores):
        seen.append(ids.clone())
        return scores

    calls = {"n": 0}

    def force_eos(module, args, out):  # row 0 says text_eos at its third token, row 1 at its fifth
        calls["n"] += 1
        out = out.clone()
        for row, at in ((0, 3), (1, 5)):
            if calls["n"] == at:
                out[row, -1, EOS] = 1e4
        return out

    reqs = [_request(0.8, 0), _request(1.5, 1)]
    b = model.batch(*model.prompts(reqs)[:2])
    handle = model.text.backbone.lm_head.register_forward_hook(force_eos)
    try:
        out = kimi.greedy(model.text, b, max_new_tokens=10, eos=EOS, blank=BLANK, logits_processor=spy)
    finally:
        handle.remove()
    assert [len(t) for t in out.tokens] == [2, 4] and out.steps == 5
    assert [s.shape[1] for s in seen] == [0, 1, 2, 3, 4]
    assert torch.equal(seen[-1][0, 2:], torch.tensor([EOS, BLANK]))  # a finished row is fed text_blank


def test_batched_equals_one_by_one(model):
    reqs = [_request(0.9, 0), _request(2.4, 1), _request(31.0, 2)]
    batched = model.batch(*model.prompts(reqs)[:2])
    assert batched.attention_mask[0, 0] == 0  # left padding
    many = kimi.greedy(model.text, batched, max_new_tokens=5, eos=EOS, blank=BLANK,
                       logits_processor=model.logits_processor, keep_logits=True)
    for i, r in enumerate(reqs):
        one = kimi.greedy(model.text, model.batch(*model.prompts([r])[:2]), max_new_tokens=5, eos=EOS, blank=BLANK,
                          logits_processor=model.logits_processor, keep_logits=True)
        assert one.tokens[0] == many.tokens[i]
        for a, b in zip(one.logits, many.logits):
            assert torch.allclose(a[0], b[i], atol=1e-4)
    model.batch_size = 3
    try:
        outs = model.generate(reqs, [], 5)
    finally:
        model.batch_size = 1
    singles = model.generate(reqs, [], 5)
    assert [o.text for o in outs] == [o.text for o in singles]
    assert [o.tokens_in for o in outs] == [glm.codes_for(len(r.audio)) for r in reqs]


def test_outputs_carry_counts_and_stats(model):
    out = model.generate([_request(2.0)], [], 4)[0]
    assert out.tokens_in == out.tokens_out == 25 and out.tokens_per_point == []
    s = out.stats
    assert s["audio_inputs"] == "both" and s["ablation"] is False and 1 <= s["new_tokens"] <= 4
    assert s["prefill_tokens"] == len(ASR_EN) + 25 + 6 and s["seconds"] > 0
    assert s["total_flops"] == s["prefill_flops"] + s["frontend_flops"] > 0


def test_hidden_states_are_the_audio_span_entering_each_layer(model):
    req = _request(1.1)
    states = model.hidden_states(req)
    assert len(states) == model.n_layers + 1 and all(h.shape == (14, model.config.hidden) for h in states)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[0]),
                                             with_kwargs=True) for layer in model.text.backbone.model.layers]
    try:
        b = model.batch(*model.prompts([req])[:2])
        model.text(input_ids=b.input_ids, audio_ids=b.audio_ids, audio_embeds=b.audio_embeds, audio_mask=b.audio_mask,
                   attention_mask=b.attention_mask, position_ids=b.position_ids)
    finally:
        for h in hooks:
            h.remove()
    for l in range(model.n_layers):
        assert torch.allclose(states[l], seen[l][b.audio_mask[0]], atol=1e-6), l
    with torch.inference_mode():
        x = model.text.embed(b.input_ids, b.audio_ids, b.audio_embeds, b.audio_mask)
        last = model.text.backbone.model(inputs_embeds=x).last_hidden_state  # after the final norm
    assert torch.allclose(states[-1], last[0, b.audio_mask[0]], atol=1e-5)


# ----------------------------------------------------------------------------- ablations
def test_ablations_are_labelled_and_feed_what_they_say(folders):
    cont = kimi.load(_cfg(folders, audio_inputs="continuous", speech_tokenizer=None))
    disc = kimi.load(_cfg(folders, audio_inputs="discrete"))
    req = _request(1.0)
    p, e, _ = cont.prompts([req])
    assert [a for a, s in zip(p[0].audio_ids, p[0].audio_slots) if s] == [BLANK] * 13 and e[0] is not None
    p, e, _ = disc.prompts([req])
    assert all(a >= OFFSET for a, s in zip(p[0].audio_ids, p[0].audio_slots) if s) and e[0] is None
    assert disc.batch(p, e).audio_embeds is None
    for m, label in ((cont, "continuous"), (disc, "discrete")):
        out = m.generate([req], [], 2)[0]
        assert out.stats["audio_inputs"] == label and out.stats["ablation"] is True
        assert m.name == f"tiny-kimiaudio-{label}-ablation"
    assert cont.generate([req], [], 2)[0].stats["speech_tokenizer_flops"] == 0
    assert disc.generate([req], [], 2)[0].stats["whisper_flops"] == 0
    cfg = compose(["model=tiny_kimiaudio", "model.audio_inputs=continuous"])
    assert cfg.model.name == "tiny-kimiaudio-continuous-ablation" and "continuous" in cfg.run_name


# ----------------------------------------------------------------------------- efficiency
def test_frontend_flops_match_the_flop_counter(model):
    from torch.utils.flop_counter import FlopCounterMode

    fe = model.frontend
    audio = (0.1 * np.random.default_rng(1).standard_normal(40_000)).astype(np.float32)  # 2.5 s, 32 tokens
    work = model.frontend_work(audio)
    want = efficiency.kimi_frontend_flops(model.frontend_shape, **work)
    mel = fe.continuous.extractor([audio], sampling_rate=16000, return_tensors="pt")["input_features"]
    feats = fe.speech.feature_extractor([audio], sampling_rate=16000, return_attention_mask=True, return_tensors="pt",
                                        padding="longest", pad_to_multiple_of=1280)
    attn = [fe.continuous.encoder.config, fe.speech.module.layers[0].self_attn.config]
    saved = [c._attn_implementation for c in attn]
    try:
        for c in attn:
            c._attn_implementation = "eager"
        counts = {}
        for key, fn in (
            ("whisper_flops", lambda: fe.continuous.encoder(mel)),
            ("speech_tokenizer_flops", lambda: fe.speech.module(feats["input_features"], feats["attention_mask"])),
            ("adaptor_flops", lambda: fe.continuous.embed(torch.zeros(work["tokens"], 4 * 32))),
        ):
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                fn()
            counts[key] = counter.get_total_flops()
    finally:
        for c, s in zip(attn, saved):
            c._attn_implementation = s
    assert counts == {k: want[k] for k in counts} and want["frontend_flops"] == sum(counts.values())


# ----------------------------------------------------------------------------- bad input
def test_bad_requests_stop_before_compute(model):
    calls = []
    handle = model.text.backbone.model.register_forward_pre_hook(lambda *a: calls.append(1))
    short = dataclasses.replace(model.config, max_positions=200)
    try:
        with pytest.raises(ValueError, match="empty audio"):
            model.generate([_request(0.5, 0), Request(utt=_request(0.1).utt, audio=np.zeros(0, np.float32))], [], 2)
        real = model.config
        model.config = short
        try:
            with pytest.raises(ValueError) as err:
                model.generate([_request(0.5, 0), _request(14.0, 1)], [], 10)
        finally:
            model.config = real
    finally:
        handle.remove()
    msg = str(err.value)
    assert "\n" not in msg and "175 audio tokens" in msg and "beyond Kimi-Audio's 200" in msg
    assert calls == []


def test_bad_folders_are_one_clear_line(folders, tmp_path):
    ckpt_dir, tok_dir = folders

    def fails(exc, needle, **over):
        with pytest.raises(exc) as err:
            kimi.load(_cfg(folders, **over))
        msg = str(err.value)
        assert "\n" not in msg and needle in msg, msg
        return msg

    msg = fails(FileNotFoundError, "does not exist", path=str(tmp_path / "nowhere"))
    assert "huggingface-cli download moonshotai/Kimi-Audio-7B-Instruct" in msg
    for gone in ("model-2-of-2.safetensors", "tiktoken.model", "whisper-large-v3/model.safetensors"):
        d = _copy(ckpt_dir, tmp_path / gone.replace("/", "_"))
        (d / gone).unlink()
        fails(FileNotFoundError, f"missing {gone}", path=str(d))
    d = _copy(ckpt_dir, tmp_path / "notkimi")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**raw, "architectures": ["Qwen2ForCausalLM"]}))
    fails(ValueError, "is not a Kimi-Audio config", path=str(d))
    d = _copy(ckpt_dir, tmp_path / "extra")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.something_else.weight"] = "model-1-of-2.safetensors"
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(ValueError, "model.something_else.weight", path=str(d))
    msg = fails(FileNotFoundError, "model.audio_inputs=continuous", speech_tokenizer=str(tmp_path / "no-tokenizer"))
    assert "THUDM/glm-4-voice-tokenizer" in msg and "ablation" in msg
    d = _copy(tok_dir, tmp_path / "tok-partial")
    (d / "model.safetensors").unlink()
    fails(FileNotFoundError, "missing model.safetensors", speech_tokenizer=str(d))
    fails(ValueError, "allowed: both, continuous, discrete", audio_inputs="mixed")
    fails(ValueError, "model.n_layers=28", n_layers=28)


# ----------------------------------------------------------------------------- compression
# thresholds for the tiny random model: its neighbouring audio tokens have cosine similarity ~0.94 (median) at l=0
NO_MERGE = [Point(0, "affinity", {"threshold": 1.5, "window": 1}), Point(2, "affinity", {"threshold": 1.5, "window": 3})]
DAP = [Point(0, "affinity", {"threshold": 0.95, "window": 1}), Point(3, "affinity", {"threshold": 0.9, "window": 3})]
NEW = 5


def _worded(seconds: float, i: int) -> Request:
    """A request whose utterance has word timings every 0.4 s (the oracle operators need them)."""
    from speech_redundancy.data.records import Word

    req = _request(seconds, i)
    req.utt.words = [Word(f"w{k}", 0.05 + 0.4 * k, 0.35 + 0.4 * k) for k in range(int(seconds / 0.4))]
    req.seed = 100 + i
    return req


def _decoded(model, reqs, points, batch_size=1, **options):
    """(outputs, generated ids per request) of ``model.generate``; ids are read where the adapter decodes."""
    seen = []

    def spy(batch, max_new_tokens):
        rows = kimi.KimiAudioModel.decode(model, batch, max_new_tokens)
        seen.extend([i for i in row if i != model.tokenizer.pad_token_id] for row in rows.tolist())
        return rows

    saved = {k: getattr(model, k) for k in ("batch_size", *options)}
    model.decode, model.batch_size = spy, batch_size
    for k, v in options.items():
        setattr(model, k, v)
    try:
        outs = model.generate(reqs, points, NEW)
    finally:
        del model.decode
        for k, v in saved.items():
            setattr(model, k, v)
    return outs, seen


def _greedy_under(model, batch, points, **kw):
    """Per-step logits and tokens of greedy decoding with ``points`` (None: no hooks at all)."""
    from speech_redundancy.engine import compression

    b = kimi.Batch(**batch)
    args = dict(max_new_tokens=NEW, eos=EOS, blank=BLANK, keep_logits=True, stop_at_eos=False)
    if points is None:
        return kimi.greedy(model.text, b, **args), None
    with compression(model.text, points, model.reach, **kw) as session:
        out = kimi.greedy(model.text, b, **args)
    return out, session


@pytest.mark.parametrize("positions", ["first", "centroid", "renumber"])
def test_no_merge_is_bit_identical_to_the_adapter_without_compression(model, positions):
    def hooks():  # transformers installs output-capturing hooks of its own: only ours must go
        return {n: (set(m._forward_pre_hooks), set(m._forward_hooks)) for n, m in model.text.named_modules()}

    before = hooks()
    reqs = [_request(1.3, 0), _request(2.1, 1)]
    batch = model.inputs(reqs)
    ref, _ = _greedy_under(model, batch, None)
    for points in ([], NO_MERGE):
        got, session = _greedy_under(model, batch, points, positions=positions, pool_early_kv=True)
        assert got.tokens == ref.tokens
        assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
        assert [r.tokens_out for r in session.records] == [r.tokens_in for r in session.records] == [17, 27]
    # through the adapter: the same ids and one retention of 1
    plain, ids = _decoded(model, reqs, [])
    none, ids_none = _decoded(model, reqs, NO_MERGE)
    assert ids == ids_none and [o.text for o in plain] == [o.text for o in none]
    assert all(o.tokens_out == o.tokens_in and o.tokens_per_point == [o.tokens_in] * 2 for o in none)
    assert hooks() == before


def test_layer0_equals_the_backbone_on_prepooled_fused_embeddings(model):
    req = _request(2.1, 1)
    batch = model.inputs([req])
    with torch.inference_mode():
        x = model.text.embed(batch["input_ids"], batch["audio_ids"], batch["audio_embeds"], batch["audio_mask"])[0]
    slots = batch["audio_mask"][0].nonzero().squeeze(1)
    s, e = int(slots[0]), int(slots[-1]) + 1  # s1..sN, between media_begin and media_end
    assert batch["audio_ids"][0, s - 1] == MEDIA_BEGIN and batch["audio_ids"][0, e] == MEDIA_END
    c = ops.compress(x[s:e], "affinity", threshold=0.95, window=1)
    assert 1 < c.n_out < e - s  # something merged, not everything
    pooled = torch.cat([x[:s], c.tokens, x[e:]]).unsqueeze(0)
    pos = torch.cat([torch.arange(s), s + c.positions, torch.arange(e, x.shape[0])]).unsqueeze(0)
    with torch.inference_mode():
        ref = model.text.backbone(inputs_embeds=pooled, position_ids=pos,
                                  attention_mask=torch.ones_like(pos)).logits
        from speech_redundancy.engine import compression

        with compression(model.text, [Point(0, "affinity", {"threshold": 0.95, "window": 1})], model.reach) as ses:
            got = model.text(**batch, logits_to_keep=0).logits
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert ses.records[0].tokens_per_point == (c.n_out,) and ses.records[0].groups[0] == tuple(c.groups.tolist())


def test_a_deep_point_shortens_only_the_layers_from_it_on(model):
    req = _request(2.1, 1)
    vanilla = model.generate([req], [], NEW)[0]
    out = model.generate([req], [Point(3, "affinity", {"threshold": 0.9, "window": 3})], NEW)[0]
    T, n_in, n_out = vanilla.stats["prefill_tokens"], out.tokens_in, out.tokens_out
    assert n_out < n_in == vanilla.tokens_in == 27
    assert out.stats["layer_tokens"] == [T, T, T, T - n_in + n_out]
    assert out.stats["prefill_flops"] == efficiency.prefill_flops(model.shape, [T, T, T, T - n_in + n_out], 1)
    assert out.stats["prefill_flops"] < vanilla.stats["prefill_flops"]
    assert out.stats["kv_bytes"] == efficiency.kv_bytes_analytic(model.shape, out.stats["layer_tokens"], 4)
    # layers below the point see exactly the uncompressed run's hidden states
    seen = []

    def keep(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    hook = model.text.backbone.model.layers[2].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model.generate([req], [], 1)
        model.generate([req], [Point(3, "affinity", {"threshold": 0.9, "window": 3})], 1)
    finally:
        hook.remove()
    assert torch.equal(seen[0], seen[1])


def test_cached_decoding_equals_recomputation_under_compression(model):
    """Decode steps against a compressed cache give the logits of running the whole sequence again each step
    under the same hooks (no cache)."""
    from speech_redundancy.engine import compression

    req = _request(1.7)
    batch = model.inputs([req])
    got, _ = _greedy_under(model, batch, DAP)
    fed = got.tokens[0][:-1]
    n = len(fed)
    b = kimi.Batch(**batch)
    for i, step in enumerate(got.logits):
        k = i  # tokens fed after the prompt before step i
        text = torch.cat([b.input_ids, torch.tensor([fed[:k]], dtype=torch.long)], dim=1)
        audio = torch.cat([b.audio_ids, torch.full((1, k), BLANK)], dim=1)
        mask = torch.cat([b.audio_mask, torch.zeros(1, k, dtype=torch.bool)], dim=1)
        feats = torch.cat([b.audio_embeds, torch.zeros(1, k, b.audio_embeds.shape[-1])], dim=1)
        with torch.inference_mode(), compression(model.text, DAP, model.reach):
            full = model.text(input_ids=text, audio_ids=audio, audio_embeds=feats, audio_mask=mask,
                              attention_mask=torch.ones_like(text), position_ids=torch.arange(text.shape[1])[None])
        assert (step[0] - full.logits[0, -1]).abs().max() < 1e-4, i
    assert n == NEW - 1


@pytest.mark.parametrize("points", [
    DAP,
    [Point(0, "uniform_merge", {"budget": 1}), Point(2, "random_drop", {"budget": 1})],
], ids=["dap", "oracle"])
def test_batched_equals_one_by_one_with_compression(model, points):
    reqs = [_worded(0.9, 0), _worded(2.4, 1), _worded(31.0, 2)]
    many, ids_many = _decoded(model, reqs, points, batch_size=3)
    for i, r in enumerate(reqs):
        (one,), ids_one = _decoded(model, [r], points)
        assert ids_one == [ids_many[i]], i
        got = many[i]
        assert (got.tokens_in, got.tokens_out, got.tokens_per_point, got.groups) == \
            (one.tokens_in, one.tokens_out, one.tokens_per_point, one.groups), i
        for key in ("layer_tokens", "prefill_flops", "kv_bytes", "total_flops", "new_tokens"):
            assert got.stats[key] == one.stats[key], (i, key)
    assert [o.tokens_in for o in many] == [glm.codes_for(len(r.audio)) for r in reqs]
    assert all(o.tokens_out < o.tokens_in for o in many)
    assert many[0].stats["batch_size"] == 3


def test_word_windows_map_at_12_5_tokens_per_second(model):
    """budget 1 with uniform_merge: one token per word window plus one per gap between windows."""
    req = _worded(2.4, 1)
    out = model.generate([req], [Point(0, "uniform_merge", {"budget": 1, "gaps": "keep"})], 2)[0]
    spans = ops.spans_from_words([w.start for w in req.utt.words], [w.end for w in req.utt.words], 12.5,
                                 out.tokens_in)
    inside = int(sum(int(e - s) for s, e in spans.tolist()))
    assert out.tokens_in == 30 and out.tokens_out == len(spans) + (out.tokens_in - inside)


def test_a_layer_beyond_the_last_is_one_line_before_compute(model, folders):
    from speech_redundancy.runner import RunError, build_points, check_layers_before_load

    calls = []
    handle = model.text.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError) as err:
            model.generate([_request(0.5)], [Point(4, "affinity", {"threshold": 0.8, "window": 3})], 2)
    finally:
        handle.remove()
    msg = str(err.value)
    assert "\n" not in msg and "layer=4 is beyond Kimi-Audio's decoder stack of 4 layers: allowed 0..3" in msg
    assert calls == []
    cfg = compose(["model=tiny_kimiaudio", "intervention=affinity", "layer=4"])
    with pytest.raises(RunError, match=r"layer=4 is out of range for tiny-kimiaudio: allowed 0..3 \(0 = the fused"):
        check_layers_before_load(cfg, build_points(cfg))
    real = compose(["model=kimiaudio", "intervention=affinity", "layer=28"])
    with pytest.raises(RunError, match="allowed 0..27"):
        check_layers_before_load(real, build_points(real))


# ----------------------------------------------------------------------------- configs and a run
def test_configs_compose():
    real = compose(["model=kimiaudio"]).model
    assert real.family == "kimi" and real.n_layers == 28 and real.token_rate == 12.5 and real.audio_inputs == "both"
    assert real.repetition_penalty == 1.1 and real.repetition_window == 16 and real.name == "kimi-audio-7b-instruct"
    tiny = compose(["model=tiny_kimiaudio"]).model
    assert tiny.tiny and tiny.n_layers == 4 and tiny.dtype == "float32"


def test_run_end_to_end_on_the_demo_set(folders, demo_manifest, tmp_path):
    from speech_redundancy.runner import run

    cfg = compose(["model=tiny_kimiaudio", f"model.path={folders[0]}", f"model.speech_tokenizer={folders[1]}",
                   "data.limit=3", "max_new_tokens=8"])
    summary = run(cfg, tmp_path)
    assert summary["n_utterances"] == 3 and summary["n_failed"] == 0 and summary["retention"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["stats"]["audio_inputs"] == "both" and r["tokens_in"] > 0 for r in rows)


# ----------------------------------------------------------------------------- the Kimi-Audio presets
KIMI_PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*_kimi.yaml"))


def _hydra(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_kimi_presets_carry_the_papers_kimi_settings():
    from omegaconf import OmegaConf

    assert KIMI_PRESETS == ["affinity_layers_kimi", "cosine_dynamics_kimi", "group_plots_kimi", "main_results_kimi",
                            "oracle_layers_kimi", "sensitivity_layer_kimi", "trajectories_kimi"]
    sweeps = {}
    for name in KIMI_PRESETS:
        cfg = _hydra([f"experiment={name}", "++data.root=/data"])
        assert cfg.model.family == "kimi" and cfg.model.n_layers == 28 and cfg.experiment_name == name
        params = cfg.hydra.sweeper.params
        sweeps[name] = OmegaConf.to_container(params) if params else {}
    assert sweeps["oracle_layers_kimi"] == {"layer": "range(0,26,5)", "operator": "random_drop,uniform_drop,uniform_merge",
                                            "budget": "1,2,4,8"}
    assert sweeps["affinity_layers_kimi"] == {"layer": "range(0,26,5)", "threshold": "0.6,0.7,0.8,0.9"}
    assert sweeps["sensitivity_layer_kimi"] == {"layer": "0,1,2,3,24,25,26,27", "threshold": "0.6,0.7,0.8,0.9"}
    assert sweeps["group_plots_kimi"] == {"layer": "range(0,26,5)"}
    assert sweeps["trajectories_kimi"]["layer"] == "range(0,26,5)"
    assert _hydra(["experiment=trajectories_kimi", "++data.root=/d"]).budget == 1
    dap = _hydra(["experiment=main_results_kimi", "intervention=dap", "++data.root=/d"]).intervention
    assert [(p.layer, p.params.threshold, p.params.window) for p in dap.points] == [(0, 0.8, 1), (25, 0.7, 3)]
    aff = _hydra(["experiment=affinity_layers_kimi", "++data.root=/d"])
    assert aff.window == 3 and aff.intervention.name == "affinity"


@pytest.fixture(scope="module")
def two_worded(demo_manifest, tmp_path_factory):
    """The two shortest real demo clips with word timings (the oracle presets need them)."""
    from speech_redundancy.data.records import read_manifest, write_manifest

    utts = sorted((u for u in read_manifest(demo_manifest) if u.extra.get("kind") == "real" and u.words),
                  key=lambda u: u.duration)[:2]
    path = tmp_path_factory.mktemp("kimi-two") / "manifest.jsonl"
    write_manifest(path, utts)
    return path


# each preset once on the 4-layer tiny model: a deep layer (3) in place of the paper's, DAP for Table 8
TINY = {"main_results_kimi": ["intervention=dap", "layer_deep=3"], "trajectories_kimi": ["layer=3"],
        "oracle_layers_kimi": ["layer=3"], "affinity_layers_kimi": ["layer=3"], "group_plots_kimi": ["layer=3"],
        "sensitivity_layer_kimi": ["layer=3"]}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_kimi_preset_runs_on_the_tiny_kimiaudio(name, folders, two_worded, tmp_path):
    from speech_redundancy.runner import run

    cfg = _hydra([f"experiment={name}", "model=tiny_kimiaudio", f"model.path={folders[0]}",
                  f"model.speech_tokenizer={folders[1]}", "data=manifest", f"data.manifest={two_worded}",
                  "data.sample=null", "data.limit=2", "max_new_tokens=4", *TINY[name]])
    summary = run(cfg, tmp_path / name)
    assert summary["n_utterances"] == 2 and summary["n_failed"] == 0, name
    assert 0 < summary["retention"] < 1.0, name
    rows = [json.loads(x) for x in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    assert all(r["stats"]["frontend_flops"] > 0 and r["stats"]["audio_inputs"] == "both" for r in rows)
    if cfg.get("save_groups"):
        assert all(r["groups"] and r["word_spans"] for r in rows)


def test_cosine_dynamics_on_the_tiny_kimiaudio(folders, two_worded, tmp_path):
    from speech_redundancy import analysis

    out = analysis.main(["experiment=cosine_dynamics_kimi", "model=tiny_kimiaudio", f"model.path={folders[0]}",
                         f"model.speech_tokenizer={folders[1]}", "data=manifest", f"data.manifest={two_worded}",
                         "data.sample=null", f"dynamics.out_dir={tmp_path}"])
    rows = [json.loads(x) for x in (out / "dynamics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]  # 4 LLM layers + the normed output
    assert all(r["n_utterances"] == 2 and -1 <= r["global_mean"] <= 1 for r in rows)
    assert not math.isnan(rows[0]["max_within_words"])

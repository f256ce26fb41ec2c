"""Kimi-Audio against the official code: golden outputs of MoonshotAI's own Kimi-Audio code (kimia_infer, the
checkpoint's modeling_moonshot_kimia.py, the GLM-4-Voice tokenizer) run on CPU on the tiny checkpoint and two real
clips, stored in tests/fixtures/kimi_golden/ (README there: commits, how, every replacement). Float32 throughout.

The tiny checkpoint is rebuilt by ``write_tiny`` (seed 0); its tensors must hash to what the official run loaded
(``golden.json``), and the official loader reported no missing or unexpected key on it. Its names are the public
layout's (tests/test_kimi_layout.py)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open

from speech_redundancy.data.records import Utterance
from speech_redundancy.models import kimi
from speech_redundancy.models import kimi_checkpoint as ckpt
from speech_redundancy.models.base import Request

GOLDEN = Path(__file__).parent / "fixtures" / "kimi_golden"
META = json.loads((GOLDEN / "golden.json").read_text())
CLIPS = tuple(META["clips"])
LOGITS_TOL = 1e-4


def weights_digest(*folders: Path) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) of every safetensors file under the folders."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(f.keys()):
                    t = f.get_tensor(name).contiguous()
                    h.update(f"{path.relative_to(folder)}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi-golden")
    out = ckpt.write_tiny(root / "tiny-kimiaudio", root / "tiny-glm4-voice-tokenizer", ckpt.TinyShape(seed=0))
    assert weights_digest(*out) == META["checkpoint"]["weights_sha256"], (
        "write_tiny(seed=0) no longer writes the weights the official code was run on: regenerate "
        "tests/fixtures/kimi_golden (README there)")
    return out


@pytest.fixture(scope="module")
def model(folders):
    return kimi.load({"family": "kimi", "name": "tiny-kimiaudio", "path": str(folders[0]),
                      "speech_tokenizer": str(folders[1]), "dtype": "float32", "device": "cpu", "n_layers": 4})


@pytest.fixture(scope="module")
def clips(demo_manifest):
    """The two clips, rebuilt from the demo set as the official run read them (float32, concatenated)."""
    demo = Path(demo_manifest).parent
    rows = {json.loads(line)["id"]: json.loads(line) for line in Path(demo_manifest).read_text().splitlines()}
    out = {}
    for name, meta in META["clips"].items():
        audio = np.concatenate([soundfile.read(demo / rows[i]["audio"], dtype="float32")[0] for i in meta["demo_ids"]])
        assert hashlib.sha256(audio.tobytes()).hexdigest() == meta["sha256_float32"], name
        out[name] = audio
    return out


def _golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def _request(name: str, audio: np.ndarray) -> Request:
    return Request(utt=Utterance(id=name, audio="", text="", duration=len(audio) / 16000, task="asr",
                                 language="en"), audio=audio)


def _digest(t: torch.Tensor) -> np.ndarray:
    t = t.detach().double()
    return np.array([float(t.sum()), float(t.abs().sum()), float((t * t).sum())])


def _same_digest(ours: np.ndarray, theirs: np.ndarray, rtol: float, what: str) -> None:
    """Sum, absolute sum and sum of squares agree to ``rtol`` (the plain sum, which may be near 0, to ``rtol`` of
    the absolute sum)."""
    tol = np.array([rtol * theirs[1], rtol * theirs[1], rtol * theirs[2]])
    assert np.all(np.abs(ours - theirs) <= tol), f"{what}: digest {ours} vs official {theirs}"


def _close(ours: np.ndarray, theirs: np.ndarray, tol: float, what: str) -> None:
    err = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    assert ours.shape == theirs.shape and err <= tol, f"{what}: max |diff| {err:.2e} > {tol:.0e}"


def test_the_official_loader_took_every_tensor():
    for part in ("kimi", "glm4_tokenizer"):
        info = META["official_loading_info"][part]
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], part


@pytest.mark.parametrize("name", CLIPS)
def test_prompt_streams_codes_and_whisper_features_equal_the_official(model, clips, name):
    g = _golden(name)
    prompts, embeds, _ = model.prompts([_request(name, clips[name])])
    p = prompts[0]
    assert p.audio_ids == g["audio_ids"].tolist()
    assert p.text_ids == g["text_ids"].tolist()
    assert p.audio_slots == g["audio_slots"].tolist()
    codes = [i - model.config.token_offset for i, s in zip(p.audio_ids, p.audio_slots) if s]
    assert codes == g["codes"].tolist()
    feats = model.frontend.continuous.features([clips[name]])[0]
    assert tuple(feats.shape) == (int(g["whisper_rows"]), int(g["whisper_dim"]))
    _close(feats[:, :8].numpy(), g["whisper_head"], 1e-4, "whisper features")
    _same_digest(_digest(feats), g["whisper_digest"], 1e-5, "whisper features")


def _prefill(model, name, audio):
    prompts, embeds, _ = model.prompts([_request(name, audio)])
    return model.batch(prompts, embeds)


@pytest.mark.parametrize("name", CLIPS)
def test_fused_embeddings_and_prefill_logits_equal_the_official(model, clips, name):
    g = _golden(name)
    b = _prefill(model, name, clips[name])
    with torch.inference_mode():
        fused = model.text.embed(b.input_ids, b.audio_ids, b.audio_embeds, b.audio_mask)[0]
        step = model.text(input_ids=b.input_ids, audio_ids=b.audio_ids, audio_embeds=b.audio_embeds,
                          audio_mask=b.audio_mask, attention_mask=b.attention_mask, position_ids=b.position_ids)
    assert list(fused.shape) == g["fused_shape"].tolist()
    _close(fused[:, :8].numpy(), g["fused_head"], 1e-5, "fused embeddings")
    _same_digest(_digest(fused), g["fused_digest"], 1e-6, "fused embeddings")
    logits = step.logits[0, -1]
    _close(logits[g["prefill_logit_ids"]].numpy(), g["prefill_logits"], LOGITS_TOL, "prefill logits")
    _same_digest(_digest(logits), g["prefill_digest"], 1e-6, "prefill logits")


@pytest.mark.parametrize("name", CLIPS)
def test_a_step_feeding_text_id_0_adds_no_text_embedding_as_the_official(model, clips, name):
    """The official fusion adds E[text id] only when the step's text ids do not sum to 0."""
    g = _golden(name)
    b = _prefill(model, name, clips[name])
    blank = model.tokenizer.ids.text_blank
    T = b.input_ids.shape[1]
    with torch.inference_mode():
        pre = model.text(input_ids=b.input_ids, audio_ids=b.audio_ids, audio_embeds=b.audio_embeds,
                         audio_mask=b.audio_mask, attention_mask=b.attention_mask, position_ids=b.position_ids)
        for text_id, key in ((0, "zero_step_logits"), (65, "nonzero_step_logits")):
            cache = copy.deepcopy(pre.cache)  # each step extends its own copy
            step = model.text(input_ids=torch.tensor([[text_id]]), audio_ids=torch.tensor([[blank]]),
                              attention_mask=torch.ones(1, T + 1, dtype=torch.long), position_ids=torch.tensor([[T]]),
                              cache=cache)
            _close(step.logits[0, -1][g["prefill_logit_ids"]].numpy(), g[key], LOGITS_TOL, key)


def _greedy(model, batch):
    ids = model.tokenizer.ids
    return kimi.greedy(model.text, batch, max_new_tokens=24, eos=ids.text_eos, blank=ids.text_blank,
                       logits_processor=model.logits_processor, keep_logits=True)


@pytest.mark.parametrize("name", CLIPS)
def test_24_greedy_tokens_and_their_logits_equal_the_official(model, clips, name):
    g = _golden(name)
    out = _greedy(model, _prefill(model, name, clips[name]))
    assert out.tokens[0] == g["tokens"].tolist() == g["official_text_tokens"].tolist()
    steps = torch.stack(out.logits)[:, 0]
    _close(steps[:, g["step_logit_ids"]].numpy(), g["step_logits"], LOGITS_TOL, "decode-step logits")


def test_batched_equals_the_official(model, clips):
    prompts, embeds = [], []
    for name in CLIPS:
        p, e, _ = model.prompts([_request(name, clips[name])])
        prompts += p
        embeds += e
    out = _greedy(model, model.batch(prompts, embeds))
    steps = torch.stack(out.logits)
    for b, name in enumerate(CLIPS):
        g = _golden(name)
        assert out.tokens[b] == g["tokens"].tolist(), name
        _close(steps[:, b][:, g["step_logit_ids"]].numpy(), g["step_logits"], LOGITS_TOL, f"{name} batched")

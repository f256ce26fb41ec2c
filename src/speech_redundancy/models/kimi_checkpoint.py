"""The Kimi-Audio-7B-Instruct checkpoint folder on disk: what it must hold, its config as a stock ``Qwen2Config``,
and its weights loaded into stock modules (``Qwen2ForCausalLM``, ``WhisperEncoder``) by the shard index. Changes
nothing in transformers. Also writes a random tiny checkpoint in the same layout (``write_tiny``).

Layout of moonshotai/Kimi-Audio-7B-Instruct (from public sources, recorded with them in
tests/fixtures/layouts/kimi_*.json; the weights themselves were never opened here):

- ``config.json``: ``architectures: ["MoonshotKimiaForCausalLM"]``, Qwen2 fields (hidden 3584, 28 layers, 28 heads,
  4 KV heads, FFN 18944, vocab 168448, max_position_embeddings 8192, rms_norm_eps 1e-6, ``rope_theta``) and the
  Kimi fields ``kimia_mimo_layers`` (6), ``kimia_mimo_transformer_from_layer_index`` (21), ``kimia_token_offset``
  (152064), ``kimia_text_output_vocab`` (152064), ``kimia_audio_output_vocab`` (16896), ``kimia_adaptor_input_dim``
  (5120), ``kimia_media_begin`` / ``kimia_media_end`` (151661 / 151663), ``use_whisper_feature``.
- ``model.safetensors.index.json`` and 36 shards (``model-1-of-35.safetensors`` .. ``model-35-of-35.safetensors``
  and ``model-36-of-36.safetensors``: read by the index, never by name); 453 tensors: the stock Qwen2 names
  (``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``), ``model.vq_adaptor.layers.{0,3,4}.*``,
  the MIMO branch (``model.mimo_layers.N.*``, ``model.mimo_norm``, ``mimo_output``) and one stored
  ``self_attn.rotary_emb.inv_freq`` per layer of both stacks (28 + 6); all bf16 (the index's total_size, 19532673280
  bytes, adds up only so).
- ``tiktoken.model`` (base64 token and rank per line, 151643 base tokens) and ``tokenizer_config.json`` (its
  ``added_tokens_decoder`` names the special ids).
- ``whisper-large-v3/``: ``config.json``, ``model.safetensors`` (a whole WhisperForConditionalGeneration:
  ``model.encoder.*``, ``model.decoder.*``, ``proj_out.*``), ``preprocessor_config.json``.
- Not read here: the remote-code files (``modeling_moonshot_kimia.py``, ``configuration_moonshot_kimia.py``,
  ``tokenization_kimia.py``), ``generation_config.json``, ``special_tokens_map.json``, and the audio-output parts
  (``audio_detokenizer/``, ``vocoder/``).

Ignored on load, by design: the MIMO branch and the audio head (they read the output of layer 21 and feed only the
audio logits; text output never depends on them, tests/test_kimi.py checks it) and the stored rotary buffers
(``Qwen2RotaryEmbedding`` computes them from ``rope_theta``). Every other tensor must fit a module: a missing or an
unexpected key stops the load, named.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HUB_ID = "moonshotai/Kimi-Audio-7B-Instruct"
ARCHITECTURE = "MoonshotKimiaForCausalLM"
INDEX = "model.safetensors.index.json"
WHISPER_DIR = "whisper-large-v3"
REQUIRED = ("config.json", INDEX, "tiktoken.model", "tokenizer_config.json", f"{WHISPER_DIR}/config.json",
            f"{WHISPER_DIR}/model.safetensors", f"{WHISPER_DIR}/preprocessor_config.json")
KIMI_FIELDS = ("kimia_token_offset", "kimia_media_begin", "kimia_media_end", "kimia_adaptor_input_dim",
               "kimia_mimo_layers", "kimia_mimo_transformer_from_layer_index")
QWEN2_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "rope_theta")
IGNORED = re.compile(r"^(model\.(mimo_)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
                     r"|model\.mimo_layers\.|model\.mimo_norm\.|mimo_output\.)")
ADAPTOR_PREFIX = "model.vq_adaptor.layers."  # the official VQAdaptor keeps its modules in a ``layers`` Sequential
OLD_ADAPTOR = re.compile(r"^model\.vq_adaptor\.\d+\.")  # this project's names before issue 18: refused, named


def download_hint(what: str = "the Kimi-Audio checkpoint") -> str:
    return (f"on a connected machine run `huggingface-cli download {HUB_ID} --local-dir <folder>` for {what}, "
            "then pass model.path=<folder>")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class KimiConfig:
    """The fields of Kimi-Audio's config.json this project uses."""

    hidden: int
    ffn: int
    n_layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    token_offset: int  # audio code c has id token_offset + c
    media_begin: int
    media_end: int
    adaptor_input_dim: int  # 4 stacked Whisper frames (4 x 1280)
    mimo_layers: int
    mimo_from_layer: int
    pad_token_id: int | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "config.json") -> "KimiConfig":
        archs = raw.get("architectures") or []
        missing = [k for k in KIMI_FIELDS + QWEN2_FIELDS if k not in raw]
        if ARCHITECTURE not in archs or missing:
            why = f"architectures={archs}" + (f", missing {', '.join(missing)}" if missing else "")
            raise ValueError(f"{where} is not a Kimi-Audio config ({why}); expected {ARCHITECTURE} with the "
                             f"kimia_* fields")
        if raw.get("rope_scaling"):
            raise ValueError(f"{where}: rope_scaling={raw['rope_scaling']!r} is not supported (Kimi-Audio has none)")
        if raw.get("tie_word_embeddings"):
            raise ValueError(f"{where}: tie_word_embeddings is true; Kimi-Audio's embeddings and heads are separate")
        if not raw.get("use_whisper_feature", True):
            raise ValueError(f"{where}: use_whisper_feature is false; this adapter expects Kimi-Audio-7B-Instruct")
        pad = raw.get("pad_token_id")
        return cls(
            hidden=int(raw["hidden_size"]), ffn=int(raw["intermediate_size"]), n_layers=int(raw["num_hidden_layers"]),
            heads=int(raw["num_attention_heads"]),
            kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            vocab=int(raw["vocab_size"]), max_positions=int(raw.get("max_position_embeddings", 8192)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(raw["rope_theta"]),
            token_offset=int(raw["kimia_token_offset"]), media_begin=int(raw["kimia_media_begin"]),
            media_end=int(raw["kimia_media_end"]), adaptor_input_dim=int(raw["kimia_adaptor_input_dim"]),
            mimo_layers=int(raw["kimia_mimo_layers"]),
            mimo_from_layer=int(raw["kimia_mimo_transformer_from_layer_index"]),
            pad_token_id=int(pad) if isinstance(pad, int) and 0 <= pad < int(raw["vocab_size"]) else None,
        )

    def qwen2_config(self, attn_implementation: str = "sdpa"):
        """The stock ``Qwen2Config`` of the text backbone (full attention everywhere, RoPE theta from config.json)."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
            num_hidden_layers=self.n_layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta}, use_sliding_window=False,
            tie_word_embeddings=False, pad_token_id=self.pad_token_id,
        )
        cfg._attn_implementation = attn_implementation
        return cfg


# ----------------------------------------------------------------------------- checks
def check_folder(folder: str | Path | None) -> Path:
    """The checkpoint folder, after checking it holds every file this adapter reads (one line naming what is
    missing otherwise)."""
    if not folder:
        raise FileNotFoundError(f"model.path is not set; {download_hint()}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Kimi-Audio checkpoint folder {folder} does not exist; {download_hint()}")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if not missing:
        missing = [s for s in sorted(set(read_index(folder).values())) if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"Kimi-Audio checkpoint folder {folder} is missing {', '.join(missing)}; "
                                f"{download_hint('the complete folder')}")
    return folder


def read_config(folder: Path) -> KimiConfig:
    return KimiConfig.from_json(json.loads((folder / "config.json").read_text()), where=str(folder / "config.json"))


def read_index(folder: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map."""
    raw = json.loads((folder / INDEX).read_text())
    if not isinstance(raw.get("weight_map"), dict):
        raise ValueError(f"{folder / INDEX} has no weight_map")
    return raw["weight_map"]


# ----------------------------------------------------------------------------- weights
def _read_shards(folder: Path, names_by_shard: dict[str, list[str]], dtype: torch.dtype, device: str):
    from safetensors import safe_open

    state = {}
    for shard, names in sorted(names_by_shard.items()):
        with safe_open(str(folder / shard), framework="pt", device=device) as f:
            have = set(f.keys())
            for name in names:
                if name not in have:
                    raise ValueError(f"{folder / INDEX} puts {name} in {shard}, which does not hold it")
                state[name] = f.get_tensor(name).to(dtype)
    return state


def _assign(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into a module built on the meta device; every key must match."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    module.load_state_dict(state, assign=True)


def split_keys(weight_map: dict[str, str], backbone_keys: set[str]) -> tuple[dict, dict, list[str], list[str]]:
    """Sort the index's tensors: (backbone names by shard, adaptor names by shard, ignored, unexpected)."""
    backbone, adaptor, ignored, unexpected = {}, {}, [], []
    old = sorted(n for n in weight_map if OLD_ADAPTOR.match(n))
    if old:
        raise ValueError(f"{old[0]}: the VQ adaptor under this project's old names (model.vq_adaptor.N.*); the official "
                         f"checkpoint names it {ADAPTOR_PREFIX}N.* (a tiny folder written before that fix: delete it "
                         "and it is rebuilt)")
    for name, shard in weight_map.items():
        if name in backbone_keys:
            backbone.setdefault(shard, []).append(name)
        elif name.startswith(ADAPTOR_PREFIX):
            adaptor.setdefault(shard, []).append(name)
        elif IGNORED.match(name):
            ignored.append(name)
        else:
            unexpected.append(name)
    return backbone, adaptor, ignored, unexpected


def load_backbone(folder: Path, config: KimiConfig, *, dtype: torch.dtype, device: torch.device,
                  attn_implementation: str = "sdpa"):
    """The stock ``Qwen2ForCausalLM`` and the VQ adaptor (``nn.Sequential``), loaded by the shard index."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    qcfg = config.qwen2_config(attn_implementation)
    with torch.device("meta"):
        backbone = Qwen2ForCausalLM(qcfg)
        adaptor = vq_adaptor(config.adaptor_input_dim, config.hidden, config.rms_norm_eps)
    weight_map = read_index(folder)
    persistent = set(backbone.state_dict()) - {n for n, _ in backbone.named_buffers()}
    by_shard, adaptor_shards, _, unexpected = split_keys(weight_map, persistent)
    if unexpected:
        raise ValueError(f"{folder / INDEX}: unexpected tensors {unexpected[:5]} (not Qwen2, vq_adaptor, MIMO or "
                         "rotary buffers)")
    load_device = str(device) if device.type == "cuda" else "cpu"
    _assign(backbone, _read_shards(folder, by_shard, dtype, load_device), f"{folder}: text backbone")
    state = _read_shards(folder, adaptor_shards, dtype, load_device)
    _assign(adaptor, {k[len(ADAPTOR_PREFIX):]: v for k, v in state.items()}, f"{folder}: {ADAPTOR_PREFIX}*")
    with torch.device(device):  # the non-persistent RoPE buffers, from rope_theta
        backbone.model.rotary_emb = Qwen2RotaryEmbedding(config=qcfg)
    return backbone.to(device).eval(), adaptor.to(device).eval()


def vq_adaptor(input_dim: int, hidden: int, eps: float) -> nn.Sequential:
    """Kimi-Audio's VQ adaptor, in the checkpoint's layout (``layers.0``, ``layers.3``, ``layers.4``): Linear, SiLU,
    (Dropout 0), Linear, LayerNorm with the config's ``rms_norm_eps``."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.SiLU(), nn.Dropout(0.0), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden, eps=eps))


def load_whisper(folder: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    """The stock ``WhisperEncoder`` from ``whisper-large-v3/`` (decoder and ``proj_out`` tensors ignored) and its
    ``WhisperFeatureExtractor``."""
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    wdir = folder / WHISPER_DIR
    wcfg = WhisperConfig.from_pretrained(str(wdir), local_files_only=True)
    wcfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        encoder = WhisperEncoder(wcfg)
    state, unexpected = {}, []
    load_device = str(device) if device.type == "cuda" else "cpu"
    with safe_open(str(wdir / "model.safetensors"), framework="pt", device=load_device) as f:
        for key in f.keys():
            if key.startswith("model.encoder."):
                state[key[len("model.encoder."):]] = f.get_tensor(key).to(dtype)
            elif not key.startswith(("model.decoder.", "proj_out.")):
                unexpected.append(key)
    if unexpected:
        raise ValueError(f"{wdir}/model.safetensors: unexpected tensors {unexpected[:5]}")
    _assign(encoder, state, f"{wdir}/model.safetensors: Whisper encoder")
    extractor = WhisperFeatureExtractor.from_pretrained(str(wdir), local_files_only=True)
    return encoder.to(device).eval(), extractor


# ----------------------------------------------------------------------------- a tiny random checkpoint
SPECIAL_TOKENS = {  # name -> id: the Kimi-Audio special tokens its prompts use (kimia_infer special_tokens.py names)
    "<|im_msg_end|>": 151645, "<|im_media_begin|>": 151661, "<|im_media_end|>": 151663,
    "<|im_kimia_text_blank|>": 151666, "<|im_kimia_text_eos|>": 151667, "<|im_kimia_user_msg_start|>": 151670,
    "<|im_kimia_assistant_msg_start|>": 151671, "<|im_kimia_speech_ct_id|>": 151675,
    "<|im_kimia_speech_ctd_id|>": 151676,
}
TINY_VERSION = 3  # bump when the tiny layout changes: folders built by another version are rebuilt


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the random tiny Kimi-Audio (same ids, layout and code path as the 7B, toy widths)."""

    hidden: int = 64
    n_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mimo_layers: int = 2
    mimo_from_layer: int = 1  # as 21 of 28 with 6 MIMO layers: n_layers - mimo_layers - 1
    codes: int = 256  # tiny codebook; ids token_offset + code
    whisper_hidden: int = 32
    whisper_layers: int = 2
    tokenizer_hidden: int = 32
    tokenizer_layers: int = 2
    seed: int = 0


def _tiny_config(shape: TinyShape) -> dict[str, Any]:
    offset = 152064
    return {
        "architectures": [ARCHITECTURE], "torch_dtype": "bfloat16",
        "hidden_size": shape.hidden, "intermediate_size": 2 * shape.hidden, "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "hidden_act": "silu",
        "vocab_size": offset + shape.codes, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False, "pad_token_id": 152063,
        "kimia_mimo_layers": shape.mimo_layers, "kimia_mimo_transformer_from_layer_index": shape.mimo_from_layer,
        "kimia_mimo_audiodelaytokens": 6, "kimia_token_offset": offset, "kimia_text_output_vocab": offset,
        "kimia_audio_output_vocab": shape.codes, "kimia_adaptor_input_dim": 4 * shape.whisper_hidden,
        "kimia_media_begin": SPECIAL_TOKENS["<|im_media_begin|>"], "kimia_media_end": SPECIAL_TOKENS["<|im_media_end|>"],
        "use_whisper_feature": True,
    }


def _random_state(shape: TinyShape, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the official checkpoint, random (norm gains in [0.5, 1.5]), in its key names."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM

    kcfg = KimiConfig.from_json(raw)
    qcfg = kcfg.qwen2_config("eager")
    qcfg.initializer_range = 0.2
    model = Qwen2ForCausalLM(qcfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.rotary_emb")}
    for i in range(shape.mimo_layers):
        layer = Qwen2DecoderLayer(qcfg, layer_idx=i)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.2)
        state.update({f"model.mimo_layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    state["model.mimo_norm.weight"] = torch.ones(shape.hidden)
    state["mimo_output.weight"] = torch.randn(kcfg.vocab, shape.hidden) * 0.2
    adaptor = vq_adaptor(kcfg.adaptor_input_dim, shape.hidden, kcfg.rms_norm_eps)
    state.update({ADAPTOR_PREFIX + k: v for k, v in adaptor.state_dict().items()})
    head_dim = shape.hidden // shape.heads
    inv_freq = 1.0 / (kcfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    for stack, n in (("layers", shape.n_layers), ("mimo_layers", shape.mimo_layers)):
        for i in range(n):
            state[f"model.{stack}.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    with torch.no_grad():
        for k, v in state.items():
            if k.endswith("norm.weight") and "vq_adaptor" not in k:
                v.uniform_(0.5, 1.5)
    return state


def _write_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Three shards with the real checkpoint's odd names (the last one holds embeddings, norms and heads), an
    index, every tensor bf16 (the rotary buffers too: with them in bf16 the real index's total_size is matched to
    the byte, tests/fixtures/layouts)."""
    from safetensors.torch import save_file

    last = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "mimo_output.weight",
            "model.mimo_norm.weight"}
    shards = {"model-1-of-2.safetensors": {}, "model-2-of-2.safetensors": {}, "model-3-of-3.safetensors": {}}
    for k, v in state.items():
        v = v.to(torch.bfloat16)
        if k in last:
            shards["model-3-of-3.safetensors"][k] = v.contiguous()
        elif k.startswith(("model.mimo_layers.", ADAPTOR_PREFIX)):
            shards["model-2-of-2.safetensors"][k] = v.contiguous()
        else:
            shards["model-1-of-2.safetensors"][k] = v.contiguous()
    weight_map, total = {}, 0
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _write_text_tokenizer(folder: Path) -> None:
    """A byte-level tiktoken file (256 tokens, rank = byte value, no merges) and Kimi-Audio's special ids."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for name, i in sorted(SPECIAL_TOKENS.items(),
                                                                                     key=lambda x: x[1])}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder,
                                                              "tokenizer_class": "TikTokenTokenizer"}, indent=2))


def _write_whisper(folder: Path, shape: TinyShape) -> None:
    """A tiny whole Whisper (encoder + decoder) with Whisper-large-v3's mels and 30 s window, fp16, saved as the
    real ``whisper-large-v3/`` is."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig(num_mel_bins=128, d_model=shape.whisper_hidden, encoder_layers=shape.whisper_layers,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=2 * shape.whisper_hidden, decoder_ffn_dim=2 * shape.whisper_hidden,
                        max_source_positions=1500, max_target_positions=64, vocab_size=51866,
                        init_std=0.2)
    model = WhisperForConditionalGeneration(cfg).to(torch.float16)
    (folder / WHISPER_DIR).mkdir()
    model.save_pretrained(str(folder / WHISPER_DIR), safe_serialization=True)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(folder / WHISPER_DIR))


def _write_speech_tokenizer(folder: Path, shape: TinyShape) -> None:
    """A tiny GLM-4-Voice tokenizer folder: its config fields, feature extractor and float32 weights (with the EMA
    buffers the real file carries)."""
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    from speech_redundancy.models.glm4_speech_tokenizer import SpeechTokenizer, SpeechTokenizerConfig

    raw = {"architectures": ["WhisperVQEncoder"], "model_type": "whisper", "num_mel_bins": 128,
           "d_model": shape.tokenizer_hidden, "encoder_layers": shape.tokenizer_layers,
           "encoder_attention_heads": 2, "encoder_ffn_dim": 2 * shape.tokenizer_hidden,
           "max_source_positions": 1500, "activation_function": "gelu", "pooling_kernel_size": 4,
           "pooling_type": "avg", "pooling_position": shape.tokenizer_layers,
           "quantize_position": shape.tokenizer_layers, "quantize_vocab_size": shape.codes,
           "quantize_causal_block_size": 200, "quantize_causal_encoder": False, "encoder_causal_attention": False,
           "encoder_causal_convolution": True, "quantize_encoder_only": True, "quantize_ema_decay": 0.99}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(folder))
    module = SpeechTokenizer(SpeechTokenizerConfig.from_json(raw))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif not name.endswith("layer_norm.bias"):
                p.normal_(std=0.2)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    state["ema_count"] = torch.ones(shape.codes)
    state["ema_weight"] = state["codebook.weight"].clone()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _stamp(shape: TinyShape) -> str:
    return json.dumps({"version": TINY_VERSION, **shape.__dict__}, sort_keys=True)


def write_tiny(folder: str | Path, speech_folder: str | Path, shape: TinyShape = TinyShape()) -> tuple[Path, Path]:
    """Write a random tiny Kimi-Audio checkpoint (official layout) and a tiny GLM-4-Voice tokenizer folder, once:
    folders already stamped with the same shape and version are kept. Deterministic in ``shape.seed``."""
    folder, speech_folder = Path(folder), Path(speech_folder)
    stamp = _stamp(shape)
    if _stamped(folder, stamp) and _stamped(speech_folder, stamp):
        return folder, speech_folder
    raw = _tiny_config(shape)
    for final in (folder, speech_folder):  # a folder the project did not write is never emptied or overwritten
        if not _ours_or_empty(final):
            raise FileExistsError(f"{final}: exists and is not a tiny model this project wrote (no .tiny.json); "
                                  "the tiny preset writes only into a missing or empty folder: pass another "
                                  "model.path / model.speech_tokenizer")
    for part, (final, build) in enumerate(((folder, "ckpt"), (speech_folder, "speech"))):
        if _stamped(final, stamp):
            continue
        torch.manual_seed(shape.seed + part)  # each folder alone is deterministic
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))  # new, so ours to remove
        tmp.rmdir()
        if build == "ckpt":
            tmp.mkdir(parents=True)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2))
            _write_shards(tmp, _random_state(shape, raw))
            _write_text_tokenizer(tmp)
            _write_whisper(tmp, shape)
        else:
            _write_speech_tokenizer(tmp, shape)
        (tmp / ".tiny.json").write_text(stamp)
        if not _stamped(final, stamp):  # another process (a sweep job) may have finished it meanwhile
            if _ours_or_empty(final):  # an older tiny model of ours, or an empty folder
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not _stamped(final, stamp):
                    raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, speech_folder


def _ours_or_empty(folder: Path) -> bool:
    """True for a missing folder, an empty one, or one carrying the tiny writer's marker (``.tiny.json``)."""
    if not folder.exists():
        return True
    return folder.is_dir() and not folder.is_symlink() and ((folder / ".tiny.json").is_file() or not any(folder.iterdir()))


def _stamped(folder: Path, stamp: str) -> bool:
    return (folder / ".tiny.json").is_file() and (folder / ".tiny.json").read_text() == stamp

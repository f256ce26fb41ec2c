"""Qwen2-Audio adapter: the generic stock-model adapter (``models.hf_audio_llm``) with Qwen2-Audio's own prompt
layout and long audio. The engine hooks ``Qwen2AudioForConditionalGeneration`` (stock transformers): its forward,
its ``model.language_model`` (Qwen2Model: masks, positions) and each Qwen2DecoderLayer; nothing else changes.

Qwen2-Audio in numbers: the processor turns up to 30 s of 16 kHz audio into 128 log-mel frames padded to 3000; the
Whisper-large-v3-shaped tower gives 1500 positions, average-pooled to 750 audio tokens (25 per second of real audio:
``((frames - 1) // 2 + 1 - 2) // 2 + 1``), one ``<|AUDIO|>`` placeholder each; the 7B LLM has 32 layers.

Long audio (``long_audio``; the feature extractor cuts at 30 s), three layouts, as their authors send it:

- ``truncate``: the first 30 s only (at most 750 audio tokens), as QwenLM/Qwen2-Audio ``eval_audio`` and
  Kimi-Audio-Evalkit do (they hand the whole clip to the processor, which keeps 30 s);
- ``span``: consecutive 30 s windows (the last one shorter) whose placeholders fill ONE audio span
  ``<|audio_bos|><|AUDIO|>...<|AUDIO|><|audio_eos|>`` (one ``<|AUDIO|>`` per window, each expanded by the processor
  to its window's tokens), e.g. 750 + 375 = 1125 tokens for 45 s; the stock model scatters the windows' features
  into that span in order (this project's layout, for the efficiency study's long buckets);
- ``items``: each 30 s window its own chat item ``Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n`` before the
  text, as lmms-eval's ``qwen2_audio`` model does (chat template only).

In every layout word windows map at 25 tokens/s across the audio slots in order (words past the kept audio are
dropped) and retention counts the real audio tokens fed. The limit is the LLM's context
(``max_position_embeddings``).

Attention scores at l = 0 (``Reach.input_scores``, :func:`encoder_scores`): the LLM's input has no layer l-1, so
attention-scored operators there read the audio encoder's last layer, as SA-MAP / VisionZip-style methods score
their input: per audio token, the attention its two encoder positions received (mean over heads, then over the
window's real query positions; padding positions left out), averaged over the pair as the tower's stride-2
average pool merges them; per window, then the windows in order. Needs the tower's attention eager
(``model.attn_implementation=eager`` sets the tower's and the LLM's).

``conf/model/tiny_qwen2audio.yaml`` builds a random tiny model instead (no download): a 2-layer tower and a 4-layer
Qwen2 LLM, with a byte-level tokenizer built here (256 byte tokens + Qwen2-Audio's special tokens) and the real
Whisper feature extractor (128 mels), so the processor, prompts and generate run the same code path as the 7B;
:func:`write_tiny` writes it as a checkpoint folder in the published tensor layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from speech_redundancy import efficiency
from speech_redundancy.audio import SAMPLE_RATE
from speech_redundancy.compress import Point
from speech_redundancy.engine import InputScores
from speech_redundancy.models import lslm
from speech_redundancy.models.base import Request
from speech_redundancy.models.hf_audio_llm import HFAudioLLM
from speech_redundancy.models.lslm import task_prompt, weights_missing

HUB_ID = "Qwen/Qwen2-Audio-7B"  # the base model (model=qwen2audio); model=qwen2audio_instruct names the Instruct one
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # one feature-extractor window
TOKEN_RATE = 25.0
LONG_AUDIO = ("truncate", "span", "items")
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS, "<|en|>", "<|zh|>"]


def reach(model):
    """Where Qwen2-Audio keeps what the engine touches (with audio-encoder scores for points at l = 0)."""
    out = lslm.stock_reach(model, "Qwen2-Audio")
    out.input_scores = encoder_scores(model)
    return out


def encoder_scores(model) -> InputScores:
    """Scores at l = 0 from the last layer of Qwen2-Audio's audio tower (module docstring)."""
    tower = model.model.audio_tower
    attention = tower.layers[-1].self_attn

    def to_slots(weights, kwargs):
        # weights [N windows, H, 1500, 1500]; a window's real encoder positions and audio tokens as the stock model
        # counts them from its mel frames (conv stride 2, then average pool 2)
        positions, tokens = tower._get_feat_extract_output_lengths(kwargs["feature_attention_mask"].sum(-1))
        parts = []
        for w, n, t in zip(weights, positions.tolist(), tokens.tolist()):
            received = w[:, :n, :n].float().mean(dim=(0, 1))  # [n]: mean over heads and the real query positions
            parts.append(received[: 2 * t].view(t, 2).mean(1))  # the pool's pairs
        return torch.cat(parts)

    return InputScores(attention=attention, to_slots=to_slots,
                       implementation=lambda: str(attention.config._attn_implementation or "eager"))


def audio_tokens_for(n_samples: int) -> int:
    """Audio tokens Qwen2-Audio gives ``n_samples`` (<= 30 s) of 16 kHz audio (mel frames -> conv stride 2 -> pool 2)."""
    frames = min(3000, math.ceil(n_samples / 160))  # the processor's attention mask counts ceil(samples / hop)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def windows(audio: np.ndarray, long_audio: str = "span") -> list[np.ndarray]:
    """The 30 s windows of a clip the model is fed under ``long_audio``: ``truncate`` the first one only, ``span``
    and ``items`` all consecutive windows (the last one shorter; one window for a clip of 30 s or less). A last
    window too short to give one audio token (20 ms or less) is left out."""
    if long_audio not in LONG_AUDIO:
        raise ValueError(f"model.long_audio={long_audio!r} is unknown; allowed: {', '.join(LONG_AUDIO)}")
    if long_audio == "truncate":
        return [audio[:WINDOW_SAMPLES]]
    parts = [audio[i:i + WINDOW_SAMPLES] for i in range(0, max(1, len(audio)), WINDOW_SAMPLES)]
    return parts if len(parts) == 1 or audio_tokens_for(len(parts[-1])) > 0 else parts[:-1]


class Qwen2AudioModel(HFAudioLLM):
    """A Qwen2-Audio checkpoint with compression points in its LLM (implements ``models.base.SpeechModel``)."""

    family = "qwen2audio"
    max_audio_seconds = None  # a longer clip is cut or windowed as long_audio says (the presets name theirs)

    def __init__(self, model, processor, *, name: str = "qwen2-audio", prompt_family: str = "qwen2_audio",
                 chat: bool = False, long_audio: str = "span", **options):
        if long_audio not in LONG_AUDIO:
            raise ValueError(f"model.long_audio={long_audio!r} is unknown; allowed: {', '.join(LONG_AUDIO)}")
        if long_audio == "items" and not chat:
            raise ValueError("model.long_audio=items is lmms-eval's chat layout (one 'Audio k:' item per 30 s); "
                             "it needs model.chat=true (use truncate or span without the chat template)")
        super().__init__(model, processor, name=name, token_rate=TOKEN_RATE, prompt_family=prompt_family, **options)
        self.reach.name = "Qwen2-Audio"
        self.reach.input_scores = encoder_scores(model)
        self.chat = chat
        self.long_audio = long_audio
        self.encoder_shape = efficiency.WhisperEncoderShape.from_qwen2audio(model.config)
        self.processor.tokenizer.padding_side = "left"

    # ------------------------------------------------------------------ checks (before any compute)
    def check_request(self, req: Request, points: list[Point], max_new_tokens: int = 0) -> None:
        super().check_request(req, points, max_new_tokens)
        n = len(windows(req.audio, self.long_audio))
        text = self.prompt_text(req, n)
        want = n if self.long_audio == "items" else 1
        if text.count(AUDIO_TOKEN) != want:
            raise ValueError(
                f"{req.utt.id}: the prompt must hold exactly {'one' if want == 1 else want} {AUDIO_TOKEN} "
                f"placeholder{'' if want == 1 else 's'} under model.long_audio={self.long_audio} "
                f"(found {text.count(AUDIO_TOKEN)}): {text!r}"
            )

    def audio_tokens(self, req: Request) -> int:
        return sum(audio_tokens_for(len(w)) for w in windows(req.audio, self.long_audio))

    def frontend_flops(self, req: Request) -> int:
        return efficiency.audio_encoder_flops(self.encoder_shape, len(windows(req.audio, self.long_audio)))

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, req: Request, n_windows: int = 1) -> str:
        """The model input text with one ``<|AUDIO|>`` per audio item: the audio then the task prompt, raw (the base
        model's ``eval_audio`` layout) or in the Instruct chat template (``chat``; ``Audio k:`` items, one per
        window with ``long_audio=items``); ``req.prompt`` as given when it already places the audio itself."""
        prompt = req.prompt
        if prompt is None:
            prompt = task_prompt(self.prompt_family, req)
        if AUDIO_TOKEN in prompt:
            return prompt
        span = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS
        if self.chat:
            items = n_windows if self.long_audio == "items" else 1
            audio = "".join(f"Audio {k}: {span}\n" for k in range(1, items + 1))
            return f"{SYSTEM_TURN}<|im_start|>user\n{audio}{prompt}<|im_end|>\n<|im_start|>assistant\n"
        return span + prompt

    # ------------------------------------------------------------------ generation
    def inputs(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch (left-padded), on the model's device; the clip's windows as ``long_audio``
        lays them out (``span``: the one placeholder stands for all windows)."""
        texts, clips = [], []
        for r in requests:
            parts = windows(r.audio, self.long_audio)
            text = self.prompt_text(r, len(parts))
            if self.long_audio == "span":
                text = text.replace(AUDIO_TOKEN, AUDIO_TOKEN * len(parts), 1)
            texts.append(text)
            clips += parts
        batch = self.processor(text=texts, audio=clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        batch["input_features"] = batch["input_features"].to(self.model.dtype)
        return batch

    def generate_kwargs(self) -> dict:
        return {"temperature": None, "top_p": None, "top_k": None, "pad_token_id": self.tokenizer.pad_token_id}


# ----------------------------------------------------------------------------- loading
def load(cfg) -> Qwen2AudioModel:
    """Build the adapter from a ``conf/model/*qwen2audio*.yaml`` node (DictConfig or dict)."""
    get = cfg.get
    if get("mini", False):  # assembled from real parts (models/mini_qwen2audio.py)
        from speech_redundancy.models import mini_qwen2audio

        return mini_qwen2audio.load(cfg)
    attn = get("attn_implementation", "sdpa")
    device = lslm.device(get("device", "auto"))
    dtype = getattr(torch, get("dtype", "bfloat16"))
    if get("tiny", False):
        model, processor = build_tiny(seed=int(get("seed", 0)), n_layers=int(get("n_layers", 4)),
                                      hidden=int(get("hidden_size", 64)), attn_implementation=attn)
        model = model.to(device=device, dtype=dtype)
    else:
        model, processor = _from_pretrained(str(get("path", HUB_ID)), dtype, attn, device)
    n_layers = get("n_layers")
    real = model.config.text_config.num_hidden_layers
    if n_layers is not None and int(n_layers) != real:
        raise ValueError(f"model.n_layers={n_layers} but the loaded {get('name', 'model')} has {real} decoder layers")
    path = str(get("path") or "")
    family = get("prompt_family") or ("qwen2_audio_instruct" if "instruct" in path.lower() else "qwen2_audio")
    return Qwen2AudioModel(model, processor, name=get("name", "qwen2-audio"), prompt_family=family,
                           chat=bool(get("chat", False)), long_audio=str(get("long_audio", "truncate")),
                           **lslm.options(cfg))


def _from_pretrained(path: str, dtype, attn: str, device):
    """Processor and model from a local folder or the Hugging Face cache; never the network. The checkpoint must
    hold exactly the tensors the model needs (the published layout: tests/fixtures/layouts/qwen2audio_7b.json):
    a missing or unexpected tensor stops here with one line instead of leaving random weights in place."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model, info = Qwen2AudioForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attn, output_loading_info=True
        )
    except OSError:
        raise weights_missing("Qwen2-Audio", path, HUB_ID) from None
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise ValueError(f"{path}: not the Qwen2-Audio checkpoint layout: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    return model.to(device), processor


# ----------------------------------------------------------------------------- a tiny random Qwen2-Audio
def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with Qwen2-Audio's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS[1:])
    tok.padding_side = "left"
    return tok


def tiny_config(vocab_size: int, audio_token_id: int, eos_id: int, *, n_layers: int = 4, hidden: int = 64,
                attn_implementation: str = "sdpa"):
    """Qwen2-Audio's architecture at toy size: real mel count and 30 s window, 2 tower layers, ``n_layers`` LLM
    layers of width ``hidden`` (4 heads, 2 KV heads)."""
    from transformers import Qwen2AudioConfig

    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": 2,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "d_model": 32,
                      "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden,
                     "intermediate_size": 2 * hidden, "num_hidden_layers": n_layers, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                     "initializer_range": 0.2, "eos_token_id": eos_id, "pad_token_id": eos_id,
                     "bos_token_id": eos_id},
        audio_token_index=audio_token_id,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.audio_config._attn_implementation = attn_implementation
    return config


def build_tiny(seed: int = 0, n_layers: int = 4, hidden: int = 64, attn_implementation: str = "sdpa"):
    """A random tiny Qwen2-Audio (fixed ``seed``) and a processor for it; no files needed."""
    from transformers import GenerationConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, \
        WhisperFeatureExtractor

    tok = tiny_tokenizer()
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKEN)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = tiny_config(len(tok), audio_id, eos, n_layers=n_layers, hidden=hidden,
                         attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():  # RMSNorm gains away from 1, so that "normed" similarity differs from "hidden"
        for name, p in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, do_sample=False)
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)
    return model, processor


def write_tiny(folder, seed: int = 0, n_layers: int = 4, hidden: int = 64):
    """Write the random tiny Qwen2-Audio (:func:`build_tiny`) to ``folder`` as a checkpoint in the published layout
    (``save_pretrained``: config.json, model.safetensors with the hub's tensor names, processor files), so that
    ``model.path=<folder>`` loads it through the same code as the 7B. Returns the folder."""
    from pathlib import Path

    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
        raise FileExistsError(f"{folder}: exists and is not empty; the tiny writer writes only into a missing or "
                              "empty folder (it never overwrites a checkpoint)")
    model, processor = build_tiny(seed=seed, n_layers=n_layers, hidden=hidden)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

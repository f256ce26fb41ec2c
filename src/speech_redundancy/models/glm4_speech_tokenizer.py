"""The GLM-4-Voice speech tokenizer (THUDM/glm-4-voice-tokenizer), written natively: 16 kHz audio -> discrete codes
at 12.5 per second, Kimi-Audio's discrete audio stream. Changes nothing in transformers; its encoder layers are the
stock ``WhisperEncoderLayer``.

What it is (read from THUDM/GLM-4-Voice ``speech_tokenizer/`` and checked against two independent ports): a
Whisper-large-v3-shaped encoder cut after ``quantize_position`` (16) layers, with

- causal convolutions: both stem convolutions (kernel 3; the second with stride 2: 100 -> 50 frames/s) are padded
  on the left only, by ``kernel - 1`` frames;
- block-causal attention: frame i attends to frame j when j <= i or both lie in the same block of
  ``quantize_causal_block_size`` (200) frames, and j is not padding;
- average pooling by ``pooling_kernel_size`` (4) after layer ``pooling_position`` (16), the sequence zero-padded to
  a multiple of 4 first: 50 -> 12.5 frames/s;
- nearest-neighbour lookup in a ``quantize_vocab_size`` (16384) x d codebook (squared Euclidean distance, first
  index on ties): the code ids.

Audio is cut into 30 s segments (the official ``extract_speech_token``); the segments of one utterance are run as
one batch padded to the longest, with the feature extractor padding each to a multiple of 1280 samples (one code),
and the codes of padding frames are dropped: a segment of L samples gives (L - 1) // 1280 + 1 codes. The official
code runs this in float32; so does this module, whatever the LLM's dtype.

The folder (``model.speech_tokenizer=``) holds ``config.json`` (WhisperVQConfig fields), ``preprocessor_config.json``
(a WhisperFeatureExtractor, 128 mels) and ``model.safetensors`` whose keys are this module's (``conv1.*``,
``conv2.*``, ``embed_positions.weight``, ``layers.N.*``, ``codebook.weight``, ``embed_positions2.weight``); the EMA
statistics of codebook training (``ema_count``, ``ema_weight``), a final ``layer_norm`` and layers past
``quantize_position`` are ignored (they do not change the codes). ``embed_positions2`` is loaded but only matters
for the quantized hidden states, not for the codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # 30 s segments, as the official tokenizer cuts them
SAMPLES_PER_CODE = 1280  # 160-sample hop x conv stride 2 x pooling 4
FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
HUB_ID = "THUDM/glm-4-voice-tokenizer"


def codes_for(n_samples: int) -> int:
    """Codes (= Kimi-Audio audio tokens) for ``n_samples`` of 16 kHz audio, summed over its 30 s segments."""
    full, rest = divmod(int(n_samples), SEGMENT_SAMPLES)
    per_full = (SEGMENT_SAMPLES - 1) // SAMPLES_PER_CODE + 1
    return full * per_full + ((rest - 1) // SAMPLES_PER_CODE + 1 if rest else 0)


def segments(audio: np.ndarray) -> list[np.ndarray]:
    """The 30 s segments of a 16 kHz waveform, in order (the last one shorter)."""
    return [audio[s:s + SEGMENT_SAMPLES] for s in range(0, len(audio), SEGMENT_SAMPLES)]


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    """The fields of the tokenizer's config.json that decide its codes."""

    mels: int  # num_mel_bins
    hidden: int  # d_model
    heads: int  # encoder_attention_heads
    ffn: int  # encoder_ffn_dim
    max_positions: int  # max_source_positions (50 Hz frames)
    n_layers: int  # quantize_position: layers run before the lookup
    pooling_position: int  # pool after this many layers
    pool: int  # pooling_kernel_size
    pooling_type: str  # "avg" (GLM-4-Voice) or "max"
    codes: int  # quantize_vocab_size
    block_size: int | None  # quantize_causal_block_size (50 Hz frames); None = full attention over valid frames
    causal_attention: bool  # encoder_causal_attention / quantize_causal_encoder: plain causal attention instead
    activation: str = "gelu"

    @classmethod
    def from_json(cls, raw: dict, where: str = "config.json") -> "SpeechTokenizerConfig":
        missing = [k for k in ("num_mel_bins", "d_model", "encoder_attention_heads", "encoder_ffn_dim",
                               "pooling_kernel_size", "quantize_vocab_size") if raw.get(k) is None]
        if missing:
            raise ValueError(f"{where} is not a GLM-4-Voice speech tokenizer config (missing {', '.join(missing)})")
        if not raw.get("encoder_causal_convolution", False):
            raise ValueError(f"{where}: encoder_causal_convolution is not true; the GLM-4-Voice tokenizer has causal "
                             "convolutions")
        n_layers = int(raw.get("quantize_position", 16))
        pooling_position = int(raw.get("pooling_position", 0) or 0)
        if not 1 <= pooling_position <= n_layers:
            raise ValueError(f"{where}: pooling_position={pooling_position} must lie in 1..quantize_position="
                             f"{n_layers}")
        if raw.get("pooling_type", "max") not in ("avg", "max"):
            raise ValueError(f"{where}: pooling_type={raw.get('pooling_type')!r}; allowed: avg, max")
        return cls(
            mels=int(raw["num_mel_bins"]), hidden=int(raw["d_model"]), heads=int(raw["encoder_attention_heads"]),
            ffn=int(raw["encoder_ffn_dim"]), max_positions=int(raw.get("max_source_positions", 1500)),
            n_layers=n_layers, pooling_position=pooling_position, pool=int(raw["pooling_kernel_size"]),
            pooling_type=str(raw.get("pooling_type", "max")), codes=int(raw["quantize_vocab_size"]),
            block_size=int(raw["quantize_causal_block_size"]) if raw.get("quantize_causal_block_size") else None,
            causal_attention=bool(raw.get("encoder_causal_attention") or raw.get("quantize_causal_encoder")),
            activation=str(raw.get("activation_function", "gelu")),
        )

    def layer_config(self):
        """A WhisperConfig for the stock ``WhisperEncoderLayer``s (dropout off)."""
        from transformers import WhisperConfig

        cfg = WhisperConfig(d_model=self.hidden, encoder_attention_heads=self.heads, encoder_ffn_dim=self.ffn,
                            activation_function=self.activation, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, num_mel_bins=self.mels, max_source_positions=self.max_positions)
        cfg._attn_implementation = "sdpa"
        return cfg


def attention_allowed(valid: Tensor, block_size: int | None, causal: bool) -> Tensor:
    """Which key frame each query frame may attend to, ``[B, T, T]`` bool: keys must be valid (not padding); with
    ``causal`` only j <= i; with a ``block_size`` (and not ``causal``) j <= i or the same block."""
    T = valid.shape[1]
    idx = torch.arange(T, device=valid.device)
    if causal:
        allowed = idx[None, :] <= idx[:, None]
    elif block_size:
        allowed = (idx[None, :] <= idx[:, None]) | (idx[None, :] // block_size == idx[:, None] // block_size)
    else:
        allowed = torch.ones(T, T, dtype=torch.bool, device=valid.device)
    return allowed[None] & valid[:, None, :]


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared Euclidean distance ||c||^2 + ||x||^2 - 2 x.c, first on ties)."""
    flat = x.reshape(-1, x.shape[-1])
    dist = torch.addmm((codebook ** 2).sum(1) + (flat ** 2).sum(1, keepdim=True), flat, codebook.t(),
                       alpha=-2.0, beta=1.0)
    return dist.min(dim=1).indices.reshape(x.shape[:-1])


class SpeechTokenizer(nn.Module):
    """GLM-4-Voice's quantizing encoder: mel frames -> code ids (see the module docstring)."""

    def __init__(self, config: SpeechTokenizerConfig):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

        self.config = config
        d = config.hidden
        self.conv1 = nn.Conv1d(config.mels, d, kernel_size=3)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(config.max_positions, d)
        layer_cfg = config.layer_config()
        self.layers = nn.ModuleList([WhisperEncoderLayer(layer_cfg) for _ in range(config.n_layers)])
        self.codebook = nn.Embedding(config.codes, d)
        self.embed_positions2 = nn.Embedding(-(-config.max_positions // config.pool), d)

    @staticmethod
    def _causal_conv(conv: nn.Conv1d, x: Tensor) -> Tensor:
        return conv(F.pad(x, (conv.kernel_size[0] - 1, 0)))

    def _mask(self, valid: Tensor, block_size: int | None, dtype: torch.dtype) -> Tensor:
        allowed = attention_allowed(valid, block_size, self.config.causal_attention)
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def forward(self, features: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``features`` [B, mels, F] (F a multiple of 8), ``frame_mask`` [B, F] (1 = real frame) -> codes [B, F/8]
        and their validity mask [B, F/8]."""
        cfg = self.config
        x = F.gelu(self._causal_conv(self.conv1, features))
        x = F.gelu(self._causal_conv(self.conv2, x)).transpose(1, 2)
        T = x.shape[1]
        if T > cfg.max_positions:
            raise ValueError(f"speech tokenizer: {T} frames exceed its {cfg.max_positions} positions")
        x = x + self.embed_positions.weight[:T]
        valid = frame_mask[:, ::2].bool()
        block = cfg.block_size
        mask = self._mask(valid, block, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i + 1 == cfg.pooling_position:
                x = x.transpose(1, 2)
                if x.shape[-1] % cfg.pool:
                    x = F.pad(x, (0, cfg.pool - x.shape[-1] % cfg.pool))
                pool = F.avg_pool1d if cfg.pooling_type == "avg" else F.max_pool1d
                x = pool(x, cfg.pool).transpose(1, 2)
                valid = valid[:, ::cfg.pool]
                block = block // cfg.pool if block else None
                if i + 1 < cfg.n_layers:
                    mask = self._mask(valid, block, x.dtype)
        return nearest_code(x, self.codebook.weight), valid


# ----------------------------------------------------------------------------- the folder
def missing_files(folder: str | Path | None) -> list[str]:
    """Files of ``FILES`` absent from ``folder`` (all of them when the folder does not exist)."""
    if not folder or not Path(folder).is_dir():
        return list(FILES)
    return [f for f in FILES if not (Path(folder) / f).is_file()]


IGNORED_PREFIXES = ("ema_count", "ema_weight", "layer_norm.")


def load_state(folder: Path, module: SpeechTokenizer) -> None:
    """Load ``model.safetensors`` into ``module``: every module key must be there; the ignored keys (see the module
    docstring) may be; anything else is refused by name."""
    from safetensors import safe_open

    expected = set(module.state_dict())
    state, unexpected = {}, []
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            name = key[len("model.encoder."):] if key.startswith("model.encoder.") else key
            if name in expected:
                state[name] = f.get_tensor(key).float()
            elif name.startswith(IGNORED_PREFIXES) or (
                    name.startswith("layers.") and int(name.split(".")[1]) >= module.config.n_layers):
                continue
            else:
                unexpected.append(key)
    missing = sorted(expected - set(state))
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not fit the GLM-4-Voice tokenizer of its config.json: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    module.load_state_dict(state)


class GLM4SpeechTokenizer:
    """A loaded tokenizer folder: its feature extractor and :class:`SpeechTokenizer`, on ``device``."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import WhisperFeatureExtractor

        folder = Path(folder)
        self.folder = folder
        self.config = SpeechTokenizerConfig.from_json(json.loads((folder / "config.json").read_text()),
                                                      where=str(folder / "config.json"))
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        if self.feature_extractor.feature_size != self.config.mels:
            raise ValueError(f"{folder}: preprocessor_config.json gives {self.feature_extractor.feature_size} mels, "
                             f"config.json {self.config.mels}")
        if self.feature_extractor.hop_length * 2 * self.config.pool != SAMPLES_PER_CODE:
            raise ValueError(f"{folder}: hop {self.feature_extractor.hop_length} x conv stride 2 x pooling "
                             f"{self.config.pool} is not {SAMPLES_PER_CODE} samples per code (12.5 codes/s)")
        with torch.device("meta"):
            module = SpeechTokenizer(self.config)
        module = module.to_empty(device="cpu")
        load_state(folder, module)
        self.module = module.to(device).eval()
        self.device = torch.device(device)

    def mel_frames(self, n_samples: int) -> int:
        """Mel frames the feature extractor gives one segment of ``n_samples`` (padded to a whole code)."""
        return -(-n_samples // SAMPLES_PER_CODE) * SAMPLES_PER_CODE // self.feature_extractor.hop_length

    @torch.inference_mode()
    def tokenize(self, audio: np.ndarray) -> list[int]:
        """Code ids of a 16 kHz waveform (all its 30 s segments, in order), as the official tokenizer gives them."""
        segs = segments(np.asarray(audio, dtype=np.float32))
        if not segs:
            return []
        feats = self.feature_extractor(segs, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                       return_tensors="pt", padding="longest", pad_to_multiple_of=SAMPLES_PER_CODE,
                                       device=str(self.device) if self.device.type == "cuda" else "cpu")
        codes, valid = self.module(feats["input_features"].to(self.device, torch.float32),
                                   feats["attention_mask"].to(self.device))
        return codes[valid].tolist()

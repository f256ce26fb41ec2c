"""Efficiency accounting for one utterance: analytic prefill FLOPs, final retention ratio (FRR), time to first token,
peak memory and its increment, KV-cache bytes (paper Table 1 and Table 2).

FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them with eager attention: every
matrix product (2 FLOPs per multiply-add), nothing for norms, activations, softmax, RoPE or bias additions. One
decoder layer that processes T tokens against ``kv`` keys costs

    2 T (d H hd + 2 d KV hd + H hd d + 3 d ff) + 4 H hd T kv

(the q, k, v, o projections, the gated MLP, then QK^T and AV; the causal half is counted too, as eager attention
computes it). In prefill kv = T. The LM head adds 2 d V per position it projects: stock Qwen2-Audio projects every
position of the prefill (it has no ``logits_to_keep``), so ``head_positions`` defaults to the final sequence length.
The audio tower always runs a whole 30 s window per clip (3000 mel frames, 1500 positions), whatever the duration.
The operators' own work (e.g. Algorithm 1's cosine band, about 2 T omega d) is not included: it is reported as time.

Memory (paper Table 2): ``peak`` = ``torch.cuda.max_memory_allocated`` during the prefill, ``increment`` = peak minus
what was allocated when it started (the weights and inputs); both None off GPU. KV bytes: ``kv_bytes_analytic`` for
one sample from its per-layer cached lengths (``hf_compat.kv_cache_bytes`` measures a cache object, whole batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only LLM that enter its FLOPs."""

    hidden: int  # d
    heads: int  # H
    kv_heads: int  # KV
    head_dim: int  # hd
    ffn: int  # ff (gated MLP: gate, up, down)
    vocab: int  # V
    n_layers: int  # L

    @classmethod
    def from_config(cls, cfg) -> "DecoderShape":
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            ffn=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            n_layers=cfg.num_hidden_layers,
        )


@dataclass(frozen=True)
class WhisperEncoderShape:
    """A Whisper-style audio encoder (Qwen2-Audio's audio tower): two convolutions over the mel frames, ``n_layers``
    bidirectional layers at half the frame rate, average pooling by 2, then a linear projector into the LLM."""

    mels: int
    hidden: int
    ffn: int
    n_layers: int
    frames: int  # mel frames per window (3000 = 30 s; always padded to this)
    out_dim: int  # projector output (LLM hidden size)
    kernel: int = 3

    @classmethod
    def from_qwen2audio(cls, config) -> "WhisperEncoderShape":
        a = config.audio_config
        return cls(mels=a.num_mel_bins, hidden=a.d_model, ffn=a.encoder_ffn_dim, n_layers=a.encoder_layers,
                   frames=2 * a.max_source_positions, out_dim=config.text_config.hidden_size)


# ----------------------------------------------------------------------------- FLOPs
def layer_flops(shape: DecoderShape, tokens: int, kv: int | None = None) -> int:
    """One decoder layer processing ``tokens`` queries against ``kv`` keys (default: the same tokens)."""
    d, H, KV, hd, ff = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    kv = tokens if kv is None else kv
    return 2 * tokens * (d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * ff) + 4 * H * hd * tokens * kv


def prefill_flops(shape: DecoderShape, layer_tokens: Sequence[int], head_positions: int | None = None) -> int:
    """LLM prefill FLOPs when decoder layer j processes ``layer_tokens[j]`` tokens (compression shortens the
    sequence from its point on), plus the LM head over ``head_positions`` (default: the final sequence length)."""
    if len(layer_tokens) != shape.n_layers:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries for {shape.n_layers} layers")
    head = layer_tokens[-1] if head_positions is None else head_positions
    return sum(layer_flops(shape, t) for t in layer_tokens) + 2 * shape.hidden * shape.vocab * head


def audio_encoder_flops(shape: WhisperEncoderShape, windows: int = 1) -> int:
    """FLOPs of the audio tower + projector for ``windows`` 30 s windows (the encoder always runs the full window,
    whatever the audio's duration)."""
    d, k = shape.hidden, shape.kernel
    t1 = shape.frames  # conv1: stride 1
    t2 = (shape.frames - 1) // 2 + 1  # conv2: stride 2 -> encoder positions
    t3 = t2 // 2  # average pooling by 2 -> audio tokens
    conv = 2 * t1 * shape.mels * k * d + 2 * t2 * d * k * d
    layers = shape.n_layers * (2 * t2 * (4 * d * d + 2 * d * shape.ffn) + 4 * d * t2 * t2)
    projector = 2 * t3 * d * shape.out_dim
    return windows * (conv + layers + projector)


def kv_bytes_analytic(shape: DecoderShape, kv_tokens: Sequence[int], bytes_per_value: int) -> int:
    """Bytes of a cache whose layer j holds ``kv_tokens[j]`` keys and values (one sample)."""
    return 2 * shape.kv_heads * shape.head_dim * bytes_per_value * sum(kv_tokens)


# ----------------------------------------------------------------------------- time and memory
class Stopwatch:
    """Elapsed seconds: CUDA events on a GPU (device time of the queued work), wall clock on CPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def start(self) -> "Stopwatch":
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.cuda:
            self._t1.record()
            self._t1.synchronize()
            return self._t0.elapsed_time(self._t1) / 1000.0
        return time.perf_counter() - self._t0


class memory_probe:
    """Peak GPU memory during a span and its increment over what was allocated at its start (the weights and
    inputs). ``stop()`` returns ``(peak_bytes, increment_bytes)``; ``(None, None)`` off GPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - self.base


# ----------------------------------------------------------------------------- one utterance
def utterance_stats(record, shape: DecoderShape, *, encoder: WhisperEncoderShape | None = None, windows: int = 1,
                    bytes_per_value: int = 2, head_positions: int | None = None) -> dict[str, Any]:
    """The efficiency numbers of one sample from its :class:`speech_redundancy.compress.Record` (retention and
    compression time are the record's own fields)."""
    llm = prefill_flops(shape, record.layer_tokens, head_positions)
    enc = audio_encoder_flops(encoder, windows) if encoder is not None else 0
    return {
        "layer_tokens": list(record.layer_tokens),
        "prefill_flops": llm,
        "encoder_flops": enc,
        "total_flops": llm + enc,
        "kv_bytes": kv_bytes_analytic(shape, record.kv_tokens, bytes_per_value),
    }


# ----------------------------------------------------------------------------- Kimi-Audio's audio front end
@dataclass(frozen=True)
class KimiFrontEndShape:
    """Kimi-Audio's front end: the Whisper-large-v3 encoder (30 s windows, no pooling, no projector), the
    GLM-4-Voice speech tokenizer (a Whisper-style stack of ``tokenizer.n_layers`` layers, pooled by ``pool`` after
    ``tokenizer_layers_before_pool``, then a lookup among ``codes``) and the VQ adaptor (two linear layers)."""

    whisper: WhisperEncoderShape
    tokenizer: WhisperEncoderShape | None
    tokenizer_layers_before_pool: int
    pool: int
    codes: int
    adaptor_in: int
    adaptor_hidden: int


def whisper_stack_flops(shape: WhisperEncoderShape, frames: int, n_layers: int | None = None,
                        pool: int = 1, layers_before_pool: int | None = None) -> int:
    """The conv stem and encoder layers of a Whisper-style encoder over ``frames`` mel frames (conv2 halves them);
    with ``pool`` > 1 the layers after ``layers_before_pool`` run on the pooled length."""
    d, k = shape.hidden, shape.kernel
    L = shape.n_layers if n_layers is None else n_layers
    t2 = (frames - 1) // 2 + 1
    conv = 2 * frames * shape.mels * k * d + 2 * t2 * d * k * d
    before = L if layers_before_pool is None else layers_before_pool
    t_after = -(-t2 // pool)

    def layer(t: int) -> int:
        return 2 * t * (4 * d * d + 2 * d * shape.ffn) + 4 * d * t * t

    return conv + before * layer(t2) + (L - before) * layer(t_after)


def kimi_frontend_flops(shape: KimiFrontEndShape, *, windows: int, tokenizer_frames: Sequence[int],
                        tokens: int) -> dict[str, int]:
    """Prefill FLOPs of Kimi-Audio's front end for one clip: ``windows`` 30 s Whisper windows (each always the full
    3000 frames), the speech tokenizer over ``tokenizer_frames`` mel frames per segment (as run, padding included;
    attention counted over the whole length although block-causal) plus its codebook distances, and the adaptor
    over the ``tokens`` audio tokens (none when no window ran). Counted as ``FlopCounterMode`` counts them."""
    whisper = windows * whisper_stack_flops(shape.whisper, shape.whisper.frames)
    tok = 0
    if shape.tokenizer is not None:
        for frames in tokenizer_frames:
            tok += whisper_stack_flops(shape.tokenizer, frames, pool=shape.pool,
                                       layers_before_pool=shape.tokenizer_layers_before_pool)
            pooled = -(-((frames - 1) // 2 + 1) // shape.pool)
            tok += 2 * pooled * shape.tokenizer.hidden * shape.codes
    h = shape.adaptor_hidden
    adaptor = 2 * tokens * (shape.adaptor_in * h + h * h) if windows else 0
    return {"whisper_flops": whisper, "speech_tokenizer_flops": tok, "adaptor_flops": adaptor,
            "frontend_flops": whisper + tok + adaptor}

"""What the decoder-only speech LLM adapters share (Qwen2-Audio, the stock transformers audio LLMs, Kimi-Audio).

:class:`LSLMAdapter` holds everything family-independent: checks, Fig. 3's hidden states, the batching loop and
the decoding call, inside :func:`speech_redundancy.engine.compression`, and the turn of the session's records into
one :class:`Output` per request with its efficiency numbers. A family's adapter says only where its model keeps
things (its :class:`~speech_redundancy.engine.Reach`), how a batch of requests becomes model inputs
(:meth:`LSLMAdapter.inputs`), how many audio tokens a request gives, and what its audio front end costs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from speech_redundancy import efficiency
from speech_redundancy.audio import SAMPLE_RATE
from speech_redundancy.compress import Point, spans_from_words
from speech_redundancy.engine import Reach, audio_hidden_states, check_points, compression, placeholder_finder
from speech_redundancy.models.base import Output, Request


class LSLMAdapter:
    """Base of the decoder-only adapters (``models.base.SpeechModel``).

    A subclass defines :meth:`inputs` (a batch of requests -> model inputs) and :meth:`audio_tokens` (audio tokens
    of one request, for the checks); it may override :meth:`decode` (default: the model's own ``generate``),
    :meth:`frontend_flops`, :meth:`request_stats` and :meth:`check_request`.
    """

    family = "lslm"
    max_audio_seconds: float | None = 30.0  # None: no limit of its own (long audio is windowed by the adapter)
    head_positions: int | None = None  # prefill positions the LM head projects (None: all, as stock generate does)

    def __init__(self, model, processor, reach: Reach, *, name: str, token_rate: float, positions: str = "first",
                 pool_early_kv: bool = False, batch_size: int = 1, prompt_family: str = "default",
                 min_new_tokens: int = 0):
        self.model = model.eval()
        self.processor = processor
        self.reach = reach
        self.name = name
        self.token_rate = float(token_rate)
        self.positions = positions
        self.pool_early_kv = pool_early_kv
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.prompt_family = prompt_family
        self.min_new_tokens = int(min_new_tokens)
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={min_new_tokens} must be >= 0")
        self.n_layers = reach.n_layers
        self.shape = efficiency.DecoderShape.from_config(reach.text_config)

    # ------------------------------------------------------------------ what a family provides
    def inputs(self, requests: list[Request]) -> dict[str, Any]:
        raise NotImplementedError

    def audio_tokens(self, req: Request) -> int | None:
        """Audio tokens this request gives (None when the adapter cannot say before running)."""
        return None

    def frontend_flops(self, req: Request) -> int:
        """FLOPs of the audio encoder (and anything else before the LLM) for this request."""
        return 0

    def request_stats(self, req: Request, stats: dict[str, Any]) -> dict[str, Any]:
        """Family-specific numbers of one request's row, given the shared ones (``stats``); merged last."""
        return {}

    def context_length(self) -> int | None:
        return getattr(self.reach.text_config, "max_position_embeddings", None)

    def decode(self, batch: dict[str, Any], max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of one batch; returns the new token ids [B, n] (padded with the tokenizer's pad id). With
        ``min_new_tokens`` (Qwen2-Audio's official scripts: 1) the end token is barred until that many are out."""
        extra = {"min_new_tokens": min(self.min_new_tokens, max_new_tokens)} if self.min_new_tokens else {}
        ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  **extra, **self.generate_kwargs())
        return ids[:, batch["input_ids"].shape[1]:]

    def generate_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ checks (before any compute)
    def check_points(self, points: list[Point]) -> None:
        check_points(points, self.reach, positions=self.positions, pool_early_kv=self.pool_early_kv)

    def check_request(self, req: Request, points: list[Point], max_new_tokens: int = 0) -> None:
        """One clear line for a request this model cannot take: empty or too long audio, no audio token, no word
        alignments for an oracle budget, more prompt, audio and new tokens than the model's context."""
        if len(req.audio) == 0:
            raise ValueError(f"{req.utt.id}: empty audio")
        seconds = len(req.audio) / SAMPLE_RATE
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            raise ValueError(f"{req.utt.id}: {seconds:.1f} s of audio; {self.name} takes at most "
                             f"{self.max_audio_seconds:g} s per clip here (its processor would cut the rest)")
        if any(p.needs_spans for p in points) and not req.utt.words:
            raise ValueError(f"{req.utt.id}: the oracle operators need word alignments, and this utterance has none "
                             "(align the dataset first: see docs/datasets.md)")
        n, context = self.audio_tokens(req), self.context_length()
        if n is not None and n < 1:
            raise ValueError(f"{req.utt.id}: {1000 * seconds:.0f} ms of audio gives no audio token on {self.name}")
        if n is not None and context is not None:
            total = n + self.prompt_tokens(req) + max_new_tokens
            if total > context:
                raise ValueError(f"{req.utt.id}: {seconds:.1f} s of audio gives {n} audio tokens; with the prompt and "
                                 f"max_new_tokens={max_new_tokens} that is {total} positions, beyond {self.name}'s "
                                 f"context of {context}: split the utterance or lower max_new_tokens")

    def prompt_tokens(self, req: Request) -> int:
        """Text tokens of the request's prompt around the audio span (0 when the adapter cannot say)."""
        text = getattr(self, "prompt_text", None)
        return max(0, len(self.tokenizer.encode(text(req))) - 1) if text is not None else 0

    # ------------------------------------------------------------------ generation
    def hidden_states(self, req: Request) -> list[torch.Tensor]:
        """The audio tokens entering each LLM layer 0..L-1 and the final normed output, uncompressed (Fig. 3)."""
        return audio_hidden_states(self.model, self.reach, self.inputs([req]))

    def generate(self, requests: list[Request], points: list[Point], max_new_tokens: int = 256) -> list[Output]:
        """Greedy decoding of each request with ``points`` applied during prefill (``batch_size`` at a time)."""
        self.check_points(points)
        for req in requests:
            self.check_request(req, points, max_new_tokens)
        outs: list[Output] = []
        for start in range(0, len(requests), self.batch_size):
            outs += self.generate_batch(requests[start:start + self.batch_size], points, max_new_tokens)
        return outs

    def generate_batch(self, requests: list[Request], points: list[Point], max_new_tokens: int) -> list[Output]:
        """One batch: word windows mapped onto the audio tokens, decoding inside the compression block, one Output
        per request with its efficiency numbers."""
        batch = self.inputs(requests)
        audio = self.reach.find_audio((), batch)
        spans = None
        if any(p.needs_spans for p in points):
            spans = [spans_from_words([w.start for w in r.utt.words], [w.end for w in r.utt.words], self.token_rate,
                                      int(n)) for r, n in zip(requests, audio.sum(1).tolist())]
        t0 = time.perf_counter()
        with compression(self.model, points, self.reach, spans=spans, seeds=[r.seed for r in requests],
                         positions=self.positions, pool_early_kv=self.pool_early_kv) as session, \
                torch.inference_mode():
            new = self.decode(batch, max_new_tokens)
        seconds = time.perf_counter() - t0
        tok = self.tokenizer
        texts = tok.batch_decode(new, skip_special_tokens=True)
        pad = getattr(tok, "pad_token_id", None)
        bytes_per_value = torch.finfo(self.model.dtype).bits // 8
        outs = []
        for b, (req, rec) in enumerate(zip(requests, session.records)):
            stats = efficiency.utterance_stats(rec, self.shape, bytes_per_value=bytes_per_value,
                                               head_positions=self.head_positions)
            frontend = self.frontend_flops(req)
            stats.update(
                encoder_flops=frontend, total_flops=stats["prefill_flops"] + frontend,
                seconds=seconds, batch_size=len(requests), ttft_seconds=session.ttft_seconds,
                engine_seconds=session.engine_seconds,  # the whole batch's time in the engine's prefill hooks
                peak_memory_bytes=session.peak_memory_bytes, memory_increment_bytes=session.memory_increment_bytes,
                kv_cache_bytes_batch=session.kv_bytes,
                new_tokens=int((new[b] != pad).sum()) if pad is not None else int(new.shape[1]),
            )
            stats.update(self.request_stats(req, stats))
            outs.append(Output.from_record(texts[b].strip(), rec, stats))
        return outs


# ----------------------------------------------------------------------------- loading helpers
def stock_reach(model, name: str | None = None) -> Reach:
    """Where a stock ``*ForConditionalGeneration`` audio LLM keeps what the engine touches."""
    inner = getattr(model, "model", None)
    stack = getattr(inner, "language_model", None)
    if stack is None or not hasattr(stack, "layers") or not hasattr(stack, "rotary_emb"):
        raise ValueError(
            f"{type(model).__name__}: no decoder stack with .layers and .rotary_emb at model.model.language_model; "
            "this family needs its own adapter"
        )
    audio_id = getattr(model.config, "audio_token_id", None)
    if audio_id is None:
        raise ValueError(f"{type(model).__name__}: config has no audio_token_id")
    return Reach(top=model, stack=stack, layers=stack.layers, text_config=stack.config, rotary=stack.rotary_emb,
                 find_audio=placeholder_finder(int(audio_id)), name=name or type(model).__name__)


def options(cfg) -> dict[str, Any]:
    """The adapter settings every LSLM config shares (positions, KV policy, batch size, ``min_new_tokens`` for the
    stock ``generate`` path; 0 when the config does not say)."""
    get = cfg.get
    return {"positions": get("positions", "first"), "pool_early_kv": bool(get("pool_early_kv", False)),
            "batch_size": int(get("batch_size", 1)), "min_new_tokens": int(get("min_new_tokens") or 0)}


def device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_prompt(family: str, req: Request) -> str:
    """The task prompt of ``speech_redundancy.prompts`` for this request's task and languages."""
    from speech_redundancy.prompts import get_prompt

    return get_prompt(family, req.utt.task, source_lang=req.utt.language,
                      target_lang=req.utt.extra.get("target_language"))


def weights_missing(name: str, path: str, hub_id: str) -> FileNotFoundError:
    """The one-line error for weights that are neither at ``path`` nor in the Hugging Face cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    where = f"folder {path}" if Path(path).exists() else f"no folder {path!r}; Hugging Face cache {HF_HUB_CACHE}"
    return FileNotFoundError(
        f"{name} weights not found (looked in: {where}); on a connected machine run "
        f"`huggingface-cli download {hub_id} --local-dir <folder>`, then pass model.path=<folder>"
    )

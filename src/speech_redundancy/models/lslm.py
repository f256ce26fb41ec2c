"""What the decoder-only adapters (Qwen2-Audio, the generic stock audio LLMs) share.

:class:`LSLMAdapter` holds the family-independent methods: checks, Fig. 3's hidden states and the batching loop. An
adapter builds the processor batch for its family; :func:`generate_batch` maps word windows onto the audio tokens,
runs the stock ``generate`` inside :func:`speech_redundancy.engine.compression`, and turns the session's records into
one :class:`Output` per request with its efficiency numbers. :func:`stock_reach`, :func:`device`, :func:`task_prompt`
and :func:`weights_missing` serve the adapters' loaders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from speech_redundancy import compress as ops
from speech_redundancy import efficiency
from speech_redundancy.engine import Reach, audio_hidden_states, check_points, compression, needs_spans
from speech_redundancy.models.base import Output, Point, Request


def generate_batch(adapter: Any, requests: list[Request], batch: dict[str, torch.Tensor], points: list[Point],
                   max_new_tokens: int, *, tokenizer: Any, encoder_shape: Any = None,
                   **generate_kwargs: Any) -> list[Output]:
    """Greedy decoding of one processor ``batch`` (built from ``requests``) with ``points`` applied in prefill.

    ``adapter`` provides ``model``, ``reach``, ``token_rate``, ``positions``, ``pool_early_kv`` and ``shape``.
    """
    n_audio = (batch["input_ids"] == adapter.reach.audio_token_id).sum(1).tolist()
    spans = None
    if any(needs_spans(p) for p in points):
        spans = [ops.spans_from_words([w.start for w in r.utt.words], [w.end for w in r.utt.words],
                                      adapter.token_rate, n) for r, n in zip(requests, n_audio)]
    t0 = time.perf_counter()
    with compression(adapter.model, points, adapter.reach, spans=spans, seeds=[r.seed for r in requests],
                     positions=adapter.positions, pool_early_kv=adapter.pool_early_kv) as session, \
            torch.inference_mode():
        ids = adapter.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     **generate_kwargs)
    seconds = time.perf_counter() - t0
    new = ids[:, batch["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    pad = getattr(tokenizer, "pad_token_id", None)
    bytes_per_value = torch.finfo(adapter.model.dtype).bits // 8
    outs = []
    for b, rec in enumerate(session.records):
        stats = efficiency.utterance_stats(rec, adapter.shape, encoder=encoder_shape, bytes_per_value=bytes_per_value)
        stats.update(
            seconds=seconds, batch_size=len(requests), ttft_seconds=session.ttft_seconds,
            peak_memory_bytes=session.peak_memory_bytes, memory_increment_bytes=session.memory_increment_bytes,
            kv_cache_bytes_batch=session.kv_bytes,
            new_tokens=int((new[b] != pad).sum()) if pad is not None else int(new.shape[1]),
        )
        outs.append(Output(text=texts[b].strip(), tokens_in=rec.tokens_in, tokens_out=rec.tokens_out,
                           tokens_per_point=list(rec.tokens_per_point), groups=[list(g) for g in rec.groups],
                           stats=stats))
    return outs


class LSLMAdapter:
    """Base of the decoder-only adapters (``models.base.SpeechModel``). A subclass sets ``model``, ``processor``,
    ``reach``, ``shape``, ``token_rate``, ``positions``, ``pool_early_kv`` and ``batch_size``, and defines
    ``inputs(requests)`` and ``check_request(req, points)``."""

    def check_points(self, points: list[Point]) -> None:
        check_points(points, self.reach, positions=self.positions, pool_early_kv=self.pool_early_kv)

    def hidden_states(self, req: Request) -> list[torch.Tensor]:
        """The audio tokens entering each LLM layer 0..L-1 and the final normed output, uncompressed (Fig. 3)."""
        return audio_hidden_states(self.model, self.reach, self.inputs([req]))

    def generate(self, requests: list[Request], points: list[Point], max_new_tokens: int = 256) -> list[Output]:
        """Greedy decoding of each request with ``points`` applied during prefill (``batch_size`` at a time)."""
        self.check_points(points)
        for req in requests:
            self.check_request(req, points)
        outs: list[Output] = []
        for start in range(0, len(requests), self.batch_size):
            outs += self._generate_batch(requests[start:start + self.batch_size], points, max_new_tokens)
        return outs

    def _generate_batch(self, requests: list[Request], points: list[Point], max_new_tokens: int) -> list[Output]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return generate_batch(self, requests, self.inputs(requests), points, max_new_tokens, tokenizer=tok)


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
    return Reach(top=model, stack=stack, layers=stack.layers, audio_token_id=int(audio_id), text_config=stack.config,
                 rotary=stack.rotary_emb, name=name or type(model).__name__)


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

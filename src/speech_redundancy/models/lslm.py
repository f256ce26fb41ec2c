"""The generation loop shared by the decoder-only adapters (Qwen2-Audio, the generic stock audio LLMs).

An adapter builds the processor batch for its family; :func:`generate_batch` maps word windows onto the audio tokens,
runs the stock ``generate`` inside :func:`speech_redundancy.engine.compression`, and turns the session's records into
one :class:`Output` per request with its efficiency numbers.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from speech_redundancy import compress as ops
from speech_redundancy import efficiency
from speech_redundancy.engine import compression, needs_spans
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

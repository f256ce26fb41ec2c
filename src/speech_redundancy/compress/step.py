"""The per-sample compression step, shared by every model adapter.

At a point, an adapter hands over the audio span of ONE sample (its tokens [T, d] entering layer l) with a
:class:`SpanState`: which original audio token each current token stands for (``origin``, the first member of its
group), the word windows over the original tokens, the sample's seed and its :class:`Record`. :func:`compress_step`
measures similarity on the point's features, maps the word windows onto the current tokens (earlier points may have
merged some), runs the operator, checks its index map (:class:`~speech_redundancy.compress.core.Compressed`: any
partition, outputs ordered by first member) and returns the compressed tokens with the next state.

Word windows after merging. Each current token stands for a set of original tokens, contiguous or interleaved; the
state keeps its first (earliest) one in ``origin``. Because outputs are ordered by their first members, ``origin``
increases, and a word window [s, e) over the original tokens maps to the current tokens whose first original member
lies in it: one contiguous run of current indices, found by ``searchsorted``. A current token whose later members
reach into the next word counts for the word of its first member (for contiguous runs: the word it starts in). Everything model-specific
(where the span sits in the sequence, batching, positions, masks, caches) stays in the adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from speech_redundancy.compress.core import Compressed, check_index_map, similarity_features
from speech_redundancy.compress.registry import Point, apply


@dataclass(frozen=True)
class Record:
    """What the points did to one sample's audio span (and, for LLMs, the lengths the engine saw)."""

    tokens_in: int = 0  # audio tokens before the first point
    tokens_per_point: tuple[int, ...] = ()  # audio tokens after each point
    groups: tuple[tuple[int, ...], ...] = ()  # per point: output index per input token (-1: dropped)
    seconds: float = 0.0  # compression time, summed over points
    layer_tokens: tuple[int, ...] = ()  # LLMs: real sequence length entering each decoder layer
    kv_tokens: tuple[int, ...] = ()  # LLMs: real cached length of each layer after prefill

    @property
    def tokens_out(self) -> int:
        return self.tokens_per_point[-1] if self.tokens_per_point else self.tokens_in

    @property
    def retention(self) -> float | None:
        """Final retention ratio: audio tokens after all points / before (the paper's FRR)."""
        return self.tokens_out / self.tokens_in if self.tokens_in else None


@dataclass(frozen=True)
class SpanState:
    """One sample's audio span between points."""

    origin: Tensor  # [T] original audio-token index of the first member of each current token (increasing)
    words: Tensor | None = None  # [U, 2] word windows over the original tokens (oracle budgets), or None
    seed: int | None = None  # the sample's seed (random operators)
    record: Record = field(default_factory=Record)

    @classmethod
    def start(cls, n_tokens: int, *, words: Tensor | None = None, seed: int | None = None,
              device: torch.device | str = "cpu") -> "SpanState":
        return cls(torch.arange(n_tokens, device=device), words, seed, Record(tokens_in=n_tokens))


@dataclass(frozen=True)
class Features:
    """Where a point's similarity features come from: a norm (``normed``: the layer's input norm, or after its
    attention the post-attention norm) and the keys (``keys``): either a key projection applied to the normed
    tokens, or ``keys`` already computed for exactly these tokens (after the attention of a layer: the keys it
    attended with). None where there is none (e.g. an encoder's already-normed output)."""

    norm: Callable[[Tensor], Tensor] | None = None
    key_proj: Callable[[Tensor], Tensor] | None = None
    keys: Tensor | None = None  # [T, F] keys of the very tokens compressed, when the model already computed them

    def of(self, x: Tensor, mode: str) -> Tensor:
        if mode == "normed" and self.norm is None:
            return x  # already normed
        if mode == "keys":
            if self.keys is not None:
                return similarity_features(x, "keys", keys=self.keys)
            if self.key_proj is None:
                raise ValueError("features=keys needs an attention layer at this point")
            return similarity_features(x, "keys", keys=self.key_proj(self.norm(x) if self.norm else x))
        return similarity_features(x, mode, norm=self.norm)


def compress_step(x: Tensor, point: Point, state: SpanState, *, features: Features = Features(),
                  scores: Tensor | None = None, query: Tensor | None = None) -> tuple[Compressed, SpanState]:
    """Apply ``point`` to one sample's audio tokens ``x`` [T, d]; return the result and the state after it.

    ``scores`` [T]: attention each token received (the point's ``scores`` source); ``query`` [Q, d]: the text
    prompt's hidden states at the point; each for the operators that take it (the adapter supplies them). An
    operator whose output breaks the index-map contract raises ValueError here, before its groups are used.
    """
    t0 = time.perf_counter()
    spec = point.spec
    feats = features.of(x, point.features) if "features" in spec.inputs and point.features != "hidden" else None
    spans = None
    if point.needs_spans:
        if state.words is None:
            raise ValueError(f"operator={point.operator} with a budget needs word windows (align the data first)")
        # word windows over the original tokens -> windows over the current ones (earlier points may have merged)
        spans = torch.searchsorted(state.origin, state.words.to(state.origin.device).contiguous())
    out = apply(spec, x, point.operator_params(), features=feats, spans=spans, scores=scores, query=query,
                seed=state.seed)
    check_index_map(out, x.shape[0], first_only=False)  # interpolate places tokens at rounded source positions
    rec = state.record
    record = replace(rec, tokens_per_point=rec.tokens_per_point + (out.n_out,),
                     groups=rec.groups + (tuple(out.groups.tolist()),),
                     seconds=rec.seconds + time.perf_counter() - t0)
    origin = state.origin.index_select(0, out.positions.to(state.origin.device))
    return out, replace(state, origin=origin, record=record)

"""Compression points inside the decoder stack of a stock transformers speech LLM, during prefill.

``with compression(model, points, reach, ...) as session: model.generate(...)`` runs the model's own ``forward`` and
``generate`` with the audio span of the hidden states entering decoder layer ``l`` replaced by its compressed tokens
(l = 0: the input embeddings; paper §3.1 H^(l)), or, for a point with ``stage="after_attention"``, the audio span
inside layer l after its attention (FastAdaSP's place). On exit every hook is removed: the model is stock again.

What the engine does, and what it leaves to others:
- the per-sample work at a point (similarity features, word windows, the operator, the record) is
  :func:`speech_redundancy.compress.compress_step`, the same step the Whisper adapter uses;
- where a model keeps its layers, norms, rotary embedding and audio span is its adapter's :class:`Reach`;
- what it knows of transformers' internals (cache keyword, cache tensors, mask builders) is in ``hf_compat``;
- the engine itself finds the audio span of each sample, re-assembles the batch after a point, places positions and
  RoPE, rebuilds masks and (optionally) pools the early KV cache.

Forward pre-hooks (``register_forward_pre_hook(..., with_kwargs=True)``), all removable:
- the top module (what ``generate`` or the adapter's loop calls): a forward whose cache already holds tokens is a
  decode step (tested first: a decode step may feed back an audio placeholder); otherwise, when the adapter's
  ``find_audio`` sees audio slots, a prefill; anything else passes through untouched;
- the decoder stack: records the 2-D padding mask and the position ids, and supplies position ids when the caller
  gave none (prefill: 0..T-1 as the stock stack; decode: one past the last position, where the stock stack would
  count from layer 0's cache, which may be shorter);
- each decoder layer: at a point, in prefill, replaces the audio span of its input by the step's output, places each
  output token at its group's first member, recomputes RoPE at the chosen positions and rebuilds the causal mask for
  the new length; every later layer is handed these keyword arguments instead of the stack's full-length ones.
  During decode, a layer whose cache holds a compressed sequence gets a mask rebuilt against its own cache length
  (and, with ``positions="renumber"``, shifted RoPE positions);
- after-attention points: a forward hook on layer l's attention module (see ``Session._after_attention``): the
  operator runs on residual + attention, each member's row is set to its output token, layer l's MLP runs row by
  row, and layer l+1's pre-hook keeps one row per output token and re-assembles the batch as for an input point.
  Layer l's attention and cache see every token; its MLP and layers > l the compressed sequence.

Groups (the index-map contract, ``compress.core.Compressed``) may be any partition: contiguous runs or interleaved
members. Nothing here assumes contiguity: each output token is placed at its group's first member (outputs are
ordered by it), centroids and pooled keys/values are per-group means over the members wherever they lie.

Positions after merging (``positions=``): ``"first"`` (default) each output token keeps its group's first original
position (text after the audio and decode steps keep theirs; relative distances between surviving tokens are the
trained ones); ``"centroid"`` the group's mean position (fractional; rotary embeddings accept floats);
``"renumber"`` contiguous 0..T'-1 (layers >= l then see decode positions shifted by T - T'). The paper does not say
which it used.

KV cache. Layers < l keep the full-length keys and values of the prefill, layers >= l the shorter ones (the paper's
setting): KV memory is about (l T + (L - l) T') / (L T) of the stock cache. ``pool_early_kv=True`` goes beyond the
paper: after layer l's point the cached keys and values of layers < l are pooled with the same groups. Keys are
cached after RoPE, so a pooled key is the mean of keys rotated at their own positions: exact only for singletons.
After layer l's attention, layer l's cache is whole too (its attention ran before the merge): layers <= l keep T.

Batches (left padding, as decoder-only ``generate`` uses). After a point every sample is re-assembled from its real
tokens and left-padded again to the longest compressed sample; layers see exactly what a one-by-one run sees, plus
masked padding. A sample's audio slots need not be contiguous (several clips, 30 s windows separated by text): all
of them form the one sequence the operator sees, and each output token takes its first member's place.

Timing (last prefill, whole batch): ``session.point_seconds[l]`` is the wall time of the points at layer l, from its
input hidden states to the re-assembled batch with its positions, RoPE and masks (the paper's t_AP; synchronised
on a GPU), and ``session.engine_seconds`` the time spent in all of the engine's prefill hooks, points included (host
time: elsewhere on a GPU the hooks only queue small kernels).

Operators needing attention ``scores`` (attention_prune, samp, visionzip, fastadasp, speechprune, segment_topk) get,
per audio token, with the point's ``scores="last_query"`` (default) the attention the prompt's last token pays it,
averaged over heads, or with ``scores="received"`` the attention it receives from every real query (padding rows
left out), summed over queries and heads; read at layer l-1 for an input point, at layer l itself after its
attention. Either needs eager attention at that layer (refused otherwise, before any compute). At l = 0 an input
point has no layer l-1: a model whose adapter gives ``Reach.input_scores`` (:class:`InputScores`; Qwen2-Audio:
attention received in its audio encoder's last layer) scores the input from its audio encoder instead, whatever
``scores`` says, and the others refuse such a point. ``features="keys"`` at an input point is the key projection
of layer l's input norm; after layer l's attention it is the keys layer l attended with (rotated, as cached, heads
side by side). Operators needing a ``query`` (cdpruner, speechprune) get the hidden states at the point of the
sample's text tokens after its audio (all its text tokens when none follow).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from speech_redundancy import hf_compat as hf
from speech_redundancy.compress import Features, Point, Record, SpanState, compress_step, pool_groups
from speech_redundancy.efficiency import Stopwatch, memory_probe

POSITIONS = ("first", "centroid", "renumber")
LAYER_TYPES = ("full_attention", "sliding_attention")


class CompressionError(ValueError):
    """A point, request or model setting the engine cannot serve; raised before any compute."""


# ----------------------------------------------------------------------------- what an adapter provides
def placeholder_finder(token_id: int) -> Callable[[tuple, dict], Tensor | None]:
    """``find_audio`` for models that repeat one placeholder id per audio token in ``input_ids``."""

    def find(args: tuple, kwargs: dict) -> Tensor | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        return ids == token_id if isinstance(ids, Tensor) and ids.dim() == 2 else None

    return find


@dataclass
class InputScores:
    """Attention scores for points at l = 0 (the LLM has no layer l-1 there), from the model's audio encoder.

    ``attention`` is the encoder attention module whose forward output[1] holds its weights [N, H, Tq, Tk] (N
    encoder inputs, e.g. 30 s windows; eager attention only); ``to_slots(weights, kwargs)`` turns them, with the
    top forward's keyword arguments, into one score per audio slot of the batch, in the order the slots have in
    the batch row by row (the order the model's own masked_scatter fills them). ``implementation()`` is that
    encoder's attention implementation now; ``setting`` what to change when it is not eager.
    """

    attention: nn.Module
    to_slots: Callable[[Tensor, dict], Tensor]
    implementation: Callable[[], str]
    setting: str = "model.attn_implementation=eager"


@dataclass
class Reach:
    """Where one loaded model keeps what the engine touches. Built by the model family's adapter."""

    top: nn.Module  # the module called once per step (prefill, then each decode step)
    stack: nn.Module  # the decoder stack (forward receives inputs_embeds, attention_mask, position_ids, cache)
    layers: Sequence[nn.Module]  # decoder layers in order; the input of layers[l] is HF hidden_states[l]
    text_config: Any  # the stack's config: attention implementation, layer types, masks
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (hidden, position_ids [B, T]) -> (cos, sin)
    find_audio: Callable[[tuple, dict], Tensor | None]  # the top forward's (args, kwargs) -> audio slots [B, T]
    input_norm: Callable[[nn.Module], nn.Module] = lambda layer: layer.input_layernorm
    post_norm: Callable[[nn.Module], nn.Module] = lambda layer: layer.post_attention_layernorm
    key_proj: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn.k_proj
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn
    name: str = "model"
    input_scores: InputScores | None = None  # scores at l = 0 from the audio encoder; None: such points refused

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.text_config, "_attn_implementation", None) or "eager")

    def layer_types(self) -> list[str]:
        types = getattr(self.text_config, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.n_layers

    def features(self, layer: int) -> Features:
        """Where layer ``layer`` takes its similarity features from (input norm, key projection)."""
        module = self.layers[layer]
        return Features(norm=self.input_norm(module), key_proj=self.key_proj(module))

    def attention_keys(self, layer: int, kwargs: dict) -> Tensor:
        """The keys layer ``layer``'s attention computed from its keyword arguments (normed ``hidden_states``,
        ``position_embeddings``): the key projection, rotated as its cache holds them, heads side by side [B, T, F]."""
        module = self.layers[layer]
        normed = kwargs["hidden_states"]
        B, T, _ = normed.shape
        keys = self.key_proj(module)(normed).view(B, T, -1, self.attention(module).head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        keys = hf.rotate_keys(self.attention(module), keys, cos, sin)
        return keys.transpose(1, 2).reshape(B, T, -1)


# ----------------------------------------------------------------------------- checks (before any compute)
def check_points(points: Sequence[Point], reach: Reach, *, positions: str = "first", pool_early_kv: bool = False) -> None:
    """Raise one clear :class:`CompressionError` for what this model cannot do (points are valid by construction)."""
    if positions not in POSITIONS:
        raise CompressionError(f"positions={positions!r} is not allowed; use one of {', '.join(POSITIONS)}")
    n = reach.n_layers
    for p in points:
        if p.layer >= n:
            raise CompressionError(
                f"layer={p.layer} is beyond {reach.name}'s decoder stack of {n} layers: allowed 0..{n - 1} "
                "(0 = the input embeddings)"
            )
        if p.after_attention and p.layer == n - 1:
            raise CompressionError(f"stage=after_attention at layer={p.layer}: no decoder layer follows the last one "
                                   f"on {reach.name} to take the compressed sequence; allowed 0..{n - 2}")
        if p.needs_scores:
            if p.layer == 0 and not p.after_attention and reach.input_scores is None:
                raise CompressionError(f"operator={p.operator} scores tokens by attention at layer l-1; layer=0 has "
                                       f"none on {reach.name} (no audio-encoder scores; stage=after_attention reads "
                                       "layer 0's own)")
            if p.layer == 0 and not p.after_attention and reach.input_scores.implementation() != "eager":
                raise CompressionError(
                    f"operator={p.operator} at layer=0 needs the audio encoder's attention weights, which "
                    f"attn_implementation={reach.input_scores.implementation()!r} does not return; set "
                    f"{reach.input_scores.setting}"
                )
            scored = p.layer if p.after_attention else p.layer - 1
            if scored >= 0 and reach.attn_implementation != "eager":
                raise CompressionError(
                    f"operator={p.operator} needs attention weights at layer {scored} (scores={p.scores}), which "
                    f"attn_implementation={reach.attn_implementation!r} does not return; set "
                    "model.attn_implementation=eager"
                )
    places = [p.order for p in points]
    if places != sorted(set(places)):
        raise CompressionError("compression layers must be distinct and increasing (one point per layer and stage, "
                               f"input before after_attention), got {[(p.layer, p.stage) for p in points]}")
    unknown = sorted(set(reach.layer_types()) - set(LAYER_TYPES))
    if points and unknown:
        raise CompressionError(f"{reach.name} has layer types {unknown} the engine cannot re-mask")
    if pool_early_kv and "sliding_attention" in reach.layer_types():
        raise CompressionError("pool_early_kv=True needs full-attention caches; this model has sliding-window layers")


# ----------------------------------------------------------------------------- state that crosses the hooks
@dataclass
class Stage:
    """The batch layout from one point on (stage 0: the stack's input)."""

    pad: Tensor | None  # [B, L] True at real tokens; None: no padding
    lengths: list[int]  # real tokens per sample
    shift: Tensor | None = None  # positions="renumber": T - T' per sample, for decode positions


@dataclass
class Prefill:
    """One prefill forward, from the top module's pre-hook to its post-hook (kept for the decode steps after it)."""

    audio: Tensor  # [B, T] audio slots of the current sequence
    spans: list[SpanState]  # per sample: its audio span between points
    pad: Tensor | None = None  # [B, T] real tokens of the current sequence
    pos: Tensor | None = None  # [B, T] position ids of the current sequence
    first_pos: Tensor | None = None  # [B] one past the last original position
    cache: Any = None
    stages: list[Stage] = field(default_factory=list)
    kv_stage: list[int] = field(default_factory=list)  # per layer: the stage whose layout its cache holds
    override: dict[str, dict] | None = None  # per layer type: kwargs for every layer from the last point on
    scores: dict = field(default_factory=dict)  # (attention module, scores source) -> [B, T] scores
    residual: Tensor | None = None  # the private copy of the input of a layer with an after-attention point
    pending: "_Pending | None" = None  # an after-attention point's groups, re-assembled at the next layer's input
    last_pos: Tensor | None = None  # [B, 1] the last position fed so far
    inputs: dict = field(default_factory=dict)  # the top forward's keyword arguments (for InputScores.to_slots)


@dataclass
class Decode:
    """One decode step."""

    pad: Tensor | None  # generate's 2-D mask over everything fed so far
    pos: Tensor  # [B, q] position ids of this step
    cache: Any
    memo: dict = field(default_factory=dict)  # per stage: rebuilt masks and RoPE, shared by the layers of a stage


# ----------------------------------------------------------------------------- the session
class Session:
    """Hooks and per-forward state of one ``compression(...)`` block. ``records[b]`` describes sample b of the last
    prefill."""

    def __init__(self, points, reach: Reach, *, spans=None, seeds=None, positions="first", pool_early_kv=False):
        self.reach = reach
        self.spans = spans  # per sample: word windows [U, 2] over the audio tokens at the stack input, or None
        self.seeds = seeds
        self.positions = positions
        self.pool_early_kv = pool_early_kv
        self.records: list[Record] = []
        self.prefills = 0
        self.ttft_seconds: float | None = None  # last prefill forward (audio encoder + LLM prefill + compression)
        self.point_seconds: dict[int, float] = {}  # last prefill: layer -> seconds of its point (t_AP), whole batch
        self.engine_seconds = 0.0  # last prefill: seconds inside the engine's hooks, points included
        self.peak_memory_bytes: int | None = None
        self.memory_increment_bytes: int | None = None
        self.kv_bytes: int | None = None
        self.phase: str | None = None  # "prefill" | "decode" | None (pass through)
        self.prefill: Prefill | None = None
        self.decode: Decode | None = None
        self.points = sorted(points, key=lambda p: p.order)
        self._at = {p.layer: p for p in self.points if not p.after_attention}  # input points by layer
        self._after = {p.layer: p for p in self.points if p.after_attention}  # after-attention points by layer
        self._stage_of = [sum(p.acts_at <= i for p in self.points) for i in range(reach.n_layers)]
        self._sources: dict[nn.Module, set[str]] = {}  # attention module -> the scores sources read from it
        self._types = reach.layer_types()
        self._handles: list = []

    # -------------------------------------------------------------- install / remove
    def install(self) -> None:
        r = self.reach
        self._handles.append(r.top.register_forward_pre_hook(self._timed(self._top_pre), with_kwargs=True))
        self._handles.append(r.top.register_forward_hook(self._timed(self._top_post), with_kwargs=True))
        self._handles.append(r.stack.register_forward_pre_hook(self._timed(self._stack_pre), with_kwargs=True))
        for i, layer in enumerate(r.layers):
            self._handles.append(layer.register_forward_pre_hook(self._timed(self._layer_hook(i)), with_kwargs=True))
        for p in self.points:
            if p.needs_scores and p.layer == 0 and not p.after_attention:
                self._handles.append(r.input_scores.attention.register_forward_hook(self._input_scores_hook))
            elif p.needs_scores:
                self._sources.setdefault(self._scores_module(p), set()).add(p.scores)
        for module in self._sources:
            self._handles.append(module.register_forward_hook(self._scores_hook))
        for i in self._after:  # after the scores hooks: a layer's scores are taken before its point runs
            self._handles.append(r.attention(r.layers[i]).register_forward_hook(self._timed(self._after_attention(i)),
                                                                                with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _timed(self, hook: Callable) -> Callable:
        """``hook`` with its wall time added to ``engine_seconds`` while a prefill runs."""

        def run(*args):
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                if self.phase == "prefill":
                    self.engine_seconds += time.perf_counter() - t0

        return run

    # -------------------------------------------------------------- top module: prefill or decode?
    def _top_pre(self, module, args, kwargs):
        cache = hf.cache_of(kwargs)
        if hf.cached_length(cache) > 0:  # a decode step, whatever tokens it feeds back
            self.phase = "decode" if self.prefill is not None and self.prefill.stages else None
            if self.phase and self.points and _n_new(args, kwargs) > 1:
                raise CompressionError("continuing a compressed cache with several tokens at once (chunked prefill, "
                                       "assisted decoding) is not supported; decode one token per step")
            return None
        audio = self.reach.find_audio(args, kwargs)
        if audio is not None and bool(audio.any()):
            self.phase = "prefill"
            self.prefill = Prefill(audio=audio, spans=[], inputs=kwargs)
            self.prefills += 1
            self.point_seconds, self.engine_seconds = {}, 0.0
            device = next(module.parameters()).device
            self._probe = memory_probe(device)
            self._watch = Stopwatch(device).start()
        elif self.points:
            raise CompressionError(f"{self.reach.name}: the prompt holds no audio slots, so there is no audio span "
                                   "to compress")
        else:
            self.phase = None
        return None

    def _top_post(self, module, args, kwargs, output):
        if self.phase == "prefill":
            self.ttft_seconds = self._watch.stop()
            self.peak_memory_bytes, self.memory_increment_bytes = self._probe.stop()
            cache = hf.output_cache(output)
            self.kv_bytes = hf.kv_cache_bytes(cache) if cache is not None else None
            self._finish_records()
        return None

    # -------------------------------------------------------------- decoder stack: masks and positions
    def _stack_pre(self, module, args, kwargs):
        if self.phase is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise CompressionError(f"{self.reach.name}: the decoder stack was called without inputs_embeds")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (isinstance(mask, Tensor) and mask.dim() != 2):
            raise CompressionError("the engine needs a 2-D padding mask (or none), not a prepared 4-D mask")
        pos = kwargs.get("position_ids")
        B, q = embeds.shape[:2]
        st = self.prefill
        if self.phase == "prefill":
            if st.audio.shape != (B, q):
                raise CompressionError(f"audio slots {tuple(st.audio.shape)} do not line up with the stack input {(B, q)}")
            if mask is not None and not bool((mask[:, -1] == 1).all()):
                raise CompressionError("batches must be left-padded (decoder-only generate pads on the left)")
            if pos is None:  # as the stock stack counts them (generate passes its own, padding-aware ones)
                pos = torch.arange(q, device=embeds.device).unsqueeze(0)
            if pos.dim() != 2:
                raise CompressionError(f"{self.reach.name}: {pos.dim()}-D position ids are not supported yet")
            kwargs["position_ids"] = pos
            st.audio = st.audio.to(embeds.device)
            st.pos = pos.expand(B, q)
            st.pad = mask.bool() if mask is not None and not bool(mask.all()) else None
            st.first_pos = st.pos.max(dim=1).values + 1
            st.cache = hf.cache_of(kwargs)
            n_audio = st.audio.sum(1).tolist()
            st.spans = [SpanState.start(int(n), words=None if self.spans is None else self.spans[b],
                                        seed=None if self.seeds is None else self.seeds[b], device=embeds.device)
                        for b, n in enumerate(n_audio)]
            st.stages = [Stage(st.pad, _real_lengths(st.pad, B, q))]
            st.kv_stage = list(self._stage_of)
            st.last_pos = st.pos[:, -1:]
        else:
            if pos is None:
                pos = st.last_pos + 1 + torch.arange(q, device=embeds.device)
                kwargs["position_ids"] = pos
            self.decode = Decode(pad=mask, pos=pos.expand(B, q), cache=hf.cache_of(kwargs))
            st.last_pos = pos[:, -1:]
        return args, kwargs

    # -------------------------------------------------------------- decoder layers
    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            if self.phase == "prefill":
                st = self.prefill
                hidden = args[0] if args else kwargs["hidden_states"]
                if st.pending is not None and st.pending.layer == i - 1:
                    hidden = self._take_pending(i, hidden)
                if i in self._at:
                    hidden = self._compress(i, self._at[i], hidden)
                if st.override is not None:
                    kwargs.update(st.override[self._types[i]])
                if i in self._after:
                    # a private copy: the stock layer keeps its input as the residual of its attention, which the
                    # after-attention hook rewrites (the caller's tensor, e.g. HF hidden_states[i], stays intact)
                    hidden = st.residual = hidden.clone()
                return _with_hidden(args, kwargs, hidden)
            if self.phase == "decode":
                kw = self._decode_kwargs(i, args[0] if args else kwargs["hidden_states"])
                if kw:
                    kwargs.update(kw)
                    return args, kwargs
            return None

        return hook

    def _scores_hook(self, module, args, output):
        if self.phase == "prefill" and isinstance(output, tuple) and len(output) > 1:
            weights = output[1]
            if weights is None:
                raise CompressionError("attention weights are missing: scores need model.attn_implementation=eager")
            st = self.prefill
            for source in self._sources[module]:
                if source == "last_query":  # attention the last token pays to every key, mean over heads: [B, T]
                    st.scores[module, source] = weights[:, :, -1, :].float().mean(1)
                else:  # received: from every real query, summed over heads and queries (padding rows left out)
                    per_query = weights.float().sum(1)  # [B, Tq, Tk]
                    if st.pad is not None:
                        per_query = per_query * st.pad[:, :, None].to(per_query.device)
                    st.scores[module, source] = per_query.sum(1)
        return None

    def _input_scores_hook(self, module, args, output):
        if self.phase == "prefill":
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise CompressionError(f"audio encoder attention weights are missing: scores at layer=0 need "
                                       f"{self.reach.input_scores.setting}")
            st = self.prefill
            flat = self.reach.input_scores.to_slots(weights, st.inputs)
            audio = st.audio.to(flat.device)
            if flat.numel() != int(audio.sum()):
                raise CompressionError(f"{self.reach.name}: {flat.numel()} audio-encoder scores for "
                                       f"{int(audio.sum())} audio slots")
            full = torch.zeros(audio.shape, dtype=torch.float32, device=flat.device)
            full[audio] = flat.float()  # row by row, as the slots are filled
            st.scores[module, "encoder"] = full
        return None

    def _scores_module(self, point: Point) -> nn.Module:
        """The attention module whose scores ``point`` reads: layer l's after its attention, else layer l-1's
        (l = 0: the audio encoder's)."""
        if point.after_attention:
            return self.reach.attention(self.reach.layers[point.layer])
        if point.layer == 0:
            return self.reach.input_scores.attention
        return self.reach.attention(self.reach.layers[point.layer - 1])

    def _scores(self, point: Point, device) -> Tensor | None:
        if not point.needs_scores:
            return None
        source = "encoder" if point.layer == 0 and not point.after_attention else point.scores
        scores = self.prefill.scores.get((self._scores_module(point), source))
        if scores is None:
            raise CompressionError(f"operator={point.operator} at layer={point.layer}: no attention scores were "
                                   "captured in this prefill")
        return scores.to(device)

    # -------------------------------------------------------------- prefill: one point
    def _compress(self, i: int, point: Point, hidden: Tensor) -> Tensor:
        """An input point at layer i: compress the audio span of ``hidden`` and re-assemble the batch."""
        t_batch = _clock(hidden.device)
        plans, tokens, step_seconds = self._steps(point, hidden, self.reach.features(i), self._scores(point, hidden.device))
        return self._reassemble(i, point.layer, hidden, plans, tokens, t_batch, step_seconds)

    def _after_attention(self, i: int):
        """The forward hook on layer i's attention for its after-attention point (prefill only).

        Why a hook and not a split layer call: the stock decoder layer computes ``residual + attention`` and runs
        its MLP on the result, with no seam to shorten the sequence in between. So the hook runs the operator on
        the post-attention states h = residual + attention (the very sum the layer forms) and writes each kept
        audio token's output back into every member's row, exactly: the residual (the layer's private input copy)
        takes the output token, the attention output 0, so the layer's sum is the token itself. The post-attention
        norm and MLP act row by row, so each member's row leaves the layer as that token through the MLP; the next
        layer's pre-hook keeps one row per output token (its first member's) and re-assembles the batch. The only
        extra work is the MLP of layer i on the T - T' rows that go away.
        """

        def hook(module, args, kwargs, output):
            if self.phase != "prefill":
                return None
            st = self.prefill
            attn_out, rest = output[0], output[1:]
            device = attn_out.device
            t_batch = _clock(device)
            point = self._after[i]
            h = st.residual + attn_out  # as the layer forms it
            keys = self.reach.attention_keys(i, kwargs) if point.features == "keys" else None
            features = Features(norm=self.reach.post_norm(self.reach.layers[i]))
            plans, tokens, step_seconds = self._steps(point, h, features, self._scores(point, device), keys=keys)
            attn_out = attn_out.clone()
            for b, (p, rows) in enumerate(zip(plans, tokens)):
                kept = p.groups >= 0
                at = p.aidx[kept]
                st.residual[b, at] = rows.to(h.dtype).index_select(0, p.groups[kept])
                attn_out[b, at] = 0
            st.residual = None
            st.pending = _Pending(i, point, plans, _clock(device) - t_batch, step_seconds)
            return (attn_out, *rest)

        return hook

    def _take_pending(self, i: int, hidden: Tensor) -> Tensor:
        """Layer i's input after an after-attention point at layer i-1: one row per output token, its first
        member's (every member's row holds the same token), then the batch re-assembled as for an input point."""
        pending, self.prefill.pending = self.prefill.pending, None
        t_batch = _clock(hidden.device) - pending.seconds
        rows = [hidden[b].index_select(0, p.aidx[_first_members(p.groups, p.n_out)])
                for b, p in enumerate(pending.plans)]
        return self._reassemble(i, pending.layer, hidden, pending.plans, rows, t_batch, pending.step_seconds)

    def _steps(self, point: Point, hidden: Tensor, features: Features, scores: Tensor | None, *,
               keys: Tensor | None = None) -> tuple[list["_Plan"], list[Tensor], list[float]]:
        """The per-sample step on each sample's audio span of ``hidden`` [B, T, d]: plans, output tokens, seconds."""
        st = self.prefill
        device = hidden.device
        B, T, _ = hidden.shape
        all_real = torch.ones(T, dtype=torch.bool, device=device)
        plans, tokens, step_seconds = [], [], []
        for b in range(B):
            real = st.pad[b] if st.pad is not None else all_real
            aidx = st.audio[b].nonzero().squeeze(1)
            tidx = (~st.audio[b] & real).nonzero().squeeze(1)
            before = st.spans[b].record.seconds
            query = None
            if point.needs_query:  # the prompt: text after the audio (all text when none follows)
                after = tidx[tidx > aidx.max()] if aidx.numel() else tidx
                query = hidden[b, after if after.numel() else tidx]
            feats = features if keys is None else replace(features, keys=_rows(keys[b], aidx))
            out, st.spans[b] = compress_step(_rows(hidden[b], aidx), point, st.spans[b], features=feats,
                                             scores=None if scores is None else scores[b, aidx], query=query)
            step_seconds.append(st.spans[b].record.seconds - before)
            plans.append(_Plan(tidx, aidx, out.groups.to(device), out.positions.to(device)))
            tokens.append(out.tokens)
        return plans, tokens, step_seconds

    def _reassemble(self, i: int, layer: int, hidden: Tensor, plans: list["_Plan"], tokens: list[Tensor],
                    t_batch: float, step_seconds: list[float]) -> Tensor:
        """The batch entering layer i after the point of ``layer``: each sample's text rows and new audio rows in
        sequence order (each output token at its group's first member), left-padded again; positions, RoPE and
        masks for layers >= i; the early KV cache pooled when asked; the point's time shared out to the records."""
        st = self.prefill
        device = hidden.device
        B = hidden.shape[0]
        lengths = [p.length for p in plans]
        L = max(lengths)
        new_hidden = _assemble(hidden, plans, L, dim=1, audio_rows=tokens)
        pad = None
        if st.pad is not None or len(set(lengths)) > 1:
            pad = torch.zeros(B, L, dtype=torch.bool, device=device)
            for b, n in enumerate(lengths):
                pad[b, L - n:] = True
        audio = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b, p in enumerate(plans):
            audio[b, L - p.length:] = p.is_audio()
        pos = self._new_positions(st.pos, plans, L)
        shift = st.first_pos - (pos.max(dim=1).values + 1) if self.positions == "renumber" else None
        if self.pool_early_kv and st.cache is not None:
            self._pool_cache(i, plans, L)
        cos_sin = self.reach.rotary(new_hidden, pos)
        override = {}
        for kind in set(self._types[i:]):
            first = i + self._types[i:].index(kind)
            mask = hf.make_mask(kind, self.reach.text_config, new_hidden, pad, st.cache, first)
            # position_ids=None: gapped ids would send FlashAttention-2 down its packed (varlen) path
            override[kind] = {"attention_mask": mask, "position_embeddings": cos_sin, "position_ids": None}
        st.audio, st.pad, st.pos, st.override = audio, pad, pos, override
        st.stages.append(Stage(pad, lengths, shift))
        seconds = _clock(device) - t_batch
        self.point_seconds[layer] = self.point_seconds.get(layer, 0.0) + seconds
        shared = (seconds - sum(step_seconds)) / B  # re-assembly, positions, masks
        st.spans = [replace(s, record=replace(s.record, seconds=s.record.seconds + shared)) for s in st.spans]
        return new_hidden

    def _new_positions(self, pos: Tensor, plans: list["_Plan"], L: int) -> Tensor:
        B = pos.shape[0]
        dtype = torch.float32 if self.positions == "centroid" else pos.dtype
        out = torch.ones(B, L, dtype=dtype, device=pos.device)
        for b, p in enumerate(plans):
            row = pos[b]
            if self.positions == "first":
                seq = torch.cat([row[p.tidx], row[p.aidx[p.first]]])[p.order]
            elif self.positions == "centroid":
                audio = _centroids(row[p.aidx], p.groups, p.n_out)
                seq = torch.cat([row[p.tidx].float(), audio])[p.order]
            else:  # renumber: contiguous from the sample's first real position
                start = torch.cat([row[p.tidx], row[p.aidx]]).min()
                seq = start + torch.arange(p.length, device=pos.device, dtype=pos.dtype)
            out[b, L - p.length:] = seq.to(dtype)
        return out

    def _pool_cache(self, i: int, plans: list["_Plan"], L: int) -> None:
        st = self.prefill
        for j in range(i):
            pooled = []
            for t in hf.layer_kv(st.cache, j):  # [B, H, T, hd]
                audio = [_pool_heads(t[b].index_select(1, p.aidx), p.groups) for b, p in enumerate(plans)]
                pooled.append(_assemble(t, plans, L, dim=2, audio_rows=audio))
            hf.set_layer_kv(st.cache, j, *pooled)
        stage = len(st.stages)  # the layout these caches hold from now on
        for j in range(i):
            st.kv_stage[j] = stage

    # -------------------------------------------------------------- decode: masks against each layer's cache
    def _decode_kwargs(self, i: int, hidden: Tensor) -> dict | None:
        st, dec = self.prefill, self.decode
        kv_stage = st.kv_stage[i]
        pos_stage = self._stage_of[i]
        if kv_stage == 0 and pos_stage == 0:
            return None
        kind = self._types[i]
        out = {}
        if kv_stage > 0:
            key = ("mask", kv_stage, kind)
            if key not in dec.memo:
                dec.memo[key] = hf.make_mask(kind, self.reach.text_config, hidden,
                                             self._decode_pad(st.stages[kv_stage], i, hidden), dec.cache, i)
            out["attention_mask"] = dec.memo[key]
        if self.positions == "renumber" and pos_stage > 0:
            key = ("rope", pos_stage)
            if key not in dec.memo:
                dec.memo[key] = self.reach.rotary(hidden, dec.pos - st.stages[pos_stage].shift[:, None])
            out["position_embeddings"] = dec.memo[key]
        return out

    def _decode_pad(self, stage: Stage, i: int, hidden: Tensor) -> Tensor | None:
        """The 2-D mask over layer i's cache: the stage's prefill layout, then every token generated since."""
        gen = self.decode.pad
        if stage.pad is None and gen is None:
            return None
        B, q = hidden.shape[:2]
        n_tail = hf.cached_length(self.decode.cache, i) + q - max(stage.lengths)
        head = stage.pad
        if head is None:
            head = torch.ones(B, max(stage.lengths), dtype=torch.bool, device=hidden.device)
        tail = gen[:, gen.shape[1] - n_tail:].bool() if gen is not None else \
            torch.ones(B, n_tail, dtype=torch.bool, device=hidden.device)
        return torch.cat([head, tail.to(head.device)], dim=1)

    # -------------------------------------------------------------- per-sample lengths for accounting
    def _finish_records(self) -> None:
        st = self.prefill
        n = self.reach.n_layers
        records = []
        for b, span in enumerate(st.spans):
            lens = [s.lengths[b] for s in st.stages]
            records.append(replace(span.record, layer_tokens=tuple(lens[self._stage_of[j]] for j in range(n)),
                                   kv_tokens=tuple(lens[st.kv_stage[j]] for j in range(n))))
        self.records = records


@contextmanager
def compression(model: nn.Module, points: Sequence[Point], reach: Reach, *, spans=None, seeds=None,
                positions: str = "first", pool_early_kv: bool = False) -> Iterator[Session]:
    """Apply ``points`` to the audio span during prefill of ``model`` (whose parts ``reach`` names) inside the block.

    ``spans[b]``: word windows [U, 2] in audio-token units for sample b (oracle operators); ``seeds[b]``: the seed of
    random operators for sample b. With no points the hooks only observe (records, time to first token, memory):
    logits and tokens are the stock ones.
    """
    check_points(points, reach, positions=positions, pool_early_kv=pool_early_kv)
    session = Session(points, reach, spans=spans, seeds=seeds, positions=positions, pool_early_kv=pool_early_kv)
    session.install()
    try:
        yield session
    finally:
        session.remove()


def audio_hidden_states(model: nn.Module, reach: Reach, batch: dict[str, Tensor]) -> list[Tensor]:
    """Uncompressed audio span of the hidden states of one sample (paper Fig. 3): entry l < L is the input of decoder
    layer l (l = 0: the input embeddings), entry L the stack's output after its final norm. float32, CPU."""
    audio = reach.find_audio((), batch)
    if audio is None or audio.shape[0] != 1:
        raise ValueError("audio_hidden_states takes one sample with audio slots")
    if not bool(audio.any()):
        raise CompressionError(f"{reach.name}: the prompt holds no audio slots")
    captured: list[Tensor] = []

    def keep(hidden: Tensor) -> None:
        captured.append(hidden[0, audio[0].to(hidden.device)].float().cpu())

    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for layer in reach.layers]
    handles.append(reach.stack.register_forward_hook(lambda m, args, out: keep(out[0])))
    try:
        with torch.inference_mode():
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


# ----------------------------------------------------------------------------- small tensor helpers
def _clock(device: torch.device) -> float:
    """Wall time, after the device's queued work (a GPU is synchronised; elsewhere a plain clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _n_new(args, kwargs) -> int:
    """Tokens a forward feeds (input_ids or inputs_embeds)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, Tensor):
        return int(ids.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    return int(embeds.shape[1]) if isinstance(embeds, Tensor) else 1


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _real_lengths(pad: Tensor | None, B: int, T: int) -> list[int]:
    return [T] * B if pad is None else pad.sum(1).tolist()


def _centroids(pos: Tensor, groups: Tensor, n_out: int) -> Tensor:
    """Mean position of each group's members (dropped ones left out) as sum / count: exact for integer positions,
    unlike pool_groups' weighted sum, so a centroid is the correctly rounded mean."""
    keep = groups >= 0
    total = torch.zeros(n_out, dtype=torch.float32, device=pos.device).index_add_(0, groups[keep], pos[keep].float())
    return total / torch.bincount(groups[keep], minlength=n_out).clamp(min=1).float()


def _first_members(groups: Tensor, n_out: int) -> Tensor:
    """Index of each group's first (earliest) member: where the after-attention hook wrote its token (an operator's
    ``positions`` may name another input, as ``interpolate``'s rounded source positions)."""
    idx = torch.arange(groups.numel(), device=groups.device)
    keep = groups >= 0
    return torch.full((n_out,), groups.numel(), dtype=torch.long, device=groups.device).scatter_reduce_(
        0, groups[keep], idx[keep], "amin")


def _pool_heads(t: Tensor, groups: Tensor) -> Tensor:
    """Group means of cached keys or values [H, T, hd] along T (dropped tokens removed), through pool_groups."""
    H, T, hd = t.shape
    flat = t.permute(1, 0, 2).reshape(T, H * hd)
    return pool_groups(flat, groups).tokens.reshape(-1, H, hd).permute(1, 0, 2)


@dataclass
class _Pending:
    """An after-attention point at ``layer``, waiting for the next layer's input to re-assemble the batch."""

    layer: int
    point: Point
    plans: list["_Plan"]
    seconds: float  # time spent so far (scores, operator, rows written back)
    step_seconds: list[float]  # per sample: its step's share


@dataclass
class _Plan:
    """How one sample's sequence is re-assembled at a point."""

    tidx: Tensor  # indices of its real text tokens
    aidx: Tensor  # indices of its audio tokens
    groups: Tensor  # [len(aidx)] output index per audio token, -1 = dropped
    first: Tensor  # [n_out] representative (first) member of each output token, into aidx

    def __post_init__(self):
        # each output token sits where its first member sat; text tokens keep their places
        self.order = torch.argsort(torch.cat([self.tidx, self.aidx[self.first]]))
        slot = torch.empty_like(self.order)
        slot[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        self.text_at, self.audio_at = slot[: self.tidx.numel()], slot[self.tidx.numel():]  # places in the new sequence

    @property
    def n_out(self) -> int:
        return int(self.first.numel())

    @property
    def length(self) -> int:
        return int(self.tidx.numel()) + self.n_out

    def is_audio(self) -> Tensor:
        flags = torch.zeros(self.length, dtype=torch.bool, device=self.tidx.device)
        flags[self.tidx.numel():] = True
        return flags[self.order]


def _assemble(t: Tensor, plans: list[_Plan], L: int, *, dim: int, audio_rows: list[Tensor]) -> Tensor:
    """Per sample: its text rows of ``t`` and its new audio rows, in sequence order, left-padded to ``L`` along
    ``dim`` (``dim`` counts the batch axis: 1 for hidden states [B, T, d], 2 for keys [B, H, T, hd]). Each row is
    written once, straight to its place (the audio rows are the bulk: one copy)."""
    shape = list(t.shape)
    shape[dim] = L
    out = t.new_empty(shape)
    d = dim - 1  # the sequence axis of one sample
    for b, p in enumerate(plans):
        pad = L - p.length
        if pad:
            out[b].narrow(d, 0, pad).zero_()
        seq = out[b].narrow(d, pad, p.length)
        seq.index_copy_(d, p.text_at, t[b].index_select(d, p.tidx))
        seq.index_copy_(d, p.audio_at, audio_rows[b].to(t.dtype))
    return out


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` along the first axis; a view, not a copy, when ``idx`` is one contiguous run (a single audio span)."""
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) + 1 == n:
        return t.narrow(0, int(idx[0]), n)
    return t.index_select(0, idx)

"""Compression points inside the decoder stack of a stock transformers speech LLM, during prefill.

``with compression(model, points, reach, ...) as session: model.generate(...)`` runs the model's own ``forward`` and
``generate`` with the audio span of the hidden states entering decoder layer ``l`` replaced by its compressed tokens
(l = 0: the spliced input embeddings; paper §3.1 H^(l)). On exit every hook is removed: the model is stock again.

Forward pre-hooks (``register_forward_pre_hook(..., with_kwargs=True)``), all removable:

- the top module (what ``generate`` calls): audio placeholders in ``input_ids`` mark a prefill; a forward without
  them after a compressed prefill, with a filled cache, is a decode step; anything else passes through untouched;
- the decoder stack: records the 2-D padding mask and the position ids it receives, and supplies the position ids
  when the caller gave none (prefill: 0..T-1 as the stock stack; decode: one past the last position, where the
  stock stack would count from layer 0's cache, which may be shorter);
- each decoder layer: at a point, in prefill, replaces the audio span of its input by ``compress.compress``'s
  output, places each output token at its group's first member, recomputes RoPE at the chosen positions and
  rebuilds the causal mask for the new length (``position_ids=None``: gapped ids would otherwise be taken for
  packed sequences and give a block-diagonal mask); every later layer is handed these keyword arguments instead of
  the stack's full-length ones. During decode, a layer whose cache holds a compressed sequence gets a mask rebuilt
  against its own cache length (and, with ``positions="renumber"``, shifted RoPE positions).

Positions after merging (``positions=``):

- ``"first"`` (default): each output token keeps its group's first original position. Text after the audio and the
  decode steps keep their original positions, so decoding needs no shift, and the same rule gathers 3-D mRoPE ids.
  Relative distances between the surviving tokens are the ones the model was trained with.
- ``"centroid"``: the mean original position of the group (fractional; rotary embeddings accept floats).
- ``"renumber"``: contiguous positions 0..T'-1; layers >= l then see decode positions shifted by T - T'.
The paper does not say which one it used.

KV cache. Layers < l keep the full-length keys and values of the prefill and layers >= l the shorter ones (the
paper's setting; ``DynamicLayer.update`` just concatenates, so mixed lengths need no cache change). KV memory is
then about (l*T + (L-l)*T') / (L*T) of the stock cache. ``pool_early_kv=True`` goes beyond the paper: after layer
l's point, the cached keys and values of layers < l are pooled with the same groups (group mean; dropped tokens
removed). Keys are cached after RoPE, so a pooled key is the mean of keys rotated at their own positions, not the key
a merged token would have at one position: an approximation, exact only for singleton groups.

Batches (left padding, as decoder-only ``generate`` uses). After a point every sample is re-assembled from its real
tokens and left-padded again to the longest compressed sample, with a matching 2-D padding mask; layers see exactly
what a one-by-one run sees, plus masked padding. A sample's audio positions need not be contiguous (several clips,
or 30 s windows separated by text): all of them form the one sequence the operator sees, and each output token takes
its first member's place among the text tokens.

Operators needing attention ``scores`` (e.g. attention_prune) get, per audio token, the attention the prompt's last
token pays to it at layer l-1, averaged over heads: this needs eager attention at layer l-1 (refused otherwise).
"""

from __future__ import annotations

import functools
import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from speech_redundancy import compress as ops
from speech_redundancy.efficiency import Stopwatch, kv_cache_bytes, memory_probe
from speech_redundancy.models.base import Point

POSITIONS = ("first", "centroid", "renumber")
LAYER_TYPES = ("full_attention", "sliding_attention")
FEATURE_OPERATORS = ops.SIMILARITY_OPERATORS  # take features=...
ORACLE_OPERATORS = ops.ORACLE_OPERATORS  # need word spans when given a budget


class CompressionError(ValueError):
    """A point, request or model setting the engine cannot serve; raised before any compute."""


# ----------------------------------------------------------------------------- what an adapter provides
@dataclass
class Reach:
    """Where one loaded model keeps what the engine touches. Built by the model family's adapter."""

    top: nn.Module  # the module ``generate`` calls (its forward receives ``input_ids``)
    stack: nn.Module  # the decoder stack (forward receives inputs_embeds, attention_mask, position_ids, cache)
    layers: Sequence[nn.Module]  # decoder layers in order; the input of layers[l] is HF hidden_states[l]
    audio_token_id: int  # the placeholder id the processor repeats once per audio token
    text_config: Any  # the stack's config: attention implementation, layer types, masks
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (hidden, position_ids [B, T]) -> (cos, sin)
    input_norm: Callable[[nn.Module], nn.Module] = lambda layer: layer.input_layernorm
    key_proj: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn.k_proj
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn
    name: str = "model"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.text_config, "_attn_implementation", None) or "eager")

    def layer_types(self) -> list[str]:
        types = getattr(self.text_config, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.n_layers


# ----------------------------------------------------------------------------- checks (before any compute)
@functools.lru_cache(maxsize=None)
def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (signatures are read once: masks are rebuilt every decode step)."""
    return name in inspect.signature(fn).parameters


def operator_takes(operator: str, name: str) -> bool:
    """Whether operator ``operator`` of ``compress.OPERATORS`` has a parameter ``name``."""
    fn = ops.OPERATORS.get(operator)
    return fn is not None and _takes(fn, name)


def needs_spans(point: Point) -> bool:
    """Oracle operators with a per-word budget need word spans (paper §3.1)."""
    return point.operator in ORACLE_OPERATORS and "budget" in point.params


def needs_scores(point: Point) -> bool:
    return operator_takes(point.operator, "scores")


def check_points(points: Sequence[Point], reach: Reach, *, positions: str = "first", pool_early_kv: bool = False) -> None:
    """Raise one clear :class:`CompressionError` for anything the engine cannot do with ``reach``'s model."""
    if positions not in POSITIONS:
        raise CompressionError(f"positions={positions!r} is not allowed; use one of {', '.join(POSITIONS)}")
    layers = [p.layer for p in points]
    n = reach.n_layers
    for p in points:
        if not isinstance(p.layer, int) or not 0 <= p.layer < n:
            raise CompressionError(
                f"layer={p.layer} is beyond {reach.name}'s decoder stack of {n} layers: allowed 0..{n - 1} "
                "(0 = the spliced input embeddings)"
            )
        if p.operator not in ops.OPERATORS:
            raise CompressionError(f"operator={p.operator!r} is unknown; allowed: {', '.join(sorted(ops.OPERATORS))}")
        mode = p.params.get("features", "hidden")
        if mode not in ops.FEATURE_MODES:
            raise CompressionError(f"features={mode!r} is not allowed; use hidden, normed, centered or keys")
        try:
            ops.validate(p.operator, **{k: v for k, v in p.params.items() if k != "features"})
        except (TypeError, ValueError) as e:
            raise CompressionError(f"layer={p.layer}: {e}") from None
        if needs_scores(p):
            if p.layer == 0:
                raise CompressionError(f"operator={p.operator} scores tokens by attention at layer l-1; layer=0 has none")
            if reach.attn_implementation != "eager":
                raise CompressionError(
                    f"operator={p.operator} needs attention weights at layer {p.layer - 1}, which "
                    f"attn_implementation={reach.attn_implementation!r} does not return; load the model with "
                    "attn_implementation=eager"
                )
    if layers != sorted(set(layers)):
        raise CompressionError(f"compression layers must be distinct and increasing, got {layers}")
    unknown = sorted(set(reach.layer_types()) - set(LAYER_TYPES))
    if points and unknown:
        raise CompressionError(f"{reach.name} has layer types {unknown} the engine cannot re-mask")
    if pool_early_kv and "sliding_attention" in reach.layer_types():
        raise CompressionError("pool_early_kv=True needs full-attention caches; this model has sliding-window layers")


# ----------------------------------------------------------------------------- per-utterance record
@dataclass
class Record:
    """What one sample's prefill did (batch position b of the session)."""

    tokens_in: int = 0  # audio tokens entering the stack
    tokens_per_point: list[int] = field(default_factory=list)  # audio tokens after each point
    groups: list[list[int]] = field(default_factory=list)  # per point: output index per input token (-1: dropped)
    seconds: float = 0.0  # compression time, summed over points (this sample's share of batch-level work)
    layer_tokens: list[int] = field(default_factory=list)  # real sequence length entering each decoder layer
    kv_tokens: list[int] = field(default_factory=list)  # real cached length of each layer after prefill

    @property
    def tokens_out(self) -> int:
        return self.tokens_per_point[-1] if self.tokens_per_point else self.tokens_in


# ----------------------------------------------------------------------------- the session
class Session:
    """Hooks and per-forward state of one ``compression(...)`` block. ``records[b]`` describes sample b."""

    def __init__(self, points, reach: Reach, *, spans=None, seeds=None, positions="first", pool_early_kv=False,
                 audio_mask: Tensor | None = None):
        self.points = sorted(points, key=lambda p: p.layer)
        self.reach = reach
        self.spans = spans  # per sample: word windows [U, 2] in audio-token units at the stack input, or None
        self.seeds = seeds
        self.positions = positions
        self.pool_early_kv = pool_early_kv
        self.audio_mask = audio_mask  # for prefills called with inputs_embeds only
        self.records: list[Record] = []
        self.prefills = 0
        self.ttft_seconds: float | None = None  # last prefill forward (audio encoder + LLM prefill + compression)
        self.peak_memory_bytes: int | None = None
        self.memory_increment_bytes: int | None = None
        self.kv_bytes: int | None = None
        self._at = {p.layer: p for p in self.points}
        self._stage_of = [sum(p.layer <= i for p in self.points) for i in range(reach.n_layers)]
        self._types = reach.layer_types()
        self._handles: list = []
        self.state: dict[str, Any] = {"phase": None}

    # -------------------------------------------------------------- install / remove
    def install(self) -> None:
        r = self.reach
        self._handles.append(r.top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self._handles.append(r.top.register_forward_hook(self._top_post, with_kwargs=True))
        self._handles.append(r.stack.register_forward_pre_hook(self._stack_pre, with_kwargs=True))
        for i, layer in enumerate(r.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for p in self.points:
            if needs_scores(p):
                attn = r.attention(r.layers[p.layer - 1])
                self._handles.append(attn.register_forward_hook(self._scores_hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -------------------------------------------------------------- top module: prefill or decode?
    def _top_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        audio = None
        if ids is not None and ids.dim() == 2:
            audio = ids == self.reach.audio_token_id
        elif self.audio_mask is not None and kwargs.get("inputs_embeds") is not None:
            audio = self.audio_mask.to(kwargs["inputs_embeds"].device)
        if audio is not None and bool(audio.any()):
            self.state = {"phase": "prefill", "audio": audio}
            self.prefills += 1
            device = next(module.parameters()).device
            self._probe = memory_probe(device)
            self._watch = Stopwatch(device).start()
        elif self.prefills and cache is not None and cache.get_seq_length() > 0 and "stages" in self.state:
            if ids is not None and ids.shape[-1] > 1:
                raise CompressionError("continuing a compressed cache with several tokens at once (chunked prefill, "
                                       "assisted decoding) is not supported; decode one token per step")
            self.state["phase"] = "decode"
        elif self.points and (cache is None or cache.get_seq_length() == 0):
            raise CompressionError(
                f"{self.reach.name}: the prompt holds no audio placeholder (token id {self.reach.audio_token_id}), "
                "so there is no audio span to compress"
            )
        else:
            self.state = {"phase": None}
        return None

    def _top_post(self, module, args, kwargs, output):
        if self.state.get("phase") == "prefill":
            self.ttft_seconds = self._watch.stop()
            self.peak_memory_bytes, self.memory_increment_bytes = self._probe.stop()
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            self.kv_bytes = kv_cache_bytes(cache) if cache is not None else None
            self._finish_records()
        return None

    # -------------------------------------------------------------- decoder stack: masks and positions
    def _stack_pre(self, module, args, kwargs):
        st = self.state
        phase = st.get("phase")
        if phase is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise CompressionError(f"{self.reach.name}: the decoder stack was called without inputs_embeds")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (isinstance(mask, Tensor) and mask.dim() != 2):
            raise CompressionError("the engine needs a 2-D padding mask (or none), not a prepared 4-D mask")
        pos = kwargs.get("position_ids")
        B, q = embeds.shape[:2]
        if phase == "prefill":
            if st["audio"].shape != (B, q):
                raise CompressionError(
                    f"audio placeholders {tuple(st['audio'].shape)} do not line up with the stack input {(B, q)}"
                )
            if mask is not None and not bool((mask[:, -1] == 1).all()):
                raise CompressionError("batches must be left-padded (decoder-only generate pads on the left)")
            if pos is None:  # as the stock stack counts them (generate passes its own, padding-aware ones)
                pos = torch.arange(q, device=embeds.device).unsqueeze(0)
            if pos.dim() != 2:
                raise CompressionError(f"{self.reach.name}: {pos.dim()}-D position ids are not supported yet")
            kwargs["position_ids"] = pos
            pos = pos.expand(B, q)
            pad = mask.bool() if mask is not None and not bool(mask.all()) else None
            n_audio = st["audio"].sum(1)
            st.update(
                pad=pad, pos=pos, first_pos=pos.max(dim=1).values + 1, cache=kwargs.get("cache"), override=None,
                origin=[torch.arange(int(n), device=embeds.device) for n in n_audio.tolist()],
                stages=[{"pad": pad, "lengths": _real_lengths(pad, B, q), "shift": None}],
                layer_kv_stage=list(self._stage_of), scores={},
            )
            self.records = [Record(tokens_in=int(n)) for n in n_audio.tolist()]
            st["last_pos"] = pos[:, -1:]
        else:  # decode
            if pos is None:
                pos = st["last_pos"] + 1 + torch.arange(q, device=embeds.device)
                kwargs["position_ids"] = pos
            st.update(gen_mask=mask, dec_pos=pos.expand(B, q), dec_cache={}, cache=kwargs.get("cache"))
            st["last_pos"] = pos[:, -1:]
        return args, kwargs

    # -------------------------------------------------------------- decoder layers
    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            phase = self.state.get("phase")
            if phase == "prefill":
                hidden = args[0] if args else kwargs["hidden_states"]
                if i in self._at:
                    hidden = self._compress(i, self._at[i], hidden)
                if self.state.get("override") is not None:
                    kwargs.update(self.state["override"][self._types[i]])
                return _with_hidden(args, kwargs, hidden)
            if phase == "decode":
                kw = self._decode_kwargs(i, args[0] if args else kwargs["hidden_states"])
                if kw:
                    kwargs.update(kw)
                    return args, kwargs
            return None

        return hook

    def _scores_hook(self, module, args, output):
        if self.state.get("phase") == "prefill" and isinstance(output, tuple) and len(output) > 1:
            weights = output[1]
            if weights is None:
                raise CompressionError("attention weights are missing: scores need attn_implementation=eager")
            # attention the last token pays to every key, averaged over heads: [B, T]
            self.state.setdefault("scores", {})[module] = weights[:, :, -1, :].float().mean(1)
        return None

    # -------------------------------------------------------------- prefill: one point
    def _compress(self, i: int, point: Point, hidden: Tensor) -> Tensor:
        st = self.state
        device = hidden.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        t_batch = time.perf_counter()
        B, T, _ = hidden.shape
        layer = self.reach.layers[i]
        params = dict(point.params)
        mode = params.pop("features", "hidden")
        scores = st.get("scores", {}).get(self.reach.attention(self.reach.layers[i - 1])) if needs_scores(point) else None
        plans, tokens, per_sample = [], [], []
        all_real = torch.ones(T, dtype=torch.bool, device=device) if st["pad"] is None else None
        for b in range(B):
            t0 = time.perf_counter()
            real = st["pad"][b] if st["pad"] is not None else all_real
            audio = st["audio"][b]
            aidx = audio.nonzero().squeeze(1)
            tidx = (~audio & real).nonzero().squeeze(1)
            x = hidden[b, aidx]
            feats = self._features(x, mode, layer) if point.operator in FEATURE_OPERATORS and mode != "hidden" else None
            spans = None
            if needs_spans(point):
                if self.spans is None or self.spans[b] is None:
                    raise CompressionError(f"operator={point.operator} with a budget needs word spans (sample {b})")
                # word windows in original audio tokens -> windows over the current tokens (earlier points merged)
                spans = torch.searchsorted(st["origin"][b], self.spans[b].to(device).contiguous())
            extra = {"scores": scores[b, aidx]} if scores is not None else {}
            seed = self.seeds[b] if self.seeds is not None else None
            out = ops.compress(x, point.operator, features=feats, spans=spans, seed=seed, **extra, **params)
            plans.append(_Plan(tidx, aidx, out.groups.to(device), out.positions.to(device)))
            tokens.append(out.tokens)
            per_sample.append(time.perf_counter() - t0)
            st["origin"][b] = st["origin"][b][plans[-1].first]
            self.records[b].tokens_per_point.append(out.n_out)
            self.records[b].groups.append(out.groups.tolist())
        lengths = [p.length for p in plans]
        L = max(lengths)
        new_hidden = _assemble(hidden, plans, L, dim=1, audio_rows=tokens)
        pad = None
        if st["pad"] is not None or len(set(lengths)) > 1:
            pad = torch.zeros(B, L, dtype=torch.bool, device=device)
            for b, n in enumerate(lengths):
                pad[b, L - n:] = True
        new_audio = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b, p in enumerate(plans):
            new_audio[b, L - p.length:] = p.is_audio()
        new_pos = self._new_positions(st["pos"], plans, L)
        shift = st["first_pos"] - (new_pos.max(dim=1).values + 1) if self.positions == "renumber" else None
        if self.pool_early_kv and st.get("cache") is not None:
            self._pool_cache(i, plans, L)
        cos_sin = self.reach.rotary(new_hidden, new_pos)
        override = {}
        for kind in set(self._types[i:]):
            first = i + self._types[i:].index(kind)
            mask = _make_mask(kind, self.reach.text_config, new_hidden, pad, st.get("cache"), first)
            # position_ids=None: gapped ids would send FlashAttention-2 down its packed (varlen) path
            override[kind] = {"attention_mask": mask, "position_embeddings": cos_sin, "position_ids": None}
        st.update(audio=new_audio, pad=pad, pos=new_pos, override=override)
        st["stages"].append({"pad": pad, "lengths": lengths, "shift": shift})
        if cuda:
            torch.cuda.synchronize(device)
        shared = (time.perf_counter() - t_batch - sum(per_sample)) / B
        for b in range(B):
            self.records[b].seconds += per_sample[b] + shared
        return new_hidden

    def _features(self, x: Tensor, mode: str, layer: nn.Module) -> Tensor:
        norm = self.reach.input_norm(layer)
        if mode == "keys":
            return ops.similarity_features(x, "keys", keys=self.reach.key_proj(layer)(norm(x)))
        return ops.similarity_features(x, mode, norm=norm)

    def _new_positions(self, pos: Tensor, plans: list["_Plan"], L: int) -> Tensor:
        B = pos.shape[0]
        dtype = torch.float32 if self.positions == "centroid" else pos.dtype
        out = torch.ones(B, L, dtype=dtype, device=pos.device)
        for b, p in enumerate(plans):
            row = pos[b]
            if self.positions == "first":
                seq = torch.cat([row[p.tidx], row[p.aidx[p.first]]])[p.order]
            elif self.positions == "centroid":
                audio = _group_mean(row[p.aidx].float(), p.groups, p.n_out, dim=0)
                seq = torch.cat([row[p.tidx].float(), audio])[p.order]
            else:  # renumber: contiguous from the sample's first real position
                start = torch.cat([row[p.tidx], row[p.aidx]]).min()
                seq = start + torch.arange(p.length, device=pos.device, dtype=pos.dtype)
            out[b, L - p.length:] = seq.to(dtype)
        return out

    def _pool_cache(self, i: int, plans: list["_Plan"], L: int) -> None:
        cache = self.state["cache"]
        for j in range(i):
            layer = cache.layers[j]
            for name in ("keys", "values"):
                t = getattr(layer, name)
                audio = [_group_mean(t[b].index_select(1, p.aidx), p.groups, p.n_out, dim=1) for b, p in enumerate(plans)]
                setattr(layer, name, _assemble(t, plans, L, dim=2, audio_rows=audio))
        stage = len(self.state["stages"])  # the layout these caches hold from now on
        for j in range(i):
            self.state["layer_kv_stage"][j] = stage

    # -------------------------------------------------------------- decode: masks against each layer's cache
    def _decode_kwargs(self, i: int, hidden: Tensor) -> dict | None:
        st = self.state
        kv_stage = st["layer_kv_stage"][i]
        pos_stage = self._stage_of[i]
        if kv_stage == 0 and pos_stage == 0:
            return None
        memo = st["dec_cache"]
        kind = self._types[i]
        key = ("mask", kv_stage, kind)
        out = {}
        if kv_stage > 0:
            if key not in memo:
                stage = st["stages"][kv_stage]
                cache = st["cache"]
                B, q = hidden.shape[:2]
                head = stage["pad"]
                gen = st.get("gen_mask")
                if head is None and gen is None:
                    mask2d = None
                else:
                    past = cache.get_seq_length(i) if cache is not None else 0
                    n_tail = past + q - max(stage["lengths"])
                    if head is None:
                        head = torch.ones(B, max(stage["lengths"]), dtype=torch.bool, device=hidden.device)
                    tail = gen[:, gen.shape[1] - n_tail:].bool() if gen is not None else \
                        torch.ones(B, n_tail, dtype=torch.bool, device=hidden.device)
                    mask2d = torch.cat([head, tail.to(head.device)], dim=1)
                memo[key] = _make_mask(kind, self.reach.text_config, hidden, mask2d, cache, i)
            out["attention_mask"] = memo[key]
        if self.positions == "renumber" and pos_stage > 0:
            rkey = ("rope", pos_stage)
            if rkey not in memo:
                shift = st["stages"][pos_stage]["shift"]
                memo[rkey] = self.reach.rotary(hidden, st["dec_pos"] - shift[:, None])
            out["position_embeddings"] = memo[rkey]
        return out

    # -------------------------------------------------------------- per-sample lengths for accounting
    def _finish_records(self) -> None:
        st = self.state
        if "stages" not in st:
            return
        for b, rec in enumerate(self.records):
            lens = [s["lengths"][b] for s in st["stages"]]
            rec.layer_tokens = [lens[self._stage_of[j]] for j in range(self.reach.n_layers)]
            rec.kv_tokens = [lens[st["layer_kv_stage"][j]] for j in range(self.reach.n_layers)]


@contextmanager
def compression(model: nn.Module, points: Sequence[Point], reach: Reach, *, spans=None, seeds=None,
                positions: str = "first", pool_early_kv: bool = False, audio_mask: Tensor | None = None
                ) -> Iterator[Session]:
    """Apply ``points`` to the audio span during prefill of ``model`` (whose parts ``reach`` names) inside the block.

    ``spans[b]``: word windows [U, 2] in audio-token units for sample b (oracle operators); ``seeds[b]``: the seed of
    random operators for sample b. With no points the hooks only observe (records, time to first token, memory):
    logits and tokens are the stock ones.
    """
    check_points(points, reach, positions=positions, pool_early_kv=pool_early_kv)
    session = Session(points, reach, spans=spans, seeds=seeds, positions=positions, pool_early_kv=pool_early_kv,
                      audio_mask=audio_mask)
    session.install()
    try:
        yield session
    finally:
        session.remove()


# ----------------------------------------------------------------------------- small tensor helpers
def audio_hidden_states(model: nn.Module, reach: Reach, batch: dict[str, Tensor]) -> list[Tensor]:
    """Uncompressed audio span of the hidden states of one sample (paper Fig. 3): entry l < L is the input of decoder
    layer l (l = 0: the spliced input embeddings), entry L the stack's output after its final norm. float32, CPU."""
    ids = batch["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"audio_hidden_states takes one sample, got a batch of {ids.shape[0]}")
    audio = ids[0] == reach.audio_token_id
    if not bool(audio.any()):
        raise CompressionError(f"{reach.name}: the prompt holds no audio placeholder (token id {reach.audio_token_id})")
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True, use_cache=False)
    return [h[0, audio.to(h.device)].float().cpu() for h in out.hidden_states]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _real_lengths(pad: Tensor | None, B: int, T: int) -> list[int]:
    return [T] * B if pad is None else pad.sum(1).tolist()


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


def _group_mean(x: Tensor, groups: Tensor, n_out: int, dim: int) -> Tensor:
    """Mean of the members of each group along ``dim`` (dropped tokens, group -1, left out)."""
    keep = (groups >= 0).nonzero().squeeze(1)
    g = groups[keep]
    xs = x.index_select(dim, keep).float()
    shape = list(x.shape)
    shape[dim] = n_out
    total = torch.zeros(shape, dtype=torch.float32, device=x.device).index_add_(dim, g, xs)
    counts = torch.bincount(g, minlength=n_out).clamp(min=1).float()
    view = [1] * x.dim()
    view[dim] = n_out
    return (total / counts.view(view)).to(x.dtype)


def _assemble(t: Tensor, plans: list[_Plan], L: int, *, dim: int, audio_rows: list[Tensor]) -> Tensor:
    """Per sample: its text rows of ``t`` and its new audio rows, in sequence order, left-padded to ``L`` along
    ``dim`` (``dim`` counts the batch axis: 1 for hidden states [B, T, d], 2 for keys [B, H, T, hd])."""
    shape = list(t.shape)
    shape[dim] = L
    out = t.new_zeros(shape)
    d = dim - 1  # the sequence axis of one sample
    for b, p in enumerate(plans):
        rows = torch.cat([t[b].index_select(d, p.tidx), audio_rows[b].to(t.dtype)], dim=d).index_select(d, p.order)
        out[b].narrow(d, L - p.length, p.length).copy_(rows)
    return out


def _make_mask(kind: str, config, hidden: Tensor, pad2d: Tensor | None, cache, layer_idx: int):
    """The stock mask for ``kind`` layers, sized against ``layer_idx``'s cache (``position_ids=None`` on purpose)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": pad2d, "cache": cache, "position_ids": None}
    if _takes(fn, "layer_idx"):
        kwargs["layer_idx"] = layer_idx
    return fn(**kwargs)

"""The operator table (one source for names, parameters and per-sample inputs), compression points, and dispatch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress import affinity, baselines, oracle, peers
from speech_redundancy.compress.core import (
    FEATURE_MODES,
    GAPS,
    Compressed,
    check_budget,
    check_ratio,
    check_threshold,
    check_window,
    identity,
    similarity_features,
)


@dataclass(frozen=True)
class Operator:
    """One operator: its function, the parameters a point gives it, and the per-sample inputs the step supplies.

    ``inputs``: "features" (similarity features; a point may then set ``features=<mode>``), "spans" (word windows,
    with a budget), "scores" (attention each token received, from the point's ``scores`` source: see :class:`Point`;
    the adapter needs eager attention there), "query" (the text prompt's hidden states at the point: only models
    with a text prompt), "seed" (random operators). ``source``: the paper (section) or released code
    (repository@commit, file) the operator follows; ``fidelity``: "released" (reproduces that code on
    tests/fixtures/peers_golden), "adapted: <what changes>" (an adaptation under its own name) or "paper" (follows
    the text; no code is public). ``stage``: where the method acts unless a point says otherwise (:data:`STAGES`).
    """

    fn: Callable[..., Compressed]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    summary: str = ""
    source: str = ""
    fidelity: str = "paper"  # "released" (matches the authors' code on golden data), "adapted: ..." or "paper"
    stage: str = "input"

    @property
    def params(self) -> tuple[str, ...]:
        """Every parameter a point may set (``features`` for operators that measure similarity, ``scores`` for
        those scored by attention)."""
        return (self.required + self.optional + (("features",) if "features" in self.inputs else ())
                + (("scores",) if "scores" in self.inputs else ()))


STAGES = ("input", "after_attention")  # where in decoder layer l a point acts (see Point)
SCORE_SOURCES = ("last_query", "received")  # which attention a scored point reads (see Point)

_ORACLE = dict(optional=("budget", "ratio", "gaps"), inputs=("spans",), source="Xiang et al. 2026, §3.1")
_PAPER = "Xiang et al. 2026"
OPERATORS: dict[str, Operator] = {
    "none": Operator(identity, summary="no compression"),
    "random_drop": Operator(oracle.random_drop, optional=("budget", "ratio", "gaps"), inputs=("spans", "seed"),
                            summary="oracle: keep R random tokens per word window (or K overall)",
                            source=_ORACLE["source"]),
    "uniform_drop": Operator(oracle.uniform_drop, **_ORACLE,
                             summary="oracle: keep R tokens at bin centres per word window (or K overall)"),
    "uniform_merge": Operator(oracle.uniform_merge, **_ORACLE,
                              summary="oracle: mean of R equal bins per word window (or K overall)"),
    "affinity": Operator(affinity.affinity_pool, required=("threshold", "window"), inputs=("features",),
                         summary="Affinity Pooling, Algorithm 1", source=f"{_PAPER}, Algorithm 1"),
    "affinity_ratio": Operator(affinity.affinity_ratio, required=("ratio", "window"), inputs=("features",),
                               summary="Affinity Pooling at a fixed retention K (Table 3)", source=f"{_PAPER}, Table 3"),
    "interpolate": Operator(baselines.interpolate, required=("ratio",), summary="linear interpolation to K",
                            source=f"{_PAPER}, §5.3"),
    "adjacent_merge": Operator(peers.adjacent_merge, required=("ratio",), inputs=("features",),
                               summary="A-ToMe: merge the most similar adjacent pairs to K",
                               source="A-ToMe (Li et al., Interspeech 2023); no public code",
                               fidelity="paper, not checked rule by rule here: adjacent merging to exactly K"),
    "group_merge": Operator(peers.group_merge, required=("threshold",), inputs=("features",),
                            summary="Samp's merge step alone: join while the mean similarity to the group is >= tau",
                            source=f"Samp / SA-MAP, {peers.SAMP_SOURCE}",
                            fidelity="released merge step (plain means; samp weights them by attention)"),
    "attention_prune": Operator(peers.attention_prune, required=("ratio",), inputs=("scores",),
                                summary="FastV as released: keep the round(T K) most attended tokens (scores from "
                                        "layer l-1; Python's round)",
                                source=f"FastV (Chen et al., ECCV 2024), {peers.FASTV_SOURCE}", fidelity="released"),
    "attention_prune_k": Operator(peers.attention_prune_k, required=("ratio",), inputs=("scores",),
                                  summary="FastV adapted: exactly n_kept(K, T) tokens (floor(K T + 1/2), not round())",
                                  source=f"FastV, {peers.FASTV_SOURCE}", fidelity="adapted: the project's count"),
    "samp": Operator(peers.samp, required=("ratio",), optional=("threshold",), inputs=("features", "scores"),
                     summary="SA-MAP / Samp as released: sequential merging while the mean cosine to the whole "
                             "group is >= tau (0.85), then linear-quality DPP to max(round(T K), 2); retention set "
                             "by tau when merging leaves fewer groups",
                     source=f"Samp / SA-MAP, {peers.SAMP_SOURCE}",
                     fidelity="released, but the DPP quality is the scores' group mean (released: the mean of the "
                              "encoder's self-attention diagonal, an input the step does not supply)"),
    "samp_k": Operator(peers.samp_k, required=("ratio",), optional=("threshold", "relevance"),
                       inputs=("features", "scores"),
                       summary="Samp adapted to equal K: adjacent pairs with cos >= tau linked (most similar first, "
                               "at most T - K'), attention-weighted means, exp-quality DPP to exactly K",
                       source=f"Samp / SA-MAP, {peers.SAMP_SOURCE}",
                       fidelity="adapted: exactly K; pairwise links capped at T - K' (released: mean cosine to the "
                                "group, no cap); quality exp(theta r_hat) of the summed scores (released: linear)"),
    "visionzip": Operator(peers.visionzip, required=("ratio",), optional=("dominant",), inputs=("features", "scores"),
                          summary="VisionZip as released: the most attended tokens (share `dominant` of K) kept; C "
                                  "strided targets, every other token assigned to its most similar target anywhere "
                                  "(on keys), contextual token = target + mean of assigned; non-contiguous groups",
                          source=f"VisionZip (Yang et al., CVPR 2025), {peers.VISIONZIP_SOURCE}",
                          fidelity="released (audio: no CLS token; D, C from K and `dominant`)"),
    "visionzip_contiguous": Operator(peers.visionzip_contiguous, required=("ratio",), optional=("dominant",),
                                     inputs=("features", "scores"),
                                     summary="VisionZip adapted to contiguous groups: contextual tokens merged "
                                             "inside the runs between dominant tokens; runs dropped when too many",
                                     source=f"VisionZip, {peers.VISIONZIP_SOURCE}",
                                     fidelity="adapted: contiguous groups, means (released: target + mean of "
                                              "assigned, any position), may drop tokens"),
    "cdpruner": Operator(peers.cdpruner, required=("ratio",), inputs=("query",),
                         summary="CDPruner as released: conditional DPP, relevance = negated mean cosine to the "
                                 "text prompt, min-max normalised, used linearly",
                         source=f"CDPruner (Zhang et al., 2025), {peers.CDPRUNER_SOURCE}",
                         fidelity="released (relevance on the hidden states, not CLIP embeddings)"),
    "cdpruner_exp": Operator(peers.cdpruner_exp, required=("ratio",), optional=("relevance",), inputs=("query",),
                             summary="CDPruner adapted: positive relevance, quality exp(theta r_hat) (the released "
                                     "code's commented-out variant)",
                             source=f"CDPruner, {peers.CDPRUNER_SOURCE}",
                             fidelity="adapted: sign and exp quality"),
    "fastadasp": Operator(peers.fastadasp, required=("ratio",), inputs=("features", "scores"),
                          summary="FastAdaSP as released: the int(T (1 - K)) most similar adjacent pairs (keys) "
                                  "merged, attention-weighted; schedule kind fastadasp_decay",
                          source=f"FastAdaSP (Lu et al., EMNLP 2024 Industry), {peers.FASTADASP_SOURCE}",
                          fidelity="released at one point (where it acts and its scores: the point's settings)"),
    "fastadasp_k": Operator(peers.fastadasp_k, required=("ratio",), inputs=("features", "scores"),
                            summary="FastAdaSP adapted: exactly n_kept(K, T) tokens",
                            source=f"FastAdaSP, {peers.FASTADASP_SOURCE}",
                            fidelity="adapted: the project's count (released: int(T r) removed)"),
    "speechprune": Operator(peers.speechprune, required=("ratio",), optional=("segment",), inputs=("query", "scores"),
                            summary="SpeechPrune-style: speech-text similarity per segment (~1 s), then attention rank",
                            source="SpeechPrune (Lin et al., 2025, arXiv 2412.12009); no public code",
                            fidelity="adapted: segment budgets by size (paper: softmax of frame scores), max over "
                                     "query tokens (paper: mean), half the pruning in phase 1 (paper: to 750 "
                                     "tokens), phase 2 by the point's scores (paper: binarised first-layer "
                                     "attention among audio tokens)"),
    "segment_topk": Operator(peers.segment_topk, required=("ratio",), optional=("segment",), inputs=("scores",),
                             summary="segment-wise top-K by attention (K split over segments by size)",
                             source="segment-wise top-K on the encoder output (FACTS §7; no public code)",
                             fidelity="paper, not checked rule by rule here"),
    "ltbm": Operator(peers.ltbm, required=("ratio",), inputs=("features",),
                     summary="LTBM-style local temporal bipartite merging (neighbour matches, rounds) to K",
                     source="LTBM (local temporal bipartite merging, arXiv 2605.25179); no public code",
                     fidelity="paper, not checked rule by rule here"),
}


def operator(name: str) -> Operator:
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


def validate(name: str, *, strict: bool = False, **params: Any) -> None:
    """Raise a one-line ValueError for an unknown operator, missing/unexpected parameters or a bad value.

    Allowed: threshold a real number (strict=True, the rule for runs: in [-1, 1]); window and budget integers >= 1;
    ratio in (0, 1]; gaps in ("unit", "keep"); features a mode name; oracle operators need budget (with word spans)
    or ratio, not both.
    """
    op = operator(name)
    unexpected = sorted(set(params) - set(op.params))
    if unexpected:
        raise ValueError(f"{name} got unexpected parameter(s) {unexpected}; allowed: {sorted(op.params) or 'none'}")
    missing = [k for k in op.required if params.get(k) is None]
    if missing:
        raise ValueError(f"{name} needs parameter(s) {missing}")
    if "spans" in op.inputs:
        has_budget, has_ratio = params.get("budget") is not None, params.get("ratio") is not None
        if has_budget == has_ratio:
            raise ValueError(f"{name} needs either budget (with word spans) or ratio, not both or neither")
        if "gaps" in params and not has_budget:
            raise ValueError(f"{name}: gaps applies only with budget (word windows)")
    if params.get("threshold") is not None:
        t = check_threshold(params["threshold"])
        if strict and not -1 <= t <= 1:
            raise ValueError(f"threshold must be in [-1, 1], got {t}")
    if params.get("window") is not None:
        check_window(params["window"])
    if params.get("budget") is not None:
        check_budget(params["budget"])
    if params.get("ratio") is not None:
        check_ratio(params["ratio"])
    if params.get("gaps") is not None and params["gaps"] not in GAPS:
        raise ValueError(f"gaps must be one of {GAPS}, got {params['gaps']!r}")
    for key in ("dominant",):
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1):
            raise ValueError(f"{key} must be in [0, 1], got {v!r}")
    v = params.get("relevance")
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v < math.inf)):
        raise ValueError(f"relevance must be a finite real number >= 0, got {v!r}")
    if params.get("segment") is not None:
        v = params["segment"]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"segment must be an integer >= 1 (tokens per segment), got {v!r}")
    if params.get("features") is not None and params["features"] not in FEATURE_MODES:
        raise ValueError(f"unknown features mode {params['features']!r}; allowed: {', '.join(FEATURE_MODES)}")
    if params.get("scores") is not None and params["scores"] not in SCORE_SOURCES:
        raise ValueError(f"unknown scores source {params['scores']!r}; allowed: {', '.join(SCORE_SOURCES)}")


@dataclass
class Point:
    """One compression point: ``operator`` with ``params`` applied to the audio tokens at layer l, where ``stage``
    says (default: the operator's, else "input"):

    - ``"input"``: the tokens entering decoder layer l (HF hidden_states[l]; l = 0: the input embeddings, or for
      encoders the input of encoder layer l); layers >= l see the compressed sequence;
    - ``"after_attention"``: inside decoder layer l, after its attention and residual, before its MLP (FastAdaSP):
      layer l's attention and cache see every token, its MLP and layers > l the compressed sequence. Similarity
      ``features`` there: ``hidden`` the post-attention states, ``normed`` them through the post-attention norm,
      ``keys`` the keys layer l attended with (after RoPE, as its cache holds them).

    ``params["scores"]`` (operators scored by attention): ``"last_query"`` (default) the attention the prompt's last
    token pays each audio token, mean over heads; ``"received"`` the attention each token receives from every real
    query, summed over queries and heads (FastAdaSP). Read at layer l-1 for an input point (at l = 0 both read the
    model's audio encoder where its adapter has one), at layer l itself after its attention.

    Checked on construction against the operator table (``strict=True``, the rule for runs, also bounds tau to
    [-1, 1]). Adapters check only facts about their model (depth, attention implementation).
    """

    layer: int
    operator: str
    params: dict[str, Any] = field(default_factory=dict)
    strict: bool = field(default=False, repr=False, compare=False)
    stage: str | None = None  # None: the operator's default stage

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r} must be an integer >= 0")
        self.layer = int(self.layer)
        self.params = dict(self.params)
        validate(self.operator, strict=self.strict, **self.params)
        if self.stage is None:
            self.stage = self.spec.stage
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not allowed; use one of {', '.join(STAGES)}")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "Point":
        """A point from a config entry ``{layer, operator, params, stage}`` (a run: strict). Of the shared keys in
        ``params`` (budget, gaps, ratio, threshold, window, features, scores, ...) only those the operator takes
        are kept, so one preset serves several operators; None values are dropped, and so is a None stage."""
        name = raw.get("operator")
        accepted = operator(name).params
        params = {k: v for k, v in (raw.get("params") or {}).items() if k in accepted and v is not None}
        return cls(layer=raw.get("layer"), operator=name, params=params, strict=True, stage=raw.get("stage"))

    @property
    def spec(self) -> Operator:
        return OPERATORS[self.operator]

    @property
    def features(self) -> str:
        """What similarity is measured on (``hidden`` unless the point says otherwise)."""
        return self.params.get("features", "hidden")

    @property
    def needs_spans(self) -> bool:
        """Oracle operators with a per-word budget R need word spans (paper §3.1)."""
        return "spans" in self.spec.inputs and self.params.get("budget") is not None

    @property
    def needs_scores(self) -> bool:
        return "scores" in self.spec.inputs

    @property
    def needs_query(self) -> bool:
        return "query" in self.spec.inputs

    @property
    def scores(self) -> str:
        """Which attention a scored point reads (:data:`SCORE_SOURCES`)."""
        return self.params.get("scores", "last_query")

    @property
    def after_attention(self) -> bool:
        return self.stage == "after_attention"

    @property
    def acts_at(self) -> int:
        """The first layer whose input is the compressed sequence (l, or l + 1 after layer l's attention)."""
        return self.layer + int(self.after_attention)

    @property
    def order(self) -> tuple[int, int]:
        """Where the point sits in the forward pass (points of a run must be in this order, each place once)."""
        return self.layer, STAGES.index(self.stage)

    def operator_params(self) -> dict[str, Any]:
        """The parameters handed to the operator function (the features mode and the scores source are resolved by
        the step and the adapter)."""
        return {k: v for k, v in self.params.items() if k not in ("features", "scores")}

    def as_dict(self) -> dict[str, Any]:
        """The point as a config entry; ``stage`` only where it is not "input" (run fingerprints stay as before)."""
        out = {"layer": self.layer, "operator": self.operator, "params": dict(self.params)}
        if self.stage != "input":
            out["stage"] = self.stage
        return out


# ------------------------------------------------------------------------------------------ dispatch


def compress(
    x: Tensor,
    name: str,
    *,
    features: Tensor | str | None = None,
    spans=None,
    scores: Tensor | None = None,
    query: Tensor | None = None,
    seed: int | None = None,
    **params: Any,
) -> Compressed:
    """Apply operator ``name`` with ``params`` to one sequence x [T, d].

    ``features`` (a tensor, or the mode "hidden"/"centered") is used by operators that measure similarity,
    ``spans`` by the oracle operators with a budget, ``scores`` [T] by the attention-scored ones, ``query`` [Q, d]
    by the prompt-aware ones, ``seed`` by random_drop; operators ignore the inputs they do not take.
    """
    validate(name, **params)
    return apply(OPERATORS[name], x, params, features=features, spans=spans, scores=scores, query=query, seed=seed)


def apply(op: Operator, x: Tensor, params: Mapping[str, Any], *, features=None, spans=None, scores=None,
          query=None, seed=None) -> Compressed:
    """Call ``op`` with already valid ``params``, handing it only the per-sample inputs it takes."""
    kwargs: dict[str, Any] = {}
    if "features" in op.inputs:
        kwargs["features"] = similarity_features(x, features) if isinstance(features, str) else features
    if "spans" in op.inputs:
        kwargs["spans"] = spans if params.get("budget") is not None else None
    if "scores" in op.inputs:
        kwargs["scores"] = scores
    if "query" in op.inputs:
        kwargs["query"] = query
    if "seed" in op.inputs:
        kwargs["seed"] = seed
    return op.fn(x, **kwargs, **params)


def compress_batch(
    x: Tensor,
    mask: Tensor,
    name: str,
    *,
    spans: list | None = None,
    scores: Tensor | None = None,
    seeds: list[int] | None = None,
    features: Tensor | str | None = None,
    queries: list[Tensor] | None = None,
    **params: Any,
) -> Compressed:
    """:func:`compress` over a padded batch x [B, T, d] whose real tokens are ``mask`` [B, T] (bool).

    Sample b is x[b][mask[b]]; its result equals (torch.equal) the single call on that sample. Returns tokens
    [B, T'max, d] (zeros at padding), groups [B, T] (-1 at padding), positions [B, T'max] (indices within the
    sample, -1 at padding) and mask [B, T'max]. ``spans``, ``seeds`` and ``queries`` are per-sample lists; ``scores`` and
    ``features`` are [B, T] / [B, T, F] (or a features mode, applied per sample).
    """
    validate(name, **params)
    if x.dim() != 3:
        raise ValueError(f"x must be a [B, T, d] tensor, got {tuple(x.shape)}")
    B, T, d = x.shape
    if mask is None or tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape ({B}, {T})")
    if "seed" in OPERATORS[name].inputs and (seeds is None or len(seeds) != B):
        raise ValueError(f"{name} needs seeds= (one int per sample, {B} in all)")
    if spans is not None and len(spans) != B:
        raise ValueError(f"spans must be a list of {B} per-sample spans, got {len(spans)}")
    if queries is not None and len(queries) != B:
        raise ValueError(f"queries must be a list of {B} per-sample [Q, d] tensors, got {len(queries)}")
    rows = [mask[b].nonzero().squeeze(1) for b in range(B)]

    def take(t: Tensor | str | None, b: int) -> Tensor | str | None:
        return t if t is None or isinstance(t, str) else t[b].index_select(0, rows[b].to(t.device))

    results = [
        compress(take(x, b), name, features=take(features, b), scores=take(scores, b),
                 spans=None if spans is None else spans[b], seed=None if seeds is None else seeds[b],
                 query=None if queries is None else queries[b], **params)
        for b in range(B)
    ]
    n_max = max([r.n_out for r in results], default=0)
    tokens = x.new_zeros(B, n_max, d)
    groups = torch.full((B, T), -1, dtype=torch.long, device=x.device)
    positions = torch.full((B, n_max), -1, dtype=torch.long, device=x.device)
    out_mask = torch.zeros(B, n_max, dtype=torch.bool, device=x.device)
    for b, r in enumerate(results):
        n = r.n_out
        tokens[b, :n] = r.tokens
        positions[b, :n] = r.positions
        out_mask[b, :n] = True
        groups[b].index_copy_(0, rows[b], r.groups)
    return Compressed(tokens, groups, positions, out_mask)


# ------------------------------------------------------------------------------------------ schedules


SCHEDULES = ("constant", "decay", "fastadasp_decay")


def schedule(operator_name: str, start: int, stop: int, ratio: float, kind: str = "constant",
             params: Mapping[str, Any] | None = None, stage: str | None = None) -> list[Point]:
    """One point per layer start..stop-1 (FastAdaSP's layer-by-layer merging), each keeping a fraction of the
    tokens entering it: ``constant`` keeps ``ratio`` at every layer; ``decay`` removes a share that falls linearly,
    1 - ratio at ``start`` to (1 - ratio) / n at the last of the n layers (layer i keeps
    1 - (1 - ratio) (n - i) / n); ``fastadasp_decay`` is FastAdaSP's released slope (yichen14/FastAdaSP@582565a,
    Qwen-Audio/modeling_qwen.py, QWenModel.forward): layer i removes r (1 - i / (n - 1)) of the tokens entering it,
    r = 1 - ratio, so nothing at the last layer. Layers that would keep everything are left out. ``params``: the
    operator's other parameters, the same at every layer; ``stage`` where in each layer (None: the operator's
    default)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind={kind!r} is not allowed; use one of {', '.join(SCHEDULES)}")
    ratio = check_ratio(ratio)
    if isinstance(start, bool) or isinstance(stop, bool) or not (0 <= int(start) < int(stop)):
        raise ValueError(f"a schedule needs 0 <= start < stop, got start={start!r}, stop={stop!r}")
    n = int(stop) - int(start)
    points = []
    for i in range(n):
        if kind == "fastadasp_decay":
            keep = round(1 - round(1 - ratio, 9) * (1 - i / (n - 1)), 9) if n > 1 else ratio
        else:
            keep = ratio if kind == "constant" else round(1 - (1 - ratio) * (n - i) / n, 6)
        if keep < 1:
            points.append(Point(int(start) + i, operator_name, {**dict(params or {}), "ratio": keep}, strict=True,
                                stage=stage))
    return points

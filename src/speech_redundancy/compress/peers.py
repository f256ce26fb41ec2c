"""Peer methods as operators with the common index map (our own code). Where the authors released code, the
operator under the method's name reproduces it (golden data from that code: tests/fixtures/peers_golden/) and an
adaptation to the project's rules carries its own name; the others follow their papers.

    as released                          adapted (own name)
    samp             SA-MAP / Samp       samp_k               equal K, pairwise links, exp quality
    cdpruner         CDPruner            cdpruner_exp         positive relevance, exp quality
    visionzip        VisionZip           visionzip_contiguous contiguous groups
    fastadasp        FastAdaSP           fastadasp_k          equal K
    attention_prune  FastV               attention_prune_k    equal K (floor(K T + 1/2), not round())
    group_merge      SA-MAP's merge step alone (plain means)

    from papers (no public code): adjacent_merge (A-ToMe), speechprune (adapted: see its docstring),
    segment_topk, ltbm

Shared rules. Operators with a ratio keep n_kept(K, T) tokens unless their released code counts otherwise (each
docstring says how). Groups may be any partition (outputs ordered by each group's first member, which is their
position); only ``visionzip`` makes non-contiguous ones. ``scores`` [T] are the attention each token received (the
point and the adapter say from where); ``query`` [Q, d] is the text prompt's hidden states at the same layer.
Equal values favour earlier tokens (the released code's ``torch.topk`` leaves ties unordered). Similarities are
cosines in float32 (float64 for float64 input), 0 against a zero vector.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress.affinity import cosine_band
from speech_redundancy.compress.core import (
    Compressed,
    acc_dtype,
    check_budget,
    check_features,
    check_finite,
    check_ratio,
    check_threshold,
    check_x,
    empty,
    from_partition,
    n_kept,
    pool_groups,
    pool_weighted,
)


def adjacent_merge(x: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """A-ToMe style: link the T - T' most similar adjacent pairs (T' = n_kept(ratio, T)); linked chains
    collapse into one mean-pooled token, so exactly T' tokens remain. Equal similarities: earlier pair first."""
    check_x(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    if T == 0:
        check_features(x, features)
        return empty(x)
    adjacent = cosine_band(x, 1, features)[1:, 0]  # cos(t, t-1) for t = 1..T-1
    n_links = T - n_kept(ratio, T)
    order = np.argsort(-adjacent, kind="stable")
    start = np.ones(T, dtype=bool)
    start[order[:n_links] + 1] = False
    return pool_groups(x, np.cumsum(start) - 1)


def _unit_rows(f: Tensor) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 (float64 for float64 input), on the host."""
    f = f.detach().to(acc_dtype(f.dtype))
    n = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    return torch.where(n > 0, f / n, torch.zeros((), dtype=f.dtype, device=f.device)).cpu().numpy()


def group_merge(x: Tensor, threshold: float, features: Tensor | None = None) -> Compressed:
    """Samp style: token t joins the current group iff its MEAN cosine similarity to all current members is
    >= ``threshold`` (clamped to [-1, 1]; zero vectors have cosine 0); otherwise it starts a new group.
    Computed on the host with a running sum of unit vectors (float32; float64 for float64 input)."""
    check_x(x)
    threshold = check_threshold(threshold)
    f = check_features(x, features)
    check_finite(x)
    if f is not x:
        check_finite(f, "features")
    T = x.shape[0]
    if T == 0:
        return empty(x)
    u = _unit_rows(f)
    start = np.zeros(T, dtype=bool)
    start[0] = True
    total, size = u[0].copy(), 1
    for t in range(1, T):
        mean_cos = min(1.0, max(-1.0, float(u[t] @ total) / size))
        if mean_cos >= threshold:
            total += u[t]
            size += 1
        else:
            start[t] = True
            total, size = u[t].copy(), 1
    return pool_groups(x, np.cumsum(start) - 1)


def _scores(scores, T: int, name: str) -> np.ndarray:
    """``scores`` as float64 [T] on the host, checked (the operator ``name`` says what is missing)."""
    if scores is None:
        raise ValueError(f"{name} needs scores= ([T] attention per audio token; the adapter supplies it)")
    s = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    if s.shape != (T,):
        raise ValueError(f"scores must have shape ({T},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; all must be finite")
    return s


def attention_prune_k(x: Tensor, scores: Tensor, ratio: float) -> Compressed:
    """FastV style: keep the n_kept(ratio, T) tokens with the highest ``scores`` [T] (the attention the
    text paid them at layer l-1), in temporal order; equal scores favour earlier tokens.

    The adapter must run layer l-1 with eager attention to get these scores (SDPA/FlashAttention return none).
    """
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    if scores is None:
        raise ValueError("attention_prune_k needs scores= ([T] attention per audio token from layer l-1)")
    s = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    if s.shape != (T,):
        raise ValueError(f"scores must have shape ({T},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; all must be finite")
    if T == 0:
        return empty(x)
    keep = np.sort(np.argsort(-s, kind="stable")[: n_kept(ratio, T)])
    groups = np.full(T, -1, dtype=np.int64)
    groups[keep] = np.arange(keep.size)
    return pool_groups(x, groups)


# ------------------------------------------------------------------------------------------ shared pieces


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, in temporal order; equal values favour earlier indices."""
    return np.sort(np.argsort(-values, kind="stable")[:k])


def _keep(T: int, keep: np.ndarray) -> np.ndarray:
    """Groups that keep the tokens ``keep`` (sorted) as singletons and drop the rest."""
    groups = np.full(T, -1, dtype=np.int64)
    groups[keep] = np.arange(keep.size)
    return groups


def _link(T: int, links: np.ndarray) -> np.ndarray:
    """Groups from linked adjacent pairs: link i joins token i + 1 to token i's group."""
    start = np.ones(T, dtype=bool)
    start[links + 1] = False
    return np.cumsum(start) - 1


def _adjacent(x: Tensor, features: Tensor | None) -> np.ndarray:
    """cos(f_t, f_{t+1}) for t = 0..T-2 (float64 on the host), with x's and the features' finiteness checks."""
    return cosine_band(x, 1, features)[1:, 0]


def _unit(f: Tensor) -> Tensor:
    """Rows scaled to unit length in float32 (float64 for float64 input); zero rows stay zero."""
    f = f.detach().to(acc_dtype(f.dtype))
    n = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    return torch.where(n > 0, f / torch.where(n > 0, n, torch.ones((), dtype=f.dtype, device=f.device)), 0.0)


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` kept tokens over segments in proportion to their sizes (largest remainders; equal
    remainders favour earlier segments); never more than a segment holds."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() == 0:
        return sizes.copy()
    share = total * sizes / sizes.sum()
    out = np.minimum(np.floor(share).astype(np.int64), sizes)
    rest = total - int(out.sum())
    order = np.argsort(-(share - out), kind="stable")
    for i in order:
        if rest <= 0:
            break
        if out[i] < sizes[i]:
            out[i] += 1
            rest -= 1
    return out


def _segments(T: int, segment: int) -> list[np.ndarray]:
    return [np.arange(s, min(T, s + segment)) for s in range(0, T, segment)]


def _relevance_quality(r: np.ndarray, relevance: float) -> np.ndarray:
    """DPP quality exp(theta * r_hat) from scores r, with r_hat = (r - min) / (max - min) in [0, 1] (0 when all
    are equal): theta = 0 is pure diversity, larger theta favours relevant tokens."""
    span = float(r.max() - r.min()) if r.size else 0.0
    r_hat = (r - r.min()) / span if span > 0 else np.zeros_like(r)
    return np.exp(float(relevance) * r_hat)


def dpp_greedy(unit: Tensor, quality, k: int, *, check: bool = True) -> np.ndarray:
    """Greedy MAP selection of ``k`` items under the DPP kernel L = diag(q) U U^T diag(q) (Chen et al., 2018, as
    CDPruner and SA-MAP release it: incremental Cholesky, one matrix-vector step per pick). ``unit`` [N, F] unit (or
    zero) rows, ``quality`` [N] >= 0. Returns the chosen indices in selection order: each step takes the largest
    remaining marginal gain d_i^2 (equal gains favour earlier items); items whose gain is exhausted (at most
    100 eps max(q)^2: duplicates, zero rows, a kernel of lower rank than k) come last, earliest first, so exactly k
    are returned. The released code has no such rule: past the kernel's rank its gains turn NaN.

    Everything runs on ``unit``'s device in its precision (float32 for half-precision input), the Gram matrix
    included; the first gains are q_i^2 exactly (unit rows) or 0 (zero rows). Float64 check (``check``): the
    running float32 subtraction d_i^2 -= e_i^2 is where rounding accumulates, so when the runner-up gain lies within
    that rounding (64 sqrt(i + 1) eps max(q)^2) of the best but is not equal to it, the contenders' gains are
    re-summed in float64 from their Cholesky entries and the larger decides (equal: the earlier)."""
    N = unit.shape[0]
    k = min(int(k), N)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    u = unit.detach().to(acc_dtype(unit.dtype))
    q = quality.detach() if isinstance(quality, Tensor) else torch.from_numpy(np.asarray(quality, np.float64))
    q = q.to(device=u.device, dtype=u.dtype)
    gram = u @ u.T
    kernel = gram * q[:, None] * q[None, :]
    qmax2 = float(q.max()) ** 2
    eps = torch.finfo(u.dtype).eps
    tol = 100 * eps * qmax2  # gains at or below: exhausted (rounding noise of the Gram matrix)
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    q2 = q * q
    unit_row = torch.diagonal(gram) > 0.5
    # the loop works on the columns still open (`cols`, ascending): chosen columns are dropped every N/8 picks, so
    # the matrix-vector step shrinks as the selection grows
    cols = torch.arange(N, device=u.device)
    d2 = torch.where(unit_row, q2, zero)
    buf = torch.empty(k * N, dtype=u.dtype, device=u.device)  # Cholesky rows; only rows < i are ever read
    cis = buf.view(k, N)
    open_ = torch.ones(N, dtype=torch.bool, device=u.device)  # among cols: not chosen yet
    n_chosen = 0  # chosen among cols since the last compaction
    picks = np.zeros(k, dtype=np.int64)
    for i in range(k):
        jl = int(torch.argmax(d2))  # chosen columns hold -inf
        best = float(d2[jl])
        if best <= tol:  # every remaining gain is exhausted: the earliest remaining item, no update
            jl = int(torch.argmax(open_.to(torch.uint8)))
            picks[i], open_[jl], d2[jl] = int(cols[jl]), False, -math.inf
            n_chosen += 1
            continue
        if check and u.dtype != torch.float64 and d2.numel() - n_chosen > 1:
            margin = 64 * math.sqrt(i + 1) * eps * qmax2
            top = torch.topk(d2, min(8, d2.numel() - n_chosen))
            near = (top.values >= best - margin) & ((top.values != best) | (top.indices == jl))
            if int(near.sum()) > 1:  # contenders within rounding: re-summed in float64, the larger decides
                c = top.indices[near].sort().values
                g = cols[c]
                exact = q2[g].double() * unit_row[g] - (cis[:i].index_select(1, c).double() ** 2).sum(0)
                jl = int(c[int(torch.argmax(exact))])  # argmax: the first (earliest) of equal values
                best = float(d2[jl])
        j = int(cols[jl])
        picks[i] = j
        row = kernel[j] if cols.numel() == N else kernel[j].index_select(0, cols)
        e = row - cis[:i, jl] @ cis[:i] if i else row.clone()
        e /= math.sqrt(best)
        cis[i] = e
        d2 -= e * e
        open_[jl], d2[jl] = False, -math.inf
        n_chosen += 1
        if n_chosen * 8 >= cols.numel() and i + 1 < k:  # drop the chosen columns
            cols, d2 = cols[open_], d2[open_]
            kept_rows = cis[: i + 1].index_select(1, torch.nonzero(open_).flatten())  # a copy, back into buf
            cis = buf[: k * cols.numel()].view(k, cols.numel())
            cis[: i + 1] = kept_rows
            open_ = torch.ones(cols.numel(), dtype=torch.bool, device=u.device)
            n_chosen = 0
    return picks


def _round_half_even(v: float) -> int:
    """Python's round(): what the released code uses for counts (halves go to the even neighbour)."""
    return int(round(v))


# ------------------------------------------------------------------------------------------ the operators


def samp_k(x: Tensor, scores: Tensor, ratio: float, threshold: float = 0.9, relevance: float = 1.0,
           features: Tensor | None = None) -> Compressed:
    """Samp / SA-MAP style, to exactly T' = n_kept(ratio, T) tokens, in two stages.

    1. Similarity-and-attention merging: adjacent pairs with cosine >= ``threshold`` are linked, most similar
       first, at most T - T' links; each chain becomes the attention-weighted mean of its members (weights
       ``scores``).
    2. DPP pruning: of the merged tokens, T' are chosen by greedy MAP under L = diag(q) S diag(q), S the cosines of
       the merged tokens' features, q = exp(relevance * r_hat) with r the attention a merged token gathered (sum
       over its members). The others are dropped.
    """
    check_x(x)
    ratio = check_ratio(ratio)
    threshold = check_threshold(threshold)
    T = x.shape[0]
    s = _scores(scores, T, "samp_k")
    f = check_features(x, features)
    if T == 0:
        return empty(x)
    adj = _adjacent(x, features)
    k = n_kept(ratio, T)
    order = np.argsort(-adj, kind="stable")
    links = order[adj[order] >= threshold][: T - k]
    groups = _link(T, links)
    merged = pool_weighted(x, groups, np.clip(s, 0, None))
    merged_f = merged.tokens if f is x else pool_weighted(f, groups, np.clip(s, 0, None)).tokens
    n1 = merged.n_out
    if n1 > k:
        gathered = np.bincount(groups, weights=s, minlength=n1)
        keep = np.sort(dpp_greedy(_unit(merged_f), _relevance_quality(gathered, relevance), k))
        remap = np.full(n1, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        groups = remap[groups]
        merged = pool_weighted(x, groups, np.clip(s, 0, None))
    return merged


def visionzip_contiguous(x: Tensor, scores: Tensor, ratio: float, dominant: float = 0.85,
                         features: Tensor | None = None) -> Compressed:
    """VisionZip style, to exactly T' = n_kept(ratio, T) tokens: D = round(dominant * T') (at least 1) dominant
    tokens, those that received the most attention (``scores``), kept as they are; C = T' - D contextual tokens
    made from the rest. In time, the rest falls into runs between dominant tokens; a contextual group stays inside
    one run (the contiguous-group contract; VisionZip merges by similarity across the image). When there are at
    most C runs, the most similar adjacent pairs inside runs are merged until C remain (A-ToMe inside runs); when
    there are more, the C runs that received the most attention in total become one token each and the others are
    dropped."""
    check_x(x)
    ratio = check_ratio(ratio)
    if isinstance(dominant, bool) or not (0 <= float(dominant) <= 1):
        raise ValueError(f"dominant must be in [0, 1], got {dominant!r}")
    T = x.shape[0]
    s = _scores(scores, T, "visionzip_contiguous")
    if T == 0:
        check_features(x, features)
        return empty(x)
    adj = _adjacent(x, features)
    k = n_kept(ratio, T)
    n_dom = min(k, max(1, int(np.floor(float(dominant) * k + 0.5))))
    n_ctx = k - n_dom
    dom = np.zeros(T, dtype=bool)
    dom[_top(s, n_dom)] = True
    rest = ~dom
    # runs of the rest: a new run starts at a rest token whose predecessor is dominant (or at t = 0)
    run_start = rest & np.concatenate([[True], dom[:-1]])
    run_id = np.where(rest, np.cumsum(run_start) - 1, -1)
    n_runs = int(run_start.sum())
    start = np.ones(T, dtype=bool)  # group starts over the kept tokens
    keep = dom.copy()
    if n_ctx == 0:
        pass  # the rest is dropped
    elif n_runs <= n_ctx:
        keep |= rest
        inner = np.flatnonzero(rest[:-1] & rest[1:])  # adjacent pairs inside one run
        n_links = int(rest.sum()) - n_ctx
        chosen = inner[np.argsort(-adj[inner], kind="stable")[:n_links]]
        start[chosen + 1] = False
    else:
        mass = np.bincount(run_id[rest], weights=s[rest], minlength=n_runs)
        kept_runs = _top(mass, n_ctx)
        in_kept = rest & np.isin(run_id, kept_runs)
        keep |= in_kept
        start[np.flatnonzero(in_kept & ~run_start)] = False  # a kept run is one group
    groups = np.where(keep, np.cumsum(start & keep) - 1, -1)
    return pool_groups(x, groups)


def cdpruner_exp(x: Tensor, query: Tensor, ratio: float, relevance: float = 1.0) -> Compressed:
    """CDPruner style conditional DPP: keep T' = n_kept(ratio, T) tokens chosen by greedy MAP under
    L = diag(q) S diag(q), S the tokens' cosines, q = exp(relevance * r_hat), r_t the mean cosine of token t with
    the text prompt's tokens ``query`` [Q, d] (min-max normalised to r_hat). The others are dropped."""
    got = _prompt_cosines(x, query, ratio, "cdpruner_exp")
    if got is None:
        return empty(x)
    ratio, u, cos = got
    T = x.shape[0]
    r = cos.double().cpu().numpy()
    keep = np.sort(dpp_greedy(u, _relevance_quality(r, relevance), n_kept(ratio, T)))
    return pool_groups(x, _keep(T, keep))


def _prompt_cosines(x: Tensor, query: Tensor, ratio: float, name: str) -> tuple[float, Tensor, Tensor] | None:
    """The first steps of the text-conditioned DPPs (cdpruner, cdpruner_exp): the inputs checked, then the checked
    ratio, ``x``'s unit rows and each row's mean cosine with the prompt's tokens; None for an empty ``x``."""
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    q_rows = _query(query, x, name)
    if x.shape[0] == 0:
        return None
    u = _unit(x)
    return ratio, u, (u @ _unit(q_rows).T).mean(dim=1)


def _query(query, x: Tensor, name: str) -> Tensor:
    if query is None:
        raise ValueError(f"{name} needs query= ([Q, d] hidden states of the text prompt at this layer); "
                         "only models with a text prompt supply it")
    check_x(query, "query")
    if query.shape[1] != x.shape[1]:
        raise ValueError(f"query has width {query.shape[1]} but x has {x.shape[1]}; they must match")
    if query.shape[0] == 0:
        raise ValueError(f"{name}: the text prompt is empty (query has no tokens)")
    check_finite(query, "query")
    return query.to(x.device)


def fastadasp_k(x: Tensor, scores: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """FastAdaSP style weighted merge at one layer: link the T - T' most similar adjacent pairs (T' =
    n_kept(ratio, T); similarity on ``features``, the layer's keys in FastAdaSP) and replace each chain by the mean
    of its members weighted by the attention they received (``scores``). A schedule over layers is a list of such
    points (:func:`speech_redundancy.compress.schedule`)."""
    check_x(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    s = _scores(scores, T, "fastadasp_k")
    if T == 0:
        check_features(x, features)
        return empty(x)
    adj = _adjacent(x, features)
    links = np.argsort(-adj, kind="stable")[: T - n_kept(ratio, T)]
    return pool_weighted(x, _link(T, links), np.clip(s, 0, None))


# ------------------------------------------------------------------------------------------ as released
# Each operator below reproduces its authors' released code (golden data: tests/fixtures/peers_golden/, from their
# repository at the commit named there); the adapted variants above keep the project's rules under their own names.

SAMP_SOURCE = "Tencent/AngelSlim@fb920fb (branch SA-MAP), SA-MAP/almeval/models/qwen2_audio/qwen2_audio_pruner.py"
CDPRUNER_SOURCE = "Theia-4869/CDPruner@9541616, llava/model/llava_arch.py (encode_images)"
VISIONZIP_SOURCE = "dvlab-research/VisionZip@3151f6d, visionzip/clip_encoder.py (CLIPVisionTower_VisionZip.forward)"
FASTADASP_SOURCE = "yichen14/FastAdaSP@582565a, Qwen-Audio/modeling_qwen.py (QWenBlock.merge_hidden_states, forward)"
FASTV_SOURCE = ("pkunlp-icler/FastV@d165972, src/FastV/llava-hf/transformers/src/transformers/models/llama/"
                "modeling_llama.py (LlamaModel.forward at layer K)")


def _removed_share(ratio: float) -> float:
    """The share r = 1 - K that FastV and FastAdaSP take as their parameter, rounded to 9 digits so that K = 0.7
    gives r = 0.3 exactly as a user of their code would write it (1 - 0.7 is 0.30000000000000004 in floating point)."""
    return round(1.0 - float(ratio), 9)


def attention_prune(x: Tensor, scores: Tensor, ratio: float) -> Compressed:
    """FastV as released: keep the round(T (1 - r)) tokens with the highest ``scores`` (the attention the last
    prompt token paid them at layer K-1, mean over heads), r = 1 - ``ratio`` the pruned share; Python's round(), so
    halves go to the even neighbour (T = 5, K = 0.5: 2 tokens, where :func:`attention_prune_k` keeps 3). Kept tokens
    stay in temporal order; equal scores favour earlier tokens. One project rule on top: at least one token is kept
    (FastV keeps none when round() gives 0)."""
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    s = _scores(scores, T, "attention_prune")
    if T == 0:
        return empty(x)
    count = min(T, max(1, _round_half_even(T * (1 - _removed_share(ratio)))))
    return pool_groups(x, _keep(T, _top(s, count)))


def samp(x: Tensor, scores: Tensor, ratio: float, threshold: float = 0.85, quality: Tensor | None = None,
         features: Tensor | None = None) -> Compressed:
    """SA-MAP (Samp) as released: sequential merging by the mean similarity to the whole group, then DPP pruning;
    the retention is set by ``threshold`` whenever merging leaves at most the K asked for.

    1. Merge: walking the tokens in order, token t joins the current group while its mean cosine to ALL current
       members (float32 cosines of the unit-scaled ``features``, compared with tau in float32) is >= ``threshold``;
       no cap on merges. A group's token is the mean of its members weighted by ``scores`` (the attention each
       token received in the audio encoder's last layer: max over heads, mean over queries); weights summing to 0
       give the plain mean (the released code divides by 0).
    2. Prune: k = max(round(T K), 2) (Python's round). When more than k groups remain, k are picked by greedy DPP
       MAP under L = diag(q) S diag(q), S the cosines of the merged tokens' features and q a group's ``quality``
       (the mean over its members of the self-attention diagonal, head mean, in the released code; ``scores``
       when not given), used linearly. When at most k groups remain they are all kept: the released code then
       fills its k rows with duplicates (its DPP re-picks exhausted items), which an index map cannot express and
       which add no information; :attr:`Compressed.n_out` is the number of distinct tokens.

    Its run script uses tau = 0.85 (the default). :func:`samp_k` is the equal-K adaptation."""
    check_x(x)
    ratio = check_ratio(ratio)
    threshold = check_threshold(threshold)
    T = x.shape[0]
    s = _scores(scores, T, "samp")
    qd = s if quality is None else _scores(quality, T, "samp (quality)")
    f = check_features(x, features)
    check_finite(x)
    if f is not x:
        check_finite(f, "features")
    if T == 0:
        return empty(x)
    u = _unit(f).cpu().numpy()
    tau = np.float32(threshold)
    start = np.zeros(T, dtype=bool)
    start[0] = True
    first = 0
    for t in range(1, T):
        if np.float32((u[first:t] @ u[t]).mean(dtype=u.dtype)) >= tau:
            continue
        start[t] = True
        first = t
    groups = np.cumsum(start) - 1
    weights = np.clip(s, 0, None)
    merged = pool_weighted(x, groups, weights)
    n1 = merged.n_out
    k = min(T, max(_round_half_even(T * ratio), 2))
    if n1 <= k:
        return merged
    merged_f = merged.tokens if f is x else pool_weighted(f, groups, weights).tokens
    quality_g = np.bincount(groups, weights=qd) / np.bincount(groups)
    keep = np.sort(dpp_greedy(_unit(merged_f), quality_g, k))
    remap = np.full(n1, -1, dtype=np.int64)
    remap[keep] = np.arange(keep.size)
    return pool_weighted(x, remap[groups], weights)


def cdpruner(x: Tensor, query: Tensor, ratio: float) -> Compressed:
    """CDPruner as released: keep n_kept(K, T) tokens (its ``visual_token_num``) chosen by greedy DPP MAP under
    L = diag(r) S diag(r), S the tokens' cosines (float32) and r the relevance used linearly: the NEGATED mean
    cosine of each token with the text prompt's tokens ``query`` [Q, d], min-max normalised as
    (r - min + 1e-6) / (max - min) (all equal: 1). The released code measures the relevance on CLIP's image and
    text embeddings and the similarity on the projector output; here both are on the hidden states at the point.
    The commented-out variants in the released code (exp(alpha r), the positive sign) are :func:`cdpruner_exp`."""
    got = _prompt_cosines(x, query, ratio, "cdpruner")
    if got is None:
        return empty(x)
    ratio, u, cos = got
    T = x.shape[0]
    r = -cos
    span = r.max() - r.min()
    r = (r - r.min() + 1e-6) / span if float(span) > 0 else torch.ones_like(r)
    keep = np.sort(dpp_greedy(u, r, n_kept(ratio, T)))
    return pool_groups(x, _keep(T, keep))


def visionzip(x: Tensor, scores: Tensor, ratio: float, dominant: float = 0.85,
              features: Tensor | None = None) -> Compressed:
    """VisionZip as released, to n_kept(K, T) = D + C tokens, D = max(1, round(dominant * k)) (its defaults: 54 of
    64, 108 of 128, 162 of 192 are dominant):

    1. Dominant tokens: the D that received the most attention (``scores``; equal scores: earlier first), kept
       as they are.
    2. Contextual tokens: of the rest (in temporal order, n tokens), C evenly strided targets (every
       max(1, n // C)-th, the first C); each other token is assigned to its most similar target anywhere in the
       sequence (cosine of the unit-scaled ``features``, the layer's keys in VisionZip; equal: the earlier
       target); a contextual token is its target PLUS the mean of the tokens assigned to it (the target alone when
       none is). No token is dropped. Groups (a target and its assigned tokens) are not contiguous: outputs are
       ordered by each group's first member. C = 0 (a K too small for a contextual token): the rest is dropped
       (the released code divides by C).
    :func:`visionzip_contiguous` is the adaptation with contiguous groups."""
    check_x(x)
    ratio = check_ratio(ratio)
    if isinstance(dominant, bool) or not (0 <= float(dominant) <= 1):
        raise ValueError(f"dominant must be in [0, 1], got {dominant!r}")
    T = x.shape[0]
    s = _scores(scores, T, "visionzip")
    f = check_features(x, features)
    check_finite(x)
    if f is not x:
        check_finite(f, "features")
    if T == 0:
        return empty(x)
    k = n_kept(ratio, T)
    n_dom = min(k, max(1, int(np.floor(float(dominant) * k + 0.5))))
    n_ctx = k - n_dom
    dom = _top(s, n_dom)
    labels = np.full(T, -1, dtype=np.int64)
    labels[dom] = np.arange(n_dom)
    acc = acc_dtype(x.dtype)
    rows = [x.index_select(0, torch.from_numpy(dom).to(x.device)).to(acc)]
    if n_ctx > 0:
        rest = np.setdiff1d(np.arange(T), dom)
        step = max(1, rest.size // n_ctx)
        local = np.arange(0, rest.size, step)[:n_ctx]
        targets = rest[local]
        others = np.delete(rest, local)
        fu = _unit(f)
        dev = f.device
        sim = fu.index_select(0, torch.from_numpy(others).to(dev)) @ fu.index_select(
            0, torch.from_numpy(targets).to(dev)).T
        assign = sim.argmax(dim=1).cpu().numpy() if others.size else np.zeros(0, dtype=np.int64)
        labels[targets] = n_dom + np.arange(n_ctx)
        labels[others] = n_dom + assign
        dev = x.device
        total = torch.zeros(n_ctx, x.shape[1], dtype=acc, device=dev).index_add_(
            0, torch.from_numpy(assign).to(dev), x.index_select(0, torch.from_numpy(others).to(dev)).to(acc))
        counts = torch.from_numpy(np.maximum(np.bincount(assign, minlength=n_ctx), 1)).to(device=dev, dtype=acc)
        rows.append(x.index_select(0, torch.from_numpy(targets).to(dev)).to(acc) + total / counts[:, None])
    return from_partition(x, labels, torch.cat(rows))


def fastadasp(x: Tensor, scores: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """FastAdaSP's weighted merge at one layer as released (method ``merge_weighted``): with r = 1 - ``ratio`` the
    share it removes, the int(T r) adjacent pairs with the highest cosine (float32, on ``features``: the layer's
    keys, all heads concatenated) are linked (equal cosines: the earlier pair first), and each chain becomes the
    mean of its members weighted by ``scores`` (the attention each token received, summed over all queries and
    heads, in the released code); weights summing to 0 give the plain mean (the released code divides by 0).
    The released schedule over layers is :func:`speech_redundancy.compress.schedule` with kind
    ``fastadasp_decay``; :func:`fastadasp_k` keeps exactly n_kept(K, T) tokens."""
    check_x(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    s = _scores(scores, T, "fastadasp")
    f = check_features(x, features)
    check_finite(x)
    if f is not x:
        check_finite(f, "features")
    if T == 0:
        return empty(x)
    m = int(T * _removed_share(ratio))
    links = np.zeros(0, dtype=np.int64)
    if m > 0:
        fa = f.detach().to(acc_dtype(f.dtype))
        cos = torch.nn.functional.cosine_similarity(fa[:-1], fa[1:], dim=1).double().cpu().numpy()
        links = np.argsort(-cos, kind="stable")[:m]
    return pool_weighted(x, _link(T, links), np.clip(s, 0, None))


def speechprune(x: Tensor, query: Tensor, scores: Tensor, ratio: float, segment: int = 25) -> Compressed:
    """SpeechPrune style two-stage pruning to T' = n_kept(ratio, T) tokens. Stage 1 removes half of the tokens to
    prune (keeps T1 = T' + floor((T - T') / 2)): the kept count is split over segments of ``segment`` tokens
    (about 1 s) in proportion to their size, and each segment keeps its tokens most similar to the text prompt
    (largest cosine with any ``query`` token). Stage 2 keeps the T' of those with the highest attention
    (``scores``, the first LLM layer's in SpeechPrune)."""
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    segment = check_budget(segment)
    T = x.shape[0]
    s = _scores(scores, T, "speechprune")
    q_rows = _query(query, x, "speechprune")
    if T == 0:
        return empty(x)
    k = n_kept(ratio, T)
    sim = (_unit(x) @ _unit(q_rows).T).max(dim=1).values.double().cpu().numpy()
    segs = _segments(T, segment)
    counts = _allocate(np.array([len(g) for g in segs]), k + (T - k) // 2)
    stage1 = np.sort(np.concatenate([g[_top(sim[g], c)] for g, c in zip(segs, counts)]))
    keep = stage1[_top(s[stage1], k)]
    return pool_groups(x, _keep(T, keep))


def segment_topk(x: Tensor, scores: Tensor, ratio: float, segment: int = 25) -> Compressed:
    """Segment-wise top-K: T' = n_kept(ratio, T) split over segments of ``segment`` tokens in proportion to their
    size (largest remainders); each segment keeps its most attended tokens (``scores``)."""
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    segment = check_budget(segment)
    T = x.shape[0]
    s = _scores(scores, T, "segment_topk")
    if T == 0:
        return empty(x)
    segs = _segments(T, segment)
    counts = _allocate(np.array([len(g) for g in segs]), n_kept(ratio, T))
    keep = np.sort(np.concatenate([g[_top(s[g], c)] for g, c in zip(segs, counts)]))
    return pool_groups(x, _keep(T, keep))


def ltbm(x: Tensor, ratio: float, features: Tensor | None = None) -> Compressed:
    """LTBM style local temporal bipartite merging to T' = n_kept(ratio, T) tokens, in rounds. Each round splits
    the current tokens into A (even positions) and B (odd); every A token's match is the more similar of its two
    temporal neighbours (both in B; equal: the earlier), and the A tokens with the most similar matches (at most
    all of them, and no more than needed) merge into them (ToMe's bipartite soft matching with the match window
    cut to the neighbours, so groups stay contiguous). Rounds repeat until T' remain; tokens are the means of
    their original members, similarities are measured on the merged features."""
    check_x(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    f = check_features(x, features)
    if T == 0:
        return empty(x)
    _adjacent(x, features)  # finiteness checks
    k = n_kept(ratio, T)
    groups = np.arange(T, dtype=np.int64)
    cur = f
    n = T
    while n > k:
        adj = _adjacent(cur, None)  # cos(c_i, c_{i+1})
        a = np.arange(0, n, 2)
        left = np.where(a > 0, np.concatenate([[-np.inf], adj])[a], -np.inf)  # cos(c_a, c_{a-1})
        right = np.where(a < n - 1, np.concatenate([adj, [-np.inf]])[a], -np.inf)  # cos(c_a, c_{a+1})
        to_left = left >= right
        best = np.where(to_left, left, right)
        valid = np.isfinite(best)
        cand = a[valid]
        order = np.argsort(-best[valid], kind="stable")[: n - k]
        merging = cand[order]
        target = np.where(to_left[valid][order], merging - 1, merging + 1)
        # new index of each current token: B tokens and unmerged A tokens start groups; a merged A joins its match
        start = np.ones(n, dtype=bool)
        start[merging] = False
        new_id = np.cumsum(start) - 1
        new_id[merging] = new_id[target]
        groups = new_id[groups]
        n = int(new_id.max()) + 1
        cur = pool_groups(f, groups).tokens
    return pool_groups(x, groups)

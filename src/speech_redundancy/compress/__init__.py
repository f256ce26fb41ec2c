"""Compression operators: pure tensor functions (no model, no config, no I/O), and the per-sample step.

Glossary (the paper's symbols, used the same way in config keys, code, result columns and table headers):

    l  layer      a point compresses the audio tokens entering layer l (LLMs: l = 0 is the input embeddings)
    tau threshold cosine similarity at or above which Affinity Pooling joins a token to the current group
    omega window  how many of the current group's last members a token is compared with
    R  budget     tokens kept per word window (the oracle operators)
    K  ratio      fraction of the tokens kept (fixed-ratio operators); kept count n_kept(K, T) = max(1, floor(K T + 1/2))
    retention     audio tokens out / in; over all points of a run it is the paper's final retention ratio (FRR)

The contract every operator keeps: it maps tokens ``x`` [T, d] to a :class:`Compressed` with ``tokens`` [T', d],
``groups`` [T] (the output index of each input token, -1 where dropped) and ``positions`` [T'] (the input position
standing for each output token: the first member of its group). Groups may be any partition of the kept tokens,
contiguous runs or interleaved (a member need not neighbour the others); output tokens are ordered by their groups'
first members, so ids first appear as 0, 1, 2, ... and ``positions`` increases (``core.check_index_map``). Each
output token takes its first member's place: the engine puts it there, later points map word windows by it (a
current token belongs to the word its first original member lies in) and group plots colour every member alike. Cosines are dot / sqrt(|a|^2 |b|^2) in float32 (float64 for float64 input), compared with tau
in float64 on the host; 0 against a zero vector. Means accumulate in float32 for half-precision input. NaN or inf in
the tokens or features raise ValueError; T = 0 gives an empty result. Random operators draw from their own CPU
generator seeded by ``seed`` (:func:`seed_for`).

Modules, in the order a reader meets them: ``core`` (the result, pooling, features, checks), ``affinity``
(Algorithm 1 plain and vectorised, fixed-ratio AP), ``oracle`` (the §3.1 interventions), ``baselines`` and ``peers``
(other methods), ``registry`` (the operator table, :class:`Point`, dispatch, layer schedules) and ``step`` (the per-sample step every
adapter calls).
"""

from speech_redundancy.compress.affinity import (
    affinity_groups,
    affinity_pool,
    affinity_ratio,
    algorithm1,
    cosine_band,
    groups_from_band,
    similarity_band,
)
from speech_redundancy.compress.baselines import interpolate
from speech_redundancy.compress.core import (
    FEATURE_MODES,
    GAPS,
    Compressed,
    check_index_map,
    identity,
    from_partition,
    n_kept,
    pool_groups,
    pool_weighted,
    seed_for,
    similarity_features,
)
from speech_redundancy.compress.oracle import random_drop, spans_from_words, uniform_drop, uniform_merge
from speech_redundancy.compress.peers import (
    adjacent_merge,
    attention_prune,
    attention_prune_k,
    cdpruner,
    cdpruner_exp,
    dpp_greedy,
    fastadasp,
    fastadasp_k,
    group_merge,
    ltbm,
    samp,
    samp_k,
    segment_topk,
    speechprune,
    visionzip,
    visionzip_contiguous,
)
from speech_redundancy.compress.registry import (
    OPERATORS,
    SCHEDULES,
    Operator,
    Point,
    compress,
    compress_batch,
    operator,
    schedule,
    validate,
)
from speech_redundancy.compress.step import Features, Record, SpanState, compress_step

__all__ = [
    "FEATURE_MODES", "GAPS", "OPERATORS", "SCHEDULES", "Compressed", "Features", "Operator", "Point", "Record",
    "SpanState", "adjacent_merge", "affinity_groups", "affinity_pool", "affinity_ratio", "algorithm1",
    "check_index_map",
    "attention_prune", "cdpruner", "compress", "compress_batch", "compress_step", "cosine_band", "dpp_greedy",
    "fastadasp", "group_merge", "groups_from_band", "identity", "interpolate", "ltbm", "n_kept", "operator",
    "pool_groups", "pool_weighted", "random_drop", "samp", "schedule", "seed_for", "segment_topk",
    "similarity_band", "similarity_features", "spans_from_words", "speechprune", "uniform_drop", "uniform_merge",
    "validate", "visionzip",
    "attention_prune_k", "cdpruner_exp", "fastadasp_k", "from_partition", "samp_k", "visionzip_contiguous",
]

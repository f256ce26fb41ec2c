"""Layer-wise cosine-similarity dynamics of the audio hidden states (paper §3.3, Fig. 3).

For the audio hidden states entering each layer, ``H`` [T, d] of one utterance:

- neighbour similarity, k in {1, 3, 5, 10}: for each token t the mean cosine similarity to its k nearest temporal
  neighbours, then the mean over t. ``neighbours="following"`` (default) takes the k tokens after t
  (t+1..t+k, fewer at the end); ``"symmetric"`` takes up to k on each side (t-k..t+k without t). The paper does
  not say which; both count every adjacent pair, and they differ only in how tokens near the edges are weighted.
- global mean: the mean cosine similarity over all pairs i != j (computed from the sum of unit vectors, O(T d)).
- max within words: for each word window with at least two tokens, the largest cosine similarity between two
  adjacent tokens inside it; the mean over words. Needs word timings (``compress.spans_from_words``).

Utterances are weighted equally (each number is averaged per utterance, then over utterances).

Model contract: the adapter exposes ``hidden_states(request) -> list[Tensor [T, d]]``, the uncompressed audio
frames entering layer 0..L (index l = input of layer l; the last one the output), and ``token_rate``
(tokens per second) for the word windows. ``WhisperModel``, ``Qwen2AudioModel`` and ``HFAudioLLM`` implement it
(the LSLMs through ``engine.audio_hidden_states``: the audio span of ``output_hidden_states``).

Runner::

    python -m speech_redundancy.analysis experiment=cosine_dynamics_demo [dynamics.features=centered]

writes ``dynamics.jsonl`` (one row per layer), ``dynamics.csv`` and ``meta.json`` into ``dynamics.out_dir``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from speech_redundancy import compress as ops

KS = (1, 3, 5, 10)
NEIGHBOURS = ("following", "symmetric")
FEATURES = ("hidden", "centered")
CONF = Path(__file__).resolve().parents[2] / "conf"


def _unit(h: torch.Tensor) -> torch.Tensor:
    if h.ndim != 2:
        raise ValueError(f"hidden states must be [T, d], got shape {tuple(h.shape)}")
    return F.normalize(h.double(), dim=-1)


def neighbour_similarity(h: torch.Tensor, k: int, neighbours: str = "following") -> float:
    """Mean over tokens of the mean cosine similarity to the k nearest temporal neighbours (see module doc)."""
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours={neighbours!r}; allowed: {', '.join(NEIGHBOURS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    u = _unit(h)
    t = u.shape[0]
    if t < 2:
        return math.nan
    total = torch.zeros(t, dtype=u.dtype)
    count = torch.zeros(t, dtype=u.dtype)
    for j in range(1, min(k, t - 1) + 1):
        c = (u[:-j] * u[j:]).sum(-1)  # cos(t, t+j) for t in [0, T-j)
        total[:-j] += c
        count[:-j] += 1
        if neighbours == "symmetric":
            total[j:] += c
            count[j:] += 1
    has = count > 0
    return float((total[has] / count[has]).mean())


def global_mean_similarity(h: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs i != j: (|sum u|^2 - T) / (T (T - 1))."""
    u = _unit(h)
    t = u.shape[0]
    if t < 2:
        return math.nan
    s = u.sum(0)
    return float(((s @ s) - t) / (t * (t - 1)))


def max_within_words(h: torch.Tensor, spans: torch.Tensor) -> float:
    """Mean over words (spans [U, 2], [start, end) token indices) of the maximum adjacent cosine similarity inside
    the word; words of one token are skipped. NaN when no word has two tokens."""
    u = _unit(h)
    adj = (u[:-1] * u[1:]).sum(-1)  # adj[t] = cos(t, t+1)
    vals = [float(adj[s:e - 1].max()) for s, e in spans.tolist() if e - s >= 2]
    return sum(vals) / len(vals) if vals else math.nan


def layer_dynamics(h: torch.Tensor, spans: torch.Tensor | None = None, ks: Sequence[int] = KS,
                   neighbours: str = "following") -> dict[str, float]:
    """All Fig. 3 numbers for one layer's states of one utterance."""
    out = {f"neighbour_k{k}": neighbour_similarity(h, k, neighbours) for k in ks}
    out["global_mean"] = global_mean_similarity(h)
    out["max_within_words"] = max_within_words(h, spans) if spans is not None and len(spans) else math.nan
    return out


def features_view(h: torch.Tensor, mode: str) -> torch.Tensor:
    """What similarity is measured on: the states as they are (``hidden``) or minus the utterance mean."""
    if mode not in FEATURES:
        raise ValueError(f"dynamics.features={mode!r}; allowed here: {', '.join(FEATURES)}")
    return ops.similarity_features(h, mode)


def utterance_dynamics(states: list[torch.Tensor], words, token_rate: float, *, ks: Sequence[int] = KS,
                       neighbours: str = "following", features: str = "hidden") -> list[dict[str, Any]]:
    """One row per layer for one utterance; ``words`` are :class:`~speech_redundancy.data.records.Word` or None."""
    rows = []
    for layer, h in enumerate(states):
        spans = None
        if words:
            spans = ops.spans_from_words([w.start for w in words], [w.end for w in words], token_rate, h.shape[0])
        rows.append({"layer": layer, **layer_dynamics(features_view(h, features), spans, ks, neighbours)})
    return rows


def average(per_utt: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean over utterances per layer (NaNs, e.g. no multi-token word, are left out of their mean)."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for rows in per_utt:
        for r in rows:
            by_layer.setdefault(r["layer"], []).append(r)
    out = []
    for layer in sorted(by_layer):
        rs = by_layer[layer]
        rec: dict[str, Any] = {"layer": layer, "n_utterances": len(rs)}
        for key in rs[0]:
            if key == "layer":
                continue
            vals = [r[key] for r in rs if not math.isnan(r[key])]
            rec[key] = sum(vals) / len(vals) if vals else math.nan
        out.append(rec)
    return out


def run_dynamics(cfg) -> Path:
    """Compute the dynamics for ``cfg`` (model, data, ``dynamics`` node) and write them; returns the folder."""
    from omegaconf import OmegaConf

    from speech_redundancy.audio import load_audio
    from speech_redundancy.data.dataset import load_dataset
    from speech_redundancy.models.base import Request
    from speech_redundancy.results import environment, write_json
    from speech_redundancy.runner import load_model

    dyn = cfg.get("dynamics") or {}
    ks = [int(k) for k in dyn.get("ks", KS)]
    neighbours = dyn.get("neighbours", "following")
    mode = dyn.get("features", "hidden")
    features_view(torch.zeros(2, 2), mode)  # fail before any compute on a bad mode
    out_dir = Path(dyn.get("out_dir") or f"{cfg.paths.output_dir}/dynamics/{cfg.model.name}/{cfg.data.name}/{mode}")
    utts, failures = load_dataset(cfg.data)
    model = load_model(cfg.model)
    if not hasattr(model, "hidden_states"):
        raise RuntimeError(f"model {cfg.model.name} has no hidden_states(request); see this module's docstring")
    t0 = time.perf_counter()
    per_utt = []
    for utt in utts:
        states = model.hidden_states(Request(utt=utt, audio=load_audio(utt.audio)))
        per_utt.append(utterance_dynamics(states, utt.words, float(model.token_rate), ks=ks, neighbours=neighbours,
                                          features=mode))
    rows = average(per_utt)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "dynamics.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(out_dir / "dynamics.csv", index=False)
    write_json(out_dir / "meta.json", {
        "model": cfg.model.name, "data": OmegaConf.to_container(cfg.data, resolve=True), "ks": ks,
        "neighbours": neighbours, "features": mode, "n_utterances": len(utts), "load_failures": failures,
        "seconds": time.perf_counter() - t0, **environment(),
    })
    print(f"cosine dynamics of {len(utts)} utterances, {len(rows)} layers -> {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    """``python -m speech_redundancy.analysis [hydra overrides]``: the run config plus a ``dynamics`` node."""
    from hydra import compose, initialize_config_dir

    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return run_dynamics(cfg)


if __name__ == "__main__":
    main()

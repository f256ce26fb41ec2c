"""One plotting function per paper figure. Each takes the DataFrame rows that :mod:`speech_redundancy.experiments`
built (or the dynamics rows of :mod:`speech_redundancy.analysis`) and a path stem, and writes ``<stem>.png`` and
``<stem>.pdf``. Rates are fractions in the data and percentages on the axes. Every point carries its utterance count
(``n_mark``; an unfinished or partly failed run's point reads ``5*`` and is ringed in red).

- :func:`oracle_layers`      Fig. 2: WER and cWER (log) against layer, one line per token ratio, one panel per operator
- :func:`cosine_dynamics`    Fig. 3: neighbour similarity (k), global mean, max within words against layer
- :func:`affinity_layers`    Fig. 4: WER, cWER (log) and retention against layer, one line per threshold
- ``*_models`` twins of these three: the same panels for several models side by side (the paper shows
  Qwen2-Audio and Kimi-Audio together)
- :func:`group_strips`       Figs. 5, 9-11: merged groups per layer, word boundaries, tokens after compression
- :func:`sensitivity_layer`  Figs. 6/8: WER and retention against threshold, one line per layer, early/deep panels
- :func:`sensitivity_window` Fig. 7: WER and retention against threshold, one line per window, one row per layer
- :func:`peer_comparison`    issue 13: WER against retention, one curve per operator, one panel per layer
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from speech_redundancy.experiments import OPERATOR_NAMES, PEER_NAMES  # noqa: E402


def save(fig, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _pct(s: pd.Series) -> pd.Series:
    return 100 * s.astype(float)


def _vanilla_line(ax, vanilla: dict | None, key: str) -> None:
    if vanilla and vanilla.get(key) is not None and not math.isnan(vanilla[key]):
        ax.axhline(100 * vanilla[key], color="0.3", ls="--", lw=1, label=f"Vanilla {100 * vanilla[key]:.2f}")
        lo, hi = vanilla.get(f"{key}_lo"), vanilla.get(f"{key}_hi")
        if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
            ax.axhspan(100 * lo, 100 * hi, color="0.3", alpha=0.1, lw=0)


def _band(ax, x: pd.Series, s: pd.DataFrame, key: str, color) -> None:
    """The 95 % interval of ``s[key]`` (columns ``<key>_lo`` / ``<key>_hi``) as a band around its curve."""
    if f"{key}_lo" in s and f"{key}_hi" in s and s[f"{key}_lo"].notna().any():
        ax.fill_between(x, _pct(s[f"{key}_lo"]), _pct(s[f"{key}_hi"]), color=color, alpha=0.15, lw=0)


def _n_labels(ax, x, y, s: pd.DataFrame) -> None:
    """Each point's utterance count beside it (``n_mark``: ``8``, or ``5*`` for an unfinished or partly failed run,
    which is also ringed in red)."""
    if "n_mark" not in s:
        return
    for xi, yi, mark in zip(x, y, s["n_mark"]):
        ax.annotate(str(mark), (xi, yi), textcoords="offset points", xytext=(2, 3), fontsize=5, color="0.35")
        if str(mark).endswith("*"):
            ax.plot([xi], [yi], "o", mfc="none", mec="red", ms=8, mew=0.8)


def _log_safe(ax, values: Sequence[float]) -> None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if vals and min(vals) > 0:
        ax.set_yscale("log")
    else:  # a WER of 0 has no log: symlog keeps the scale readable (paper Fig. 8 does the same)
        ax.set_yscale("symlog", linthresh=1.0)


def _operators(d: pd.DataFrame) -> list[str]:
    ops = [o for o in ("random_drop", "uniform_drop", "uniform_merge") if o in set(d["operator"])]
    return ops + sorted(set(d["operator"]) - set(ops))


def _oracle_panel(axes, d: pd.DataFrame, vanilla: dict | None, name: str = "") -> None:
    """Fig. 2 of one context on ``axes`` [2, operators]: WER (top) and cWER (bottom) against layer."""
    ops = _operators(d)
    budgets = sorted(d["budget"].unique())
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(budgets), 1)))
    for j, op in enumerate(ops):
        g = d[d["operator"] == op]
        for row, (key, label) in enumerate((("wer", "WER (%)"), ("cwer", "cWER (%)"))):
            ax = axes[row][j]
            for c, b in zip(colors, budgets):
                s = g[g["budget"] == b].sort_values("layer")
                if s.empty:
                    continue
                ax.plot(s["layer"], _pct(s[key]), "o-", color=c, ms=4,
                        label=f"R={int(b)} ({100 * s['token_ratio'].iloc[0]:.1f}%)")
                _band(ax, s["layer"], s, key, c)
                _n_labels(ax, s["layer"], _pct(s[key]), s)
            _vanilla_line(ax, vanilla, key)
            _log_safe(ax, list(_pct(g[key])))
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(f"{name}: {OPERATOR_NAMES.get(op, op)}" if name else OPERATOR_NAMES.get(op, op))
            if j == 0:
                ax.set_ylabel(label + ", log scale")
            if row == 1:
                ax.set_xlabel("layer l")
    axes[0][len(ops) - 1].legend(fontsize=8, title="token ratio", title_fontsize=8)


def oracle_layers(d: pd.DataFrame, stem: str | Path, title: str = "", vanilla: dict | None = None) -> list[Path]:
    """Fig. 2. ``d``: oracle runs of one context (columns operator, budget, token_ratio, layer, wer, cwer)."""
    n = len(_operators(d))
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False, sharex=True)
    _oracle_panel(axes, d, vanilla)
    fig.suptitle(title or "Layer-wise oracle interventions")
    fig.tight_layout()
    return save(fig, stem)


def oracle_layers_models(panels: Sequence[tuple[str, pd.DataFrame, dict | None]], stem: str | Path,
                         title: str = "") -> list[Path]:
    """Fig. 2 as the paper lays it out: one block of operator columns per model, side by side. ``panels``:
    (model name, its oracle runs of one context, its vanilla run) per model."""
    widths = [len(_operators(d)) for _, d, _ in panels]
    fig, axes = plt.subplots(2, sum(widths), figsize=(4.2 * sum(widths), 6.4), squeeze=False)
    col = 0
    for (name, d, vanilla), w in zip(panels, widths):
        _oracle_panel(axes[:, col:col + w], d, vanilla, name)
        col += w
    fig.suptitle(title or "Layer-wise oracle interventions")
    fig.tight_layout()
    return save(fig, stem)


def _affinity_panel(axes, d: pd.DataFrame, vanilla: dict | None, name: str = "") -> None:
    """Fig. 4 of one context on three ``axes``: WER, cWER (log) and retention against layer, one line per τ."""
    thresholds = sorted(d["threshold"].unique())
    colors = plt.cm.plasma(np.linspace(0.1, 0.8, max(len(thresholds), 1)))
    for ax, (key, label) in zip(axes, (("wer", "WER (%)"), ("cwer", "cWER (%)"), ("retention", "retention (%)"))):
        for c, t in zip(colors, thresholds):
            s = d[d["threshold"] == t].sort_values("layer")
            ax.plot(s["layer"], _pct(s[key]), "o-", color=c, ms=4, label=f"τ={t:g}")
            _band(ax, s["layer"], s, key, c)
            _n_labels(ax, s["layer"], _pct(s[key]), s)
        if key == "retention":
            ax.set_ylim(0, 105)
        else:
            _vanilla_line(ax, vanilla, key)
            _log_safe(ax, list(_pct(d[key])))
            label += ", log scale"
        ax.set_xlabel("layer l")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if name:
            ax.set_title(name)
    axes[-1].legend(fontsize=8)


def affinity_layers(d: pd.DataFrame, stem: str | Path, title: str = "", vanilla: dict | None = None) -> list[Path]:
    """Fig. 4. ``d``: single-point affinity runs of one context, window and features (layer, threshold, ...)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    _affinity_panel(axes, d, vanilla)
    fig.suptitle(title or "Affinity Pooling, layer by layer")
    fig.tight_layout()
    return save(fig, stem)


def affinity_layers_models(panels: Sequence[tuple[str, pd.DataFrame, dict | None]], stem: str | Path,
                           title: str = "") -> list[Path]:
    """Fig. 4 with one row of three panels per model. ``panels``: (model name, its affinity runs of one context,
    window and features, its vanilla run) per model."""
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 3.8 * len(panels)), squeeze=False)
    for row, (name, d, vanilla) in zip(axes, panels):
        _affinity_panel(row, d, vanilla, name)
    fig.suptitle(title or "Affinity Pooling, layer by layer")
    fig.tight_layout()
    return save(fig, stem)


def _dynamics_panel(ax, rows: pd.DataFrame, title: str) -> None:
    ks = sorted(int(c.split("_k")[1]) for c in rows.columns if c.startswith("neighbour_k"))
    colors = plt.cm.Blues(np.linspace(0.9, 0.4, max(len(ks), 1)))
    for c, k in zip(colors, ks):
        ax.plot(rows["layer"], rows[f"neighbour_k{k}"], "o-", ms=4, color=c, label=f"neighbour k={k}")
    ax.plot(rows["layer"], rows["global_mean"], "s--", ms=4, color="tab:gray", label="global mean")
    if "max_within_words" in rows and rows["max_within_words"].notna().any():
        ax.plot(rows["layer"], rows["max_within_words"], "^-", ms=4, color="tab:red", label="max within words")
    ax.set_xlabel("layer l")
    ax.set_ylabel("cosine similarity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)


def cosine_dynamics(rows: pd.DataFrame, stem: str | Path, title: str = "") -> list[Path]:
    """Fig. 3. ``rows``: one row per layer with ``neighbour_k<k>``, ``global_mean``, ``max_within_words``."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    _dynamics_panel(ax, rows, title or "Layer-wise cosine similarity dynamics")
    fig.tight_layout()
    return save(fig, stem)


def cosine_dynamics_models(panels: Sequence[tuple[str, pd.DataFrame]], stem: str | Path, title: str = "") -> list[Path]:
    """Fig. 3 as the paper lays it out: one panel per model, side by side. ``panels``: (model name, rows)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        _dynamics_panel(ax, rows, name)
    fig.suptitle(title or "Layer-wise cosine similarity dynamics")
    fig.tight_layout()
    return save(fig, stem)


def _split_layers(layers: list[int]) -> list[list[int]]:
    if len(layers) <= 4:
        return [layers]
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    cut = int(np.argmax(gaps)) + 1 if max(gaps) > 1 else len(layers) // 2
    return [layers[:cut], layers[cut:]]


def _threshold_row(row, curves, vanilla: dict | None, prefix: str = "") -> None:
    """WER (log) and retention against τ on one row of two axes; ``curves``: (label, colour, runs) per line."""
    for label, c, runs in curves:
        s = runs.sort_values("threshold")
        row[0].plot(s["threshold"], _pct(s["wer"]), "o-", color=c, ms=4, label=label)
        row[1].plot(s["threshold"], _pct(s["retention"]), "o-", color=c, ms=4, label=label)
        _n_labels(row[0], s["threshold"], _pct(s["wer"]), s)
    _vanilla_line(row[0], vanilla, "wer")
    _log_safe(row[0], [v for _, _, runs in curves for v in _pct(runs["wer"])])
    row[0].set_ylabel(f"{prefix}WER (%)")
    row[1].set_ylabel(f"{prefix}retention (%)")
    row[1].set_ylim(0, 105)
    for ax in row:
        ax.set_xlabel("threshold τ")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)


def sensitivity_layer(d: pd.DataFrame, stem: str | Path, title: str = "", vanilla: dict | None = None) -> list[Path]:
    """Figs. 6/8. ``d``: single-point affinity runs of one context/window/features over layers and thresholds.
    Early and deep layers (split at the largest gap in the layer list, else in half) get one row each."""
    layers = sorted(int(x) for x in d["layer"].unique())
    parts = _split_layers(layers)
    fig, axes = plt.subplots(len(parts), 2, figsize=(10, 3.4 * len(parts)), squeeze=False)
    for i, part in enumerate(parts):
        colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(part), 1)))
        curves = [(f"l={layer}", c, d[d["layer"] == layer]) for c, layer in zip(colors, part)]
        _threshold_row(axes[i], curves, vanilla)
    fig.suptitle(title or "Layer sensitivity of Affinity Pooling")
    fig.tight_layout()
    return save(fig, stem)


def sensitivity_window(d: pd.DataFrame, stem: str | Path, title: str = "", vanilla: dict | None = None) -> list[Path]:
    """Fig. 7. ``d``: single-point affinity runs of one context/features at layers with several windows."""
    layers = sorted(int(x) for x in d["layer"].unique())
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 3.4 * len(layers)), squeeze=False)
    for i, layer in enumerate(layers):
        g = d[d["layer"] == layer]
        windows = sorted(int(w) for w in g["window"].unique())
        colors = plt.cm.cividis(np.linspace(0.1, 0.9, max(len(windows), 1)))
        _threshold_row(axes[i], [(f"ω={w}", c, g[g["window"] == w]) for c, w in zip(colors, windows)], vanilla,
                       prefix=f"l={layer}: ")
    fig.suptitle(title or "Lookback window ablation")
    fig.tight_layout()
    return save(fig, stem)


DROPPED_COLOUR = np.array([1.0, 1.0, 1.0])  # dropped tokens (group -1) are left white


def group_colours(groups: np.ndarray) -> np.ndarray:
    """RGB [T, 3] per input token: its group's colour (cycling over 20 by group index, so neighbouring groups
    differ; every member of a group alike, wherever it lies), dropped tokens white."""
    g = np.asarray(groups)
    colours = plt.get_cmap("tab20")((np.maximum(g, 0) % 20) / 19.0)[:, :3]
    colours[g < 0] = DROPPED_COLOUR
    return colours


def group_strips(strips: list[dict[str, Any]], word_spans: list[tuple[int, int]], stem: str | Path,
                 title: str = "", words: Sequence[str] = ()) -> list[Path]:
    """Figs. 5, 9-11: one strip per layer, each input token coloured by its merged group, vertical lines at word
    boundaries, the number of tokens after compression on the right axis and the transcript under each strip.

    ``strips``: ``{"layer", "groups" (output index per input token), "hypothesis"}`` per layer; ``word_spans``:
    [start, end) token indices of the words on the same axis. Groups may be any partition (:func:`group_colours`):
    interleaved groups show as alternating colours, dropped tokens as white gaps.
    """
    strips = sorted(strips, key=lambda s: s["layer"])
    n = max(len(s["groups"]) for s in strips)
    fig, ax = plt.subplots(figsize=(min(22, 4 + n / 12), 0.9 + 0.75 * len(strips)))
    for i, s in enumerate(strips):
        g = np.asarray(s["groups"])
        colours = group_colours(g)
        y = len(strips) - 1 - i
        ax.imshow(colours[None, :, :3], extent=(0, len(g), y + 0.1, y + 0.75), aspect="auto", interpolation="nearest")
        hyp = s.get("hypothesis") or ""
        ax.text(0, y + 0.02, hyp if len(hyp) < 160 else hyp[:157] + "...", fontsize=6.5, va="top", ha="left",
                color="0.2")
    for start, end in word_spans:
        ax.axvline(start, color="k", lw=0.6, alpha=0.7)
        ax.axvline(end, color="k", lw=0.6, alpha=0.7, ls=":")
    if words and len(words) == len(word_spans):
        for (start, end), w in zip(word_spans, words):
            ax.text((start + end) / 2, len(strips) - 0.15, w, fontsize=7, ha="center", va="bottom", rotation=0)
    ax.set_xlim(0, n)
    ax.set_ylim(-0.25, len(strips) + 0.25)
    ax.set_yticks([len(strips) - 1 - i + 0.42 for i in range(len(strips))])
    ax.set_yticklabels([f"l={s['layer']}" for s in strips])
    ax.set_xlabel("audio token (input frame index)")
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ax.get_yticks())
    right.set_yticklabels([str(int(max(s["groups"]) + 1)) if len(s["groups"]) else "0" for s in strips])
    right.set_ylabel("tokens after compression")
    ax.set_title(title or "Merged token groups")
    fig.tight_layout()
    return save(fig, stem)


def peer_comparison(d: pd.DataFrame, stem: str | Path, title: str = "", vanilla: dict | None = None) -> list[Path]:
    """WER against the retention reached, one curve per operator (K = 90..60% as points), one panel per layer.
    ``d``: the comparison's runs of one context (columns layer, operator, ratio, retention, wer)."""
    layers = sorted(d["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(5.6 * len(layers), 4.2), squeeze=False, sharey=True)
    ops = sorted(d["operator"].unique(), key=lambda o: list(PEER_NAMES).index(o) if o in PEER_NAMES else 99)
    cmap = plt.cm.tab20(np.linspace(0, 1, max(len(ops), 1)))
    markers = "os^vD<>pXh*P"
    for ax, layer in zip(axes[0], layers):
        g = d[d["layer"] == layer]
        for i, op in enumerate(ops):
            s = g[g["operator"] == op].sort_values("ratio")
            if s.empty:
                continue
            ax.plot(_pct(s["retention"]), _pct(s["wer"]), marker=markers[i % len(markers)], color=cmap[i], ms=5,
                    label=PEER_NAMES.get(op, op))
            _band(ax, _pct(s["retention"]), s, "wer", cmap[i])
            _n_labels(ax, _pct(s["retention"]), _pct(s["wer"]), s)
        _vanilla_line(ax, vanilla, "wer")
        ax.invert_xaxis()  # less retention to the right, as compression grows
        ax.set_xlabel("retention (%)")
        ax.set_title(f"layer l={int(layer)}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("WER (%)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "The field at fixed retention")
    fig.tight_layout()
    return save(fig, stem)

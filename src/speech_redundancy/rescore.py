"""Score a finished run again from its ``results.jsonl``, without running the model, and build the paper's
decoding-trajectory tables (Tables 9-10).

A results row::

    {"id": "1089-134686-0000", "task": "asr", "language": "en", "status": "ok",
     "reference": "...", "hypothesis": "...",
     # st: "target_language": "zh" (or task "st_en2zh"); qa: "question", "choices", "answer"
     # failed rows: "status": "failed", "error": "..."
     # trajectories: "layer", "operator", "budget" and/or "threshold", "loop", "language_switch"}

Rows are scored per (task, language, target language) with :func:`speech_redundancy.metrics.score`, the scorer
the run summary and the tables use; the folder is read with :func:`speech_redundancy.results.read_run`, the reader of
``make figures``: one row per id, the last one written (a retried item written again counts once). Failed rows are
counted, not scored. A line that is not UTF-8, not JSON, or lacks a required key is reported as ``file:line: reason``
and skipped (counted). A folder in use (``run.lock`` held) or unfinished (no ``summary.json``) is scored with a
warning line (``warnings`` in the result, ``complete: false``).

Scoring protocols (:mod:`speech_redundancy.protocols`): without one, the run's own (``run.json``'s ``protocol``,
else ``paper``) and the result goes to ``rescored.json``; with ``protocol=NAME`` the same hypotheses are scored under
that harness's rules into ``rescored.<NAME>.json`` and ``rescored.<NAME>.jsonl`` (the rows with only their metrics,
``protocol``/``edits``/``ref_words``, recomputed). The run's own ``results.jsonl`` and ``summary.json`` are never
written.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from speech_redundancy.judge import Judge, OfflineJudge
from speech_redundancy.metrics import group_key, language_switch, protocol_problem, repetition_loop, row_metrics, score
from speech_redundancy.normalize import CHAR_LANGUAGES
from speech_redundancy.protocols import get as get_protocol
from speech_redundancy.results import read_json, read_run, write_json, write_jsonl
from speech_redundancy.stats import Bootstrap


def score_group(task: str, language: str, target: str | None, rows: list[dict[str, Any]], judge: Judge | None = None,
                cache_path: Path | None = None, protocol: str = "paper", bootstrap: Bootstrap | None = None
                ) -> dict[str, Any]:
    """Metrics of one (task, language, target) group of rows (:func:`metrics.score`; QA judged, offline by default)."""
    if task not in ("asr", "st", "qa"):
        raise ValueError(f"cannot score task {task!r}; expected asr, st or qa")
    out: dict[str, Any] = {"task": task, "language": language}
    if task == "st":
        out["target_language"] = target
    out.update(score(rows, protocol, judge=(judge or OfflineJudge()) if task == "qa" else None,
                     judge_cache=cache_path, bootstrap=bootstrap))
    return out


def run_protocol(run_dir: str | Path) -> str:
    """The scoring protocol a run folder was scored under (``run.json``'s ``protocol``; ``paper`` before it had one)."""
    meta, _ = read_json(Path(run_dir) / "run.json")
    return str(meta.get("protocol") or "paper") if meta else "paper"


def rescore(run_dir: str | Path, judge: Judge | None = None, *, cache: bool = True, quiet: bool = False,
            protocol: str | None = None, bootstrap: Bootstrap | None = None) -> dict[str, Any]:
    """Score ``<run_dir>/results.jsonl`` again under the run's own protocol into ``<run_dir>/rescored.json`` or,
    with ``protocol``, under that one into ``rescored.<protocol>.json`` (+ ``.jsonl`` rows); print a table, return
    the dict. An unknown protocol, or one whose tokenizer cannot run here, is one ValueError before any scoring."""
    run_dir = Path(run_dir)
    path = run_dir / "results.jsonl"
    name = get_protocol(protocol).name if protocol is not None else None
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"results file not found: {path}")
    folder = read_run(run_dir)  # the reader of make figures: one row per id, the last one written
    rows, problems = folder.rows, [p for p in folder.problems if not p.startswith(str(run_dir / "run.json"))]
    used = name or (folder.protocol if folder.meta else "paper")
    why = protocol_problem(used, (r for r in rows if r.get("status", "ok") == "ok"))
    if why:
        raise ValueError(why)
    warnings = folder.warnings()
    for p in problems + [f"warning: {w}" for w in warnings]:
        print(p, file=sys.stderr)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    cache_path = run_dir / "judge_cache.jsonl" if cache else None
    scored = {}
    for (task, lang, tgt), grp in sorted(groups.items(), key=lambda kv: str(kv[0])):
        group = f"{task}/{lang}" + (f"2{tgt}" if task == "st" else "")
        scored[group] = score_group(task, lang, tgt, grp, judge=judge, cache_path=cache_path, protocol=used,
                                    bootstrap=bootstrap)
    summary = {"run_dir": str(run_dir), "protocol": used, "n_rows": len(rows), "n_malformed": len(problems),
               "malformed": problems, "warnings": warnings, "complete": not warnings, "groups": scored}
    if name is None:
        write_json(run_dir / "rescored.json", _nan_to_none(summary))
    else:
        write_json(run_dir / f"rescored.{name}.json", _nan_to_none(summary))
        write_jsonl(run_dir / f"rescored.{name}.jsonl",
                    ({**r, **row_metrics(r, name)} if r.get("status", "ok") == "ok" else r for r in rows))
    if not quiet:
        print(format_table(summary))
    return summary


def _nan_to_none(x: Any) -> Any:
    """NaN (a metric with nothing to score) as JSON null: json.dumps would write the invalid token NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def metric_of(g: dict[str, Any]) -> tuple[str, str]:
    """(name, value) of a group's headline number: WER% / CER% / MER% (mixed units), BLEU or Acc%."""
    if g["task"] == "asr":
        name = {"char": "CER%", "mixed": "MER%"}.get(g.get("unit"), "WER%")
        return name, _pct(g.get("wer"))
    if g["task"] == "st":
        return "BLEU", "-" if g.get("bleu") is None else f"{g['bleu']:.2f}"
    return "Acc%", _pct(g.get("accuracy"))


def interval_of(g: dict[str, Any], key: str | None = None) -> str:
    """``[low, high]`` of a group's headline number (or of ``key``), in the unit it is printed in; ``-`` if none."""
    key = key or {"asr": "wer", "st": "bleu"}.get(g["task"], "accuracy")
    ci = g.get(f"{key}_ci")
    if not ci or ci[0] is None or (isinstance(ci[0], float) and math.isnan(ci[0])):
        return "-"
    scale = 1.0 if key == "bleu" else 100.0
    return f"[{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]"


def format_table(summary: dict[str, Any]) -> str:
    """A small text table of a rescore summary (rates in %; BLEU as sacrebleu reports it)."""
    level = next((100 * g["bootstrap"]["level"] for g in summary["groups"].values() if g.get("bootstrap")), 95.0)
    head = (f"{'group':<12} {'n':>6} {'failed':>6} {'metric':<9} {'score':>8} {f'{level:g}% CI':>16} {'cWER':>7} "
            f"{'cWER CI':>16} {'loop%':>6} {'loop CI':>16} {'switch%':>7} {'empty%':>6}")
    lines = [f"protocol {summary.get('protocol', 'paper')}", head, "-" * len(head)]
    for name, g in summary["groups"].items():
        metric, value = metric_of(g)
        asr = g["task"] == "asr"
        cwer = _pct(g.get("cwer")) if asr else "-"
        lines.append(
            f"{name:<12} {g['n']:>6} {g['n_failed']:>6} {metric:<9} {value:>8} {interval_of(g):>16} {cwer:>7} "
            f"{interval_of(g, 'cwer') if asr else '-':>16} {_pct(g.get('loop_rate')):>6} "
            f"{interval_of(g, 'loop_rate'):>16} {_pct(g.get('switch_rate')):>7} {_pct(g.get('empty_rate')):>6}"
        )
    if summary.get("n_malformed"):
        lines.append(f"({summary['n_malformed']} malformed lines skipped)")
    for w in summary.get("warnings") or []:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """The same hypotheses under each protocol: one line per group, one column per protocol (ASR cells say their
    metric, WER / CER / MER, since protocols count different units)."""
    names = list(summaries)
    groups = list(dict.fromkeys(g for s in summaries.values() for g in s["groups"]))
    width = max(13, *(len(n) for n in names))
    lines = [f"{'group':<12} " + " ".join(f"{n:>{width}}" for n in names)]
    for group in groups:
        cells = []
        for n in names:
            g = summaries[n]["groups"].get(group)
            metric, value = metric_of(g) if g else ("", "-")
            cells.append(f"{value} {metric.rstrip('%')}" if g and g["task"] == "asr" else value)
        lines.append(f"{group:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- trajectories


def _truncate(text: str, language: str, max_units: int) -> str:
    if language in CHAR_LANGUAGES:
        return text[:max_units]
    return " ".join(text.split()[:max_units])


def trajectory_table(
    rows: Iterable[dict[str, Any]],
    utt_id: str,
    *,
    max_words: int = 24,
    max_chars: int = 60,
    merge_identical: bool = True,
):
    """Paper Tables 9-10: one row per (operator, budget/threshold, layer) for one utterance.

    A looping hypothesis is cut to ``max_words`` words (``max_chars`` characters for Chinese) and marked
    ``… Looping``; ``loop`` and ``language_switch`` are taken from the rows, or detected when absent. With
    ``merge_identical``, consecutive layers with the same hypothesis share one row ("25 & 30").
    """
    import pandas as pd

    picked = [r for r in rows if str(r.get("id")) == str(utt_id)]
    if not picked:
        raise ValueError(f"no result rows for utterance {utt_id!r}")
    recs = []
    for r in picked:
        hyp = r.get("hypothesis") or ""
        lang = r.get("language", "en")
        switch = r.get("language_switch")
        if switch is None:
            switch = language_switch(hyp, r.get("target_language") or lang)
        out_lang = "zh" if (switch and lang not in CHAR_LANGUAGES) else lang
        loop = r.get("loop")
        if loop is None:
            loop = repetition_loop(hyp, out_lang)
        shown = hyp
        if loop:
            shown = _truncate(hyp, out_lang, max_chars if out_lang in CHAR_LANGUAGES else max_words) + " … Looping"
        recs.append(
            {
                "operator": r.get("operator", "none"),
                "budget": r.get("budget"),
                "threshold": r.get("threshold"),
                "layer": r.get("layer"),
                "hypothesis": shown,
                "loop": bool(loop),
                "language_switch": bool(switch),
            }
        )
    df = pd.DataFrame(recs)
    df = df.sort_values(["operator", "budget", "threshold", "layer"], na_position="first", kind="stable").reset_index(drop=True)
    df["layer"] = df["layer"].map(lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x)))
    if merge_identical and len(df) > 1:
        keep, labels = [], []
        for i, row in df.iterrows():
            prev = keep[-1] if keep else None
            if prev is not None and all(
                _same(df.at[prev, c], row[c]) for c in ("operator", "budget", "threshold", "hypothesis")
            ):
                labels[-1] = f"{labels[-1]} & {row['layer']}"
                continue
            keep.append(i)
            labels.append(row["layer"])
        df = df.loc[keep].copy()
        df["layer"] = labels
        df = df.reset_index(drop=True)
    return df


def _same(a: Any, b: Any) -> bool:
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    return (na and nb) or (not na and not nb and a == b)

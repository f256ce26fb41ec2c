"""Score a finished run again from its ``results.jsonl``, without running the model, and build the paper's
decoding-trajectory tables (Tables 9-10).

A results row::

    {"id": "1089-134686-0000", "task": "asr", "language": "en", "status": "ok",
     "reference": "...", "hypothesis": "...",
     # st: "target_language": "zh" (or task "st_en2zh"); qa: "question", "choices", "answer"
     # failed rows: "status": "failed", "error": "..."
     # trajectories: "layer", "operator", "budget" and/or "threshold", "loop", "language_switch"}

Rows are scored per (task, language, target language). Failed rows are counted, not scored. A line that is not
UTF-8, not JSON, or lacks a required key is reported as ``file:line: reason`` and skipped (counted).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from speech_redundancy.judge import Judge, OfflineJudge, judge_all
from speech_redundancy.metrics import (
    corpus_bleu,
    corpus_wer,
    failure_rates,
    language_switch,
    qa_accuracy,
    repetition_loop,
)
from speech_redundancy.normalize import CHAR_LANGUAGES
from speech_redundancy.prompts import split_task
from speech_redundancy.results import write_json

REQUIRED = ("id", "task", "language", "status")
REQUIRED_OK = ("reference", "hypothesis")


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in REQUIRED if k not in row]
    if row.get("status") == "ok":
        missing += [k for k in REQUIRED_OK if k not in row]
    if missing:
        return f"missing {missing}"
    if row["status"] not in ("ok", "failed"):
        return f"status must be 'ok' or 'failed', not {row['status']!r}"
    if row["status"] == "ok":
        if not isinstance(row["hypothesis"], str):
            return "hypothesis is not a string"
        ref = row["reference"]
        if not (isinstance(ref, str) or (isinstance(ref, list) and all(isinstance(r, str) for r in ref))):
            return "reference is not a string (or list of strings)"
    return None


def read_results(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a results JSONL and one ``file:line: reason`` per skipped line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    rows, problems = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not JSON ({e.msg})")
                continue
            problem = _row_problem(row)
            if problem:
                problems.append(f"{path}:{n}: {problem}")
                continue
            rows.append(row)
    return rows, problems


def _group_key(row: dict[str, Any]) -> tuple[str, str, str | None]:
    base, src, tgt = split_task(str(row["task"]))
    if base == "st":
        tgt = row.get("target_language") or tgt
        if tgt is None:
            tgt = "en" if row["language"] in CHAR_LANGUAGES else "zh"
    return base, src or str(row["language"]), tgt


def score_group(task: str, language: str, target: str | None, rows: list[dict[str, Any]], judge: Judge | None = None, cache_path: Path | None = None) -> dict[str, Any]:
    """Metrics of one (task, language, target) group of rows: WER/cWER, BLEU or accuracy, plus failure rates."""
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {"task": task, "language": language, "n": len(rows), "n_failed": len(rows) - len(ok)}
    hyps = [r["hypothesis"] for r in ok]
    if task == "asr":
        refs = [r["reference"] if isinstance(r["reference"], str) else r["reference"][0] for r in ok]
        out.update({k: v for k, v in corpus_wer(refs, hyps, language=language).items() if k != "n"})
        out.update(failure_rates(hyps, language))
    elif task == "st":
        refs = [r["reference"] if isinstance(r["reference"], str) else r["reference"][0] for r in ok]
        out["target_language"] = target
        out.update({k: v for k, v in corpus_bleu(refs, hyps, target).items() if k != "n"})
        out.update(failure_rates(hyps, target))
    elif task == "qa":
        judge = judge or OfflineJudge()
        verdicts = judge_all(ok, judge, cache_path=cache_path)
        out["judge"] = judge.id
        acc = qa_accuracy(v["verdict"] for v in verdicts)
        out.update(accuracy=acc["accuracy"], correct=acc["correct"], n_judged=acc["n_judged"], n_judge_failed=acc["n_failed"])
        out["judge_errors"] = sorted({v["error"] for v in verdicts if v["error"]})[:5]
        out.update(failure_rates(hyps, language))
    else:
        raise ValueError(f"cannot score task {task!r}; expected asr, st or qa")
    out["n"] = len(rows)
    return out


def rescore(run_dir: str | Path, judge: Judge | None = None, *, cache: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Score ``<run_dir>/results.jsonl`` again, write ``<run_dir>/rescored.json``, print a table, return the dict."""
    run_dir = Path(run_dir)
    rows, problems = read_results(run_dir / "results.jsonl")
    for p in problems:
        print(f"skipped {p}", file=sys.stderr)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    cache_path = run_dir / "judge_cache.jsonl" if cache else None
    scored = {}
    for (task, lang, tgt), grp in sorted(groups.items(), key=lambda kv: str(kv[0])):
        name = f"{task}/{lang}" + (f"2{tgt}" if task == "st" else "")
        scored[name] = score_group(task, lang, tgt, grp, judge=judge, cache_path=cache_path)
    summary = {"run_dir": str(run_dir), "n_rows": len(rows), "n_malformed": len(problems), "malformed": problems, "groups": scored}
    write_json(run_dir / "rescored.json", _nan_to_none(summary))
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


def format_table(summary: dict[str, Any]) -> str:
    """A small text table of a rescore summary (rates in %; BLEU as sacrebleu reports it)."""
    head = f"{'group':<12} {'n':>6} {'failed':>6} {'metric':<9} {'score':>8} {'cWER':>7} {'loop%':>6} {'switch%':>7} {'empty%':>6}"
    lines = [head, "-" * len(head)]
    for name, g in summary["groups"].items():
        if g["task"] == "asr":
            metric, score, cwer = ("CER%" if g.get("unit") == "char" else "WER%"), _pct(g["wer"]), _pct(g["cwer"])
        elif g["task"] == "st":
            metric, score, cwer = "BLEU", f"{g['bleu']:.2f}", "-"
        else:
            metric, score, cwer = "Acc%", _pct(g["accuracy"]), "-"
        lines.append(
            f"{name:<12} {g['n']:>6} {g['n_failed']:>6} {metric:<9} {score:>8} {cwer:>7} "
            f"{_pct(g['loop_rate']):>6} {_pct(g['switch_rate']):>7} {_pct(g['empty_rate']):>6}"
        )
    if summary.get("n_malformed"):
        lines.append(f"({summary['n_malformed']} malformed lines skipped)")
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

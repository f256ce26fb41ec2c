"""One run: config -> data -> model + compression -> generation -> metrics -> results files.

``run(cfg, out_dir)`` is the whole loop; ``main_from_hydra`` is what ``python run.py`` calls. Every utterance's row
is written durably as soon as it is decoded, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from speech_redundancy import compress as ops
from speech_redundancy.audio import AudioError, load_audio
from speech_redundancy.compress import Point
from speech_redundancy.models.base import Request
from speech_redundancy.signal import time_stretch
from speech_redundancy.results import ResultsLog, environment, fingerprint, write_json

# Settings that decide per-item results: a run folder holding results of other settings is never resumed.
RESULT_KEYS = ("model", "data", "task", "intervention", "seed", "max_new_tokens")


class RunError(RuntimeError):
    """A run-level problem reported to the user as one line."""


# ----------------------------------------------------------------------------- config -> points
def build_points(cfg: DictConfig) -> list[Point]:
    """Turn ``cfg.intervention.points`` into :class:`Point` objects, validated on construction (a run's rules: tau in
    [-1, 1]). Each entry carries the shared keys (budget, gaps, ratio, threshold, window, features); only those the
    operator takes are kept, so one preset serves several operators."""
    points = []
    for raw in cfg.intervention.points or []:
        raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
        try:
            points.append(Point.parse(raw))
        except (ValueError, TypeError) as e:
            raise RunError(str(e)) from None
    return points


# ----------------------------------------------------------------------------- model
_LAST_MODEL: dict[str, Any] = {}  # the last model built in this process, reused by the next run with the same config


def load_model(model_cfg: DictConfig):
    """Build the adapter for ``model.family``; a sweep in one process (basic launcher, tests) loads it once."""
    key = OmegaConf.to_yaml(model_cfg, resolve=True)
    if key not in _LAST_MODEL:
        _LAST_MODEL.clear()
        _LAST_MODEL[key] = _build_model(model_cfg)
    return _LAST_MODEL[key]


def _build_model(model_cfg: DictConfig):
    family = model_cfg.family
    if family == "whisper":
        from speech_redundancy.models import whisper as module
    elif family == "qwen2audio":
        from speech_redundancy.models import qwen2audio as module
    elif family == "kimi":
        from speech_redundancy.models import kimi as module
    elif family == "hf_audio_llm":
        from speech_redundancy.models import hf_audio_llm as module
    else:
        raise RunError(f"model.family={family!r} is unknown; allowed: whisper, qwen2audio, hf_audio_llm, kimi")
    return module.load(model_cfg)


# ----------------------------------------------------------------------------- per-item rows
def item_row(utt, out, *, save_groups: bool) -> dict[str, Any]:
    from speech_redundancy import metrics

    row: dict[str, Any] = {
        "id": utt.id,
        "status": "ok",
        "task": utt.task,
        "language": utt.language,
        "reference": utt.text,
        "hypothesis": out.text,
        "duration": utt.duration,
        "tokens_in": out.tokens_in,
        "tokens_out": out.tokens_out,
        "retention": out.tokens_out / out.tokens_in if out.tokens_in else None,
        "tokens_per_point": out.tokens_per_point,
        "seconds": out.stats.get("seconds"),
        "stats": out.stats,
    }
    if utt.task == "asr":
        row["edits"], row["ref_words"] = metrics.utterance_edits(utt.text, out.text, language=utt.language)
    row["loop"] = metrics.repetition_loop(out.text, language=utt.language)
    for key in ("kind", "source", "question", "choices", "answer", "target_language"):
        if key in utt.extra:
            row[key] = utt.extra[key]
    if save_groups:
        row["groups"] = out.groups
    return row


def failed_row(utt, error: str) -> dict[str, Any]:
    return {"id": utt.id, "status": "failed", "error": error, "task": utt.task, "language": utt.language,
            "reference": utt.text, "kind": utt.extra.get("kind")}


# ----------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], load_failures: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Corpus-level numbers from per-item rows: WER, cWER (paper §3.2), retention, failures."""
    from speech_redundancy import metrics

    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [{"id": r["id"], "error": r.get("error")} for r in rows if r.get("status") != "ok"]
    failed += [dict(f) for f in load_failures]
    summary: dict[str, Any] = {"n_utterances": len(ok), "n_failed": len(failed)}
    asr = [r for r in ok if r.get("task") == "asr"]
    if asr:
        agg = metrics.aggregate(asr)
        summary.update(wer=agg["wer"], cwer=agg["cwer"], edits=agg["edits"], ref_words=agg["ref_words"])
        kinds = sorted({r.get("kind") for r in asr if r.get("kind")})
        if len(kinds) > 1:
            summary["by_kind"] = {
                k: {key: v for key, v in metrics.aggregate([r for r in asr if r.get("kind") == k]).items()
                    if key in ("wer", "cwer", "edits", "ref_words", "n")}
                for k in kinds
            }
    st = [r for r in ok if r.get("task") == "st"]
    if st:
        target = st[0].get("target_language") or "en"
        summary["bleu"] = metrics.corpus_bleu([r["reference"] for r in st], [r["hypothesis"] for r in st],
                                              target)["bleu"]
    tokens_in = sum(r["tokens_in"] for r in ok)
    summary["retention"] = sum(r["tokens_out"] for r in ok) / tokens_in if tokens_in else None
    summary["retention_mean"] = sum(r["retention"] for r in ok) / len(ok) if ok else None
    summary["loop_rate"] = sum(bool(r.get("loop")) for r in ok) / len(ok) if ok else None
    summary["seconds"] = sum(r.get("seconds") or 0.0 for r in ok)
    summary["failed"] = failed
    return summary


def format_summary(summary: dict[str, Any], title: str) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [title, f"{'utterances':>12} {'failed':>7} {'WER %':>8} {'cWER %':>8} {'retention %':>12} {'loops %':>8}"]
    lines.append(
        f"{summary['n_utterances']:>12} {summary['n_failed']:>7} {pct(summary.get('wer')):>8} "
        f"{pct(summary.get('cwer')):>8} {pct(summary.get('retention')):>12} {pct(summary.get('loop_rate')):>8}"
    )
    for kind, agg in summary.get("by_kind", {}).items():
        lines.append(f"  {kind:<10} n={agg.get('n', '?'):<4} WER {pct(agg['wer'])}%  cWER {pct(agg['cwer'])}%")
    if "bleu" in summary:
        lines.append(f"  BLEU {summary['bleu']:.2f}")
    for f in summary["failed"][:10]:
        lines.append(f"  failed: {f.get('id') or f.get('file')}: {f.get('error')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run ``cfg`` into ``out_dir`` (resuming what is already there) and return the summary."""
    from speech_redundancy.data.dataset import load_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = build_points(cfg)
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
                for k in RESULT_KEYS}
    fp = fingerprint(settings)
    _check_resume(out_dir, fp, cfg)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    write_json(out_dir / "run.json", {"fingerprint": fp, "settings": settings, **environment()})

    utts, load_failures = load_dataset(cfg.data)
    if not utts and not load_failures:
        raise RunError(f"data={cfg.data.name}: no utterances selected")
    log = ResultsLog(out_dir / "results.jsonl")
    for msg in log.problems:
        print(msg, file=sys.stderr)
    todo = [u for u in utts if not log.done(u.id)]
    if len(todo) < len(utts):
        print(f"resuming {out_dir}: {len(utts) - len(todo)} of {len(utts)} utterances already done")
    on_error = cfg.data.get("on_error", "raise")
    try:
        if todo:
            model = load_model(cfg.model)
            if hasattr(model, "check_points"):
                model.check_points(points)
            _decode(cfg, model, points, todo, log, on_error)
    finally:
        log.close(order=[u.id for u in utts])
    rows = [log.rows[u.id] for u in utts if u.id in log.rows]
    summary = summarize(rows, load_failures)
    summary.update(model=cfg.model.name, data=cfg.data.name, intervention=cfg.intervention.tag,
                   points=[vars(p) for p in points])
    write_json(out_dir / "summary.json", summary)
    print(format_summary(summary, f"{cfg.model.name} | {cfg.data.name} | {cfg.intervention.tag} -> {out_dir}"))
    return summary


def _decode(cfg, model, points, todo, log: ResultsLog, on_error: str) -> None:
    bs = max(1, int(cfg.get("batch_size", 1)))
    prompt = cfg.task.get("prompt") if "task" in cfg else None
    bar = tqdm(total=len(todo), desc=f"{cfg.model.name} {cfg.intervention.tag}", unit="utt", dynamic_ncols=True)
    edits = words = 0
    speedup = cfg.intervention.get("speedup")
    for start in range(0, len(todo), bs):
        batch = todo[start:start + bs]
        requests = []
        for utt in batch:
            try:
                audio = load_audio(utt.audio)
            except AudioError as e:
                if on_error != "skip":
                    raise
                log.append(failed_row(utt, str(e)))
                bar.update(1)
                continue
            if speedup:  # signal-level baseline (paper §5.3): time-stretch the waveform, pitch kept
                audio = time_stretch(audio, 1.0 / float(speedup))
            requests.append(Request(utt=utt, audio=audio, seed=ops.seed_for(int(cfg.seed), utt.id), prompt=prompt))
        if not requests:
            continue
        try:
            outs = model.generate(requests, points, int(cfg.max_new_tokens))
        except ValueError as e:
            if on_error != "skip" or len(requests) > 1:
                raise
            log.append(failed_row(requests[0].utt, str(e)))
            bar.update(1)
            continue
        for req, out in zip(requests, outs):
            if speedup:  # retention counts against the tokens of the original audio
                out.tokens_in = max(1, math.ceil(model.token_rate * req.utt.duration))
            row = item_row(req.utt, out, save_groups=bool(cfg.get("save_groups", False)))
            log.append(row)
            if "edits" in row:
                edits, words = edits + row["edits"], words + row["ref_words"]
                bar.set_postfix(wer=f"{100 * edits / max(words, 1):.1f}%", ret=f"{row['retention']:.2f}")
            bar.update(1)
    bar.close()


def _check_resume(out_dir: Path, fp: str, cfg: DictConfig) -> None:
    import json

    meta = out_dir / "run.json"
    results = out_dir / "results.jsonl"
    if not results.exists() or not meta.exists():
        return
    if not cfg.get("resume", True):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        results.rename(results.with_name(f"results.{stamp}.jsonl"))
        return
    old = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
    if old != fp:
        raise RunError(
            f"{out_dir} holds results of different settings (fingerprint {old} != {fp}); "
            "choose another run_name=... or pass resume=false to start it again"
        )


def main_from_hydra(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point used by ``run.py``: one-line errors instead of tracebacks for bad settings and inputs."""
    from hydra.core.hydra_config import HydraConfig

    import os

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if "TRANSFORMERS_VERBOSITY" not in os.environ:  # Whisper's generate warns on every call; keep the bar readable
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return run(cfg, out_dir)
    except (RunError, AudioError, ValueError, FileNotFoundError, ImportError, OSError) as e:
        if os.environ.get("SR_DEBUG"):
            raise
        print(f"error: {e}  (SR_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)

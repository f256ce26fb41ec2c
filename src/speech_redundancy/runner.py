"""One run: config -> data -> model + compression -> generation -> metrics -> results files.

``run(cfg, out_dir)`` is the whole loop; ``main_from_hydra`` is what ``python run.py`` calls. Every utterance's row
is written durably as soon as it is decoded, so an interrupted run resumes where it stopped.

Order of a run: settings checks (``batch_size``, ``max_new_tokens``, ``seed``, points, the layer range from the model
preset) before anything is written; the folder lock (:class:`~speech_redundancy.results.FolderLock`: a second
process on the same folder is refused); the settings check against the folder's ``run.json`` (only what changes a
row counts, and a refusal names the keys that differ); the data, whose load failures become ``failed`` rows;
checks that need the data (oracle without word alignments); then the model, loaded only when something is left to
decode. A batch that fails is decoded again one item at a time, so only the bad item fails (``data.on_error=skip``)
or is named (otherwise). The summary is :func:`speech_redundancy.metrics.score` over the rows in
``results.jsonl`` under the run's scoring ``protocol`` (top-level key, default ``paper``), which every scored row
and ``run.json`` name; the protocol is not part of the settings fingerprint (it changes no hypothesis), so a run
resumed under another protocol keeps its rows and has their metrics recomputed. The CLI exits 0 on success, 1 when nothing was scored, 2 on an error, 130 on Ctrl-C (one line
saying what was saved and how to resume); a failed run leaves ``failed.json`` (the error, the overrides).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
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
from speech_redundancy.stats import Bootstrap
from speech_redundancy.results import (
    FAILED_NAME,
    FolderBusy,
    FolderLock,
    ResultsLog,
    differences,
    digest,
    environment,
    identity,
    read_rows,
    row_problem,
    write_json,
)

# The settings recorded in run.json; their identity (results.identity: without the selection keys) decides whether a
# folder's rows can be resumed.
RESULT_KEYS = ("model", "data", "task", "intervention", "seed", "max_new_tokens")
MARKER = FAILED_NAME  # left in the run folder by a run that failed: the error and the overrides


class RunError(RuntimeError):
    """A run-level problem reported to the user as one line."""


class FolderInUse(RunError):
    """Another process works in the run folder (no failure marker is written there)."""


# ----------------------------------------------------------------------------- settings
def _integer(cfg: DictConfig, key: str, minimum: int | None, optional: bool = False) -> int | None:
    value = OmegaConf.select(cfg, key, default=None)
    if optional and value is None:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    if not ok:
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise RunError(f"{key}={value!r} is not allowed: use {allowed}")
    return value


def check_settings(cfg: DictConfig) -> None:
    """One line for a run-level number that is not one (``batch_size``, ``max_new_tokens``, ``seed``) or an
    unknown scoring ``protocol``."""
    _integer(cfg, "batch_size", 1)
    _integer(cfg, "max_new_tokens", 1)
    _integer(cfg, "seed", None)
    if "model" in cfg:
        _integer(cfg, "model.batch_size", 1, optional=True)
    if "data" in cfg:
        for key, minimum in (("shard_count", 1), ("shard_index", 0), ("limit", 0), ("sample", 0)):
            _integer(cfg, f"data.{key}", minimum, optional=True)
    protocol_of(cfg)


def batch_size_of(cfg: DictConfig) -> int:
    """The one batch size: the top-level ``batch_size``, or ``model.batch_size`` where only that one was raised."""
    return max(int(cfg.get("batch_size") or 1), int(OmegaConf.select(cfg, "model.batch_size", default=None) or 1))


def protocol_of(cfg: DictConfig) -> str:
    """The run's scoring protocol (``protocol=...``, default ``paper``), checked against the known ones."""
    from speech_redundancy.protocols import NAMES

    name = cfg.get("protocol") or "paper"
    if name not in NAMES:
        raise RunError(f"protocol={name!r} is not allowed: use one of {', '.join(NAMES)}")
    return str(name)


def _static_depth(model_cfg: DictConfig) -> tuple[int, str] | None:
    """(last valid layer, what 0 and the last are) from what is known without loading the weights, or None."""
    family = model_cfg.get("family")
    if family == "whisper":
        from speech_redundancy import weights

        try:
            folder = weights.model_dir(str(model_cfg.checkpoint))
        except Exception:  # an unknown checkpoint: the loader says so
            return None
        if not weights.is_converted(folder):
            return None
        n = int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["encoder_layers"])
        return n, f"0 = encoder input after the conv stem, {n} = encoder output"
    if family in ("qwen2audio", "kimi") and model_cfg.get("n_layers") is not None:  # the loader checks it
        n = int(model_cfg.n_layers)
        return n - 1, "0 = the " + ("fused" if family == "kimi" else "spliced") + " input embeddings"
    return None


def check_layers_before_load(cfg: DictConfig, points: list[Point]) -> None:
    """The layer range, from the model preset's static facts, before the weights load (the adapter's
    ``check_points`` stays the authority once they have)."""
    attn = OmegaConf.select(cfg, "model.attn_implementation", default=None)
    if cfg.model.get("family") != "whisper" and attn not in (None, "eager"):
        for p in points:  # what the adapter refuses once loaded (engine.check_points), said before the weights load
            if p.needs_scores:
                where = "the audio encoder's attention at layer 0" if p.layer == 0 else f"attention at layer {p.layer - 1}"
                raise RunError(f"operator={p.operator} at layer={p.layer} needs {where}, which "
                               f"model.attn_implementation={attn} does not return: set model.attn_implementation=eager")
    if cfg.model.get("family") == "whisper":
        from speech_redundancy.models.whisper import point_problem

        for p in points:
            problem = point_problem(p, cfg.model.name)
            if problem:
                raise RunError(problem)
    depth = _static_depth(cfg.model)
    if depth is None:
        return
    last, what = depth
    scheduled = any(isinstance(raw, DictConfig) and raw.get("schedule") is not None
                    for raw in (cfg.intervention.get("points") or []))
    for p in points:
        if not 0 <= p.layer <= last:
            if scheduled:  # the layer was generated from layer..schedule_stop-1: the key to change is schedule_stop
                raise RunError(f"schedule_stop={max(q.layer for q in points) + 1} is out of range for {cfg.model.name}: the schedule's "
                               f"layers must lie in 0..{last} ({what}); use schedule_stop <= {last + 1}")
            raise RunError(f"layer={p.layer} is out of range for {cfg.model.name}: allowed 0..{last} ({what})")


def check_alignments(points: list[Point], utts: list, on_error: str) -> tuple[list, list[dict]]:
    """Oracle points need word timings: the utterances without them raise (or, with skip, become failures)."""
    if not any(p.needs_spans for p in points):
        return utts, []
    missing = [u for u in utts if not u.words]
    if not missing:
        return utts, []
    if on_error != "skip":
        raise RunError(
            f"{missing[0].id}: the oracle needs word alignments, and {len(missing)} of {len(utts)} selected "
            "utterances have none; align the dataset first (data.align_root=..., docs/datasets.md) or pass "
            "data.on_error=skip"
        )
    failures = [{"id": u.id, "error": f"{u.id}: no word alignments (the oracle needs them)"} for u in missing]
    return [u for u in utts if u.words], failures


# ----------------------------------------------------------------------------- config -> points
def build_points(cfg: DictConfig) -> list[Point]:
    """Turn ``cfg.intervention.points`` into :class:`Point` objects, validated on construction (a run's rules: tau in
    [-1, 1]). Each entry carries the shared keys (budget, gaps, ratio, threshold, window, features); only those the
    operator takes are kept, so one preset serves several operators. An entry with ``schedule: {kind, stop}``
    (FastAdaSP's layer-by-layer merging) expands into one point per layer ``layer``..``stop``-1
    (:func:`speech_redundancy.compress.schedule`)."""
    points = []
    for raw in cfg.intervention.points or []:
        raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
        try:
            plan = raw.pop("schedule", None)
            first = Point.parse(raw)
            if plan is None:
                points.append(first)
                continue
            params = dict(first.params)
            points += ops.schedule(first.operator, first.layer, int(plan.get("stop")), params.pop("ratio"),
                                   str(plan.get("kind", "constant")), params, stage=first.stage)
        except (ValueError, TypeError, KeyError) as e:
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


def torch_threads(model_cfg) -> int | None:
    """CPU threads for torch: ``model.num_threads`` when set, else the CPUs SLURM gave this task
    (``SLURM_CPUS_PER_TASK``: a cluster that does not bind tasks to cores would otherwise let every task use every
    core), else torch's default (None)."""
    import os

    value = model_cfg.get("num_threads") or os.environ.get("SLURM_CPUS_PER_TASK")
    return int(value) if value else None


def _build_model(model_cfg: DictConfig):
    import torch

    threads = torch_threads(model_cfg)
    if threads:
        torch.set_num_threads(threads)
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
def item_row(utt, out, *, save_groups: bool, token_rate: float | None = None, protocol: str = "paper") -> dict[str, Any]:
    """The results row of a decoded item, its metrics under ``protocol``. With ``save_groups``: each point's group
    map and, when the item has word timings, its ``words`` and their ``word_spans`` ([start, end) over the input
    tokens) for the group plots."""
    from speech_redundancy import metrics

    row: dict[str, Any] = {
        "id": utt.id,
        "status": "ok",
        "task": utt.task,
        "language": utt.language,
        "reference": utt.text,
        "hypothesis": out.text,
        "audio": str(utt.audio),
        "audio_digest": audio_digest(utt.audio),
        "duration": utt.duration,
        "tokens_in": out.tokens_in,
        "tokens_out": out.tokens_out,
        "retention": out.tokens_out / out.tokens_in if out.tokens_in else None,
        "tokens_per_point": out.tokens_per_point,
        "seconds": out.stats.get("seconds"),
        "stats": out.stats,
    }
    row["protocol"] = protocol
    if utt.task == "asr":
        row["edits"], row["ref_words"] = metrics.utterance_edits(utt.text, out.text, language=utt.language,
                                                                 protocol=protocol)
    row["loop"] = metrics.repetition_loop(out.text, language=utt.language)
    for key in ("kind", "source", "question", "choices", "answer", "target_language"):
        if key in utt.extra:
            row[key] = utt.extra[key]
    if save_groups:
        row["groups"] = out.groups
        if utt.words and token_rate and out.tokens_in:
            words = sorted(utt.words, key=lambda w: (w.start, w.end))
            spans = ops.spans_from_words([w.start for w in words], [w.end for w in words], token_rate, out.tokens_in)
            row["word_spans"] = spans.tolist()
            if len(spans) == len(words):  # every word kept a token: the labels line up with the spans
                row["words"] = [w.word for w in words]
    return row


def audio_digest(path: str | Path) -> str | None:
    """A cheap digest of an audio file's content: its size and modification time (None when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def stale_reason(row: dict[str, Any] | None, utt) -> str | None:
    """Why a finished row cannot be kept for ``utt`` (None when it can): its reference, audio path or audio digest
    differs from the manifest item's now, or it holds no audio token (decoded without audio)."""
    if row is None:
        return None
    if row.get("tokens_in") == 0:
        return "its row was decoded from no audio token"
    if row.get("reference") != utt.text:
        return "its reference changed in the manifest"
    if "audio" in row and row["audio"] != str(utt.audio):
        return f"its audio path changed ({row['audio']} -> {utt.audio})"
    if row.get("audio_digest") is not None and row["audio_digest"] != audio_digest(utt.audio):
        return "its audio file changed (size or modification time)"
    return None


def failed_row(utt, error: str) -> dict[str, Any]:
    return {"id": utt.id, "status": "failed", "stage": "decode", "error": error, "task": utt.task,
            "language": utt.language, "reference": utt.text, "kind": utt.extra.get("kind")}


def load_failed_row(failure: dict[str, Any], task: str, language: str) -> dict[str, Any]:
    """The row of an item that failed at load time: its id, or ``file[:line]`` when it has none."""
    row = {"id": str(failure.get("id") or failure.get("file")), "status": "failed", "stage": "load",
           "error": failure.get("error"), "task": task, "language": language}
    if failure.get("id") and failure.get("file"):
        row["file"] = failure["file"]
    return row


# ----------------------------------------------------------------------------- summary
def format_summary(summary: dict[str, Any], title: str) -> str:
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    def ci(d, key, scale=100.0):  # the 95 % interval beside its number
        lo, hi = (d.get(f"{key}_ci") or [None, None])[:2]
        return "" if lo is None or math.isnan(lo) else f"[{scale * lo:.2f}, {scale * hi:.2f}]"

    lines = [title, f"{'utterances':>12} {'failed':>7} {'WER %':>8} {'cWER %':>8} {'retention %':>12} {'loops %':>8}"]
    lines.append(
        f"{summary['n_utterances']:>12} {summary['n_failed']:>7} {pct(summary.get('wer')):>8} "
        f"{pct(summary.get('cwer')):>8} {pct(summary.get('retention')):>12} {pct(summary.get('loop_rate')):>8}"
    )
    level = 100 * float((summary.get("bootstrap") or {}).get("level", 0.95))
    parts = [f"{name} {ci(summary, key)}" for name, key in (("WER", "wer"), ("cWER", "cwer"), ("loops", "loop_rate"))
             if ci(summary, key)]
    if parts:
        lines.append(f"  {level:g}% intervals: " + "  ".join(parts))
    for kind, agg in summary.get("by_kind", {}).items():
        lines.append(f"  {kind:<10} n={agg.get('n', '?'):<4} WER {pct(agg['wer'])}% {ci(agg, 'wer')}  "
                     f"cWER {pct(agg['cwer'])}% {ci(agg, 'cwer')}")
    if "bleu" in summary:
        lines.append(f"  BLEU {summary['bleu']:.2f} {ci(summary, 'bleu', 1.0)}")
    for f in summary["failed"][:10]:
        lines.append(f"  failed: {f.get('id') or f.get('file')}: {f.get('error')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run ``cfg`` into ``out_dir`` (resuming what is already there) and return the summary."""
    out_dir = Path(out_dir)
    check_settings(cfg)
    points = build_points(cfg)
    check_layers_before_load(cfg, points)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out_dir).acquire()
    except FolderBusy as e:
        raise FolderInUse(str(e)) from None
    except OSError as e:
        raise RunError(f"{out_dir}: cannot write the run folder ({e.strerror or e})") from None
    try:
        return _run_locked(cfg, out_dir, points)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, out_dir: Path, points: list[Point]) -> dict[str, Any]:
    from speech_redundancy import metrics
    from speech_redundancy.data.dataset import load_dataset

    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
                for k in RESULT_KEYS}
    ident = identity(settings)
    fp = digest(ident)
    protocol = protocol_of(cfg)
    _check_resume(out_dir, ident, fp, cfg)
    for stale in ("summary.json", MARKER):  # written again when this run ends
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    write_json(out_dir / "run.json", {"fingerprint": fp, "identity": ident, "settings": settings, "protocol": protocol,
                                      **environment()})

    on_error = cfg.data.get("on_error", "raise")
    utts, failures = load_dataset(cfg.data)
    utts, unaligned = check_alignments(points, utts, on_error)
    if not utts and not failures and not unaligned:
        raise RunError(f"data={cfg.data.name}: no utterances selected")
    why = metrics.protocol_problem(protocol, ({**u.extra, "task": u.task, "language": u.language} for u in utts))
    if why:
        raise RunError(why)
    task = str(utts[0].task if utts else cfg.task.get("name", "asr"))
    language = str(utts[0].language if utts else cfg.data.get("language") or cfg.task.get("language") or "en")
    selected = {u.id for u in utts}
    load_rows = [load_failed_row(f, task, language) for f in failures + unaligned]
    load_rows = [r for r in load_rows if r["id"] not in selected]  # an item that loaded after all is decoded
    order = [u.id for u in utts] + list(dict.fromkeys(r["id"] for r in load_rows))
    log = ResultsLog(out_dir / "results.jsonl", keep=order, check=row_problem)
    for msg in log.problems:
        print(msg, file=sys.stderr)
    for row in load_rows:
        if not log.done(row["id"]):
            log.append(row)
    for u in utts:  # a row that no longer matches its manifest item, or that should not have been ok, is redone
        why = stale_reason(log.rows.get(u.id), u) if log.done(u.id) else None
        if why:
            print(f"{u.id}: {why}; decoded again", file=sys.stderr)
            log.rows.pop(u.id)
    todo = [u for u in utts if not log.done(u.id)]
    if len(todo) < len(utts):
        print(f"resuming {out_dir}: {len(utts) - len(todo)} of {len(utts)} utterances already done")
    try:
        if todo:
            model = load_model(cfg.model)
            if hasattr(model, "check_points"):
                model.check_points(points)
            _decode(cfg, model, points, todo, log, on_error, protocol)
        for row in log.rows.values():  # rows resumed from a run under another protocol: their metrics again
            if row.get("status") == "ok" and row.get("protocol") != protocol:
                row.update(metrics.row_metrics(row, protocol))
    finally:
        log.close(order=order)
    rows = [log.rows[i] for i in order if i in log.rows]
    summary = metrics.score(rows, protocol, bootstrap=Bootstrap.from_config(cfg.get("bootstrap")))
    summary.update(model=cfg.model.name, data=cfg.data.name, intervention=cfg.intervention.tag,
                   points=[p.as_dict() for p in points])
    write_json(out_dir / "summary.json", summary)
    print(format_summary(summary, f"{cfg.model.name} | {cfg.data.name} | {cfg.intervention.tag} | protocol {protocol} "
                                  f"-> {out_dir}"))
    return summary


def _decode(cfg, model, points, todo, log: ResultsLog, on_error: str, protocol: str = "paper") -> None:
    bs = batch_size_of(cfg)
    prompt = cfg.task.get("prompt") if "task" in cfg else None
    save_groups = bool(cfg.get("save_groups", False))
    speedup = cfg.intervention.get("speedup")
    bar = tqdm(total=len(todo), desc=f"{cfg.model.name} {cfg.intervention.tag}", unit="utt", dynamic_ncols=True)
    edits = words = 0

    if hasattr(model, "batch_size"):  # the adapter batches what the runner hands it: one key decides both
        model.batch_size = bs

    def failed(utt, error: Exception) -> None:
        message = str(error) if str(error).startswith(utt.id) else f"{utt.id}: {error}"
        if on_error != "skip":
            raise RunError(message) from error
        log.append(failed_row(utt, message))
        bar.update(1)

    def done(req, out) -> None:
        nonlocal edits, words
        if speedup:  # retention counts against the tokens of the original audio
            out.tokens_in = max(1, math.ceil(model.token_rate * req.utt.duration))
        row = item_row(req.utt, out, save_groups=save_groups, token_rate=getattr(model, "token_rate", None),
                       protocol=protocol)
        log.append(row)
        if "edits" in row:
            edits, words = edits + row["edits"], words + row["ref_words"]
            ret = row.get("retention")
            bar.set_postfix(wer=f"{100 * edits / max(words, 1):.1f}%", ret="-" if ret is None else f"{ret:.2f}")
        bar.update(1)

    try:
        for start in range(0, len(todo), bs):
            requests = []
            for utt in todo[start:start + bs]:
                try:
                    audio = load_audio(utt.audio)
                except AudioError as e:
                    failed(utt, e)
                    continue
                if speedup:  # signal-level baseline (paper §5.3): time-stretch the waveform, pitch kept
                    audio = time_stretch(audio, 1.0 / float(speedup))
                n_tokens = audio_tokens(model, utt, audio, prompt)
                if n_tokens is not None and n_tokens < 1:  # nothing for the model to hear: never decoded
                    failed(utt, ValueError(f"{len(audio) / 16000 * 1000:.0f} ms of audio gives no audio token on "
                                           f"{model.name}; the item is left out"))
                    continue
                requests.append(Request(utt=utt, audio=audio, seed=ops.seed_for(int(cfg.seed), utt.id), prompt=prompt))
            if not requests:
                continue
            try:
                outs = model.generate(requests, points, int(cfg.max_new_tokens))
            except Exception as e:  # noqa: BLE001 - any failure of a batch: find the bad item, one at a time
                if len(requests) == 1:
                    failed(requests[0].utt, e)
                    continue
                for req in requests:
                    try:
                        (out,) = model.generate([req], points, int(cfg.max_new_tokens))
                    except Exception as e1:  # noqa: BLE001
                        failed(req.utt, e1)
                        continue
                    done(req, out)
                continue
            for req, out in zip(requests, outs):
                done(req, out)
    finally:
        bar.close()


def audio_tokens(model, utt, audio, prompt) -> int | None:
    """The audio tokens ``model`` makes of ``audio`` (its ``audio_tokens``), or None when it cannot say."""
    count = getattr(model, "audio_tokens", None)
    if count is None:
        return None
    try:
        return int(count(Request(utt=utt, audio=audio, prompt=prompt)))
    except Exception:  # noqa: BLE001 - the adapter's own checks will say what is wrong
        return None


def _check_resume(out_dir: Path, ident: dict[str, Any], fp: str, cfg: DictConfig) -> None:
    meta = out_dir / "run.json"
    results = out_dir / "results.jsonl"
    if not results.exists() or not meta.exists():
        return
    if not cfg.get("resume", True):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        results.rename(results.with_name(f"results.{stamp}.jsonl"))
        spare = out_dir / "unselected.jsonl"
        if spare.exists():
            spare.rename(spare.with_name(f"unselected.{stamp}.jsonl"))
        return
    try:
        old_meta = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{meta}: unreadable ({e}); pass resume=false to start the run again") from None
    old = old_meta.get("identity")
    if old is None and isinstance(old_meta.get("settings"), dict):  # folders written before run.json had it
        old = identity(old_meta["settings"])
    if (digest(old) if old is not None else old_meta.get("fingerprint")) != fp:
        diffs = differences(old, ident) if old is not None else ["fingerprint"]
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise RunError(
            f"{out_dir} holds results of different settings ({shown}); "
            "choose another run_name=... or pass resume=false to start it again"
        )


# ----------------------------------------------------------------------------- the command line
def _write_marker(out_dir: Path, error: str, overrides: list[str]) -> None:
    """``failed.json`` in the run folder: the error line and the settings, for ``make figures`` to list."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / MARKER, {"error": error, "overrides": overrides, "host": socket.gethostname(),
                                      "pid": os.getpid(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": " ".join(["python run.py", *map(shlex.quote, sys.argv[1:])])})
    except OSError:  # a read-only folder: the error line is all there is
        pass


def main_from_hydra(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point used by ``run.py``: one-line errors instead of tracebacks for bad settings and inputs, a
    failure marker in the run folder, and exit codes (0 done, 1 nothing scored, 2 error, 130 interrupted). In a
    sweep (``-m``) a failed job raises instead of exiting, so the other jobs still run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    sweep = hc.mode == RunMode.MULTIRUN
    if "TRANSFORMERS_VERBOSITY" not in os.environ:  # Whisper's generate warns on every call; keep the bar readable
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def fail(message: str, code: int, marker: bool = True):
        if marker:
            _write_marker(out_dir, message, overrides)
        hint = "  (SR_DEBUG=1 shows the traceback)" if code == 2 else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        if sweep:
            raise RunError(message)
        sys.exit(code)

    try:
        summary = run(cfg, out_dir)
    except KeyboardInterrupt:
        rows, _ = read_rows(out_dir / "results.jsonl")
        saved = sum(r.get("status") == "ok" for r in rows)
        args = sys.argv[1:] if sweep else [*overrides, f"hydra.run.dir={out_dir}"]
        print(f"interrupted: {saved} utterances saved in {out_dir / 'results.jsonl'}; resume with: "
              + " ".join(["python run.py", *map(shlex.quote, args)]), file=sys.stderr)
        sys.exit(130)
    except (RunError, AudioError, ValueError, FileNotFoundError, ImportError, OSError) as e:
        if os.environ.get("SR_DEBUG"):
            _write_marker(out_dir, str(e), overrides)
            raise
        fail(str(e), 2, marker=not isinstance(e, FolderInUse))
    except Exception as e:  # an unexpected failure: leave the marker, keep the traceback
        _write_marker(out_dir, f"{type(e).__name__}: {e}", overrides)
        raise
    if not summary["n_utterances"]:
        first = summary["failed"][0] if summary["failed"] else {}
        fail(f"no utterance was scored: {summary['n_failed']} failed"
             + (f" (first: {first.get('error')})" if first else ""), 1)
    return summary

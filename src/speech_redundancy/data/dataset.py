"""From the Hydra ``data`` node to the list of utterances a run evaluates.

``load_dataset(cfg)`` loads the named corpus (``conf/data/<name>.yaml``), attaches MFA alignments
(``align_root``), keeps the ``subset``, refuses items whose reference is empty (nothing to score them against:
for ASR, nothing left after the normaliser), then selects: ``sample`` (seeded) -> ``limit`` -> duration ``buckets``
-> SLURM ``shard``. It returns the records and the items that failed to load (only non-empty with
``on_error: skip``; the run writes each as a ``failed`` row).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from speech_redundancy.data import select
from speech_redundancy.data.corpora import (
    load_covost2,
    load_hf,
    load_kespeech,
    load_librispeech,
    load_manifest,
    load_openbookqa,
    load_sdqa,
    load_trivia_qa,
)
from speech_redundancy.data.corpora.common import CorpusError, check_on_error, guarded
from speech_redundancy.data.records import Utterance
from speech_redundancy.data.textgrid import attach_alignments, coverage

log = logging.getLogger(__name__)
MISSING = "???"


def _to_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def _path(c: dict, key: str, layout: str) -> Path:
    value = c.get(key)
    if value in (None, "", MISSING):
        raise ValueError(f"data.{key} is required for data={c['name']}: set data.{key}=<{layout}>")
    return Path(str(value)).expanduser()


def _demo(c: dict, on_error: str, failures: list) -> list[Utterance]:
    manifest = c.get("manifest")
    if manifest in (None, "", MISSING):
        from speech_redundancy.data.demo import build_demo

        manifest = build_demo()
    return load_manifest(manifest, on_error, failures)


def _covost2(c: dict, on_error: str, failures: list) -> list[Utterance]:
    return load_covost2(_path(c, "root", "Common Voice language folder with clips/"), c.get("source_language", "en"),
                        c.get("target_language", "zh-CN"), c.get("split") or "test", c.get("tsv_dir"), on_error, failures)


def _hf(c: dict, on_error: str, failures: list) -> list[Utterance]:
    return load_hf(_path(c, "root", "dataset folder or parquet file"), c.get("split"), c.get("config"),
                   c.get("audio_column", "audio"), c.get("text_column", "text"), c.get("id_column"),
                   c.get("language", "en"), c.get("task", "asr"), c.get("audio_dir"), on_error, failures)


LOADERS: dict[str, Callable[[dict, str, list], list[Utterance]]] = {
    "demo": _demo,
    "librispeech": lambda c, e, f: load_librispeech(_path(c, "root", "LibriSpeech folder"), c.get("split") or "test-clean", e, f),
    "kespeech": lambda c, e, f: load_kespeech(_path(c, "root", "KeSpeech folder"), c.get("split") or "test", e, f),
    "covost2": _covost2,
    "sdqa": lambda c, e, f: load_sdqa(_path(c, "root", "voicebench folder"), c.get("split") or "usa", c.get("audio_dir"), e, f),
    "openbookqa": lambda c, e, f: load_openbookqa(_path(c, "root", "voicebench folder"), c.get("split") or "test", c.get("audio_dir"), e, f),
    "trivia_qa": lambda c, e, f: load_trivia_qa(_path(c, "root", "speech-triavia-qa folder"), c.get("split") or "test", c.get("audio_dir"), e, f),
    "hf": _hf,
    "manifest": lambda c, e, f: load_manifest(_path(c, "manifest", "manifest.jsonl"), e, f),
}


def _check_reference(u: Utterance) -> Utterance:
    from speech_redundancy.normalize import normalize, normalizer_id, tokenize

    if not str(u.text).strip():
        raise CorpusError(f"{u.id}: empty reference text {u.text!r}; an item without a reference cannot be scored")
    if u.task == "asr" and not tokenize(normalize(u.text, u.language), u.language):
        raise CorpusError(f"{u.id}: empty reference: nothing of {u.text!r} is left after the "
                          f"{normalizer_id(u.language)} normaliser, so the item cannot be scored")
    return u


def with_references(utts: list[Utterance], on_error: str, failures: list[dict] | None) -> list[Utterance]:
    """The utterances that have a reference to score against (the others raise, or are recorded with skip)."""
    kept = [guarded(_check_reference, u, key={"id": u.id}, on_error=on_error, failures=failures) for u in utts]
    return [u for u in kept if u is not None]


def _unique_ids(utts: list[Utterance], name: str) -> None:
    dupes = [uid for uid, n in Counter(u.id for u in utts).items() if n > 1]
    if dupes:
        raise ValueError(f"data={name}: {len(dupes)} duplicate utterance ids (e.g. {dupes[:3]}); ids must be unique")


def _subset(utts: list[Utterance], subset: str | None, name: str) -> list[Utterance]:
    """Keep one kind of utterance: ``extra["kind"] == subset`` ("real", "synthetic"), or ``"read"``: real speech
    read from a text or prompt (the demo set's LibriVox and pocketsphinx clips; not the conversational call)."""
    if subset in (None, "", "all"):
        return utts
    if subset == "read":
        kept = [u for u in utts if u.extra.get("kind") == "real" and u.extra.get("style") in ("read", "command")]
    else:
        kept = [u for u in utts if u.extra.get("kind") == subset]
    if not kept:
        kinds = sorted({str(u.extra.get("kind")) for u in utts})
        raise ValueError(f"data={name}: no utterance in subset {subset!r} (kinds present: {kinds}; or 'read')")
    return kept


def select_utterances(utts: list[Utterance], c: dict) -> list[Utterance]:
    """``sample`` -> ``limit`` -> ``buckets`` -> ``shard``, as configured in the data node ``c``."""
    seed = int(c.get("seed") or 0)
    if c.get("sample") is not None:
        utts = select.sample(utts, int(c["sample"]), seed)
    utts = select.limit(utts, None if c.get("limit") is None else int(c["limit"]))
    buckets = c.get("buckets")
    if buckets:
        groups = select.duration_buckets(utts, buckets.get("edges", (0, 20, 40, 60)), buckets.get("n_per_bucket", 100), seed)
        for label, group in groups.items():
            log.info("bucket %s s: %d utterances", label, len(group))
        utts = [u for group in groups.values() for u in group]
    return select.shard(utts, int(c.get("shard_index") or 0), int(c.get("shard_count") or 1))


def load_dataset(cfg: Any) -> tuple[list[Utterance], list[dict]]:
    """Records selected by the Hydra ``data`` node (DictConfig or dict), and ``[{"id" or "file", "error"}]`` skipped."""
    c = _to_dict(cfg)
    name = c.get("name")
    if name not in LOADERS:
        raise ValueError(f"unknown data.name {name!r}; allowed: {', '.join(LOADERS)}")
    on_error = check_on_error(c.get("on_error") or "raise")
    failures: list[dict] = []
    utts = LOADERS[name](c, on_error, failures)
    if c.get("align_root") not in (None, "", MISSING):
        utts = attach_alignments(utts, Path(str(c["align_root"])).expanduser(), on_error, failures)
        log.info("data=%s: word alignments for %.1f%% of %d utterances", name, 100 * coverage(utts), len(utts))
    if utts:
        _unique_ids(utts, name)
        utts = with_references(_subset(utts, c.get("subset"), name), on_error, failures)
    if failures:
        log.warning("data=%s: %d problem(s) skipped (items left out, or alignments not attached); first: %s", name, len(failures), failures[0])
    if not utts:
        first = f"; first: {failures[0].get('id') or failures[0].get('file')}: {failures[0]['error']}" if failures else ""
        raise ValueError(f"data={name}: no utterances loaded ({len(failures)} failed{first})")
    return select_utterances(utts, c), failures

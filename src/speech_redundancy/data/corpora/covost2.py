"""CoVoST 2 (Wang et al., 2020) speech translation over Common Voice (version 4) clips.

Layout: a Common Voice language folder ``<root>`` (e.g. ``cv-corpus-4-2019-12-10/en``) with ``clips/*.mp3``, and the
CoVoST split TSV ``covost_v2.<src>_<tgt>.<split>.tsv`` (columns ``path``, ``sentence``, ``translation``,
``client_id``; tab-separated, no quoting) in ``tsv_dir``, ``<root>`` or its parent. The released un-split
``covost_v2.<src>_<tgt>.tsv`` with a ``split`` column is read too. MP3 is decoded by libsndfile (>= 1.1, bundled
with soundfile 0.14); a pre-converted ``clips/<stem>.wav`` or ``.flac`` is used when the mp3 is absent.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from speech_redundancy.audio import AudioError
from speech_redundancy.data.corpora.common import (
    CorpusError,
    check_on_error,
    guarded,
    iso_language,
    missing_root,
    probe_duration,
    read_text,
)
from speech_redundancy.data.records import Utterance

REQUIRED = ("path", "translation")
AUDIO_SUFFIXES = (".mp3", ".wav", ".flac")


def tsv_name(source_language: str, target_language: str, split: str | None = None) -> str:
    """``covost_v2.en_zh-CN.test.tsv`` (or the un-split name when ``split`` is None)."""
    return f"covost_v2.{source_language}_{target_language}" + (f".{split}" if split else "") + ".tsv"


def find_tsv(root: Path, source_language: str, target_language: str, split: str, tsv_dir: str | Path | None) -> tuple[Path, bool]:
    """``(tsv path, needs filtering by its split column)``."""
    places = [Path(tsv_dir)] if tsv_dir else [root, root.parent]
    for place in places:
        if (place / tsv_name(source_language, target_language, split)).is_file():
            return place / tsv_name(source_language, target_language, split), False
    for place in places:
        if (place / tsv_name(source_language, target_language)).is_file():
            return place / tsv_name(source_language, target_language), True
    raise missing_root(places[0], "CoVoST 2 TSV", f"{tsv_name(source_language, target_language, split)} in {[str(p) for p in places]}")


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a CoVoST / Common Voice TSV (header line, tabs, no quoting)."""
    rows = list(csv.DictReader(io.StringIO(read_text(path, what="TSV"), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0].keys() if rows else []
    missing = [c for c in REQUIRED if c not in header]
    if rows and missing:
        raise CorpusError(f"{path}: missing columns {missing}; expected path, sentence, translation, client_id")
    return rows


def find_clip(root: Path, name: str) -> Path:
    """The audio file for a TSV ``path`` entry: ``clips/<name>``, or the same stem as wav/flac."""
    stem = Path(name).stem
    tried = []
    for folder in (root / "clips", root):
        for candidate in [folder / name] + [folder / (stem + s) for s in AUDIO_SUFFIXES]:
            if candidate.is_file():
                return candidate
        tried.append(str(folder / name))
    raise AudioError(f"{tried[0]}: audio file not found (also tried .wav/.flac and {tried[1]})")


def _utterance(row: dict, root: Path, tsv: Path, source_language: str, target_language: str) -> Utterance:
    if not row.get("path") or row.get("translation") is None:
        raise CorpusError(f"{tsv}: row without path or translation: {dict(row)}")
    audio = find_clip(root, row["path"])
    return Utterance(
        id=Path(row["path"]).stem,
        audio=str(audio),
        text=row["translation"],
        duration=probe_duration(audio),
        language=iso_language(source_language),
        task="st",
        extra={
            "transcript": row.get("sentence") or "",
            "translation": row["translation"],
            "target_language": iso_language(target_language),
            "speaker": row.get("client_id") or "",
            "source": f"covost2/{source_language}_{target_language}",
        },
    )


def load_covost2(
    root: str | Path,
    source_language: str = "en",
    target_language: str = "zh-CN",
    split: str = "test",
    tsv_dir: str | Path | None = None,
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> list[Utterance]:
    """The ``split`` rows of one CoVoST 2 direction; ``text`` is the reference translation, task ``st``."""
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise missing_root(root, "Common Voice language folder", "<root>/clips/*.mp3 + covost_v2.<src>_<tgt>.<split>.tsv")
    tsv, filter_split = find_tsv(root, source_language, target_language, split, tsv_dir)
    rows = read_tsv(tsv)
    if filter_split:
        rows = [r for r in rows if r.get("split") == split]
    utts = []
    for i, row in enumerate(rows, 2):
        u = guarded(_utterance, row, root, tsv, source_language, target_language,
                    key={"id": Path(row.get("path") or f"line{i}").stem}, on_error=on_error, failures=failures)
        if u is not None:
            utts.append(u)
    return utts

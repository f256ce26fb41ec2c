"""LibriSpeech (Panayotov et al., 2015), as unpacked from openslr.org/12.

Layout: ``<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with one
``<speaker>-<chapter>.trans.txt`` per chapter (lines ``<utt-id> <UPPER CASE TRANSCRIPT>``). ``root`` may be the
folder holding the split folders, its ``LibriSpeech/`` parent, or the split folder itself.
"""

from __future__ import annotations

from pathlib import Path

from speech_redundancy.data.corpora.common import (
    CorpusError,
    check_on_error,
    guarded,
    missing_root,
    probe_duration,
    read_text,
)
from speech_redundancy.data.records import Utterance

SPLITS = ("test-clean", "test-other", "dev-clean", "dev-other", "train-clean-100", "train-clean-360", "train-other-500")
LAYOUT = "<root>/<split>/<speaker>/<chapter>/*.flac + <speaker>-<chapter>.trans.txt (root may also be the split folder)"


def find_split(root: str | Path, split: str) -> Path:
    """The folder whose children are speaker folders for ``split``."""
    root = Path(root)
    for cand in (root / split, root / "LibriSpeech" / split):
        if cand.is_dir():
            return cand
    if root.name in SPLITS and root.name != split:
        raise FileNotFoundError(f"{root}: this is the LibriSpeech {root.name} folder, but split={split}")
    if root.is_dir() and (root.name == split or next(root.glob("*/*/*.trans.txt"), None) is not None):
        return root
    raise missing_root(root if not root.is_dir() else root / split, f"LibriSpeech {split}", LAYOUT)


def read_transcripts(path: Path) -> dict[str, str]:
    """``{utt_id: transcript}`` from a ``<speaker>-<chapter>.trans.txt``."""
    out = {}
    for i, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise CorpusError(f"{path}:{i}: expected '<utt-id> <transcript>', got {line.strip()[:60]!r}")
        out[parts[0]] = parts[1]
    return out


def _utterance(uid: str, audio: Path, text: str | None, trans: Path, split: str) -> Utterance:
    if text is None:
        raise CorpusError(f"{audio}: no line for {uid} in {trans}")
    speaker, chapter = uid.split("-")[:2]
    return Utterance(
        id=uid,
        audio=str(audio),
        text=text,
        duration=probe_duration(audio),
        language="en",
        task="asr",
        extra={"speaker": speaker, "chapter": chapter, "source": f"librispeech/{split}"},
    )


def transcript_path(chapter: Path) -> Path:
    return chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt"


def _chapter(chapter: Path, split: str, on_error: str, failures: list[dict] | None) -> list[Utterance]:
    trans = transcript_path(chapter)
    if not trans.is_file():
        raise CorpusError(f"{trans}: transcript file not found for the audio in {chapter}")
    texts = read_transcripts(trans)
    ids = sorted(set(texts) | {p.stem for p in chapter.glob("*.flac")})
    utts = []
    for uid in ids:
        u = guarded(_utterance, uid, chapter / f"{uid}.flac", texts.get(uid), trans, split,
                    key={"id": uid}, on_error=on_error, failures=failures)
        if u is not None:
            utts.append(u)
    return utts


def load_librispeech(
    root: str | Path,
    split: str = "test-clean",
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> list[Utterance]:
    """Every utterance of ``split`` in id order (MFA word timings: ``data.align_root``, attached by
    :func:`speech_redundancy.data.dataset.load_dataset` for every corpus)."""
    check_on_error(on_error)
    split_dir = find_split(root, split)
    utts = []
    for chapter in sorted(p for p in split_dir.glob("*/*") if p.is_dir()):
        part = guarded(_chapter, chapter, split, on_error, failures,
                       key={"file": str(transcript_path(chapter))}, on_error=on_error, failures=failures)
        utts += part or []
    if not utts and not failures:
        raise missing_root(split_dir, f"LibriSpeech {split}", LAYOUT)
    return utts

"""Hugging Face audio datasets kept on disk, read with pyarrow (the ``datasets`` package is not needed).

Accepted layouts for ``root``:

- a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such folder per split);
- a Hub snapshot or any folder of parquet files (``<split>-*.parquet``, ``<config>/<split>-*.parquet``,
  ``data/<split>-*.parquet``); ``config`` picks a sub-folder (VoiceBench: ``sd-qa``, ``openbookqa``);
- a single ``.parquet`` or ``.arrow`` file.

The audio column is a struct ``{bytes, path}`` (the ``Audio`` feature's storage) or ``{array, sampling_rate}``;
a plain string is taken as a file path. Embedded clips are written once to
``<cache_dir()>/hf/<dataset-hash>/<id><ext>`` (original bytes kept; arrays as float WAV) so that the runner
can read them with ``load_audio`` like any other file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import soundfile as sf

from speech_redundancy.audio import AudioError
from speech_redundancy.data.corpora.common import (
    CorpusError,
    check_on_error,
    guarded,
    missing_root,
    probe_duration,
)
from speech_redundancy.data.records import Utterance
from speech_redundancy.paths import cache_dir

LAYOUT = "a save_to_disk folder (state.json + *.arrow), a folder of <split>-*.parquet files, or one .parquet/.arrow file"
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}
BATCH_ROWS = 32


# ---------------------------------------------------------------- finding the table files


def find_tables(root: str | Path, split: str | None = None, config: str | None = None) -> list[Path]:
    """The Arrow or parquet files that hold ``split`` (all files when ``split`` is None), in order."""
    root = Path(root)
    if config and (root / config).is_dir():
        root = root / config
    if root.is_file() and root.suffix in (".parquet", ".arrow"):
        return [root]
    if not root.is_dir():
        raise missing_root(root, "Hugging Face dataset", LAYOUT)
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise CorpusError(f"{root / 'dataset_dict.json'}: no split {split!r}; available: {splits}")
        return find_tables(root / split)
    if (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        return [root / f["filename"] for f in state.get("_data_files", [])] or sorted(root.glob("*.arrow"))
    files = sorted(root.rglob("*.parquet")) or sorted(root.rglob("*.arrow"))
    if not files:
        raise missing_root(root, "Hugging Face dataset", LAYOUT)
    if split is None:
        return files
    chosen = [f for f in files if _in_split(f.relative_to(root), split)]
    if not chosen:
        names = sorted({_split_of(f.relative_to(root)) for f in files})
        raise CorpusError(f"{root}: no files for split {split!r}; splits found: {names}")
    return chosen


def _split_of(rel: Path) -> str:
    return re.split(r"[-.]", rel.name, maxsplit=1)[0]


def _in_split(rel: Path, split: str) -> bool:
    return _split_of(rel) == split or split in rel.parts[:-1]


def dataset_key(files: list[Path]) -> str:
    """A short hash naming the dataset's cache folder: changes when a table file changes."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- reading rows


def iter_rows(files: list[Path]) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``(file, row index in file, row)`` for every row, a few rows in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            if f.suffix == ".parquet":
                batches = pq.ParquetFile(str(f)).iter_batches(batch_size=BATCH_ROWS)
            else:
                batches = _arrow_batches(pa, f)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f, i, row
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{f}: cannot read table ({e})") from None


def _arrow_batches(pa, f: Path):
    try:  # save_to_disk writes the IPC stream format; accept the file format too
        return iter(pa.ipc.open_stream(pa.memory_map(str(f))))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(f)))
        return (reader.get_batch(k) for k in range(reader.num_record_batches))


def column_names(files: list[Path]) -> list[str]:
    """Column names of the first table file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = files[0]
    try:
        if f.suffix == ".parquet":
            return list(pq.read_schema(str(f)).names)
        return list(next(iter(_arrow_batches(pa, f))).schema.names)
    except (pa.ArrowException, OSError, StopIteration) as e:
        raise CorpusError(f"{f}: cannot read table ({e})") from None


# ---------------------------------------------------------------- audio cells -> files


def sniff_suffix(data: bytes) -> str:
    """File suffix from an audio file's first bytes."""
    if data[:4] == b"RIFF":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:4] == b"OggS":
        return ".ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return ".mp3"
    return ".bin"


def safe_name(uid: str) -> str:
    """A file name for an id; odd characters replaced, plus a short hash of the id when any were."""
    name = re.sub(r"[^\w.\-]+", "_", uid).strip("._")
    return name if name == uid else f"{name}-{hashlib.sha1(uid.encode()).hexdigest()[:8]}"


def audio_to_file(cell: Any, out_dir: Path, uid: str, base: Path) -> Path:
    """The file holding an audio cell's audio, writing it to ``out_dir`` once when it is embedded."""
    if isinstance(cell, str):
        cell = {"path": cell}
    if not isinstance(cell, dict):
        raise AudioError(f"audio cell of {uid}: expected a struct {{bytes, path}} or {{array, sampling_rate}}, got {type(cell).__name__}")
    if cell.get("bytes"):
        data = cell["bytes"]
        suffix = Path(cell.get("path") or "").suffix.lower()
        suffix = suffix if suffix in AUDIO_SUFFIXES else sniff_suffix(data)
        dest = out_dir / (safe_name(uid) + suffix)
        if not (dest.is_file() and dest.stat().st_size == len(data)):
            _atomic_write(dest, lambda tmp: tmp.write_bytes(data))
        return dest
    if cell.get("array") is not None:
        wav = np.asarray(cell["array"], dtype=np.float32)
        sr = int(cell.get("sampling_rate") or 0)
        if wav.size == 0 or sr <= 0:
            raise AudioError(f"audio cell of {uid}: empty array or no sampling_rate")
        if wav.ndim == 2 and wav.shape[0] < wav.shape[1]:  # (channels, samples) -> (samples, channels)
            wav = wav.T
        dest = out_dir / (safe_name(uid) + ".wav")
        if not dest.is_file():
            _atomic_write(dest, lambda tmp: sf.write(str(tmp), wav, sr, subtype="FLOAT", format="WAV"))
        return dest
    if cell.get("path"):
        p = Path(cell["path"])
        for candidate in (p, base / p):
            if candidate.is_file():
                return candidate
        raise AudioError(f"{p}: audio file not found (the audio cell of {uid} has no bytes, only this path)")
    raise AudioError(f"audio cell of {uid}: no bytes, array or path")


def _atomic_write(dest: Path, write: Callable[[Path], Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # shards extracting the same clips never share it
    try:
        write(tmp)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- loaders


def iter_hf(
    root: str | Path,
    split: str | None = None,
    config: str | None = None,
    audio_column: str = "audio",
    id_column: str | None = None,
    id_prefix: str = "",
    audio_dir: str | Path | None = None,
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> Iterator[tuple[str, Path, float, dict[str, Any]]]:
    """``(id, audio file, duration, other columns)`` per row; rows with bad audio raise or are recorded and skipped."""
    check_on_error(on_error)
    files = find_tables(root, split, config)
    columns = column_names(files)
    for name, col in (("audio_column", audio_column), ("id_column", id_column)):
        if col is not None and col not in columns:
            raise CorpusError(f"{files[0]}: no column {col!r} ({name}); columns: {columns}")
    out_dir = Path(audio_dir) if audio_dir else cache_dir() / "hf" / dataset_key(files)
    n = 0
    for f, i, row in iter_rows(files):
        uid = str(row[id_column]) if id_column else f"{id_prefix}{n:06d}"
        n += 1
        cell = row.pop(audio_column)
        result = guarded(_clip, cell, out_dir, uid, f, i, key={"id": uid}, on_error=on_error, failures=failures)
        if result is not None:
            yield uid, result[0], result[1], row


def _clip(cell: Any, out_dir: Path, uid: str, table: Path, row: int) -> tuple[Path, float]:
    try:
        path = audio_to_file(cell, out_dir, uid, table.parent)
        return path, probe_duration(path)
    except AudioError as e:
        raise AudioError(f"{e} [row {row} of {table}]") from None


def _scalar_columns(row: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in skip and isinstance(v, (str, int, float, bool, list))}


def load_hf(
    root: str | Path,
    split: str | None = None,
    config: str | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    id_column: str | None = None,
    language: str = "en",
    task: str = "asr",
    audio_dir: str | Path | None = None,
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> list[Utterance]:
    """Any HF audio dataset on disk, with configurable column names; other plain columns go to ``extra``."""
    files = find_tables(root, split, config)
    if text_column not in column_names(files):
        raise CorpusError(f"{files[0]}: no column {text_column!r} (text_column); columns: {column_names(files)}")
    prefix = f"{split}-" if split else ""
    utts = []
    for uid, audio, duration, row in iter_hf(root, split, config, audio_column, id_column, prefix, audio_dir, on_error, failures):
        extra = _scalar_columns(row, {text_column, id_column})
        extra["source"] = f"hf/{Path(root).name}" + (f"/{split}" if split else "")
        utts.append(Utterance(uid, str(audio), str(row[text_column]), duration, language, task, extra=extra))
    return utts

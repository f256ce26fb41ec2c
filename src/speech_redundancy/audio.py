"""Audio input: any file soundfile reads (any rate, channels, 8/16/24-bit or float) -> 16 kHz mono float32.

A file that is missing, a directory, empty, unreadable, or shorter than its own header says (a WAV cut off while
it was copied: libsndfile reads the frames that are there and notes ``data : N (should be M)`` in its log) raises
:class:`AudioError` naming the file and the reason, at load time (:func:`check_header`, from the header alone) and
when decoded (:func:`load_audio`). soundfile and soxr are imported when a file is read, so that the model code,
which only needs :data:`SAMPLE_RATE`, imports without them (the GPU check, ``scripts/device_check.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_STREAMED = 0x7FFFFFFF  # streaming writers put 0x7FFFFFFF / 0xFFFFFFFF in the size field: length unknown, not cut


class AudioError(ValueError):
    """A missing, unreadable, corrupt or empty audio file; the message names the file."""


def check_path(path: Path) -> None:
    """:class:`AudioError` unless ``path`` is a file."""
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO, a socket: never opened (a read could block)
        from speech_redundancy.results import file_kind

        raise AudioError(f"{path}: is {file_kind(path)}, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")


def check_header(path: Path, extra_info: str) -> None:
    """:class:`AudioError` when libsndfile's header log says the audio data is shorter than announced."""
    m = _DATA_SIZE.search(extra_info or "")
    if m:
        said, has = int(m[1]), int(m[2])
        if has < said < _STREAMED:
            raise AudioError(f"{path}: truncated: the header announces {said} bytes of audio data, the file holds {has}")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` as mono float32 at ``sample_rate`` (channels averaged, resampled with soxr)."""
    import soundfile as sf
    import soxr

    path = Path(path)
    check_path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            extra, sr = f.extra_info, f.samplerate
            wav = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError... on bad files
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    check_header(path, extra)
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio file is empty")
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate).astype(np.float32)
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    return np.ascontiguousarray(wav, dtype=np.float32)

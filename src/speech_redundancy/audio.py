"""Audio input: any file soundfile reads (any rate, channels, 8/16/24-bit or float) -> 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A missing, unreadable, corrupt or empty audio file; the message names the file."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` as mono float32 at ``sample_rate`` (channels averaged, resampled with soxr)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError... on bad files
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio file is empty")
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate).astype(np.float32)
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    return np.ascontiguousarray(wav, dtype=np.float32)

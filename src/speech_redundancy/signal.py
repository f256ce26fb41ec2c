"""Signal-level baselines on the waveform (numpy only).

``time_stretch`` is the paper's "Signal-level Speedup" baseline (§5.3): the audio is played ``rate`` times
faster with its pitch kept, before the model sees it; a retention budget K maps to rate = 1 / K.
Implemented as WSOLA (waveform-similarity overlap-add): Hann-windowed frames are read every
``rate * hop`` samples and written every ``hop`` samples, each read shifted within +-``tolerance`` to the
offset that best continues the previously written frame, so periods line up and the pitch is unchanged.
"""

from __future__ import annotations

import math

import numpy as np


def _best_offset(region: np.ndarray, template: np.ndarray) -> int:
    """Offset into ``region`` where ``template`` correlates best (normalised cross-correlation)."""
    corr = np.correlate(region, template, mode="valid")
    energy = np.convolve(region * region, np.ones(template.size), mode="valid")
    return int(np.argmax(corr / np.sqrt(energy + 1e-12)))


def time_stretch(
    wav: np.ndarray,
    rate: float,
    sample_rate: int = 16000,
    *,
    frame_s: float = 0.032,
    tolerance_s: float = 0.010,
) -> np.ndarray:
    """Speed ``wav`` (1-D) up by ``rate`` (> 1 faster, < 1 slower) keeping its pitch (WSOLA).

    Returns float32 audio of round(len(wav) / rate) samples. Frames of ``frame_s`` overlap by half; each
    analysis frame may move by up to ``tolerance_s`` to match the natural continuation of the previous one.
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"wav must be 1-D (mono), got shape {wav.shape}")
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")
    if not np.isfinite(wav).all():
        raise ValueError("wav contains NaN or inf")
    x = wav.astype(np.float64)
    n_out = int(round(x.size / rate))
    if n_out == 0 or x.size == 0:
        return np.zeros(n_out, dtype=np.float32)
    frame = max(4, 2 * int(round(frame_s * sample_rate / 2)))
    hop = frame // 2
    tol = max(0, int(round(tolerance_s * sample_rate)))
    window = np.sin(np.pi * (np.arange(frame) + 0.5) / frame) ** 2  # periodic Hann: halves overlap-add to 1
    n_frames = n_out // hop + 2
    pad = tol + frame
    src = np.concatenate([np.zeros(pad), x, np.zeros(pad + int(math.ceil(n_frames * hop * rate)) + frame)])
    out = np.zeros(n_frames * hop + frame)
    norm = np.zeros_like(out)
    prev = pad  # where the previous frame was read (in src); set before frame 1 reads it
    for k in range(n_frames):
        nominal = pad + int(round(k * hop * rate))
        if k == 0:
            start = nominal
        else:
            template = src[prev + hop : prev + hop + frame]  # natural continuation of the last frame
            lo = nominal - tol
            start = lo + _best_offset(src[lo : nominal + tol + frame], template)
        out[k * hop : k * hop + frame] += window * src[start : start + frame]
        norm[k * hop : k * hop + frame] += window
        prev = start
    # frames were written from output sample 0 while reading from src offset `pad` (= input sample 0)
    y = out[:n_out] / np.maximum(norm[:n_out], 1e-3)
    return y.astype(np.float32)

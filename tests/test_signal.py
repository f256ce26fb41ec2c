"""time_stretch: the paper's signal-level speedup baseline keeps pitch and shortens time."""

from __future__ import annotations

import numpy as np
import pytest

from speech_redundancy.signal import time_stretch

SR = 16000


def dominant_hz(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.fft.rfftfreq(y.size, 1 / SR)[spec.argmax()])


def tone(hz: float, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR).astype(np.float32)


@pytest.mark.parametrize("rate", [1 / 0.6, 1 / 0.9, 1.0, 0.8, 2.0])
def test_length_and_pitch(rate):
    wav = tone(220, 1.5)
    y = time_stretch(wav, rate, SR)
    assert y.dtype == np.float32 and y.size == round(wav.size / rate)
    assert abs(dominant_hz(y) - 220) < 3  # plain resampling would move it to 220 * rate
    assert 0.5 < np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(wav**2)) < 1.5


def test_time_is_compressed():
    wav = np.concatenate([tone(220, 1.0), tone(660, 1.0)])
    y = time_stretch(wav, 2.0, SR)  # the switch moves from 1.0 s to 0.5 s
    assert abs(dominant_hz(y[: int(0.4 * SR)]) - 220) < 5
    assert abs(dominant_hz(y[int(0.6 * SR) :]) - 660) < 5


def test_rate_one_is_near_identity():
    wav = tone(220, 0.5) * np.hanning(SR // 2).astype(np.float32)
    y = time_stretch(wav, 1.0, SR)
    assert np.max(np.abs(y - wav)) < 1e-4


def test_bad_input():
    assert time_stretch(np.zeros(0, np.float32), 1.5).size == 0
    with pytest.raises(ValueError, match="rate must be a positive"):
        time_stretch(tone(220, 0.1), 0)
    with pytest.raises(ValueError, match="1-D"):
        time_stretch(np.zeros((2, 100)), 1.5)
    bad = tone(220, 0.1)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        time_stretch(bad, 1.5)

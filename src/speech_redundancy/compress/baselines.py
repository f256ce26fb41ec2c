"""Signal-processing baselines of the paper (§5.3) that act on the token sequence: linear interpolation to K."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.compress.core import Compressed, acc_dtype, check_finite, check_ratio, check_x, empty, n_kept


def interpolate(x: Tensor, ratio: float) -> Compressed:
    """Linear interpolation of the token sequence to T' = n_kept(ratio, T) tokens.

    Output i samples source position p_i = (i + 1/2) T / T' - 1/2 (half-pixel centres, as
    ``F.interpolate(mode="linear", align_corners=False)``). groups: each input token goes to the output with
    the nearest p_i (ties to the earlier); positions: floor(p_i + 1/2), the rounded source position.
    """
    check_x(x)
    check_finite(x)
    ratio = check_ratio(ratio)
    T = x.shape[0]
    if T == 0:
        return empty(x)
    n_out = n_kept(ratio, T)
    p = np.clip((np.arange(n_out) + 0.5) * (T / n_out) - 0.5, 0, T - 1)
    lo = np.floor(p).astype(np.int64)
    hi = np.minimum(lo + 1, T - 1)
    device = x.device
    acc = acc_dtype(x.dtype)
    frac = torch.from_numpy(p - lo).to(device=device, dtype=acc).unsqueeze(1)
    a = x.index_select(0, torch.from_numpy(lo).to(device)).to(acc)
    b = x.index_select(0, torch.from_numpy(hi).to(device)).to(acc)
    tokens = a.lerp_(b, frac).to(x.dtype)
    t = np.arange(T, dtype=np.float64)
    right = np.clip(np.searchsorted(p, t, side="left"), 0, n_out - 1)
    left = np.clip(right - 1, 0, n_out - 1)
    groups = np.where(np.abs(t - p[left]) <= np.abs(p[right] - t), left, right)
    positions = np.clip(np.floor(p + 0.5), 0, T - 1).astype(np.int64)
    return Compressed(tokens, torch.from_numpy(groups).to(device), torch.from_numpy(positions).to(device))

"""Compression operators: pure tensor functions (no model, no config, no I/O).

CONTRACT (shared by every model adapter; being implemented):

Every operator maps audio tokens ``x`` of shape [T, d] to a :class:`Compressed`:
``tokens`` [T', d], ``groups`` [T] (output index of each input token, -1 where the token was dropped) and
``positions`` [T'] (the input position that represents each output token: the first member of its group).
``compress(x, operator, **params)`` dispatches by name; ``affinity_groups(x, threshold, window)`` is
Algorithm 1 of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Compressed:
    tokens: Tensor  # [T', d] (batched: [B, T', d], padded)
    groups: Tensor  # [T] long: output index per input token, -1 = dropped (batched: [B, T], -1 also at padding)
    positions: Tensor  # [T'] long: representative (first) input position per output token (batched: [B, T'], -1 at padding)
    mask: Tensor | None = None  # batched only: [B, T'] bool, True at real output tokens

    @property
    def n_out(self) -> int:
        return int(self.tokens.shape[-2])

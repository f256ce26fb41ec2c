"""What the runner asks of a model adapter: a batch of :class:`Request` in, one :class:`Output` each out.

Compression points (:class:`speech_redundancy.compress.Point`) apply one operator to the audio span of the hidden
states entering layer ``layer``; each adapter says which layers its model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from speech_redundancy.compress import Point, Record
from speech_redundancy.data.records import Utterance


@dataclass
class Request:
    utt: Utterance
    audio: np.ndarray  # 16 kHz mono float32
    seed: int = 0  # per-utterance seed, derived from the run seed and the utterance id
    prompt: str | None = None  # task prompt (LSLMs); None = the model's default for the task


@dataclass
class Output:
    text: str  # decoded hypothesis, special tokens removed
    tokens_in: int  # audio tokens before any compression (Whisper: the utterance's frames)
    tokens_out: int  # audio tokens after the last compression point (retention = tokens_out / tokens_in)
    tokens_per_point: list[int] = field(default_factory=list)  # audio tokens after each point, in order
    groups: list[list[int]] | None = None  # per point: output index per input token (for group plots)
    stats: dict[str, Any] = field(default_factory=dict)  # seconds, flops, ttft, memory, kv bytes, ...

    @classmethod
    def from_record(cls, text: str, record: Record, stats: dict[str, Any]) -> "Output":
        """The output of one sample whose compression the step recorded in ``record``."""
        return cls(text=text, tokens_in=record.tokens_in, tokens_out=record.tokens_out,
                   tokens_per_point=list(record.tokens_per_point), groups=[list(g) for g in record.groups],
                   stats={"compress_seconds": record.seconds, **stats})


class SpeechModel(Protocol):
    name: str
    token_rate: float  # audio tokens per second where compression applies
    n_layers: int  # depth of the stack that compression points index (adapters say which layers are valid)

    def check_points(self, points: list[Point]) -> None: ...

    def generate(self, requests: list[Request], points: list[Point], max_new_tokens: int) -> list[Output]: ...

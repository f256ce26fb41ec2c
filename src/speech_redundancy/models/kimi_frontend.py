"""Kimi-Audio's audio front end: 16 kHz audio -> the discrete code ids and the continuous features of its audio
slots. Changes nothing; runs the checkpoint's stock ``WhisperEncoder`` and the VQ adaptor, and the GLM-4-Voice
speech tokenizer (``glm4_speech_tokenizer``).

Both paths cut the audio into 30 s segments (kimia_infer ``whisper_Lv3/whisper.py`` and the GLM tokenizer) and give
token_len = (L - 1) // 1280 + 1 tokens for a segment of L samples (12.5 per second), so the two streams line up:

- continuous: each segment padded to 30 s, 128 log-mel frames x 3000 (``WhisperFeatureExtractor`` from
  ``whisper-large-v3/preprocessor_config.json``), the Whisper-large-v3 encoder -> 1500 frames x 1280, the first
  4 x token_len frames kept, every 4 consecutive frames stacked into one 5120-dim vector, then the VQ adaptor
  (Linear 5120 -> 3584, SiLU, Linear, LayerNorm eps 1e-6) -> one LLM-width vector per audio token;
- discrete: the speech tokenizer's codes, as ids ``kimia_token_offset + code``.

``audio_inputs`` chooses what enters the LLM: ``both`` (the model as trained), ``continuous`` (ablation: codes
replaced by ``text_blank``, so the slots carry only the Whisper features; the speech tokenizer is not needed) or
``discrete`` (ablation: no Whisper features; the slots carry E[code] alone, as kimia_infer's forward does when no
feature is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from speech_redundancy.models.glm4_speech_tokenizer import SAMPLE_RATE, SAMPLES_PER_CODE, segments

AUDIO_INPUTS = ("both", "continuous", "discrete")
FRAMES_PER_TOKEN = 4  # Whisper frames (50/s) stacked into one audio token (12.5/s)
WINDOW_BATCH = 8  # 30 s windows per Whisper forward


def segment_tokens(n_samples: int) -> int:
    """Audio tokens of one segment of ``n_samples`` (at most 30 s)."""
    return (int(n_samples) - 1) // SAMPLES_PER_CODE + 1


@dataclass
class AudioTokens:
    """One utterance through the front end: ``codes`` (ids for the audio stream) and ``features`` (stacked Whisper
    frames, [N, 4 x d_whisper], or None)."""

    codes: list[int]
    features: Tensor | None


class ContinuousFrontEnd:
    """Whisper-large-v3 encoder over 30 s windows, 4-frame stacking, then the VQ adaptor (``embed``)."""

    def __init__(self, encoder, extractor, adaptor):
        self.encoder = encoder
        self.extractor = extractor
        self.adaptor = adaptor

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @torch.inference_mode()
    def features(self, audios: list[np.ndarray]) -> list[Tensor]:
        """Per utterance, the stacked Whisper frames of its audio tokens, [N_i, 4 x d_whisper]."""
        windows, owner = [], []
        for i, audio in enumerate(audios):
            for seg in segments(np.asarray(audio, dtype=np.float32)):
                windows.append(seg)
                owner.append(i)
        device = self.encoder.conv1.weight.device
        per_sample: list[list[Tensor]] = [[] for _ in audios]
        for start in range(0, len(windows), WINDOW_BATCH):
            chunk = windows[start:start + WINDOW_BATCH]
            mel = self.extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
            hidden = self.encoder(mel.to(device, self.dtype)).last_hidden_state
            for j, seg in enumerate(chunk):
                n = segment_tokens(len(seg))
                frames = hidden[j, :FRAMES_PER_TOKEN * n]
                per_sample[owner[start + j]].append(frames.reshape(n, FRAMES_PER_TOKEN * frames.shape[-1]))
        return [torch.cat(parts) if parts else hidden.new_zeros(0, 0) for parts in per_sample]

    @torch.inference_mode()
    def embed(self, features: Tensor) -> Tensor:
        """The VQ adaptor: [N, 4 x d_whisper] -> [N, d_llm]."""
        return self.adaptor(features.to(self.adaptor[0].weight.dtype))


class FrontEnd:
    """What ``audio_inputs`` asks for, from the loaded parts (``speech`` None when the ablation does not need it)."""

    def __init__(self, continuous: ContinuousFrontEnd, speech, *, token_offset: int, text_blank: int,
                 audio_inputs: str = "both"):
        if audio_inputs not in AUDIO_INPUTS:
            raise ValueError(f"model.audio_inputs={audio_inputs!r}; allowed: {', '.join(AUDIO_INPUTS)}")
        if audio_inputs != "continuous" and speech is None:
            raise ValueError(f"model.audio_inputs={audio_inputs} needs the speech tokenizer")
        self.continuous = continuous
        self.speech = speech
        self.token_offset = token_offset
        self.text_blank = text_blank
        self.audio_inputs = audio_inputs

    def __call__(self, audios: list[np.ndarray]) -> list[AudioTokens]:
        n = [sum(segment_tokens(len(s)) for s in segments(np.asarray(a))) for a in audios]
        if self.audio_inputs == "continuous":
            codes = [[self.text_blank] * k for k in n]
        else:
            codes = [[self.token_offset + c for c in self.speech.tokenize(a)] for a in audios]
        feats = self.continuous.features(audios) if self.audio_inputs != "discrete" else [None] * len(audios)
        out = []
        for k, c, f in zip(n, codes, feats):
            if len(c) != k or (f is not None and f.shape[0] != k):
                raise RuntimeError(f"front end: {len(c)} codes and {None if f is None else f.shape[0]} feature "
                                   f"rows for {k} audio tokens")
            out.append(AudioTokens(codes=c, features=f))
        return out

"""Kimi-Audio's text tokenizer (tiktoken, from the checkpoint's ``tiktoken.model``) and its two-stream prompt
layout. Changes nothing; builds token-id lists.

Kimi-Audio reads two id streams of equal length, summed in the embedding: an audio stream (role tokens, media
markers, audio code ids) and a text stream (instruction text; ``text_blank`` wherever the audio stream speaks). A
user turn with a text instruction p1..pk followed by audio with N tokens s1..sN, then the assistant's turn, is
(kimia_infer ``prompt_manager.py``, the messages built by Kimi-Audio-Evalkit ``almeval/models/kimi_audio.py``)::

    audio: user_start  blank x k   media_begin s1..sN media_end  speech_ct  msg_end  assistant_start
    text:  blank       p1..pk      blank x (N + 2)               blank      blank    blank

with the continuous (Whisper) features placed at s1..sN only. An empty instruction (spoken QA) gives k = 0. The
audio ids s_i are ``kimia_token_offset + code``; in the continuous-only ablation they are ``text_blank``.

The tokenizer: the base ranks from ``tiktoken.model`` and the special ids named in ``tokenizer_config.json``'s
``added_tokens_decoder``, pre-tokenised with Qwen2's pattern (Kimi-Audio keeps Qwen2.5's 151643 base tokens; the
pattern is the one vLLM's Kimi-Audio tokenizer uses). Instructions are encoded as plain text (special-token strings
in them are not special). Decoding is the official one (kimia_infer ``KimiAudio.generate``): ids below
``kimia_token_offset`` are kept, so a generated special token stays in the text as its literal ``<|...|>`` string (the
scoring protocols remove them, ``kimi_evalkit`` with the Evalkit's ``remove_sp``); audio ids are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
           r"""|\s+(?!\S)|\s+""")

SPECIAL_NAMES = {  # field -> token name in tokenizer_config.json
    "msg_end": "<|im_msg_end|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "text_blank": "<|im_kimia_text_blank|>",
    "text_eos": "<|im_kimia_text_eos|>",
    "user_start": "<|im_kimia_user_msg_start|>",
    "assistant_start": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>",
    "speech_ctd": "<|im_kimia_speech_ctd_id|>",
}


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids of the prompt layout and of decoding."""

    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_start: int
    assistant_start: int
    speech_ct: int
    speech_ctd: int


class TextTokenizer:
    """tiktoken over the checkpoint's ``tiktoken.model`` with the special ids of ``tokenizer_config.json``."""

    def __init__(self, folder: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        folder = Path(folder)
        ranks = load_tiktoken_bpe(str(folder / "tiktoken.model"))
        decoder = json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder") or {}
        specials = {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict) and v.get("content")}
        missing = [n for n in SPECIAL_NAMES.values() if n not in specials]
        if missing:
            raise ValueError(f"{folder}/tokenizer_config.json names no {', '.join(missing)} in added_tokens_decoder "
                             "(not Kimi-Audio's tokenizer)")
        self.n_base = len(ranks)
        clash = [n for n, i in specials.items() if i < self.n_base]
        if clash:
            raise ValueError(f"{folder}: special tokens {clash[:3]} have ids inside the {self.n_base} base tokens")
        self.encoding = tiktoken.Encoding(name=f"kimi-audio:{folder}", pat_str=PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.ids = SpecialIds(**{f: specials[n] for f, n in SPECIAL_NAMES.items()})
        self.special_ids = frozenset(specials.values())

    pad_token_id = -1  # fills decoded rows after text_eos (no token has it; decode drops it)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` as the official decoding gives it: base tokens and the named special tokens (as their
        ``<|...|>`` strings); audio ids and ids no token has (the row padding) are dropped."""
        return self.encoding.decode([i for i in ids if 0 <= i < self.n_base or i in self.special_ids])

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` per row (a [B, n] tensor or lists), as transformers tokenizers name it; special tokens are
        always kept, as the official decoding keeps them (``skip_special_tokens`` is ignored)."""
        return [self.decode([int(i) for i in row]) for row in rows]


@dataclass
class Prompt:
    """One sample's prefill streams; ``audio_slots`` marks s1..sN (where continuous features go)."""

    audio_ids: list[int]
    text_ids: list[int]
    audio_slots: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.audio_ids)

    @property
    def n_audio(self) -> int:
        return sum(self.audio_slots)


def layout(ids: SpecialIds, instruction_ids: list[int], audio_ids: list[int]) -> Prompt:
    """The two streams of a user turn (instruction, then audio) and the assistant's start (module docstring)."""
    k, n, b = len(instruction_ids), len(audio_ids), ids.text_blank
    audio = [ids.user_start] + [b] * k + [ids.media_begin] + list(audio_ids) + [ids.media_end, ids.speech_ct,
                                                                                 ids.msg_end, ids.assistant_start]
    text = [b] + list(instruction_ids) + [b] * (n + 2) + [b, b, b]
    slots = [False] * (k + 2) + [True] * n + [False] * 4
    return Prompt(audio_ids=audio, text_ids=text, audio_slots=slots)


def prompt_length(n_instruction: int, n_audio: int) -> int:
    """Prefill length of :func:`layout`."""
    return n_instruction + n_audio + 6

"""Task prompts per model family, as the peers published them.

For the speech LLMs a prompt is the text that follows the audio in the user turn (the adapter places the audio:
``<|audio_bos|><|AUDIO|><|audio_eos|>`` for Qwen2-Audio); an empty string means an audio-only turn. For Whisper
a "prompt" is the generate keywords that choose language and task.

Sources (facts, not code):
- Qwen2-Audio-7B (base, family ``qwen2_audio``; the text after ``<|audio_bos|><|AUDIO|><|audio_eos|>``, no chat
  template). ASR: ``Detect the language and recognize the speech: <|en|>`` (``<|zh|>`` for Mandarin), the prompt
  of Qwen2-Audio's evaluation files (eval_audio/EVALUATION.md), as Kimi-Audio-Evalkit's almeval/models/qwen_audio.py
  restates it. Speech translation: lmms-eval tasks/covost2/_default_template_{en_zh,zh_en}_yaml, ``qwen2_audio``
  pre_prompt (``Translate the speech into Chinese and only output the translation: <|en|>``). Spoken QA: the cue
  `` Your answer to the question is:`` (Kimi-Audio-Evalkit, qwen_audio.py, Audio-QA; leading space included).
- Qwen2-Audio-7B-Instruct (family ``qwen2_audio_instruct``; the text after the ``Audio 1:`` item of the chat
  template's user turn). ASR: lmms-eval tasks/librispeech/_default_yaml_template, ``qwen2_audio`` post_prompt on
  utils.librispeech_doc_to_text (``Please recognize the speech and only output the recognized content: <|en|>``);
  translation as the base model (lmms-eval covost2); spoken QA: the audio alone (Kimi-Audio-Evalkit
  Qwen2AudioChat and VoiceBench both send an audio-only user turn).
- Kimi-Audio (family ``kimi_audio``; the text instruction before the audio in the user turn), as
  Kimi-Audio-Evalkit's data/download_benchmark.py writes its questions: ASR in English ``Please transcribe the
  spoken content into written text.`` (LibriSpeech), in Chinese ``请把这段语音转录成文本。`` (AISHELL, WenetSpeech);
  spoken QA: no instruction (VoiceBench, the question is in the audio). Kimi-Audio has no published translation
  prompt: we use lmms-eval's default covost2 pre_prompt. (The Kimi-Audio README demo uses ``请将音频内容转换为文字。``.)
- ``default`` (other audio LLMs in transformers, e.g. Voxtral): lmms-eval's model-agnostic prompts, ASR
  ``Please recognize the speech and only output the recognized content:`` (tasks/librispeech, gigaspeech) and
  the covost2 default pre_prompt for translation; QA: audio alone.
"""

from __future__ import annotations

from typing import Any

from speech_redundancy.data.records import TASKS, split_task  # noqa: F401 (the one parser of the task field)

LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}

_FAMILY_ALIASES = {
    "qwen2-audio": "qwen2_audio",
    "qwen2audio": "qwen2_audio",
    "qwen2-audio-instruct": "qwen2_audio_instruct",
    "kimi-audio": "kimi_audio",
    "kimia": "kimi_audio",
    "kimi": "kimi_audio",
    "hf_audio_llm": "default",
}

_TEMPLATES: dict[tuple[str, str], str] = {
    ("qwen2_audio", "asr"): "Detect the language and recognize the speech: <|{source}|>",
    ("qwen2_audio", "st"): "Translate the speech into {target_name} and only output the translation: <|{source}|>",
    ("qwen2_audio", "qa"): " Your answer to the question is:",
    ("qwen2_audio_instruct", "asr"): "Please recognize the speech and only output the recognized content: <|{source}|>",
    ("qwen2_audio_instruct", "st"): "Translate the speech into {target_name} and only output the translation: <|{source}|>",
    ("qwen2_audio_instruct", "qa"): "",
    ("kimi_audio", "asr"): "Please transcribe the spoken content into written text.",
    ("kimi_audio", "st"): "Translate the speech into {target_name} and only output the translation:",
    ("kimi_audio", "qa"): "",
    ("default", "asr"): "Please recognize the speech and only output the recognized content:",
    ("default", "st"): "Translate the speech into {target_name} and only output the translation:",
    ("default", "qa"): "",
}


# (family, task, source language) -> template, where a family's prompt depends on the language spoken
_LANGUAGE_TEMPLATES: dict[tuple[str, str, str], str] = {
    ("kimi_audio", "asr", "zh"): "请把这段语音转录成文本。",
}


def _whisper_kwargs(task: str, source: str, target: str | None) -> dict[str, Any]:
    if task == "asr":
        return {"language": source, "task": "transcribe"}
    if task == "st":
        if target != "en":
            raise ValueError(f"Whisper translates only into English, not into {target!r}")
        return {"language": source, "task": "translate"}
    raise ValueError("Whisper has no spoken-QA mode")


def get_prompt(
    model_family: str,
    task: str,
    source_lang: str | None = None,
    target_lang: str | None = None,
    override: str | dict | None = None,
) -> str | dict[str, Any]:
    """The task prompt for a model family (``dict`` of generate keywords for Whisper); ``override`` wins."""
    family = _FAMILY_ALIASES.get(model_family.lower(), model_family.lower())
    base, src, tgt = split_task(task)
    source = source_lang or src or "en"
    target = target_lang or tgt
    if base not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if base == "st" and target is None:
        raise ValueError("speech translation needs a target language")
    if override is not None:
        if family == "whisper" and not isinstance(override, dict):
            raise TypeError("a Whisper prompt override must be a dict of generate keywords")
        return override
    if family == "whisper":
        return _whisper_kwargs(base, source, target)
    if (family, base) not in _TEMPLATES:
        known = sorted({f for f, _ in _TEMPLATES} | {"whisper"})
        raise ValueError(f"no prompt for model family {model_family!r}; known: {known}")
    target_name = LANGUAGE_NAMES.get(target or "", target or "")
    template = _LANGUAGE_TEMPLATES.get((family, base, source), _TEMPLATES[(family, base)])
    return template.format(source=source, target=target, target_name=target_name)

"""Generic adapter for stock transformers audio LLMs that splice audio features into ``<audio>`` placeholders and run a
decoder stack at ``model.model.language_model`` (Voxtral, GLM-ASR, Audio Flamingo 3, Qwen3-ASR, Fun-ASR-Nano, ...):
hooks the ``*ForConditionalGeneration`` forward, its ``language_model`` (masks, positions) and each decoder layer;
nothing else changes. The engine (``speech_redundancy.engine``) does the work.

Verified here (tiny random configs, tests/test_engine.py): ``VoxtralForConditionalGeneration`` (Llama stack),
``GlmAsrForConditionalGeneration`` (Llama stack) and ``AudioFlamingo3ForConditionalGeneration`` (Qwen2 stack) give
bit-identical logits and tokens to the stock model with no compression and run with compression, fed with
``input_ids`` + ``input_features`` built directly. Not verified: the processors' chat templates used by
:meth:`HFAudioLLM.generate` (their tokenizer files need the hub), and real weights.

Audio tokens per second (``token_rate`` in the config): Voxtral and GLM-ASR 12.5 (Whisper frames stacked by 4),
Audio Flamingo 3 25 (pooled by 2, as Qwen2-Audio).
"""

from __future__ import annotations

import torch

from speech_redundancy.audio import SAMPLE_RATE
from speech_redundancy.models import lslm
from speech_redundancy.models.base import Request
from speech_redundancy.models.lslm import LSLMAdapter, stock_reach, task_prompt, weights_missing


class HFAudioLLM(LSLMAdapter):
    """A stock transformers audio LLM with compression points in its LLM (``models.base.SpeechModel``). Its
    processors pad or cut audio to one 30 s window, so longer clips are refused."""

    family = "hf_audio_llm"

    def __init__(self, model, processor, *, name: str, token_rate: float, **options):
        super().__init__(model, processor, stock_reach(model, name), name=name, token_rate=token_rate, **options)

    def inputs(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Chat-template inputs (audio then the task prompt in one user turn), left-padded, on the model's device."""
        conversations = []
        for r in requests:
            prompt = r.prompt if r.prompt is not None else task_prompt(self.prompt_family, r)
            content = [{"type": "audio", "audio": r.audio}]
            if prompt:
                content.append({"type": "text", "text": prompt})
            conversations.append([{"role": "user", "content": content}])
        batch = self.processor.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                   add_generation_prompt=True, return_tensors="pt", padding=True,
                                                   sampling_rate=SAMPLE_RATE)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        if "input_features" in batch:
            batch["input_features"] = batch["input_features"].to(self.model.dtype)
        return batch


def load(cfg) -> HFAudioLLM:
    """Build the adapter from a ``conf/model/*.yaml`` node with ``family: hf_audio_llm`` (local files only)."""
    from transformers import AutoProcessor

    get = cfg.get
    path = str(get("path"))
    dtype = getattr(torch, get("dtype", "bfloat16"))
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = _model_class(path).from_pretrained(path, local_files_only=True, dtype=dtype,
                                                   attn_implementation=get("attn_implementation", "sdpa"))
    except OSError:
        raise weights_missing(get("name", path), path, get("hub_id", path)) from None
    return HFAudioLLM(model.to(lslm.device(get("device", "auto"))), processor, name=get("name", path),
                      token_rate=float(get("token_rate")), prompt_family=get("prompt_family", "default"),
                      **lslm.options(cfg))


def _model_class(path: str):
    """The ``*ForConditionalGeneration`` class named by the checkpoint's config."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    for n in names:
        if hasattr(transformers, n):
            return getattr(transformers, n)
    raise ValueError(f"{path}: config names no transformers class ({names})")

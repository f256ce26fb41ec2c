"""Kimi-Audio adapter (skeleton): would hook MoonshotAI's ``kimia_infer`` model (``MoonshotKimiaForCausalLM``, remote
code) — its decoder layers' inputs during prefill — and change nothing else. NOT IMPLEMENTED: nothing here was run.

Why a skeleton. Kimi-Audio is not in transformers; its code is the ``kimia_infer`` package from MoonshotAI's GitHub
repository (not on PyPI, and GitHub and the Hugging Face hub are unreachable from this project's machines), so it
could be neither installed nor checked. What is known (paper §3.1 and the Kimi-Audio report): a Qwen2.5-7B backbone
with 28 layers; audio at 12.5 tokens/s as discrete semantic tokens whose embeddings are summed with continuous
Whisper-large-v3 features at the same positions; ``KimiAudio.generate`` runs its own decoding loop (text and audio
heads), not ``transformers.GenerationMixin.generate``.

What a working adapter needs, following ``speech_redundancy.engine``:
1. a :class:`speech_redundancy.engine.Reach` whose ``top`` is the module the loop calls per step, ``stack`` the
   Qwen2-style model with ``.layers`` (28) and its rotary embedding, ``audio_token_id`` replaced by the mask of
   audio positions (``Session(audio_mask=...)``: Kimi marks audio by token-id ranges, not one placeholder id);
2. masks: kimia_infer's modeling code predates transformers' ``create_causal_mask`` and builds 4-D masks itself,
   and its loop keeps its own KV cache; the per-layer decode masks the engine rebuilds (layers >= l hold the
   shorter sequence) must be rebuilt with that code's mask helper and cache type instead;
3. the MIMO audio-output branch reads hidden states of a middle layer: compressing before that layer shortens its
   input too (fine for text output, which is what the paper evaluates).
"""

from __future__ import annotations

TOKEN_RATE = 12.5
N_LAYERS = 28


def load(cfg):
    """Refuse with a clear message: Kimi-Audio support is a documented skeleton (see the module docstring)."""
    try:
        import kimia_infer  # noqa: F401
    except ImportError:
        raise ImportError(
            "Kimi-Audio needs MoonshotAI's kimia_infer package (github.com/MoonshotAI/Kimi-Audio, not on PyPI) and "
            "its weights (moonshotai/Kimi-Audio-7B-Instruct); neither is installed here, and this adapter is an "
            "unverified skeleton: see src/speech_redundancy/models/kimi.py"
        ) from None
    raise NotImplementedError(
        "kimia_infer is importable, but the Kimi-Audio adapter is a skeleton: its own decoding loop, masks and KV "
        "cache need the engine's decode-time re-masking ported (src/speech_redundancy/models/kimi.py lists the steps)"
    )

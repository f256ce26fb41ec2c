"""Whisper adapter: compression inside the audio encoder of the stock ``WhisperForConditionalGeneration``.

Hooks (removed after every utterance):
- layer l < n_layers: a forward pre-hook on ``model.model.encoder.layers[l]`` replaces that layer's input;
- layer l = n_layers: a forward hook on the encoder's final ``layer_norm`` replaces the output the decoder reads.
Layer 0 is the input of the first encoder layer (after the conv stem and the sinusoidal positions); layer
n_layers is the encoder output (after the final layer norm), the faithful stand-in for an LLM's input point l = 0
(Qwen2-Audio's l = 0 is the projector applied to the audio encoder's output).

Operators scored by attention (``scores``) get, per utterance frame, the attention it received at encoder layer
l-1 (mean over heads and over the utterance's frames as queries): this needs ``model.attn_implementation=eager``
and l >= 1. Whisper has no text prompt, so operators that need one (``query``: cdpruner, speechprune) are refused.

Sequence length and Whisper's decoder. The encoder always sees a 30 s window (1500 frames at 50/s). Only the
utterance's frames, the first ceil(50 x duration), are compressed; with ``padding="keep"`` (default) the padding
frames stay after them, because cutting the sequence to the utterance breaks Whisper's decoder even without any
merging (shared/FACTS.md §2: WER above 400%). ``padding="drop"`` cuts them, to reproduce that failure.
Retention is counted over the utterance's frames.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from speech_redundancy.audio import SAMPLE_RATE
from speech_redundancy.compress import Features, Point, SpanState, compress_step, spans_from_words
from speech_redundancy.models.base import Output, Request

FRAMES_PER_SECOND = 50  # Whisper encoder frames per second (conv stem stride 2 over 100 mel frames/s)
PADDING_MODES = ("keep", "drop")



def point_problem(p: Point, name: str) -> str | None:
    """What Whisper's encoder cannot take from a point, whatever its weights (the runner says it before they load)."""
    if p.after_attention:
        return f"stage=after_attention: {name}'s points act at the input of encoder layer l (stage=input) only"
    if p.needs_scores and p.params.get("scores") == "last_query":
        return (f"scores=last_query: {name}'s encoder has no prompt token; its scores are the attention each frame "
                "receives (mean over queries and heads): scores=received")
    if p.needs_query:
        return (f"operator={p.operator} needs a text prompt (the query it ranks tokens against); {name} has none: "
                "use it with a speech LLM (e.g. model=qwen2audio)")
    return None

class WhisperModel:
    """A Whisper checkpoint with compression points in its encoder (implements ``models.base.SpeechModel``)."""

    family = "whisper"
    token_rate = float(FRAMES_PER_SECOND)

    def __init__(self, model, processor, name: str = "whisper", padding: str = "keep"):
        if padding not in PADDING_MODES:
            raise ValueError(f"model.padding={padding!r} is not allowed; use one of {PADDING_MODES}")
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.padding = padding
        self.encoder = model.model.encoder
        self.n_layers = len(self.encoder.layers)
        self.max_frames = self.encoder.config.max_source_positions
        self.multilingual = bool(getattr(model.generation_config, "is_multilingual", False))

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.encoder.config, "_attn_implementation", None) or "eager")

    # ------------------------------------------------------------------ checks
    def check_points(self, points: list[Point]) -> None:
        """Raise a one-line error for a point this model cannot take (before any compute)."""
        layers = [p.layer for p in points]
        for p in points:
            if p.layer > self.n_layers:
                raise ValueError(
                    f"layer={p.layer} is out of range for {self.name}: allowed 0..{self.n_layers} "
                    f"(0 = encoder input after the conv stem, {self.n_layers} = encoder output)"
                )
            if p.features == "keys" and p.layer == self.n_layers:
                raise ValueError(f"features=keys needs an attention layer; layer={p.layer} is the encoder output")
            problem = point_problem(p, self.name)
            if problem:
                raise ValueError(problem)
            if p.needs_scores:
                if p.layer == 0:
                    raise ValueError(f"operator={p.operator} scores frames by attention at encoder layer l-1; "
                                     "layer=0 has none: use layer >= 1")
                if self.attn_implementation != "eager":
                    raise ValueError(f"operator={p.operator} needs attention weights at encoder layer {p.layer - 1}, "
                                     f"which attn_implementation={self.attn_implementation!r} does not return; set "
                                     "model.attn_implementation=eager")
        if layers != sorted(set(layers)):
            raise ValueError(f"compression layers must be distinct and increasing, got {layers}")

    # -------------------------------------------------------------- generation
    def generate(self, requests: list[Request], points: list[Point], max_new_tokens: int) -> list[Output]:
        """Transcribe each request greedily with ``points`` applied in the encoder (one utterance at a time:
        compressed lengths differ per utterance and Whisper's encoder has no attention mask)."""
        self.check_points(points)
        return [self._generate_one(r, points, max_new_tokens) for r in requests]

    def _generate_one(self, req: Request, points: list[Point], max_new_tokens: int) -> Output:
        duration = len(req.audio) / SAMPLE_RATE
        if duration > 30.0:
            raise ValueError(f"{req.utt.id}: {duration:.1f} s of audio; Whisper takes at most 30 s per utterance")
        n_utt = min(self.max_frames, frames_for(duration))
        words = self._word_spans(req, n_utt) if any(p.needs_spans for p in points) else None
        state = [SpanState.start(n_utt, words=words, seed=req.seed)]  # the utterance frames between points
        features = self.processor.feature_extractor(
            req.audio, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.model.device, self.model.dtype)
        handles = self._install(points, state)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                ids = self.model.generate(features, max_new_tokens=max_new_tokens, **self._generate_kwargs(req))
        finally:
            for h in handles:
                h.remove()
        seconds = time.perf_counter() - t0
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        return Output.from_record(text, state[0].record, {"seconds": seconds, "new_tokens": int(ids.shape[-1])})

    def hidden_states(self, req: Request) -> list[torch.Tensor]:
        """The utterance frames entering each compression layer, uncompressed: a list of ``n_layers + 1`` tensors
        [T, d] (index l = the input of layer l; the last one is the encoder output). Used by the cosine-dynamics
        analysis (paper Fig. 3)."""
        n_utt = min(self.max_frames, frames_for(len(req.audio) / SAMPLE_RATE))
        features = self.processor.feature_extractor(
            req.audio, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.model.device, self.model.dtype)
        captured: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(lambda m, args: captured.append(args[0][0, :n_utt].float()))
                   for layer in self.encoder.layers]
        handles.append(self.encoder.layer_norm.register_forward_hook(
            lambda m, args, out: captured.append(out[0, :n_utt].float())))
        try:
            with torch.inference_mode():
                self.encoder(features)
        finally:
            for h in handles:
                h.remove()
        return captured

    def _generate_kwargs(self, req: Request) -> dict[str, Any]:
        if not self.multilingual:
            return {}
        task = "translate" if req.utt.task == "st" else "transcribe"
        return {"language": req.utt.language, "task": task}

    def _word_spans(self, req: Request, n_utt: int) -> torch.Tensor:
        words = req.utt.words
        if not words:
            raise ValueError(
                f"{req.utt.id}: the oracle needs word alignments, and this utterance has none "
                "(align the dataset first: see docs/datasets.md)"
            )
        return spans_from_words([w.start for w in words], [w.end for w in words], self.token_rate, n_utt)

    # ------------------------------------------------------------------- hooks
    def _install(self, points: list[Point], state: list[SpanState]) -> list:
        handles = []
        scores: dict[int, torch.Tensor] = {}  # layer l -> attention received per utterance frame at layer l-1
        for point in points:
            if point.needs_scores:
                def keep_scores(module, args, output, layer=point.layer):
                    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                    if weights is None:
                        raise ValueError("attention weights are missing: scores need model.attn_implementation=eager")
                    n = len(state[0].origin)  # the utterance frames (the padding frames follow them)
                    scores[layer] = weights[0, :, :n, :n].float().mean(dim=(0, 1))

                attn = self.encoder.layers[point.layer - 1].self_attn
                handles.append(attn.register_forward_hook(keep_scores))
        for point in points:
            if point.layer < self.n_layers:
                layer = self.encoder.layers[point.layer]
                feats = Features(norm=layer.self_attn_layer_norm, key_proj=layer.self_attn.k_proj)

                def pre_hook(module, args, kwargs, point=point, feats=feats):
                    return (self._apply(args[0], point, state, feats, scores.get(point.layer)), *args[1:]), kwargs

                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:  # the encoder output, already layer-normed: "normed" features are the hidden states

                def post_hook(module, args, output, point=point):
                    return self._apply(output, point, state, Features(), scores.get(point.layer))

                handles.append(self.encoder.layer_norm.register_forward_hook(post_hook))
        return handles

    def _apply(self, hidden: torch.Tensor, point: Point, state: list[SpanState], feats: Features,
               scores: torch.Tensor | None = None) -> torch.Tensor:
        """Compress the utterance frames of ``hidden`` [1, L, d] at one point; keep or drop the padding frames."""
        n = len(state[0].origin)
        out, state[0] = compress_step(hidden[0, :n], point, state[0], features=feats, scores=scores)
        rest = hidden[0, n:] if self.padding == "keep" else hidden[0, :0]
        return torch.cat([out.tokens, rest], dim=0).unsqueeze(0)


def load(cfg) -> WhisperModel:
    """Build the adapter from a ``conf/model/whisper_*.yaml`` node (weights converted offline on first use)."""
    from speech_redundancy.weights import load_whisper

    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model, processor = load_whisper(
        cfg.checkpoint, device=cfg.get("device", "cpu"), dtype=dtype,
        attn_implementation=cfg.get("attn_implementation", "sdpa"),
    )
    return WhisperModel(model, processor, name=cfg.name, padding=cfg.get("padding", "keep"))


def frames_for(seconds: float) -> int:
    """Encoder frames that carry ``seconds`` of audio (capped at the 30 s window)."""
    return int(min(1500, max(1, math.ceil(FRAMES_PER_SECOND * seconds))))

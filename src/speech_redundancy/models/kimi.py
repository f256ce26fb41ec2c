"""Kimi-Audio-7B-Instruct adapter, natively on stock transformers classes (no ``trust_remote_code``, no
``kimia_infer``). What changes: nothing in transformers. :class:`KimiAudioText` computes Kimi-Audio's two-stream
fused embeddings and calls the stock ``Qwen2Model`` (``backbone.model``) with ``inputs_embeds``; the stock
``lm_head`` gives the text logits.

Compression: :class:`KimiAudioModel` is the shared decoder-only adapter (``models.lslm``), so points go through the
same engine (``speech_redundancy.engine``) and per-sample step as Qwen2-Audio. Its :func:`reach`: the engine's
hooks sit on ``KimiAudioText`` (the top module, called once per prefill and decode step by :func:`greedy`), on
``backbone.model`` (the stock ``Qwen2Model``: masks, positions) and on each ``backbone.model.layers[i]``; the audio
span is the audio-slot mask (s1..sN between media_begin and media_end), so l = 0 compresses the fused input
embedding of the slots and l in 1..27 the input of decoder layer l. Word windows map at 12.5 tokens/s (30 s
segments are contiguous in the one span); ``model.positions`` and ``model.pool_early_kv`` as for Qwen2-Audio.

Data flow (module by module):

1. ``kimi_checkpoint``: the checkpoint folder -> ``Qwen2ForCausalLM`` (``Qwen2Config`` from its config.json, RoPE
   theta included), the VQ adaptor, the ``whisper-large-v3/`` encoder; the MIMO branch and audio head are not built
   (they feed only audio output), the stored rotary buffers are ignored.
2. ``glm4_speech_tokenizer`` + ``kimi_frontend``: audio -> discrete codes (GLM-4-Voice tokenizer, from
   ``model.speech_tokenizer=``) and continuous features (Whisper + 4-frame stacking + adaptor), 12.5 per second,
   in 30 s segments.
3. ``kimi_prompt``: tiktoken text tokenizer and the two-stream prompt layout (ASR, QA, translation share it; the
   instruction text comes from ``speech_redundancy.prompts``, family ``kimi_audio``).
4. Here: fusion at the audio slots, ``(E[code] + adaptor(whisper)) * sqrt(2)``, elsewhere ``E[audio-stream id]``,
   plus ``E[text-stream id]`` everywhere unless the step's text ids sum to 0 (the official rule); positions 0..T-1; greedy decoding as Kimi-Audio-Evalkit runs it: each
   step feeds back ``text_blank`` on the audio stream and the chosen token on the text stream, stops at
   ``text_eos``, with the text repetition penalty 1.1 over the last 16 generated tokens once more than 16 were
   generated (:class:`WindowedRepetitionPenalty`; ``model.repetition_penalty=1.0`` turns it off).

Batches (``model.batch_size``) are left-padded with a 2-D padding mask and per-sample positions; each sample's
tokens, lengths and groups equal a one-by-one run's, with or without compression (tested). Prefill FLOPs: the LLM
(its head over the last position only) plus the front end (Whisper encoder, speech tokenizer, adaptor:
``efficiency.kimi_frontend_flops``). ``model.audio_inputs=continuous|discrete`` are ablations (see
``kimi_frontend``): the adapter's name and every result row's ``stats`` carry the label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from speech_redundancy import efficiency
from speech_redundancy.audio import SAMPLE_RATE
from speech_redundancy.compress import Point
from speech_redundancy.engine import Reach
from speech_redundancy.models import glm4_speech_tokenizer as glm
from speech_redundancy.models import kimi_checkpoint as ckpt
from speech_redundancy.models.base import Output, Request
from speech_redundancy.models.lslm import LSLMAdapter, task_prompt
from speech_redundancy.models.kimi_frontend import AUDIO_INPUTS, ContinuousFrontEnd, FrontEnd, segment_tokens
from speech_redundancy.models.kimi_prompt import Prompt, TextTokenizer, layout, prompt_length

TOKEN_RATE = 12.5
N_LAYERS = 28
PROMPT_FAMILY = "kimi_audio"


# ----------------------------------------------------------------------------- the text model
class KimiStep(NamedTuple):
    logits: Tensor  # [B, kept positions, vocab]
    cache: object  # transformers DynamicCache


class KimiAudioText(nn.Module):
    """Kimi-Audio's text path: two-stream fused embeddings -> the stock ``Qwen2Model`` -> ``lm_head``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # a stock Qwen2ForCausalLM

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.lm_head.weight.dtype

    def embed(self, input_ids: Tensor, audio_ids: Tensor, audio_embeds: Tensor | None = None,
              audio_mask: Tensor | None = None) -> Tensor:
        """E[audio id], replaced at ``audio_mask`` by (E[audio id] + ``audio_embeds``) x sqrt(2) when features
        are given, plus E[text id] at every position of a sample whose text ids do not sum to 0 (the official
        rule: a decode step that feeds back text id 0 adds no text embedding). ``audio_embeds`` is [B, T, d] (only
        its ``audio_mask`` rows are read)."""
        table = self.backbone.model.embed_tokens
        x = table(audio_ids)
        if audio_embeds is not None and audio_mask is not None:
            root2 = torch.tensor(2.0, dtype=x.dtype, device=x.device).sqrt()
            x = torch.where(audio_mask[..., None], (x + audio_embeds.to(x.dtype)) * root2, x)
        with_text = input_ids.sum(-1) != 0  # [B]; official: per call (batch 1), here per sample
        return torch.where(with_text[:, None, None], x + table(input_ids), x)

    def forward(self, input_ids: Tensor, audio_ids: Tensor, audio_embeds: Tensor | None = None,
                audio_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, logits_to_keep: int = 1) -> KimiStep:
        """One step (prefill: whole prompt, empty or no ``cache``; decode: one position per sample). Returns the
        logits of the last ``logits_to_keep`` positions (0: all) and the cache."""
        from transformers import DynamicCache

        embeds = self.embed(input_ids, audio_ids, audio_embeds, audio_mask)
        if cache is None:
            cache = DynamicCache(config=self.backbone.config)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=True)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return KimiStep(logits=self.backbone.lm_head(hidden), cache=out.cache)


# ----------------------------------------------------------------------------- decoding
class WindowedRepetitionPenalty(LogitsProcessor):
    """Kimi-Audio's text repetition penalty as a transformers ``LogitsProcessor``: once more than ``window`` tokens
    were generated, the logits of the tokens among the last ``window`` are divided by ``penalty`` (multiplied when
    negative), each token once. ``input_ids`` are the tokens generated so far, [B, n]."""

    def __init__(self, penalty: float = 1.1, window: int = 16):
        if penalty <= 0 or window < 1:
            raise ValueError(f"repetition penalty {penalty} must be > 0 and its window {window} >= 1")
        self.penalty = float(penalty)
        self.window = int(window)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.penalty == 1.0 or input_ids.shape[1] <= self.window:
            return scores
        recent = input_ids[:, -self.window:]
        picked = scores.gather(1, recent)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, recent, picked)


def processors(penalty: float, window: int) -> LogitsProcessorList:
    """The logits processors of Kimi-Audio's text decoding (none with ``penalty`` 1)."""
    return LogitsProcessorList([WindowedRepetitionPenalty(penalty, window)] if penalty != 1.0 else [])


@dataclass
class Batch:
    """The left-padded prefill of a batch, ready for :class:`KimiAudioText`."""

    input_ids: Tensor  # text stream [B, T]
    audio_ids: Tensor  # audio stream [B, T]
    audio_mask: Tensor  # bool [B, T]: the audio slots
    audio_embeds: Tensor | None  # [B, T, d] adaptor outputs at the slots (zeros elsewhere) or None
    attention_mask: Tensor  # [B, T] 1 = real token
    position_ids: Tensor  # [B, T]


def collate(prompts: list[Prompt], embeds: list[Tensor | None], *, pad_id: int, hidden: int,
            device: torch.device, dtype: torch.dtype) -> Batch:
    """Left-pad the prompts; place each sample's adaptor outputs at its audio slots."""
    B, T = len(prompts), max(len(p) for p in prompts)
    text = torch.full((B, T), pad_id, dtype=torch.long)
    audio = torch.full((B, T), pad_id, dtype=torch.long)
    slots = torch.zeros(B, T, dtype=torch.bool)
    mask = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, hidden, dtype=dtype, device=device) if any(e is not None for e in embeds) else None
    for b, p in enumerate(prompts):
        s = T - len(p)
        text[b, s:] = torch.tensor(p.text_ids)
        audio[b, s:] = torch.tensor(p.audio_ids)
        slots[b, s:] = torch.tensor(p.audio_slots)
        mask[b, s:] = 1
        if feats is not None and embeds[b] is not None:
            feats[b, slots[b].to(device)] = embeds[b].to(device, dtype)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids=text.to(device), audio_ids=audio.to(device), audio_mask=slots.to(device),
                 audio_embeds=feats, attention_mask=mask.to(device), position_ids=positions.to(device))


@dataclass
class Decoded:
    tokens: list[list[int]]  # per sample, up to (not including) text_eos
    logits: list[Tensor] | None  # per step, the raw logits [B, V] (when asked)
    steps: int  # forward passes
    first_token_seconds: float


@torch.inference_mode()
def greedy(text: KimiAudioText, batch: Batch, *, max_new_tokens: int, eos: int, blank: int, logits_processor=None,
           keep_logits: bool = False, stop_at_eos: bool = True) -> Decoded:
    """Greedy decoding with both streams fed back each step (audio: ``blank``; text: the chosen token)."""
    t0 = time.perf_counter()
    step = text(input_ids=batch.input_ids, audio_ids=batch.audio_ids, audio_embeds=batch.audio_embeds,
                audio_mask=batch.audio_mask, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                cache=None)
    B = batch.input_ids.shape[0]
    device = batch.input_ids.device
    mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
    generated = torch.zeros(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits, steps, first = [], 1, 0.0
    for i in range(max_new_tokens):
        scores = step.logits[:, -1]
        if keep_logits:
            logits.append(scores.float().cpu())
        if logits_processor is not None:
            scores = logits_processor(generated, scores)
        nxt = scores.argmax(-1)
        if i == 0:
            first = time.perf_counter() - t0
        nxt = torch.where(done, torch.full_like(nxt, blank), nxt)
        generated = torch.cat([generated, nxt[:, None]], dim=1)
        if stop_at_eos:
            done |= nxt == eos
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        step = text(input_ids=nxt[:, None], audio_ids=torch.full_like(nxt[:, None], blank), attention_mask=mask,
                    position_ids=pos, cache=step.cache)
        steps += 1
    tokens = []
    for row in generated.tolist():
        tokens.append(row[:row.index(eos)] if stop_at_eos and eos in row else row)
    return Decoded(tokens=tokens, logits=logits if keep_logits else None, steps=steps, first_token_seconds=first)


# ----------------------------------------------------------------------------- the adapter
def reach(text: KimiAudioText) -> Reach:
    """Where Kimi-Audio keeps what the engine touches: the top module is :class:`KimiAudioText` (called once per
    prefill and decode step by :func:`greedy`), the stack its stock ``Qwen2Model``; the audio span is the audio-slot
    mask (s1..sN between media_begin and media_end), so l = 0 is the fused input embedding of those slots."""
    stack = text.backbone.model

    def find_audio(args: tuple, kwargs: dict) -> Tensor | None:
        mask = kwargs.get("audio_mask")
        return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    return Reach(top=text, stack=stack, layers=stack.layers, text_config=text.backbone.config,
                 rotary=stack.rotary_emb, find_audio=find_audio, name="Kimi-Audio")


class KimiAudioModel(LSLMAdapter):
    """Kimi-Audio-7B-Instruct with compression points in its LLM (implements ``models.base.SpeechModel``): the
    shared decoder-only adapter (``models.lslm``) with Kimi-Audio's front end, two-stream prompts and decoding."""

    family = "kimi"
    max_audio_seconds = None  # long audio goes in as consecutive 30 s segments
    head_positions = 1  # KimiAudioText projects only the last prefill position

    def __init__(self, text: KimiAudioText, frontend: FrontEnd, tokenizer: TextTokenizer, config: ckpt.KimiConfig,
                 *, name: str = "kimi-audio-7b-instruct", repetition_penalty: float = 1.1,
                 repetition_window: int = 16, prompt_family: str = PROMPT_FAMILY, **options):
        self.frontend = frontend
        self.config = config
        self.audio_inputs = frontend.audio_inputs
        self.ablation = self.audio_inputs != "both"
        label = f"-{self.audio_inputs}-ablation"
        name = name if not self.ablation or label in name else name + label
        super().__init__(text, tokenizer, reach(text), name=name, token_rate=TOKEN_RATE,
                         prompt_family=prompt_family, **options)
        self.logits_processor = processors(repetition_penalty, repetition_window)
        self.repetition_penalty = float(repetition_penalty)
        self.frontend_shape = frontend_shape(frontend)
        self.frontend_seconds = 0.0  # of the last batch (front end and prompts, before the prefill)

    @property
    def text(self) -> KimiAudioText:
        return self.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ checks (before any compute)
    def instruction(self, req: Request) -> list[int]:
        """The instruction's text ids: ``req.prompt`` or the ``kimi_audio`` task prompt (empty for spoken QA)."""
        text = req.prompt if req.prompt is not None else task_prompt(self.prompt_family, req)
        return self.tokenizer.encode(text) if text else []

    def audio_tokens(self, req: Request) -> int:
        return sum(segment_tokens(len(s)) for s in glm.segments(np.asarray(req.audio)))

    def context_length(self) -> int:
        return self.config.max_positions

    def check_request(self, req: Request, points: list[Point], max_new_tokens: int = 0) -> None:
        """The shared checks, then the whole prefill plus ``max_new_tokens`` against the context."""
        super().check_request(req, points)
        n_audio = self.audio_tokens(req)
        total = prompt_length(len(self.instruction(req)), n_audio) + max_new_tokens
        if total > self.config.max_positions:
            raise ValueError(
                f"{req.utt.id}: {len(req.audio) / SAMPLE_RATE:.1f} s of audio gives {n_audio} audio tokens; with the "
                f"prompt and max_new_tokens={max_new_tokens} that is {total} positions, beyond Kimi-Audio's "
                f"{self.config.max_positions} (max_position_embeddings): split the utterance or lower max_new_tokens"
            )

    # ------------------------------------------------------------------ prompts
    def prompts(self, requests: list[Request]) -> tuple[list[Prompt], list[Tensor | None], dict]:
        """Front end and prompt layout of each request: its prompt streams and adaptor outputs (or None)."""
        t0 = time.perf_counter()
        tokens = self.frontend([r.audio for r in requests])
        prompts = [layout(self.tokenizer.ids, self.instruction(r), t.codes) for r, t in zip(requests, tokens)]
        embeds = [self.frontend.continuous.embed(t.features) if t.features is not None else None for t in tokens]
        return prompts, embeds, {"frontend_seconds": time.perf_counter() - t0}

    def batch(self, prompts: list[Prompt], embeds: list[Tensor | None]) -> Batch:
        return collate(prompts, embeds, pad_id=self.tokenizer.ids.text_blank, hidden=self.config.hidden,
                       device=self.device, dtype=self.dtype)

    def inputs(self, requests: list[Request]) -> dict[str, Tensor | None]:
        """The left-padded prefill of a batch as :class:`KimiAudioText`'s keywords (front end included)."""
        prompts, embeds, timing = self.prompts(requests)
        self.frontend_seconds = timing["frontend_seconds"]
        return dict(vars(self.batch(prompts, embeds)))

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[Request], points: list[Point], max_new_tokens: int = 256) -> list[Output]:
        """Greedy decoding of each request with ``points`` applied during prefill (``batch_size`` at a time)."""
        self.check_points(points)
        for req in requests:
            self.check_request(req, points, max_new_tokens)
        outs: list[Output] = []
        for start in range(0, len(requests), self.batch_size):
            outs += self.generate_batch(requests[start:start + self.batch_size], points, max_new_tokens)
        return outs

    def decode(self, batch: dict[str, Tensor | None], max_new_tokens: int) -> Tensor:
        """:func:`greedy` on one batch; the tokens before ``text_eos``, padded with the tokenizer's pad id."""
        ids = self.tokenizer.ids
        out = greedy(self.model, Batch(**batch), max_new_tokens=max_new_tokens, eos=ids.text_eos,
                     blank=ids.text_blank, logits_processor=self.logits_processor)
        width = max(len(t) for t in out.tokens)
        rows = torch.full((len(out.tokens), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for b, t in enumerate(out.tokens):
            rows[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        return rows

    # ------------------------------------------------------------------ efficiency
    def frontend_work(self, audio: np.ndarray) -> dict:
        """What the front end runs on one clip: Whisper windows, speech-tokenizer mel frames per segment (padded to
        the longest, as one batch), audio tokens."""
        segs = glm.segments(np.asarray(audio))
        longest = max(len(s) for s in segs)
        frames = -(-longest // glm.SAMPLES_PER_CODE) * glm.SAMPLES_PER_CODE // 160
        return {"windows": len(segs) if self.audio_inputs != "discrete" else 0,
                "tokenizer_frames": [frames] * len(segs) if self.audio_inputs != "continuous" else [],
                "tokens": sum(segment_tokens(len(s)) for s in segs)}

    def frontend_parts(self, req: Request) -> dict[str, int]:
        """FLOPs of the Whisper encoder, the speech tokenizer and the adaptor on this request, and their sum."""
        return efficiency.kimi_frontend_flops(self.frontend_shape, **self.frontend_work(req.audio))

    def frontend_flops(self, req: Request) -> int:
        return self.frontend_parts(req)["frontend_flops"]

    def request_stats(self, req: Request, stats: dict) -> dict:
        """The front end's FLOPs by part and its time (in ``seconds`` and ``ttft_seconds`` too: it runs before
        the prefill), the ablation label and the repetition penalty."""
        fe = self.frontend_seconds
        ttft = stats.get("ttft_seconds")
        return {**self.frontend_parts(req), "frontend_seconds": fe, "seconds": stats["seconds"] + fe,
                "ttft_seconds": None if ttft is None else ttft + fe, "prefill_tokens": stats["layer_tokens"][0],
                "audio_inputs": self.audio_inputs, "ablation": self.ablation,
                "repetition_penalty": self.repetition_penalty}

    # ------------------------------------------------------------------ Fig. 3
    @torch.inference_mode()
    def hidden_states(self, req: Request) -> list[Tensor]:
        """The audio span entering each LLM layer 0..L-1 (0: the fused embeddings) and the final normed output,
        uncompressed; float32 on CPU."""
        self.check_request(req, [])
        prompts, embeds, _ = self.prompts([req])
        b = self.batch(prompts, embeds)
        x = self.model.embed(b.input_ids, b.audio_ids, b.audio_embeds, b.audio_mask)
        out = self.model.backbone.model(inputs_embeds=x, attention_mask=b.attention_mask,
                                        position_ids=b.position_ids, use_cache=False, output_hidden_states=True)
        return [h[0, b.audio_mask[0]].float().cpu() for h in out.hidden_states]


def frontend_shape(frontend: FrontEnd) -> efficiency.KimiFrontEndShape:
    """The sizes of the loaded front end that enter its FLOPs."""
    enc = frontend.continuous.encoder.config
    adaptor = frontend.continuous.adaptor
    tok = frontend.speech.config if frontend.speech is not None else None
    return efficiency.KimiFrontEndShape(
        whisper=efficiency.WhisperEncoderShape(mels=enc.num_mel_bins, hidden=enc.d_model, ffn=enc.encoder_ffn_dim,
                                               n_layers=enc.encoder_layers, frames=2 * enc.max_source_positions,
                                               out_dim=adaptor[3].out_features),
        tokenizer=None if tok is None else efficiency.WhisperEncoderShape(
            mels=tok.mels, hidden=tok.hidden, ffn=tok.ffn, n_layers=tok.n_layers, frames=0, out_dim=tok.hidden),
        tokenizer_layers_before_pool=0 if tok is None else tok.pooling_position,
        pool=4 if tok is None else tok.pool, codes=0 if tok is None else tok.codes,
        adaptor_in=adaptor[0].in_features, adaptor_hidden=adaptor[3].out_features,
    )


# ----------------------------------------------------------------------------- loading
def tiny_folders(cfg) -> tuple[Path, Path]:
    """Where ``model=tiny_kimiaudio`` keeps its checkpoint and tokenizer folders (built once)."""
    from speech_redundancy.paths import cache_dir

    root = cache_dir() / "models"
    return (Path(cfg.get("path") or root / "tiny-kimiaudio"),
            Path(cfg.get("speech_tokenizer") or root / "tiny-glm4-voice-tokenizer"))


def speech_tokenizer_missing(folder, missing: list[str]) -> FileNotFoundError:
    where = f"model.speech_tokenizer={folder}" if folder else "model.speech_tokenizer is not set"
    if not folder:
        what = "no folder given"
    elif not Path(folder).is_dir():
        what = "the folder does not exist"
    else:
        what = f"missing {', '.join(missing)}"
    return FileNotFoundError(
        f"{where}: the GLM-4-Voice speech tokenizer ({what}) is needed for the discrete audio stream; on a connected "
        f"machine run `huggingface-cli download {glm.HUB_ID} --local-dir <folder>`, or run "
        "model.audio_inputs=continuous (a labelled ablation: Whisper features only)"
    )


def load(cfg) -> KimiAudioModel:
    """Build the adapter from a ``conf/model/*kimiaudio*.yaml`` node (DictConfig or dict). Every file is checked
    before any weight is read."""
    from speech_redundancy.models import lslm

    get = cfg.get
    audio_inputs = str(get("audio_inputs", "both"))
    if audio_inputs not in AUDIO_INPUTS:
        raise ValueError(f"model.audio_inputs={audio_inputs!r}; allowed: {', '.join(AUDIO_INPUTS)} "
                         "(continuous and discrete are ablations)")
    path, speech_path = get("path"), get("speech_tokenizer")
    if get("tiny", False):
        path, speech_path = ckpt.write_tiny(*tiny_folders(cfg), shape=ckpt.TinyShape(seed=int(get("seed", 0))))
    folder = ckpt.check_folder(path)
    config = ckpt.read_config(folder)
    if audio_inputs != "continuous":
        missing = glm.missing_files(speech_path)
        if missing:
            raise speech_tokenizer_missing(speech_path, missing)
    n_layers = get("n_layers")
    if n_layers is not None and int(n_layers) != config.n_layers:
        raise ValueError(f"model.n_layers={n_layers} but {folder}/config.json has {config.n_layers} layers")
    tokenizer = TextTokenizer(folder)
    ids = tokenizer.ids
    if (ids.media_begin, ids.media_end) != (config.media_begin, config.media_end):
        raise ValueError(f"{folder}: tokenizer media ids {(ids.media_begin, ids.media_end)} differ from config.json's "
                         f"kimia_media_begin/end {(config.media_begin, config.media_end)}")
    device = lslm.device(get("device", "auto"))
    dtype = getattr(torch, get("dtype", "bfloat16"))
    attn = get("attn_implementation", "sdpa")
    backbone, adaptor = ckpt.load_backbone(folder, config, dtype=dtype, device=device, attn_implementation=attn)
    encoder, extractor = ckpt.load_whisper(folder, dtype=dtype, device=device, attn_implementation=attn)
    speech = glm.GLM4SpeechTokenizer(speech_path, device=device) if audio_inputs != "continuous" else None
    frontend = FrontEnd(ContinuousFrontEnd(encoder, extractor, adaptor), speech, token_offset=config.token_offset,
                        text_blank=ids.text_blank, audio_inputs=audio_inputs)
    return KimiAudioModel(
        KimiAudioText(backbone), frontend, tokenizer, config, name=get("name", "kimi-audio-7b-instruct"),
        repetition_penalty=float(get("repetition_penalty", 1.1)), repetition_window=int(get("repetition_window", 16)),
        prompt_family=get("prompt_family") or PROMPT_FAMILY, **lslm.options(cfg),
    )

"""Prefill efficiency of Affinity Pooling on Qwen2-Audio-7B's architecture (paper Table 2), with random weights.

    python scripts/bench_prefill.py --out outputs/bench_prefill          # GPU: the full 7B architecture, bf16, SDPA
    python scripts/bench_prefill.py --device cpu --llm-layers 4 --encoder-layers 4 --tie-embeddings \\
        --buckets 40-60 --per-bucket 1 --repeats 3 --warmup 1 --out outputs/bench_prefill_cpu   # 7B widths, CPU
    python scripts/bench_prefill.py --tiny --out /tmp/bench              # CPU smoke run on a tiny random model

What it builds: ``Qwen2AudioForConditionalGeneration`` at the real widths of Qwen2-Audio-7B (LLM d = 4096, 32 heads,
FFN 11008, vocabulary 156,032; audio tower d = 1280, 20 heads, FFN 5120) with ``--llm-layers`` N and
``--encoder-layers`` M layers (default 32 and 32: the full model), random weights, SDPA, bf16 on a GPU and float32
on the CPU. No download. ``--tie-embeddings`` shares the input embeddings with the LM head (the same compute; 2.6 GB
less memory in float32: the real model does not tie them).

What it feeds: random log-mel features for clips spread evenly over each duration bucket (0-20, 20-40, 40-60 s).
Qwen2-Audio's encoder takes one 30 s window (3000 mel frames) per clip, so a clip longer than 30 s is fed as
consecutive 30 s windows (the last one partly padding) whose audio tokens fill ONE run of ``<|AUDIO|>``
placeholders in one prompt: the stock model scatters the windows' features into that run in order. The encoder
therefore costs a whole window per started 30 s, as it would in deployment.

Compression: random weights give no meaningful similarities, so the paper's retention is forced with a fixed-ratio
operator (``uniform_merge`` with ``ratio``): Table 1 Aggressive keeps 78.64% after l_in = 0 (AP_in), 14.30% after
l_deep alone (AP_deep) and 14.91% after both (DAP: 78.64% at l = 0, then 14.91/78.64 at l_deep). l_deep = 29 of 32
layers; with N layers it sits at the same fraction, round(29 N / 32), at most N - 1. t_AP is therefore the cost of
that operator plus the engine's re-assembly, not of Algorithm 1's similarity band.

Per method and bucket (median over ``--repeats`` after ``--warmup``, the methods taking turns within each repeat,
then the mean over the bucket's clips):
``ttft_s`` = ``generate(max_new_tokens=1)`` (CUDA events on a GPU, wall clock on the CPU); Vanilla is the stock
model with no hooks at all. ``speedup`` = Vanilla's TTFT / the method's; ``flops_ideal_speedup`` = Vanilla's prefill
FLOPs / the method's (audio encoder + LLM + LM head, as ``efficiency`` counts them; ``_llm`` without the encoder);
``efficiency`` = speedup / flops_ideal_speedup; ``t_ap_s`` = the engine's own time for the points (compression plus
re-assembly, positions, RoPE and masks: ``Session.point_seconds``) and ``engine_s`` all the time in its hooks;
``prefill_s`` the top forward alone (the engine's ``ttft_seconds``); with ``--breakdown`` each clip's ``parts_s``
(audio tower, each decoder layer, LM head, the points, and the rest of the call) of its median run. On a GPU also the peak memory ``peak_gb``, its
increment over what was allocated before the call (weights + inputs) ``increment_gb`` and the saving ratio
dm_vanilla / dm. ``clips`` holds each clip's shapes (windows, audio tokens before and after each point, the tokens
entering each layer) and raw TTFTs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from speech_redundancy import efficiency  # noqa: E402
from speech_redundancy.compress import Point  # noqa: E402
from speech_redundancy.engine import compression  # noqa: E402
from speech_redundancy.models import lslm, qwen2audio  # noqa: E402

# Qwen/Qwen2-Audio-7B(-Instruct) config.json, the fields that shape compute
QWEN2_AUDIO_7B = {
    "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": 32,
                     "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280,
                     "max_source_positions": 1500, "activation_function": "gelu", "scale_embedding": False},
    "text_config": {"model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643},
    "audio_token_index": 151646,
}
AUDIO_BOS, AUDIO_EOS = 151647, 151648
RETENTION_IN, RETENTION_DEEP, RETENTION_DAP = 0.7864, 0.1430, 0.1491  # Table 1, Aggressive
DEEP_OF_32 = 29  # the paper's l_deep in Qwen2-Audio-7B's 32 layers
BUCKETS = ((0, 20), (20, 40), (40, 60))
PROMPT_TOKENS = 14  # "Detect the language and recognize the speech: <|en|>" is about this long
METHODS = ("Vanilla", "AP_in", "AP_deep", "DAP")


def deep_layer(n_layers: int) -> int:
    """l_deep for a stack of ``n_layers``: 29 of 32 at the same fraction (at most the last layer)."""
    return min(n_layers - 1, round(DEEP_OF_32 * n_layers / 32))


def methods(n_layers: int) -> dict[str, list[Point]]:
    deep = deep_layer(n_layers)
    return {
        "Vanilla": [],
        "AP_in": [Point(0, "uniform_merge", {"ratio": RETENTION_IN})],
        "AP_deep": [Point(deep, "uniform_merge", {"ratio": RETENTION_DEEP})],
        "DAP": [Point(0, "uniform_merge", {"ratio": RETENTION_IN}),
                Point(deep, "uniform_merge", {"ratio": RETENTION_DAP / RETENTION_IN})],
    }


def config_7b(llm_layers: int = 32, encoder_layers: int = 32, tie_embeddings: bool = False, attn: str = "sdpa"):
    """Qwen2-Audio-7B's configuration with ``llm_layers`` / ``encoder_layers`` layers."""
    from transformers import Qwen2AudioConfig

    spec = json.loads(json.dumps(QWEN2_AUDIO_7B))
    spec["text_config"]["num_hidden_layers"] = llm_layers
    spec["text_config"]["tie_word_embeddings"] = tie_embeddings
    spec["audio_config"]["encoder_layers"] = encoder_layers
    config = Qwen2AudioConfig(**spec)
    config.tie_word_embeddings = tie_embeddings
    for c in (config, config.text_config, config.audio_config):
        c._attn_implementation = attn
    return config


def build_7b(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights for ``config`` in ``dtype`` on ``device``: the modules are laid out on the meta device, given
    storage on ``device`` (the LM head shared with the input embeddings when ``config.tie_word_embeddings``) and
    initialised there by transformers' own ``initialize_weights`` (normal(0, 0.02), norms at 1, RoPE buffers)."""
    from transformers import Qwen2AudioForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # before any write: the untied head's pages are never touched
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    torch.manual_seed(seed)
    model.initialize_weights()
    return model.eval()


def build(args, device: torch.device):
    """(model, audio_token_id, bos, eos) with random weights."""
    if args.tiny:
        model, processor = qwen2audio.build_tiny(seed=0)
        tok = processor.tokenizer
        ids = [tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")]
        return model.to(device), *ids
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = config_7b(args.llm_layers, args.encoder_layers, args.tie_embeddings)
    return build_7b(config, device, dtype), config.audio_token_index, AUDIO_BOS, AUDIO_EOS


def clip_inputs(seconds: float, audio_id: int, bos: int, eos: int, vocab: int, device, dtype, seed: int):
    """Random mel features for ``seconds`` of audio as 30 s windows, and one prompt with all their placeholders."""
    g = torch.Generator().manual_seed(seed)
    frames = max(1, math.ceil(seconds * 100))
    windows = math.ceil(frames / 3000)
    feats = torch.randn(windows, 128, 3000, generator=g) * 0.5
    fmask = torch.zeros(windows, 3000, dtype=torch.long)
    for w in range(windows):
        fmask[w, : min(3000, frames - 3000 * w)] = 1
    n_audio = sum(qwen2audio.audio_tokens_for(int(n) * 160) for n in fmask.sum(1).tolist())
    text = torch.randint(0, min(vocab, 150000), (PROMPT_TOKENS,), generator=g).tolist()
    ids = torch.tensor([[bos] + [audio_id] * n_audio + [eos] + text])
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
        "input_features": feats.to(device, dtype), "feature_attention_mask": fmask.to(device),
    }, windows, n_audio


class Parts:
    """Wall seconds of the audio tower, each decoder layer and the LM head within one call (forward pre- and
    post-hooks, synchronised on a GPU). Installed after the engine's hooks, so a layer's time leaves out its point."""

    def __init__(self, model, reach, device):
        self.modules = {"encoder": model.model.audio_tower, "head": model.lm_head,
                        **{f"layer{i}": layer for i, layer in enumerate(reach.layers)}}
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(self.modules, 0.0)
        self._handles, self._t0 = [], {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> "Parts":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._t0.__setitem__(n, self._now())))
            self._handles.append(m.register_forward_hook(
                lambda *_, n=name: self.seconds.__setitem__(n, self.seconds[n] + self._now() - self._t0[n])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def summary(self, ttft: float, points: float) -> dict:
        layers = [self.seconds[f"layer{i}"] for i in range(len(self.modules) - 2)]
        return {"encoder": self.seconds["encoder"], "layers": layers, "head": self.seconds["head"],
                "points": points, "rest": ttft - self.seconds["encoder"] - sum(layers) - self.seconds["head"] - points}


def measure(model, reach, batch, points, device, breakdown: bool = False) -> dict:
    """One TTFT measurement. Vanilla (no points) runs the stock model without any hook (but ``breakdown``'s)."""
    gen = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    probe = efficiency.memory_probe(device)
    watch = efficiency.Stopwatch(device).start()
    parts = Parts(model, reach, device) if breakdown else None
    with torch.inference_mode():
        if not points:
            with parts or contextlib.nullcontext():
                model.generate(**batch, **gen)
            session = None
        else:
            with compression(model, points, reach) as session, parts or contextlib.nullcontext():
                model.generate(**batch, **gen)
    seconds = watch.stop()
    peak, inc = probe.stop()
    out = {"ttft_s": seconds, "peak": peak, "inc": inc, "record": None, "t_ap_s": None, "t_ap_points_s": None,
           "engine_s": None, "prefill_s": None}
    if session is not None:
        out.update(record=session.records[0], t_ap_s=sum(session.point_seconds.values()),
                   t_ap_points_s={str(k): v for k, v in session.point_seconds.items()},
                   engine_s=session.engine_seconds, prefill_s=session.ttft_seconds)
    out["parts_s"] = parts.summary(seconds, out["t_ap_s"] or 0.0) if parts else None
    return out


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def run(args, built=None) -> list[dict]:
    """The rows of the table; ``built`` = ``build(args, device)``'s result when the caller has the model already."""
    device = lslm.device(args.device)
    model, audio_id, bos, eos = built if built is not None else build(args, device)
    reach = qwen2audio.reach(model)
    shape = efficiency.DecoderShape.from_config(reach.text_config)
    enc = efficiency.WhisperEncoderShape.from_qwen2audio(model.config)
    dtype = next(model.parameters()).dtype
    todo = methods(shape.n_layers)
    rows = []
    for lo, hi in args.buckets:
        durations = [lo + (i + 0.5) * (hi - lo) / args.per_bucket for i in range(args.per_bucket)]
        clips: dict[str, list[dict]] = {name: [] for name in todo}
        for k, seconds in enumerate(durations):
            batch, windows, n_audio = clip_inputs(seconds, audio_id, bos, eos, shape.vocab, device, dtype, seed=k)
            length = int(batch["input_ids"].shape[1])
            # methods take turns within each repeat, so a change of load on the machine reaches them all alike
            measured: dict[str, list[dict]] = {name: [] for name in todo}
            for rep in range(args.warmup + args.repeats):
                for name, points in todo.items():
                    got = measure(model, reach, batch, points, device, breakdown=args.breakdown)
                    if device.type == "cpu" and not args.tiny:  # minutes per clip: say what is going on
                        what = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}"
                        print(f"    {seconds:5.1f} s clip  {name:<8} {what}: {got['ttft_s']:.2f} s", flush=True)
                    if rep >= args.warmup:
                        measured[name].append(got)
            for name, runs in measured.items():
                rec = runs[0]["record"]
                layer_tokens = list(rec.layer_tokens) if rec is not None else [length] * shape.n_layers
                llm = efficiency.prefill_flops(shape, layer_tokens)
                layers = sum(efficiency.layer_flops(shape, t) for t in layer_tokens)
                clips[name].append({
                    "seconds": seconds, "windows": windows, "sequence": length, "audio_tokens": n_audio,
                    "audio_tokens_per_point": list(rec.tokens_per_point) if rec is not None else [],
                    "retention": rec.retention if rec is not None else 1.0, "layer_tokens": layer_tokens,
                    "llm_flops": llm, "layer_flops": layers, "head_flops": llm - layers,
                    "encoder_flops": efficiency.audio_encoder_flops(enc, windows),
                    "ttft_s": _median(runs, "ttft_s"), "ttft_runs_s": [r["ttft_s"] for r in runs],
                    "prefill_s": _median(runs, "prefill_s"), "t_ap_s": _median(runs, "t_ap_s"),
                    "engine_s": _median(runs, "engine_s"),
                    "t_ap_points_s": runs[len(runs) // 2]["t_ap_points_s"],
                    "parts_s": sorted(runs, key=lambda r: r["ttft_s"])[len(runs) // 2]["parts_s"],  # the median run's
                    "peak": runs[-1]["peak"], "inc": runs[-1]["inc"],
                })
                print(f"  {lo}-{hi} s  {seconds:5.1f} s  {name:<8} TTFT {clips[name][-1]['ttft_s']:.3f} s", flush=True)
        rows += bucket_rows(f"{lo}-{hi} s", clips)
    return rows


def bucket_rows(bucket: str, clips: dict[str, list[dict]]) -> list[dict]:
    """One row per method over one bucket's clips (TTFT means over clips, FLOPs sums)."""
    base = clips["Vanilla"]
    base_ttft = statistics.mean(c["ttft_s"] for c in base)
    base_flops = sum(c["llm_flops"] + c["encoder_flops"] for c in base)
    base_llm = sum(c["llm_flops"] for c in base)
    base_inc = _mean(c["inc"] for c in base)
    rows = []
    for name, cs in clips.items():
        ttft = statistics.mean(c["ttft_s"] for c in cs)
        flops = sum(c["llm_flops"] + c["encoder_flops"] for c in cs)
        t_ap = _mean(c["t_ap_s"] for c in cs)
        row = {
            "bucket": bucket, "method": name, "n": len(cs),
            "audio_tokens": statistics.mean(c["audio_tokens"] for c in cs),
            "retention": statistics.mean(c["retention"] for c in cs),
            "ttft_s": ttft, "prefill_s": _mean(c["prefill_s"] for c in cs),
            "speedup": base_ttft / ttft,
            "flops_ideal_speedup": base_flops / flops,
            "flops_ideal_speedup_llm": base_llm / sum(c["llm_flops"] for c in cs),
            "gflops": flops / len(cs) / 1e9,
            "t_ap_s": t_ap, "engine_s": _mean(c["engine_s"] for c in cs),
            "t_ap_fraction": t_ap / ttft if t_ap is not None else None,
            "peak_gb": _gb(c["peak"] for c in cs), "increment_gb": _gb(c["inc"] for c in cs),
        }
        row["efficiency"] = row["speedup"] / row["flops_ideal_speedup"]
        row["saving"] = base_inc / _mean(c["inc"] for c in cs) if base_inc else None
        parts = [c["parts_s"] for c in cs if c.get("parts_s")]
        if parts:
            row["parts_s"] = {k: statistics.mean(p[k] for p in parts) for k in ("encoder", "head", "points", "rest")}
            row["parts_s"]["layers"] = [statistics.mean(p["layers"][j] for p in parts)
                                        for j in range(len(parts[0]["layers"]))]
            row["part_flops"] = {k: statistics.mean(c[f"{k}_flops"] for c in cs) for k in ("encoder", "layer", "head")}
        row["clips"] = [{k: v for k, v in c.items() if k not in ("peak", "inc")} for c in cs]
        rows.append(row)
    return rows


def _buckets(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi)))
    return tuple(out)


def _gb(values) -> float | None:
    mean = _mean(values)
    return mean / 1e9 if mean is not None else None


def format_table(rows: list[dict], title: str) -> str:
    def f(v, fmt, scale=1.0):
        return "-" if v is None else format(scale * v, fmt)

    head = (f"{'bucket':<9} {'method':<8} {'ret. %':>6} {'GFLOPs':>9} {'TTFT s':>8} {'Spd.':>6} {'ideal':>6} "
            f"{'eff.':>5} {'t_AP ms':>8} {'t_AP %':>7} {'m GB':>6} {'dm GB':>7} {'Sav.':>6}")
    lines = [title, head]
    for r in rows:
        lines.append(
            f"{r['bucket']:<9} {r['method']:<8} {100 * r['retention']:>6.2f} {r['gflops']:>9.1f} {r['ttft_s']:>8.3f} "
            f"{r['speedup']:>5.2f}x {r['flops_ideal_speedup']:>5.2f}x {100 * r['efficiency']:>4.0f}% "
            f"{f(r['t_ap_s'], '8.2f', 1e3):>8} {f(r['t_ap_fraction'], '7.3f', 100):>7} "
            f"{f(r['peak_gb'], '6.2f'):>6} {f(r['increment_gb'], '7.3f'):>7} "
            f"{(f(r['saving'], '5.2f') + 'x') if r['saving'] else '-':>6}"
        )
    return "\n".join(lines)


def format_parts(rows: list[dict]) -> str:
    """Where each method's time goes (``--breakdown``): seconds per part, and per part Vanilla's time / the method's
    beside Vanilla's FLOPs / the method's."""
    lines = [f"{'bucket':<9} {'method':<8} {'encoder':>8} {'layers':>8} {'head':>7} {'points':>7} {'rest':>6}   "
             f"{'layers: spd / FLOPs':>20} {'head: spd / FLOPs':>18}"]
    base = {}
    for r in rows:
        p, f = r.get("parts_s"), r.get("part_flops")
        if not p:
            continue
        if r["method"] == "Vanilla":
            base[r["bucket"]] = (p, f)
        bp, bf = base.get(r["bucket"], (p, f))
        lines.append(
            f"{r['bucket']:<9} {r['method']:<8} {p['encoder']:>8.2f} {sum(p['layers']):>8.2f} {p['head']:>7.2f} "
            f"{p['points']:>7.3f} {p['rest']:>6.2f}   "
            f"{sum(bp['layers']) / sum(p['layers']):>9.2f}x / {bf['layer'] / f['layer']:.2f}x "
            f"{bp['head'] / p['head']:>8.2f}x / {bf['head'] / f['head']:.2f}x")
    return "\n".join(lines) if len(lines) > 1 else ""


def describe(args, device: torch.device) -> dict:
    """Where and how the benchmark ran (written into the JSON)."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    if device.type == "cpu":
        try:
            cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            name = cpu[0].split(":", 1)[1].strip() if cpu else name
        except OSError:
            pass
    n_layers = 4 if args.tiny else args.llm_layers
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": name, "device_type": device.type,
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tiny": args.tiny,
        "llm_layers": n_layers, "encoder_layers": 2 if args.tiny else args.encoder_layers,
        "deep_layer": deep_layer(n_layers), "tie_embeddings": args.tie_embeddings,
        "repeats": args.repeats, "warmup": args.warmup, "per_bucket": args.per_bucket, "breakdown": args.breakdown,
        "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke run)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--llm-layers", type=int, default=32, help="LLM decoder layers at 7B width (32 = the full model)")
    p.add_argument("--encoder-layers", type=int, default=32, help="audio tower layers (32 = the full tower)")
    p.add_argument("--tie-embeddings", action="store_true", help="share embeddings and LM head (saves memory)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--buckets", type=_buckets, default=BUCKETS, help="duration buckets, e.g. 0-20,20-40,40-60")
    p.add_argument("--per-bucket", type=int, default=5, help="clip durations per bucket (evenly spread)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the audio tower, each decoder layer and the LM head (hooks; syncs on a GPU)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench_prefill.json / .csv")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = lslm.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_prefill: --device cuda asked for, but torch sees no CUDA device")
    meta = describe(args, device)
    t0 = time.perf_counter()
    rows = run(args)
    meta["seconds"] = time.perf_counter() - t0
    meta["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    what = "tiny model" if args.tiny else \
        f"Qwen2-Audio-7B widths, {meta['llm_layers']} LLM + {meta['encoder_layers']} encoder layers, l_deep = {meta['deep_layer']}"
    print(format_table(rows, f"prefill efficiency on {meta['device']} ({what}; random weights; retention forced "
                             "to paper Table 1)"))
    if args.breakdown:
        print("seconds per part (median run); per part Vanilla's time / the method's beside Vanilla's FLOPs / the method's")
        print(format_parts(rows))
    if args.out is not None:
        write(args.out, meta, rows)
    return rows


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k != "clips"} for r in rows]
    with (out / "bench_prefill.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    (out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out / 'bench_prefill.json'}")


if __name__ == "__main__":
    main()

"""Prefill efficiency of Affinity Pooling on Qwen2-Audio-7B's architecture (paper Table 2), with random weights.

    python scripts/bench_prefill.py --out outputs/bench_prefill            # GPU: real 7B shapes, bf16, SDPA
    python scripts/bench_prefill.py --tiny --out /tmp/bench                # CPU smoke run on a tiny random model

What it builds: ``Qwen2AudioForConditionalGeneration`` from the 7B configuration written below (no download,
random weights, bf16, SDPA) on the GPU. What it feeds: random log-mel features for clips of 0-20, 20-40 and 40-60 s.
Qwen2-Audio's encoder takes one 30 s window (3000 mel frames) per clip, so a clip longer than 30 s is fed as
consecutive 30 s windows (the last one partly padding) whose audio tokens fill ONE run of ``<|AUDIO|>``
placeholders in one prompt: the stock model scatters the windows' features into that run in order. The encoder
therefore costs a whole window per started 30 s, as it would in deployment.

Compression: random weights give no meaningful similarities, so the paper's retention is forced with a fixed-ratio
operator (``uniform_merge`` with ``ratio``): Table 1 Aggressive keeps 78.64% after l_in=0 (AP_in), 14.30% after
l_deep=29 alone (AP_deep) and 14.91% after both (DAP: 78.64% at l=0, then 14.91/78.64 at l=29). t_AP is therefore
the cost of that operator plus the engine's re-assembly, not of Algorithm 1's similarity band.

Per method and bucket (median over ``--repeats`` after ``--warmup``): TTFT = ``generate(max_new_tokens=1)`` (CUDA
events on GPU, wall clock on CPU), speed-up over vanilla next to the FLOPs-ideal speed-up (audio encoder + LLM
prefill FLOPs, vanilla / method), t_AP (compression seconds), peak memory m, its increment over what was allocated
before the call (weights + inputs) and the saving ratio dm_vanilla / dm. Off GPU, memory columns are empty.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from speech_redundancy import efficiency  # noqa: E402
from speech_redundancy.engine import compression  # noqa: E402
from speech_redundancy.models import lslm, qwen2audio  # noqa: E402
from speech_redundancy.compress import Point  # noqa: E402

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
BUCKETS = ((0, 20), (20, 40), (40, 60))
PROMPT_TOKENS = 14  # "Detect the language and recognize the speech: <|en|>" is about this long


def methods(n_layers: int) -> dict[str, list[Point]]:
    deep = min(n_layers - 1, round(29 * n_layers / 32))
    return {
        "Vanilla": [],
        "AP_in": [Point(0, "uniform_merge", {"ratio": RETENTION_IN})],
        "AP_deep": [Point(deep, "uniform_merge", {"ratio": RETENTION_DEEP})],
        "DAP": [Point(0, "uniform_merge", {"ratio": RETENTION_IN}),
                Point(deep, "uniform_merge", {"ratio": RETENTION_DAP / RETENTION_IN})],
    }


def build(tiny: bool, device: torch.device):
    """(model, audio_token_id, bos, eos) with random weights."""
    if tiny:
        model, processor = qwen2audio.build_tiny(seed=0)
        tok = processor.tokenizer
        ids = [tok.convert_tokens_to_ids(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")]
        return model.to(device), *ids
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(**QWEN2_AUDIO_7B)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.audio_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config.audio_token_index, AUDIO_BOS, AUDIO_EOS


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


def measure(model, reach, batch, points, device):
    """One TTFT measurement: (seconds, compression seconds, peak bytes, increment bytes, record)."""
    probe = efficiency.memory_probe(device)
    watch = efficiency.Stopwatch(device).start()
    with torch.inference_mode(), compression(model, points, reach) as session:
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    seconds = watch.stop()
    peak, inc = probe.stop()
    rec = session.records[0]
    return seconds, rec.seconds, peak, inc, rec


def run(args) -> list[dict]:
    device = lslm.device(args.device)
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the 7B benchmark needs a GPU; use --tiny for a CPU smoke run")
    model, audio_id, bos, eos = build(args.tiny, device)
    reach = qwen2audio.reach(model)
    shape = efficiency.DecoderShape.from_config(reach.text_config)
    enc = efficiency.WhisperEncoderShape.from_qwen2audio(model.config)
    dtype = next(model.parameters()).dtype
    rows = []
    for lo, hi in args.buckets:
        durations = [lo + (i + 0.5) * (hi - lo) / args.per_bucket for i in range(args.per_bucket)]
        per_method: dict[str, dict[str, list]] = {}
        for k, seconds in enumerate(durations):
            batch, windows, n_audio = clip_inputs(seconds, audio_id, bos, eos, shape.vocab, device, dtype, seed=k)
            for name, points in methods(shape.n_layers).items():
                for _ in range(args.warmup):
                    measure(model, reach, batch, points, device)
                runs = [measure(model, reach, batch, points, device) for _ in range(args.repeats)]
                rec = runs[0][4]
                flops = efficiency.prefill_flops(shape, rec.layer_tokens) + efficiency.audio_encoder_flops(enc, windows)
                acc = per_method.setdefault(name, {"ttft": [], "t_ap": [], "peak": [], "inc": [], "flops": [],
                                                   "frr": [], "tokens": []})
                acc["ttft"].append(statistics.median(r[0] for r in runs))
                acc["t_ap"].append(statistics.median(r[1] for r in runs))
                acc["peak"].append(runs[-1][2])
                acc["inc"].append(runs[-1][3])
                acc["flops"].append(flops)
                acc["frr"].append(rec.tokens_out / rec.tokens_in)
                acc["tokens"].append(n_audio)
        base = per_method["Vanilla"]
        for name, acc in per_method.items():
            row = {
                "bucket": f"{lo}-{hi} s", "method": name, "n": len(durations),
                "audio_tokens": statistics.mean(acc["tokens"]), "frr": statistics.mean(acc["frr"]),
                "ttft_ms": 1000 * statistics.mean(acc["ttft"]),
                "speedup": statistics.mean(base["ttft"]) / statistics.mean(acc["ttft"]),
                "ideal_speedup": sum(base["flops"]) / sum(acc["flops"]),
                "gflops": sum(acc["flops"]) / len(acc["flops"]) / 1e9,
                "t_ap_ms": 1000 * statistics.mean(acc["t_ap"]) if name != "Vanilla" else None,
                "peak_gb": _gb(acc["peak"]), "increment_gb": _gb(acc["inc"]),
            }
            row["saving"] = (_gb(base["inc"]) / row["increment_gb"]) if row["increment_gb"] else None
            rows.append(row)
    return rows


def _buckets(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi)))
    return tuple(out)


def _gb(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) / 1e9 if values else None


def format_table(rows: list[dict], device: str) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'bucket':<9} {'method':<8} {'FRR %':>6} {'GFLOPs':>9} {'TTFT ms':>9} {'Spd.':>6} {'ideal':>6} "
            f"{'t_AP ms':>8} {'m GB':>7} {'dm GB':>7} {'Sav.':>6}")
    lines = [f"prefill efficiency on {device} (random weights; retention forced to paper Table 1)", head]
    for r in rows:
        lines.append(
            f"{r['bucket']:<9} {r['method']:<8} {100 * r['frr']:>6.2f} {r['gflops']:>9.1f} {r['ttft_ms']:>9.2f} "
            f"{r['speedup']:>5.2f}x {r['ideal_speedup']:>5.2f}x {f(r['t_ap_ms'], '8.2f'):>8} "
            f"{f(r['peak_gb'], '7.2f'):>7} {f(r['increment_gb'], '7.3f'):>7} "
            f"{(f(r['saving'], '5.2f') + 'x') if r['saving'] else '-':>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--buckets", type=_buckets, default=BUCKETS, help="duration buckets, e.g. 0-20,20-40,40-60")
    p.add_argument("--per-bucket", type=int, default=5, help="clip durations per bucket (evenly spread)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="folder for bench_prefill.csv / .json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    print(format_table(rows, device + (" (tiny model)" if args.tiny else " (Qwen2-Audio-7B shapes)")))
    if args.out is not None:
        import csv

        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "bench_prefill.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        meta = {"device": device, "tiny": args.tiny, "torch": torch.__version__, "repeats": args.repeats,
                "warmup": args.warmup, "per_bucket": args.per_bucket, "seconds": time.perf_counter() - t0}
        (args.out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()

"""One prepared GPU check of the efficiency claims (paper Table 2, issue 14): about 4-6 minutes on one GPU.

    python3 scripts/device_check.py --out DIR          # or: make device-check (writes outputs/device_check)

On a GPU machine with Python and PyTorch only (no Hydra, OmegaConf, jiwer or soundfile; no package registry), run
``scripts/device_wheels.sh`` here first: it downloads the project's pinned transformers and what it imports into
``.whl/`` (ignored by git), which travels with the working tree and is unpacked there into a temporary folder put
first on ``sys.path``. Without ``.whl/`` the machine's own transformers is used (the report says which). Through the
device tool: ``run(command="python3 scripts/device_check.py --out $OUT", carry=[".whl"], timeout_s=540)``.

Three steps, each on Qwen2-Audio-7B's full architecture with random weights (nothing downloaded), bf16, SDPA:

1. correctness: (a) with nothing merged (tau > 1 at l = 0 and l = 29) and with no points the hooked model gives
   tokens and logits equal (torch.equal) to the stock model; (b) a left-padded batch of three clips (8, 25 and
   50 s) under DAP gives the tokens of one-by-one runs. bf16 on a GPU is not batch-invariant even for the stock
   model (padding changes kernel shapes), so (b) passes when the tokens agree, or when the compressed batch departs
   from its one-by-one runs by at most 4x as much (largest |logit| difference) as the stock model's batch departs
   from its own one-by-one runs;
2. prefill: ``bench_prefill.py``'s benchmark (Vanilla, AP_in, AP_deep, DAP; the paper's forced retention) for the
   three duration buckets, 6 clips per bucket, median of 5 after 2 warm-ups;
3. operators: Affinity Pooling (threshold 0.8, window 1 and 3) at T in {250, 750, 1500}, d in {3584, 4096}, in
   float32 and bf16, median of 30 CUDA-event timings (target: at most 0.5 ms).

Writes ``device_check.json`` and ``device_check.md`` into ``--out``; exits 1 when a step fails or misses its check.
Without CUDA it refuses in one line (exit 2) before doing anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
BUDGET_S = 450  # stop starting new steps after this many seconds (the whole check must fit in 8 minutes)
OP_TARGET_MS = 0.5
LEGACY_MANYLINUX = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}  # glibc they need


# ----------------------------------------------------------------------------- before anything: CUDA, wheels
def refusal() -> str | None:
    """Why this machine cannot run the check (one line), or None."""
    try:
        import torch
    except ImportError:
        return "device_check: PyTorch is not installed here; this check runs on a GPU machine with PyTorch"
    if not torch.cuda.is_available():
        return (f"device_check: no CUDA device visible to torch {torch.__version__} on {platform.node()}; this check "
                "needs one GPU (run it on a GPU machine; the CPU benchmark is scripts/bench_prefill.py --device cpu)")
    return None


def wheel_fits(name: str) -> bool:
    """Whether a wheel file (by its name's tags) installs on this Python and machine."""
    parts = name[:-4].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    major, minor = sys.version_info[:2]
    ok_py = False
    for tag in py.split("."):
        m = re.fullmatch(r"(cp|py)(\d)(\d*)", tag)
        if not m:
            continue
        want = (int(m[2]), int(m[3])) if m[3] else (int(m[2]), 0)
        if m[1] == "py" and want[0] == major:
            ok_py = True
        elif m[1] == "cp" and ((abi == "abi3" and want <= (major, minor)) or want == (major, minor)):
            ok_py = True
    if not ok_py:
        return False
    if plat == "any":
        return True
    machine = platform.machine()
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    have = tuple(int(v) for v in version.split(".")[:2])
    for tag in plat.split("."):
        if not tag.endswith("_" + machine):
            continue
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)", tag[: -len(machine) - 1])
        need = (int(m[1]), int(m[2])) if m else LEGACY_MANYLINUX.get(tag[: -len(machine) - 1])
        if need is not None and need <= have:
            return True
    return False


def use_wheels(folder: Path = WHEELS) -> dict:
    """Unpack the wheels in ``folder`` that fit this machine into a temporary folder first on ``sys.path``."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"wheels": [], "site": None}
    site = Path(tempfile.mkdtemp(prefix="sr-wheels-"))
    used, skipped = [], []
    for w in wheels:
        if not wheel_fits(w.name):
            skipped.append(w.name)
            continue
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
        used.append(w.name)
    for data in site.glob("*.data"):  # purelib / platlib parts of a wheel belong at the top
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                item.rename(site / item.name)
    sys.path.insert(0, str(site))
    return {"wheels": used, "skipped": skipped, "site": str(site)}


# ----------------------------------------------------------------------------- steps
def batch_of(clips: list[dict], pad_id: int) -> dict:
    """One left-padded batch from single-clip inputs (their 30 s windows stacked in sample order)."""
    import torch

    n = max(c["input_ids"].shape[1] for c in clips)
    ids, mask = [], []
    for c in clips:
        gap = n - c["input_ids"].shape[1]
        ids.append(torch.cat([c["input_ids"].new_full((1, gap), pad_id), c["input_ids"]], 1))
        mask.append(torch.cat([c["attention_mask"].new_zeros((1, gap)), c["attention_mask"]], 1))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask),
            "input_features": torch.cat([c["input_features"] for c in clips]),
            "feature_attention_mask": torch.cat([c["feature_attention_mask"] for c in clips])}


def correctness(bench, model, device, new_tokens: int = 8) -> dict:
    import torch

    from speech_redundancy.compress import Point
    from speech_redundancy.engine import compression
    from speech_redundancy.models import qwen2audio

    reach = qwen2audio.reach(model)
    audio_id = model.config.audio_token_index
    pad = int(model.config.text_config.pad_token_id)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=pad)
    deep = bench.deep_layer(reach.n_layers)

    def generate(batch, points):
        with torch.inference_mode():
            if points is None:
                out = model.generate(**batch, **gen)
            else:
                with compression(model, points, reach):
                    out = model.generate(**batch, **gen)
        return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()

    dtype, vocab = next(model.parameters()).dtype, model.config.text_config.vocab_size
    clips = [bench.clip_inputs(s, audio_id, bench.AUDIO_BOS, bench.AUDIO_EOS, vocab, device, dtype, seed=10 + k)[0]
             for k, s in enumerate((8.0, 25.0, 50.0))]
    batch = batch_of(clips, pad)
    out: dict = {"new_tokens": new_tokens, "clips_s": [8.0, 25.0, 50.0], "deep_layer": deep}

    # (a) nothing merged = stock, bit for bit
    ref_tok, ref_logits = generate(batch, None)
    no_merge = [Point(0, "affinity", {"threshold": 1.5, "window": 1}),
                Point(deep, "affinity", {"threshold": 1.5, "window": 3})]
    a = {}
    for name, points in (("observe", []), ("no_merge", no_merge)):
        tok, logits = generate(batch, points)
        a[name] = {"tokens_equal": bool(torch.equal(tok, ref_tok)), "logits_equal": bool(torch.equal(logits, ref_logits)),
                   "max_abs_logit_diff": float((logits - ref_logits).abs().max())}
    out["no_merge_equals_stock"] = a

    # (b) batch = one by one, under DAP and, for the noise level, for the stock model
    b = {}
    for name, points in (("stock", None), ("DAP", bench.methods(reach.n_layers)["DAP"])):
        tok, logits = generate(batch, points)
        agree, diff = [], 0.0
        for i, clip in enumerate(clips):
            t1, l1 = generate(clip, points)
            agree.append(bool(torch.equal(tok[i], t1[0])))
            diff = max(diff, float((logits[i, 0] - l1[0, 0]).abs().max()))  # first step: no earlier token differs
        b[name] = {"tokens_equal_per_clip": agree, "max_abs_first_logit_diff": diff,
                   "max_abs_first_logit": float(logits[:, 0].abs().max())}
    b_ok = all(b["DAP"]["tokens_equal_per_clip"]) or \
        b["DAP"]["max_abs_first_logit_diff"] <= 4 * max(b["stock"]["max_abs_first_logit_diff"], 1e-3)
    out["batch_equals_one_by_one"] = b
    out["passed"] = all(v["tokens_equal"] and v["logits_equal"] for v in a.values()) and b_ok
    return out


def prefill(bench, built, device, per_bucket: int = 6, repeats: int = 5, warmup: int = 2) -> dict:
    settings = {"per_bucket": per_bucket, "repeats": repeats, "warmup": warmup}
    args = bench.parser().parse_args(["--device", str(device)] + [f"--{k.replace('_', '-')}={v}"
                                                                   for k, v in settings.items()])
    rows = bench.run(args, built)
    print(bench.format_table(rows, "prefill (Qwen2-Audio-7B architecture, random weights)"), flush=True)
    n_layers = built[0].config.text_config.num_hidden_layers
    return {"settings": {**settings, "deep_layer": bench.deep_layer(n_layers)}, "rows": rows}


def speech_like(T: int, d: int, seed: int = 0):
    """Runs of 1-6 tokens sharing a random vector, plus noise at half its scale (as scripts/bench_compress.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ends = torch.randint(1, 7, (T,), generator=g).cumsum(0)
    run = torch.searchsorted(ends, torch.arange(T), right=True)
    base = torch.randn(int(run.max()) + 1, d, generator=g)
    return base[run] + 0.5 * torch.randn(T, d, generator=g)


def operators(device, repeats: int = 30, sizes=((250, 750, 1500), (3584, 4096))) -> dict:
    import torch

    from speech_redundancy.compress import compress
    from speech_redundancy.efficiency import Stopwatch

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T in sizes[0]:
            for d in sizes[1]:
                x = speech_like(T, d).to(device, dtype)
                for window in (1, 3):
                    def once():
                        return compress(x, "affinity", threshold=0.8, window=window)
                    for _ in range(3):
                        once()
                    times = []
                    for _ in range(repeats):
                        watch = Stopwatch(device).start()
                        once()
                        times.append(1e3 * watch.stop())
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "T": T, "d": d, "window": window,
                                 "ms": statistics.median(times), "ms_min": min(times),
                                 "retention": once().n_out / T})
    return {"target_ms": OP_TARGET_MS, "rows": rows, "passed": all(r["ms"] <= OP_TARGET_MS for r in rows)}


# ----------------------------------------------------------------------------- the report
def markdown(report: dict) -> str:
    """The report as Markdown (for docs/benchmarks.md)."""
    m = report["meta"]
    lines = [f"# Device check ({m.get('date', '?')})", "",
             f"{m.get('gpu', '?')}, torch {m.get('torch', '?')} (CUDA {m.get('cuda', '?')}), Python "
             f"{m.get('python', '?')}, transformers {m.get('transformers', '?')} ({m.get('transformers_from', '?')}); "
             f"{m.get('seconds', 0):.0f} s in all.", ""]
    for name, step in report["steps"].items():
        status = step.get("status")
        lines.append(f"## {name}: {status}" + (f" ({step['error']})" if step.get("error") else ""))
        lines.append("")
        got = step.get("result") or {}
        if name == "correctness" and got:
            for k, v in got["no_merge_equals_stock"].items():
                lines.append(f"- {k} vs stock: tokens equal {v['tokens_equal']}, logits equal {v['logits_equal']} "
                             f"(max |diff| {v['max_abs_logit_diff']:.3g})")
            for k, v in got["batch_equals_one_by_one"].items():
                lines.append(f"- {k}, batch of 3 vs one by one: tokens equal per clip {v['tokens_equal_per_clip']}, "
                             f"max |first-step logit diff| {v['max_abs_first_logit_diff']:.3g} "
                             f"(max |logit| {v['max_abs_first_logit']:.3g})")
        elif name == "prefill" and got:
            lines += ["| bucket | method | retention % | TTFT ms | speed-up | FLOPs-ideal | efficiency | t_AP ms | "
                      "m GB | dm GB | saving |", "|" + " --- |" * 11]
            for r in got["rows"]:
                lines.append(
                    f"| {r['bucket']} | {r['method']} | {100 * r['retention']:.2f} | {1e3 * r['ttft_s']:.1f} | "
                    f"{r['speedup']:.2f}x | {r['flops_ideal_speedup']:.2f}x | {100 * r['efficiency']:.0f}% | "
                    f"{_f(r['t_ap_s'], 1e3, '.2f')} | {_f(r['peak_gb'], 1, '.2f')} | "
                    f"{_f(r['increment_gb'], 1, '.3f')} | {_f(r['saving'], 1, '.2f')} |")
        elif name == "operators" and got:
            lines += [f"Affinity Pooling, threshold 0.8, median of CUDA-event timings; target <= {got['target_ms']} ms.",
                      "", "| dtype | T | d | window | ms | min ms | retention |", "|" + " --- |" * 7]
            for r in got["rows"]:
                lines.append(f"| {r['dtype']} | {r['T']} | {r['d']} | {r['window']} | {r['ms']:.3f} | "
                             f"{r['ms_min']:.3f} | {r['retention']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _f(v, scale, fmt) -> str:
    return "-" if v is None else format(scale * v, fmt)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "device_check.md").write_text(markdown(report))
    print(f"device_check: wrote {out / 'device_check.json'} and device_check.md", flush=True)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "device_check"))
    p.add_argument("--skip", default="", help="comma-separated steps to leave out (correctness,prefill,operators)")
    args = p.parse_args(argv)
    why = refusal()
    if why:
        print(why, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    wheels = use_wheels()
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_prefill as bench

    device = torch.device("cuda")
    where = Path(transformers.__file__).resolve()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "gpu": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gb": torch.cuda.get_device_properties(device).total_memory / 1e9, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "machine": platform.machine(),
            "transformers": transformers.__version__,
            "transformers_from": "shipped wheel" if wheels["site"] and str(where).startswith(wheels["site"])
            else f"the machine's own ({where.parent})", "wheels": wheels}
    print(f"device_check: {meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']} "
          f"({meta['transformers_from']})", flush=True)
    report = {"meta": meta, "steps": {}}
    skip = {s for s in args.skip.split(",") if s}
    built = None
    for name in ("correctness", "prefill", "operators"):
        step = report["steps"][name] = {"status": "not run"}
        if name in skip:
            step["status"] = "skipped (--skip)"
            continue
        if time.perf_counter() - t0 > BUDGET_S:
            step["status"] = f"skipped: over the {BUDGET_S} s budget"
            continue
        start = time.perf_counter()
        print(f"device_check: {name} ...", flush=True)
        try:
            if name in ("correctness", "prefill") and built is None:
                config = bench.config_7b(32, 32)
                built = (bench.build_7b(config, device, torch.bfloat16), config.audio_token_index,
                         bench.AUDIO_BOS, bench.AUDIO_EOS)
                meta["build_s"] = time.perf_counter() - start
            if name == "correctness":
                step["result"] = correctness(bench, built[0], device)
            elif name == "prefill":
                step["result"] = prefill(bench, built, device)
            else:
                if built is not None:
                    del built
                    built = None
                    torch.cuda.empty_cache()
                step["result"] = operators(device)
            passed = step["result"].get("passed", True)
            step["status"] = "passed" if passed else "FAILED its check"
        except Exception as e:  # the report says which step failed and why; the others still run
            step["status"] = "error"
            step["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            step["traceback"] = traceback.format_exc()
            print(step["traceback"], file=sys.stderr, flush=True)
        step["seconds"] = time.perf_counter() - start
        print(f"device_check: {name}: {step['status']} ({step['seconds']:.0f} s)", flush=True)
    meta["seconds"] = time.perf_counter() - t0
    write(report, args.out)
    print(markdown(report))
    return 0 if all(s["status"] in ("passed", "skipped (--skip)") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

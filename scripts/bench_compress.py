"""Time every compression operator on synthetic and real hidden states, each beside one copy of its input.

    PYTHONPATH=src python scripts/bench_compress.py [--device cuda] [--quick] [--T 1500 --d 4096]
        [--kinds random,smooth,massive] [--real 2] [--only samp,ltbm] [--json bench.json] [--out bench.csv]

Inputs (float32 [T, d]; by default T = 1500, d = 4096, windows 1 and 3):
- ``random``: independent Gaussian rows (no two alike: Affinity Pooling at tau = 0.8 merges nothing);
- ``smooth``: a random walk (cumulative sum of Gaussian rows: every neighbour within about 1e-3 of cosine 1, as in
  deep layers);
- ``massive``: Gaussian rows plus three dimensions shared by every token at ~100x the others' scale (the massive
  activations of LLM hidden states: every cosine near 1);
- ``runs``: runs of 1-6 near-identical tokens (a shared random vector plus noise at half its scale; the earlier
  benchmark's input), on request;
- real hidden states (``--real N``, default 2): Whisper base's encoder inputs at layers 0, 3 and 6 (the encoder
  output) on the N longest demo clips (d = 512, T = 50 frames per second), when the weights and the demo set are in
  the cache (``make data``).

Per input: ``copy`` (``x.clone()``, the yardstick), every operator of ``compress.OPERATORS`` through ``compress``,
``affinity_groups`` alone (the groups without the means), and the literal Algorithm 1 loop plus a per-group mean
(``literal``). Milliseconds (wall-clock, or with ``--clock cpu`` this process's CPU time), median (and minimum)
after warm-up; operators slower than 100 ms get at most 3 timed
calls. Parameters: tau = 0.8; K = 60%; word spans of 10 tokens (R = 4) for the oracle operators; uniform random
attention scores and a random 12-token text query for the peer operators; ``segment=25``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time

import torch

from speech_redundancy.compress import OPERATORS, affinity_groups, compress

THRESHOLD, RATIO, BUDGET, WORD = 0.8, 0.6, 4, 10
KINDS = ("random", "smooth", "massive", "runs")
TARGETS = {"affinity_groups": 2.5, "affinity": 4.0}  # ms at T = 1500, d = 4096, window 3 on 2 CPU cores (issue 22)


def synthetic(kind: str, T: int, d: int, seed: int = 0) -> torch.Tensor:
    """One of the synthetic inputs of the module docstring, float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(T, d, generator=g)
    if kind == "smooth":
        return torch.randn(T, d, generator=g).cumsum(0)
    if kind == "massive":
        x = torch.randn(T, d, generator=g)
        x[:, :3] += torch.tensor([80.0, -120.0, 60.0])
        return x
    if kind == "runs":
        ends = torch.randint(1, 7, (T,), generator=g).cumsum(0)
        run = torch.searchsorted(ends, torch.arange(T), right=True)
        base = torch.randn(int(run.max()) + 1, d, generator=g)
        return base[run] + 0.5 * torch.randn(T, d, generator=g)
    raise ValueError(f"unknown input kind {kind!r}; allowed: {', '.join(KINDS)}")


def whisper_states(n_clips: int) -> list[tuple[str, torch.Tensor]]:
    """(label, [T, 512]) for Whisper base's encoder layers 0, 3 and 6 on the ``n_clips`` longest demo clips, or []
    with a note when the weights or the demo set are not in the cache."""
    from speech_redundancy.audio import load_audio
    from speech_redundancy.data.records import read_manifest
    from speech_redundancy.models.base import Request
    from speech_redundancy.models.whisper import WhisperModel
    from speech_redundancy.paths import cache_dir

    manifest = cache_dir() / "demo" / "manifest.jsonl"
    if n_clips <= 0:
        return []
    if not manifest.is_file() or not (cache_dir() / "models" / "whisper-base").is_dir():
        print(f"real hidden states skipped: no demo set or whisper-base under {cache_dir()} (run `make data`)")
        return []
    from speech_redundancy.weights import load_whisper

    utts = sorted(read_manifest(manifest), key=lambda u: -u.duration)[:n_clips]
    model = WhisperModel(*load_whisper("whisper-base"))
    out = []
    for utt in utts:
        audio = utt.audio if os.path.isabs(utt.audio) else str(manifest.parent / utt.audio)
        states = model.hidden_states(Request(utt=utt, audio=load_audio(audio)))
        out += [(f"whisper-base l={layer} {utt.id}", states[layer].contiguous()) for layer in (0, 3, 6)]
    return out


def timer(device: str, clock: str = "wall"):
    """Milliseconds of one call of f, synchronised on CUDA; ``clock="cpu"``: the CPU time of this process instead of
    the wall-clock time (on a loaded machine it leaves out the time other jobs hold the cores; with one thread it is
    close to the wall-clock time an idle machine would give)."""
    if clock == "cpu":
        def run(f):
            t0 = time.process_time()
            f()
            return (time.process_time() - t0) * 1e3
    elif device.startswith("cuda"):
        def run(f):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(f):
            t0 = time.perf_counter()
            f()
            return (time.perf_counter() - t0) * 1e3
    return run


def time_ms(f, device: str, repeats: int, warmup: int = 2, clock: str = "wall") -> tuple[float, float]:
    """(median, minimum) milliseconds of f after warm-up; at most 3 timed calls when a warm-up call took > 100 ms."""
    once = timer(device, clock)
    slow = max(once(f) for _ in range(warmup)) > 100
    times = [once(f) for _ in range(min(repeats, 3) if slow else repeats)]
    return statistics.median(times), min(times)


def literal_pool(x: torch.Tensor, threshold: float, window: int) -> torch.Tensor:
    """Algorithm 1 as a straightforward implementation would write it: unit rows computed once, then one token at a
    time (a host sync per token), then the mean of each group."""
    unit = torch.nn.functional.normalize(x.float(), dim=1)
    members: list[list[int]] = [[0]]
    for t in range(1, x.shape[0]):
        last = members[-1][-window:]
        if float((unit[last] @ unit[t]).max()) >= threshold:
            members[-1].append(t)
        else:
            members.append([t])
    return torch.stack([x[m].mean(0) for m in members])


def operators(T: int, d: int, window: int, device: str) -> dict[str, dict]:
    """Every operator of compress.OPERATORS with its inputs: word spans, attention scores, a 12-token text query."""
    spans = torch.tensor([[a, min(a + WORD, T)] for a in range(0, T, WORD + 2)], dtype=torch.long)
    scores = torch.rand(T, generator=torch.Generator().manual_seed(1)).to(device)
    query = torch.randn(12, d, generator=torch.Generator().manual_seed(2)).to(device)
    params = {
        "none": {},
        "random_drop": dict(budget=BUDGET, spans=spans, seed=0),
        "uniform_drop": dict(budget=BUDGET, spans=spans),
        "uniform_merge": dict(budget=BUDGET, spans=spans),
        "affinity": dict(threshold=THRESHOLD, window=window),
        "affinity_ratio": dict(ratio=RATIO, window=window),
        "interpolate": dict(ratio=RATIO),
        "adjacent_merge": dict(ratio=RATIO),
        "group_merge": dict(threshold=THRESHOLD),
        "attention_prune": dict(ratio=RATIO, scores=scores),
        "samp": dict(ratio=RATIO, scores=scores, threshold=0.9),
        "visionzip": dict(ratio=RATIO, scores=scores),
        "cdpruner": dict(ratio=RATIO, query=query),
        "fastadasp": dict(ratio=RATIO, scores=scores),
        "speechprune": dict(ratio=RATIO, scores=scores, query=query, segment=25),
        "segment_topk": dict(ratio=RATIO, scores=scores, segment=25),
        "ltbm": dict(ratio=RATIO),
    }
    missing = set(OPERATORS) - set(params)
    if missing:
        raise SystemExit(f"bench_compress.py has no inputs for {sorted(missing)}: add them to operators()")
    return params


def bench_input(label: str, x: torch.Tensor, window: int, args, only: set[str] | None) -> dict:
    """One row: the milliseconds of every timed call on x (median and minimum) and each divided by copy's."""
    T, d = x.shape
    ms, ms_min = {}, {}

    def add(name, f, repeats=args.repeats, warmup=2):
        ms[name], ms_min[name] = time_ms(f, args.device, repeats, warmup, args.clock)

    add("copy", x.clone)
    for name, params in operators(T, d, window, args.device).items():
        if only is None or name in only:
            add(name, lambda: compress(x, name, **params))
    if only is None or "affinity" in only:
        add("affinity_groups", lambda: affinity_groups(x, THRESHOLD, window))
        add("literal", lambda: literal_pool(x, THRESHOLD, window), max(3, args.repeats // 5), warmup=1)
    row = {"input": label, "T": T, "d": d, "window": window, "ms": ms, "ms_min": ms_min,
           "per_copy": {k: v / ms["copy"] for k, v in ms.items()},
           "per_copy_min": {k: v / ms_min["copy"] for k, v in ms_min.items()}}
    if "affinity" in ms:
        row["retention"] = compress(x, "affinity", threshold=THRESHOLD, window=window).n_out / T
        row["speedup"] = ms["literal"] / ms["affinity"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (5), one real clip")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per operator (default 15, --quick 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--kinds", default="random,smooth,massive", help=f"synthetic inputs, from {', '.join(KINDS)}")
    ap.add_argument("--T", default="1500", help="comma-separated sequence lengths of the synthetic inputs")
    ap.add_argument("--d", default="4096", help="comma-separated widths of the synthetic inputs")
    ap.add_argument("--windows", default="1,3", help="comma-separated windows (omega)")
    ap.add_argument("--real", type=int, default=None,
                    help="longest demo clips whose Whisper base hidden states are timed (default 2, --quick 1; 0: none)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time (default) or this process's CPU time (CPU only; for loaded machines)")
    ap.add_argument("--only", default=None, help="comma-separated operators to time (default: all)")
    ap.add_argument("--json", default=None, help="write every row and the run's settings as JSON")
    ap.add_argument("--out", default=None, help="write the milliseconds as CSV")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu times the host process; use it with --device cpu")
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (5 if args.quick else 15)
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        synthetic(k, 1, 4)  # an unknown kind fails before anything runs
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(OPERATORS)
    if unknown:
        raise SystemExit(f"unknown operators {sorted(unknown)}; allowed: {', '.join(OPERATORS)}")
    windows = [int(w) for w in args.windows.split(",")]
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}")

    inputs = [(f"{k}", synthetic(k, T, d)) for k in kinds for T in map(int, args.T.split(","))
              for d in map(int, args.d.split(","))]
    inputs += whisper_states(args.real if args.real is not None else (1 if args.quick else 2))
    rows = []
    for label, x in inputs:
        x = x.to(args.device)
        for window in windows:
            rows.append(bench_input(label, x, window, args, only))
            print_row(rows[-1], header=len(rows) == 1)
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in load_after)}")
    report_targets(rows)
    if args.json:
        meta = {"started_utc": started.isoformat(timespec="seconds"), "device": args.device,
                "threads": torch.get_num_threads(), "clock": args.clock, "cpu": cpu_name(), "cores": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version(), "repeats": args.repeats,
                "load_before": load_before, "load_after": load_after, "threshold": THRESHOLD, "ratio": RATIO,
                "targets_ms": TARGETS}
        with open(args.json, "w") as f:
            json.dump({"settings": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if args.out:
        names = list(dict.fromkeys(k for r in rows for k in r["ms"]))
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["device", "input", "T", "d", "window", *names, "retention", "speedup"])
            for r in rows:
                w.writerow([args.device, r["input"], r["T"], r["d"], r["window"],
                            *(r["ms"].get(n, "") for n in names), r.get("retention", ""), r.get("speedup", "")])
        print(f"wrote {args.out}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def print_row(row: dict, header: bool) -> None:
    names = list(row["ms"])
    if header:
        print(f"threads={torch.get_num_threads()}; ms (median), then in brackets the median / copy's")
    print(f"{row['input']}  T={row['T']} d={row['d']} window={row['window']}"
          + (f"  retention={row['retention']:.2f} speedup={row['speedup']:.0f}x" if "retention" in row else ""))
    print("   " + "  ".join(f"{n}={row['ms'][n]:.2f} ({row['per_copy'][n]:.1f})" for n in names), flush=True)


def report_targets(rows: list[dict]) -> None:
    """The issue's targets (CPU, T = 1500, d = 4096, window 3), one line per input kind."""
    for r in rows:
        if (r["T"], r["d"], r["window"]) != (1500, 4096, 3) or "affinity" not in r["ms"]:
            continue
        verdict = [f"{n} {r['ms'][n]:.2f} ms (min {r['ms_min'][n]:.2f}; target <= {t}) "
                   f"{'met' if r['ms'][n] <= t else 'NOT met'}" for n, t in TARGETS.items()]
        print(f"target {r['input']}: " + "; ".join(verdict) + f"; copy {r['ms']['copy']:.2f} ms")


if __name__ == "__main__":
    main()

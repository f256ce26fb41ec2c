#!/usr/bin/env python
"""Scan a LibriSpeech split once and write the project's JSONL manifest (optionally with MFA word timings).

    PYTHONPATH=src python scripts/prepare_librispeech.py --root /data/LibriSpeech --split test-clean \
        [--align-root /data/mfa/test-clean] [--out manifests/librispeech-test-clean.jsonl] [--on-error skip]

Then run on it with ``data=manifest data.manifest=<out>``. Layouts: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy.data.dataset import load_dataset  # noqa: E402
from speech_redundancy.data.records import write_manifest  # noqa: E402
from speech_redundancy.data.textgrid import coverage  # noqa: E402
from speech_redundancy.paths import cache_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="folder holding <split>/ (or LibriSpeech/, or the split folder)")
    p.add_argument("--split", default="test-clean")
    p.add_argument("--align-root", default=None, help="MFA output: <align-root>/<speaker>/<utt-id>.TextGrid")
    p.add_argument("--out", default=None, help="manifest path (default <cache>/manifests/librispeech-<split>.jsonl)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    args = p.parse_args(argv)

    utts, failures = load_dataset({"name": "librispeech", "root": args.root, "split": args.split,
                                   "align_root": args.align_root, "on_error": args.on_error})
    out = Path(args.out) if args.out else cache_dir() / "manifests" / f"librispeech-{args.split}.jsonl"
    write_manifest(out, utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"{out}: {len(utts)} utterances, {hours:.2f} h")
    if args.align_root:
        print(f"word alignments: {coverage(utts):.1%} of utterances")
    for f in failures:
        print(f"skipped {f.get('id') or f.get('file')}: {f['error']}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} problem(s) skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Add word timings to a JSONL manifest with the offline pocketsphinx aligner (English), for oracle runs.

    PYTHONPATH=src python scripts/align_manifest.py --manifest in.jsonl --out aligned.jsonl [--force] [--on-error skip]

Utterances that already carry words keep them unless ``--force``; non-English ones are passed through untouched.
Each aligned utterance is appended to ``<out>.partial`` as soon as it is done, so an interrupted run resumes where it
stopped; the final manifest replaces ``<out>`` at the end. Coverage (the share of reference words that the aligner
timed; the rest are interpolated between their neighbours, see ``speech_redundancy.data.align``) is printed.
Montreal Forced Aligner users: ``scripts/align_mfa.sh`` and ``data.align_root`` instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tqdm import tqdm  # noqa: E402

from speech_redundancy.audio import AudioError, load_audio  # noqa: E402
from speech_redundancy.data.align import AlignmentError, align  # noqa: E402
from speech_redundancy.data.records import Utterance, Word, read_manifest, write_manifest  # noqa: E402
from speech_redundancy.results import ResultsLog  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="re-align utterances that already have words")
    p.add_argument("--on-error", choices=("raise", "skip"), default="skip",
                   help="skip: keep a failing utterance without words and list it (default); raise: stop")
    args = p.parse_args(argv)

    utts = read_manifest(args.manifest)
    partial = args.out.with_name(args.out.name + ".partial")
    log = ResultsLog(partial)  # rows of an interrupted earlier run; a torn last line is skipped and repaired
    failures: list[str] = []
    timed = total = 0
    try:
        for u in tqdm(utts, desc="pocketsphinx alignment", unit="utt"):
            if (u.words and not args.force) or not u.language.startswith("en") or u.id in log.rows:
                continue
            try:
                result = align(load_audio(u.audio), u.text, name=f"{u.id} ({u.audio})")
                log.append({"id": u.id, "words": [vars(w) for w in result.words], "aligned": result.aligned})
            except (AlignmentError, AudioError) as e:
                if args.on_error == "raise":
                    raise SystemExit(f"error: {e}")
                log.append({"id": u.id, "error": str(e)})
    finally:
        log.close()
    done = log.rows
    out: list[Utterance] = []
    for u in utts:
        row = done.get(u.id)
        if row and "words" in row:
            u.words = [Word(**w) for w in row["words"]]
            timed += sum(row["aligned"])
            total += len(row["aligned"])
        elif row:
            failures.append(f"{u.id}: {row['error']}")
        out.append(u)
    write_manifest(args.out, out)
    partial.unlink()
    with_words = sum(1 for u in out if u.words)
    print(f"{args.out}: {len(out)} utterances, {with_words} with word timings")
    if total:
        print(f"alignment coverage: {timed / total:.2%} of {total} reference words timed by pocketsphinx")
    for f in failures:
        print(f"not aligned: {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Export a Hugging Face audio dataset kept on disk to the project's JSONL manifest plus one audio file per item.

    PYTHONPATH=src python scripts/prepare_hf.py --preset sdqa --root /data/voicebench --split usa --out-dir data/sdqa
    PYTHONPATH=src python scripts/prepare_hf.py --preset hf --root /data/my_ds --split test \
        --audio-column audio --text-column sentence --id-column id --out-dir data/my_ds

Writes <out-dir>/audio/<id>.<ext> and <out-dir>/manifest.jsonl (audio paths relative to it, so the folder can be
moved); run on it with ``data=manifest data.manifest=<out-dir>/manifest.jsonl``. Layouts: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy.data.dataset import load_dataset  # noqa: E402
from speech_redundancy.data.records import write_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("sdqa", "openbookqa", "trivia_qa", "hf"), default="hf")
    p.add_argument("--root", required=True, help="save_to_disk folder, parquet folder (Hub snapshot) or file")
    p.add_argument("--split", default=None, help="default: usa (sdqa), test (openbookqa, trivia_qa), all files (hf)")
    p.add_argument("--config", default=None, help="hf: sub-folder of a multi-config snapshot")
    p.add_argument("--audio-column", default="audio")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default=None)
    p.add_argument("--language", default="en")
    p.add_argument("--task", default="asr", help="hf: asr, st or qa")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    args = p.parse_args(argv)

    out = Path(args.out_dir)
    cfg = {
        "name": args.preset, "root": args.root, "split": args.split, "config": args.config,
        "audio_column": args.audio_column, "text_column": args.text_column, "id_column": args.id_column,
        "language": args.language, "task": args.task, "audio_dir": str(out / "audio"), "on_error": args.on_error,
    }
    utts, failures = load_dataset(cfg)
    write_manifest(out / "manifest.jsonl", utts)
    print(f"{out / 'manifest.jsonl'}: {len(utts)} items, {sum(u.duration for u in utts) / 3600:.2f} h of audio")
    for f in failures:
        print(f"skipped {f.get('id') or f.get('file')}: {f['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

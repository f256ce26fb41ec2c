"""Score a finished run again from its results.jsonl: ``python scripts/rescore.py RUN_DIR [--judge http ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy.judge import make_judge  # noqa: E402
from speech_redundancy.rescore import rescore  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--judge", choices=["offline", "hf", "http"], default="offline", help="QA judge (default: offline)")
    p.add_argument("--judge-url", help="http judge: base URL of an OpenAI-compatible server")
    p.add_argument("--judge-model", help="hf: model name or path; http: served model name")
    p.add_argument("--judge-api-key", help="http judge: bearer token, if the server wants one")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write <run_dir>/judge_cache.jsonl")
    args = p.parse_args(argv)
    kwargs = {"api_key": args.judge_api_key} if args.judge == "http" and args.judge_api_key else {}
    try:
        judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, **kwargs)
        rescore(args.run_dir, judge=judge, cache=not args.no_cache)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

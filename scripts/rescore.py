"""Score a finished run again from its results.jsonl, without running the model:
``python scripts/rescore.py RUN_DIR [--protocol NAME|all] [--judge http ...] [--resamples 1000 --seed 0]``.

Without ``--protocol`` the run's own scoring protocol is used and ``RUN_DIR/rescored.json`` written; with
``--protocol NAME`` the same hypotheses are scored under that harness's rules into ``RUN_DIR/rescored.NAME.json``
and ``rescored.NAME.jsonl`` (the rows, only their metrics recomputed); ``--protocol all`` does every protocol that
can run here and prints them side by side. ``results.jsonl`` and ``summary.json`` are never written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from speech_redundancy.judge import make_judge  # noqa: E402
from speech_redundancy.protocols import NAMES  # noqa: E402
from speech_redundancy.rescore import format_comparison, rescore  # noqa: E402
from speech_redundancy.stats import Bootstrap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--protocol", help=f"scoring protocol: {', '.join(NAMES)}, or all (default: the run's own)")
    p.add_argument("--judge", choices=["offline", "hf", "http"], default="offline", help="QA judge (default: offline)")
    p.add_argument("--judge-url", help="http judge: base URL of an OpenAI-compatible server")
    p.add_argument("--judge-model", help="hf: model name or path; http: served model name")
    p.add_argument("--judge-api-key", help="http judge: bearer token, if the server wants one")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write <run_dir>/judge_cache.jsonl")
    p.add_argument("--resamples", type=int, default=Bootstrap.resamples, help="bootstrap resamples per interval")
    p.add_argument("--seed", type=int, default=Bootstrap.seed, help="bootstrap seed")
    args = p.parse_args(argv)
    kwargs = {"api_key": args.judge_api_key} if args.judge == "http" and args.judge_api_key else {}
    try:
        judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model, **kwargs)
        boot = Bootstrap(resamples=args.resamples, seed=args.seed)
        if args.protocol != "all":
            rescore(args.run_dir, judge=judge, cache=not args.no_cache, protocol=args.protocol, bootstrap=boot)
            return 0
        done = {}
        for name in NAMES:
            try:
                done[name] = rescore(args.run_dir, judge=judge, cache=not args.no_cache, protocol=name, quiet=True,
                                     bootstrap=boot)
            except ValueError as e:  # a protocol whose tokenizer cannot run here: say so, do the others
                print(f"skipped: {e}", file=sys.stderr)
        print(format_comparison(done))
    except (OSError, ValueError) as e:  # a missing folder, a read-only one (rescored.json), a bad protocol
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

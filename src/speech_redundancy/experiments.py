"""From run folders to the paper's tables: find runs, merge shards and duplicates, build one DataFrame per table.

A run folder (``runner.run``) holds ``run.json`` (settings + fingerprint), ``results.jsonl`` (one row per
utterance) and, once finished, ``summary.json``. Sweeps launched with an experiment preset live under
``<outputs>/multirun/<experiment>/<model>/<data>/<tag>/shard<i>of<n>/``; single runs under
``<outputs>/runs/<model>/<data>/<tag>/``.

:func:`collect` scans a folder tree and returns one record per *logical run*: folders whose settings agree except
for ``data.shard_index`` (the shards of one array job, or the same run found twice) are merged, one row per
utterance (the last one written wins), and every number is recomputed from the rows with :func:`metrics.score`
(the scorer of the run summary and of ``rescore``) under the run's scoring protocol (``run.json``'s ``protocol``,
``paper`` for folders older than it; ``collect(root, protocol=NAME)`` scores every run under NAME instead; the
``protocol`` column says which). Everything that could not be used is returned as one line
each: malformed result lines (``file:line``), folders without ``summary.json`` (a failed or unfinished job),
failed jobs (their ``failed.json``: the error and the overrides, found even where the job died before writing
``run.json``), missing shards, failed utterances.

The table builders (``oracle_table``, ``affinity_table``, ``main_table``, ``fixed_ratio_table``, ``peer_table``,
``trajectories``, ``prefill_table``) take that DataFrame and return what the paper shows; they never read files.
``protocols_table`` takes the runs of one context and scores the same hypotheses under every protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from speech_redundancy import metrics, protocols, stats
from speech_redundancy.results import FAILED_NAME, digest, latest_by_id, read_json, read_run

SHARD_KEYS = ("shard_index", "shard_count")
OPERATOR_NAMES = {"random_drop": "Random Drop", "uniform_drop": "Uniform Drop", "uniform_merge": "Uniform Merge"}


# ----------------------------------------------------------------------------------------------- finding runs
def find_run_dirs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` holding a ``run.json`` (sorted; ``.submitit`` and ``.hydra`` folders ignored)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob("run.json")
                  if not any(part.startswith(".") for part in p.parent.relative_to(root).parts))


def experiment_of(path: Path) -> str | None:
    """``oracle_layers`` for ``.../multirun/oracle_layers/...``; None for single runs."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part == "multirun":
            return parts[i + 1]
    return None


def _hash(obj: Any) -> str:
    return digest(obj)[:10]


def _without_shard(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (data or {}).items() if k not in SHARD_KEYS}


def run_key(settings: dict[str, Any]) -> str:
    """Identity of a logical run: its settings without the shard index/count."""
    return _hash({**settings, "data": _without_shard(settings.get("data", {}))})


def context_key(settings: dict[str, Any]) -> str:
    """What runs must share to sit in one table: everything but the intervention (and the shard)."""
    return _hash({k: (_without_shard(v) if k == "data" else v) for k, v in settings.items() if k != "intervention"})


def data_label(data: dict[str, Any]) -> str:
    """A short name for the evaluated selection: ``librispeech/test-clean``, ``demo/real``."""
    label = str(data.get("name"))
    for key in ("split", "subset", "source_language"):
        if data.get(key) not in (None, "", "???"):
            label += f"/{data[key]}"
    return label


# ----------------------------------------------------------------------------------------------- one logical run
@dataclass
class Run:
    """One logical run: the merged rows of its folders, its settings, and its recomputed numbers."""

    key: str
    settings: dict[str, Any]
    dirs: list[Path]
    rows: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    protocol: str = "paper"  # the scoring protocol its folders were run under

    @property
    def points(self) -> list[dict[str, Any]]:
        return list((self.settings.get("intervention") or {}).get("points") or [])

    def describe(self, protocol: str | None = None, bootstrap: stats.Bootstrap | None = None) -> dict[str, Any]:
        """The flat record of this run: what it was (layer, operator, tau, omega, R, K...) and its numbers, scored
        under ``protocol`` (default: the run's own), with their intervals (``bootstrap``)."""
        s, iv = self.settings, self.settings.get("intervention") or {}
        data = s.get("data") or {}
        rec: dict[str, Any] = {
            "model": (s.get("model") or {}).get("name"),
            "token_rate": (s.get("model") or {}).get("token_rate"),
            "data": data_label(data),
            "experiment": experiment_of(self.dirs[0]),
            "intervention": iv.get("name"),
            "tag": iv.get("tag"),
            "speedup": iv.get("speedup"),
            "n_points": len(self.points),
            "context": context_key(s),
            "run_key": self.key,
            "complete": self.complete,
            "dirs": [str(d) for d in self.dirs],
        }
        if len(self.points) == 1:
            p = self.points[0]
            rec.update(layer=p.get("layer"), operator=p.get("operator"), **_point_params(p.get("params") or {}))
        elif len(self.points) == 2:
            (a, b) = self.points
            rec.update(layer_in=a.get("layer"), layer_deep=b.get("layer"),
                       threshold_in=(a.get("params") or {}).get("threshold"),
                       threshold_deep=(b.get("params") or {}).get("threshold"),
                       window_in=(a.get("params") or {}).get("window"),
                       window_deep=(b.get("params") or {}).get("window"),
                       operator=a.get("operator"), features=(a.get("params") or {}).get("features"))
        if rec["intervention"] == "speedup" and rec.get("speedup") is not None:
            rec["ratio"] = float(rec["speedup"])
        rec["protocol"] = protocol or self.protocol
        rec.update(score(self.rows, rec["protocol"], bootstrap))
        rec["n_mark"] = n_mark(rec["n"], self.complete, rec.get("n_failed"))
        return rec


def _point_params(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("budget", "threshold", "window", "ratio", "features", "gaps"):
        if params.get(key) is not None:
            out[key] = params[key]
    return out


PARTIAL = "*"  # after a cell's n: its run had not finished, lacks shards, or some of its utterances failed
PARTIAL_NOTE = (f"n: utterances scored; {PARTIAL} marks a run that had not finished (no summary.json, in use, "
                "shards missing) or with failed utterances: its number is not over the whole selection")


def n_mark(n: Any, complete: bool, n_failed: Any = 0) -> str:
    """A cell's utterance count as tables print it: ``8``, or ``5*`` for a run not complete or partly failed."""
    partial = not complete or bool(n_failed) and not _isnan(n_failed)
    return f"{int(n)}{PARTIAL if partial else ''}"


SCORE_COLUMNS = ("n_failed", "wer", "cwer", "edits", "ref_words", "bleu", "retention", "loop_rate")
INTERVAL_COLUMNS = ("wer", "cwer", "bleu", "loop_rate")  # each with <key>_lo / <key>_hi


def score(rows: list[dict[str, Any]], protocol: str = "paper", bootstrap: stats.Bootstrap | None = None
          ) -> dict[str, Any]:
    """The table columns of merged rows, from :func:`metrics.score` under ``protocol``: ``n`` (utterances scored),
    ``n_failed``, WER/cWER and their counts, BLEU, retention, loop rate (NaN where there is nothing to score),
    ``<key>_lo`` / ``<key>_hi``: the interval of WER, cWER, BLEU and loop rate, and ``utt``: what each utterance
    contributes (:func:`metrics.utterances`, for the paired comparisons)."""
    got = metrics.score(rows, protocol, bootstrap=bootstrap)
    out: dict[str, Any] = {"n": got["n_utterances"]}
    for key in SCORE_COLUMNS:
        if key in got or key in ("retention", "loop_rate"):
            value = got.get(key)
            out[key] = math.nan if value is None else value
    for key in INTERVAL_COLUMNS:
        if got.get(f"{key}_ci") is not None:
            out[f"{key}_lo"], out[f"{key}_hi"] = (math.nan if v is None else v for v in got[f"{key}_ci"])
    out["utt"] = metrics.utterances(rows, protocol)
    return out


# ----------------------------------------------------------------------------------------------- collecting
def settings_problem(settings: Any) -> str | None:
    """Why a ``run.json``'s settings cannot place a run in a table (None when they can): the model, data and
    intervention nodes must be objects, the points a list of objects with an integer layer, an operator name and
    a params object."""
    if not isinstance(settings, dict):
        return "no settings object"
    for node in ("model", "data", "task", "intervention"):
        if settings.get(node) is not None and not isinstance(settings[node], dict):
            return f"settings.{node} is a {type(settings[node]).__name__}, not an object"
    for node, key in (("model", "name"), ("data", "name"), ("intervention", "name"), ("intervention", "tag")):
        value = (settings.get(node) or {}).get(key)
        if value is not None and not isinstance(value, str):
            return f"settings.{node}.{key} is not a string"
    points = (settings.get("intervention") or {}).get("points") or []
    if not isinstance(points, list):
        return "settings.intervention.points is not a list"
    for i, p in enumerate(points):
        ok = (isinstance(p, dict) and isinstance(p.get("layer"), int) and not isinstance(p.get("layer"), bool)
              and isinstance(p.get("operator"), str) and isinstance(p.get("params") or {}, dict))
        if not ok:
            return f"settings.intervention.points.{i} is not a point (layer, operator, params)"
    return None


def load_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """The logical runs under ``root`` and one line per problem met on the way (see module docstring). Each folder
    is read by :func:`speech_redundancy.results.read_run`, the reader rescore uses too."""
    problems: list[str] = []
    groups: dict[str, Run] = {}
    shard_of: dict[Path, int] = {}
    protocols: dict[str, set[str]] = {}
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for d in find_run_dirs(root):
        folder = read_run(d)
        settings = folder.settings
        why = "unreadable" if folder.meta is None else settings_problem(settings)
        if why:
            problems.append(f"{d}/run.json: {why}, run skipped" + (f" ({folder.problems[0]})" if folder.problems else ""))
            continue
        problems.extend(folder.problems)
        shard_of[d] = _shard_index(settings)
        key = run_key(settings)
        run = groups.setdefault(key, Run(key=key, settings=settings, dirs=[]))
        run.dirs.append(d)
        rows_of.setdefault(key, []).extend(folder.rows)
        protocols.setdefault(key, set()).add(folder.protocol)
        if folder.warnings():
            run.complete = False
            problems.extend(folder.warnings())
    runs = []
    for run in groups.values():
        used = sorted(protocols[run.key])
        run.protocol = used[0] if len(used) == 1 else "paper"
        if len(used) > 1:
            problems.append(f"{run.dirs[0]}: its folders were scored under protocols {used}; scored under paper")
        run.rows = list(latest_by_id(rows_of[run.key]).values())
        count = _shard_count(run.settings)
        shards = {shard_of[d] for d in run.dirs}
        if count > 1 and len(shards) < count:
            run.complete = False
            problems.append(f"{run.dirs[0]}: {len(shards)} of {count} shards found ({sorted(shards)})")
        failed = [r for r in run.rows if r.get("status", "ok") != "ok"]
        if failed:
            problems.append(f"{run.dirs[0]}: {len(failed)} failed utterance(s), e.g. {failed[0].get('id')}: "
                            f"{failed[0].get('error')}")
        if run.rows:
            runs.append(run)
        else:
            problems.append(f"{run.dirs[0]}: no result rows; run left out")
    return runs, problems


def _shard_index(settings: dict[str, Any]) -> int:
    try:
        return int((settings.get("data") or {}).get("shard_index") or 0)
    except (AttributeError, TypeError, ValueError):
        return 0


def _shard_count(settings: dict[str, Any]) -> int:
    try:
        return int((settings.get("data") or {}).get("shard_count") or 1)
    except (AttributeError, TypeError, ValueError):
        return 1


def failed_jobs(root: str | Path) -> list[str]:
    """One line per run folder under ``root`` holding a ``failed.json``: the folder, the error, the overrides. This
    marker (written by the run itself) and the run folders are how failed jobs are known: nothing a launcher left
    (submitit's pickles) is ever read."""
    root = Path(root)
    out = []
    for marker in sorted(root.rglob(FAILED_NAME)) if root.exists() else []:
        if any(part.startswith(".") for part in marker.parent.relative_to(root).parts):
            continue
        info, why = read_json(marker)
        error = info.get("error") if info else None
        overrides = info.get("overrides") if info else None
        if why or not isinstance(error, str) or not isinstance(overrides or [], list):
            out.append(f"{marker}: unreadable failure marker ({why or 'no error line'})")
            continue
        out.append(f"{marker.parent}: job failed: {error} [settings: {' '.join(map(str, overrides or [])) or '(no overrides)'}]")
    return out


def collect(root: str | Path, protocol: str | None = None, bootstrap: stats.Bootstrap | None = None
            ) -> tuple[pd.DataFrame, list[Run], list[str]]:
    """(one row per logical run, the runs, problems) for every run folder under ``root``, each run scored under
    ``protocol`` (default: its own), intervals drawn as ``bootstrap`` says."""
    if protocol is not None:
        protocols.get(protocol)  # an unknown name: one line before any scoring
    runs, problems = load_runs(root)
    problems += failed_jobs(root)
    df = pd.DataFrame([r.describe(protocol, bootstrap) for r in runs])
    return df, runs, problems


# ----------------------------------------------------------------------------------------------- tables
def _sel(df: pd.DataFrame, **eq) -> pd.DataFrame:
    if df.empty:
        return df
    m = pd.Series(True, index=df.index)
    for k, v in eq.items():
        if k not in df:
            return df.iloc[0:0]
        m &= df[k] == v
    return df[m]


def _not_aux(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of the aggregate sweeps (group-plot and trajectory runs evaluate 1-3 utterances: left out)."""
    if df.empty or "experiment" not in df:
        return df
    exp = df["experiment"].fillna("")
    return df[~exp.str.startswith(("trajectories", "group_plots"))]


def vanilla_of(df: pd.DataFrame, context: str) -> dict[str, Any] | None:
    return _best(_sel(df, intervention="none", context=context))


def contexts(df: pd.DataFrame) -> list[str]:
    return [] if df.empty else sorted(df["context"].unique())


def context_name(df: pd.DataFrame, context: str, all_contexts: Iterable[str] | None = None) -> str:
    """``whisper-base_demo-real`` (plus the context hash when one model/data pair has several contexts)."""
    row = df[df["context"] == context].iloc[0]
    base = f"{row['model']}_{row['data']}".replace("/", "-")
    same = {c for c in (all_contexts or [context])
            if not df[df["context"] == c].empty and
            f"{df[df['context'] == c].iloc[0]['model']}_{df[df['context'] == c].iloc[0]['data']}".replace("/", "-") == base}
    return base if len(same) <= 1 else f"{base}_{context[:6]}"


def side_by_side(d: pd.DataFrame, keys: tuple[str, ...] = ()) -> list[tuple[tuple, list[tuple[str, str, pd.DataFrame]]]]:
    """The paper's two-model panels (Qwen2-Audio | Kimi-Audio): per (data, *keys) that has runs of two or more
    models, one (model, context, runs) per model, its context with the most runs, models by token rate (higher
    first, the paper's order) then name. Groups with one model are left out."""
    out: list[tuple[tuple, list[tuple[str, str, pd.DataFrame]]]] = []
    if d.empty:
        return out
    for key, g in d.groupby(["data", *keys], sort=True):
        if g["model"].nunique() < 2:
            continue
        rate = g.groupby("model")["token_rate"].first().fillna(0).astype(float)
        picks = []
        for model in sorted(rate.index, key=lambda m: (-rate[m], m)):
            gm = g[g["model"] == model]
            ctx = gm["context"].value_counts().idxmax()
            picks.append((model, ctx, gm[gm["context"] == ctx]))
        out.append((key if isinstance(key, tuple) else (key,), picks))
    return out


# ----------------------------------------------------------------------------------------------- intervals
CELLS = "_cells"  # per table row: column -> run_key of the run the number came from (moved to ``t.attrs``)


def _interval(lo: Any, hi: Any, scale: float) -> str:
    if lo is None or hi is None or _isnan(lo) or _isnan(hi):
        return "-"
    return f"[{scale * lo:.2f}, {scale * hi:.2f}]"


def _cell(rec: dict[str, Any], col: str, r: dict[str, Any] | None, key: str = "wer", scale: float = 100.0) -> None:
    """``rec[col]``: run ``r``'s ``key`` × ``scale`` (NaN without one); ``rec[col + " CI"]``: its interval; and
    which run the cell came from, for :func:`paired_table`."""
    r = r.to_dict() if isinstance(r, pd.Series) else r
    v = r.get(key) if r else None
    rec[col] = math.nan if v is None or _isnan(v) else scale * float(v)
    rec[f"{col} CI"] = _interval(r.get(f"{key}_lo"), r.get(f"{key}_hi"), scale) if r else "-"
    if r and not _isnan(rec[col]) and r.get("run_key") is not None:
        rec.setdefault(CELLS, {})[col] = r["run_key"]


def _cells_to_attrs(t: pd.DataFrame) -> pd.DataFrame:
    """Move the per-row cell -> run map out of the columns into ``t.attrs["cells"]`` (one dict per row)."""
    if CELLS in t:
        cells = [c if isinstance(c, dict) else {} for c in t[CELLS]]
        t = t.drop(columns=[CELLS])
        t.attrs["cells"] = cells
    else:
        t.attrs["cells"] = [{} for _ in range(len(t))]
    return t


def compare_runs(a: dict[str, Any], b: dict[str, Any], column: str = "WER",
                 bootstrap: stats.Bootstrap | None = None) -> tuple[stats.Comparison | None, str]:
    """Run ``a`` − run ``b`` (records of :func:`collect`) on the utterances both scored, paired on utterance ids:
    WER (cWER when ``column`` names it) in points, or BLEU. Returns (comparison or None, note): runs with no
    shared id, or whose shared ids carry different references, are not compared (the note says why); a pairing on
    fewer utterances than either run has is noted ("paired on k of n_a / n_b")."""
    boot = bootstrap or stats.DEFAULT
    ua, ub = a.get("utt"), b.get("utt")
    if ua is None or ub is None:
        return None, "no per-utterance numbers"
    if ua.asr or ub.asr:
        shared = sorted(set(ua.asr) & set(ub.asr))
        if not shared:
            return None, f"no shared utterances ({len(ua.asr)} / {len(ub.asr)}): not compared"
        differ = sum(ua.asr[i][2] != ub.asr[i][2] for i in shared)
        if differ:
            return None, f"{differ} shared ids have different references: not compared"
        k = 1 if column.rstrip().endswith("cWER") else 0
        c = stats.paired_rate([ua.asr[i][k] for i in shared], [ub.asr[i][k] for i in shared],
                              [ua.asr[i][2] for i in shared], boot)
        c = stats.Comparison(100 * c.diff, 100 * c.low, 100 * c.high, c.p, c.n)
        sizes = (len(ua.asr), len(ub.asr))
    elif ua.st and ub.st:
        tgts = sorted(set(ua.st) & set(ub.st))
        if len(tgts) != 1:
            return None, "not one shared translation target: not compared"
        sa, sb = ua.st[tgts[0]], ub.st[tgts[0]]
        shared = sorted(set(sa) & set(sb))
        if not shared:
            return None, f"no shared utterances ({len(sa)} / {len(sb)}): not compared"
        if any(sa[i][0] != sb[i][0] for i in shared):
            return None, "shared ids have different references: not compared"
        proto = str(a.get("protocol") or "paper")
        refs, hyps_a, tok = protocols.bleu_inputs([sa[i][0] for i in shared], [sa[i][1] for i in shared], tgts[0], proto)
        _, hyps_b, _ = protocols.bleu_inputs([sb[i][0] for i in shared], [sb[i][1] for i in shared], tgts[0], proto)
        c = stats.paired_bleu(refs, hyps_a, hyps_b, tok, boot)
        sizes = (len(sa), len(sb))
    else:
        return None, "nothing to compare"
    note = "" if sizes == (c.n, c.n) else f"paired on {c.n} of {sizes[0]} / {sizes[1]} utterances"
    return c, note


def _reference_row(t: pd.DataFrame, i: int, label: str, reference: str, within: tuple[str, ...]) -> int | None:
    """The row of ``reference`` (its label, or the label plus a `` (l=...)`` suffix, the one matching row ``i``'s
    suffix first) with the same ``within`` values as row ``i``."""
    own = str(t.at[i, label])
    suffix = own[own.index(" ("):] if " (" in own else ""
    found = [j for j in t.index if all(t.at[j, w] == t.at[i, w] for w in within)
             and (str(t.at[j, label]) == reference or str(t.at[j, label]).startswith(reference + " ("))]
    exact = [j for j in found if str(t.at[j, label]) == reference + suffix]
    return (exact or found or [None])[0]


def paired_table(t: pd.DataFrame, df: pd.DataFrame, *, label: str, reference: str | None = None,
                 within: tuple[str, ...] = (), vanilla: str | None = None, alpha: float = 0.05,
                 bootstrap: stats.Bootstrap | None = None) -> pd.DataFrame:
    """Every number of a comparison table ``t`` (built by a table builder, which records each cell's run) against
    Vanilla and against the ``reference`` method, over the same utterances.

    Vanilla is the table's row labelled ``Vanilla`` (column ``label``) or, for tables without one, the run key
    ``vanilla``; the reference is the row labelled ``reference`` with the same ``within`` values (e.g. the same
    budget). Per cell: the difference (points of WER / cWER, or BLEU) with its paired bootstrap interval, the
    approximate-randomisation p-value and Holm's adjusted p-value over the table (one family per baseline), ``sig``
    ``*`` where the adjusted p is below ``alpha`` and ``ns`` where not; ``n`` the utterances shared, ``note`` why a
    cell was not compared or was paired on fewer utterances than it has. One row per (table row, column)."""
    cells = t.attrs.get("cells") or [{} for _ in range(len(t))]
    runs = {r["run_key"]: r for r in df.to_dict("records")} if not df.empty else {}
    van_rows = [j for j in t.index if str(t.at[j, label]) == "Vanilla"] if label in t else []
    out: list[dict[str, Any]] = []
    for i in t.index:
        for col, key in cells[i].items():
            rec: dict[str, Any] = {"row": int(i), label: t.at[i, label],
                                   **{w: t.at[i, w] for w in within if w in t}, "column": col, "value": t.at[i, col]}
            notes = []
            for name, other in (("Vanilla", (cells[van_rows[0]].get(col) if van_rows else vanilla)),
                                (reference, None)):
                if name is None:
                    continue
                if name == reference:
                    j = _reference_row(t, i, label, reference, within)
                    other = cells[j].get(col) if j is not None else None
                c, note = (None, "") if other is None or other == key else compare_runs(runs[key], runs[other], col,
                                                                                           bootstrap)
                rec[f"vs {name}"] = c.diff if c else math.nan
                rec[f"vs {name} CI"] = _interval(c.low, c.high, 1.0) if c else "-"
                rec[f"vs {name} p"] = c.p if c else math.nan
                rec[f"vs {name} n"] = c.n if c else math.nan
                if note:
                    notes.append(f"vs {name}: {note}")
            rec["note"] = "; ".join(notes)
            out.append(rec)
    p = pd.DataFrame(out)
    for name in ("Vanilla", reference):
        if name is None or p.empty or f"vs {name} p" not in p:
            continue
        adj = stats.holm(list(p[f"vs {name} p"]))
        p[f"vs {name} p (Holm)"] = adj
        p[f"vs {name} sig"] = ["-" if _isnan(a) else ("*" if a < alpha else "ns") for a in adj]
    if p.empty:
        return p
    order = [c for c in p.columns if not c.startswith("vs ") and c != "note"]
    for name in ("Vanilla", reference):
        order += [c for c in (f"vs {name}", f"vs {name} CI", f"vs {name} p", f"vs {name} p (Holm)", f"vs {name} sig",
                              f"vs {name} n") if name is not None and c in p]
    return p[order + ["note"]]


def mark_not_significant(t: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """``t`` with `` ns`` after the interval of every cell whose difference to Vanilla is not significant (Holm)."""
    t = t.copy()
    if paired.empty or "vs Vanilla sig" not in paired:
        return t
    for _, r in paired[paired["vs Vanilla sig"] == "ns"].iterrows():
        ci = f"{r['column']} CI"
        if ci in t:
            t.at[int(r["row"]), ci] = f"{t.at[int(r['row']), ci]} ns"
    return t


def oracle_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Single-point oracle runs (paper §3): one row per (context, operator, budget, layer)."""
    d = _not_aux(_sel(df, intervention="oracle", n_points=1))
    if d.empty:
        return d
    d = d.copy()
    # the paper labels each budget by its token ratio: the mean retention over that budget's runs
    d["token_ratio"] = d.groupby(["context", "budget"])["retention"].transform("mean")
    return d.sort_values(["context", "operator", "budget", "layer"])


def oracle_table(df: pd.DataFrame, context: str) -> pd.DataFrame:
    """Paper Tables 4-5: rows (operator, token ratio), columns ``L<l> WER`` / ``L<l> cWER`` in %."""
    d = oracle_runs(df)
    d = d[d["context"] == context]
    out = []
    for (op, budget), g in d.groupby(["operator", "budget"], sort=True):
        rec = {"Operator": OPERATOR_NAMES.get(op, op), "R": int(budget), "Token Ratio": 100 * g["token_ratio"].iloc[0]}
        for _, r in g.sort_values("layer").iterrows():
            _cell(rec, f"L{int(r['layer'])} WER", r, "wer")
            _cell(rec, f"L{int(r['layer'])} cWER", r, "cwer")
            rec[f"L{int(r['layer'])} n"] = r.get("n_mark")
        out.append(rec)
    t = pd.DataFrame(out)
    return _cells_to_attrs(t.sort_values(["Operator", "Token Ratio"]).reset_index(drop=True) if not t.empty else t)


def affinity_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Single-point Affinity Pooling runs (paper §4)."""
    d = _not_aux(_sel(df, intervention="affinity", n_points=1))
    return d if d.empty else d[d["operator"] == "affinity"].sort_values(["context", "features", "window", "layer", "threshold"])


def affinity_table(df: pd.DataFrame, context: str, window: int, features: str) -> pd.DataFrame:
    """Paper Tables 6-7: rows layer, columns ``tau=<t> WER / cWER / Ratio`` in %."""
    d = affinity_runs(df)
    d = d[(d["context"] == context) & (d["window"] == window) & (d["features"] == features)]
    out = []
    for layer, g in d.groupby("layer", sort=True):
        rec = {"Layer": int(layer)}
        for _, r in g.sort_values("threshold").iterrows():
            t = f"tau={r['threshold']:g}"
            _cell(rec, f"{t} WER", r, "wer")
            _cell(rec, f"{t} cWER", r, "cwer")
            rec[f"{t} Ratio"] = 100 * r["retention"]
            rec[f"{t} n"] = r.get("n_mark")
        out.append(rec)
    return _cells_to_attrs(pd.DataFrame(out))


def _setting_name(t_in: float, t_deep: float, label: str | None = None) -> str:
    """The paper's names for its two settings; two other settings are named by order (lower tau_in = Aggressive)."""
    known = {(0.8, 0.7): "Setting A: Aggressive", (0.9, 0.8): "Setting B: Conservative"}
    name = known.get((round(float(t_in), 3), round(float(t_deep), 3)), label or "Setting")
    return f"{name} (tau_in={t_in:g}, tau_deep={t_deep:g})"


def _metric(row: dict[str, Any]) -> tuple[str, float]:
    if row.get("wer") is not None and not _isnan(row.get("wer")):
        return "WER", 100 * row["wer"]
    if row.get("bleu") is not None and not _isnan(row.get("bleu")):
        return "BLEU", row["bleu"]
    return "-", math.nan


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _single(df: pd.DataFrame, model: str, data: str, layer: int, threshold: float, window: int, features) -> dict | None:
    d = _sel(df, intervention="affinity", n_points=1, model=model, data=data)
    if d.empty:
        return None
    d = d[(d["layer"] == layer) & (d["threshold"].astype(float).round(3) == round(float(threshold), 3))
          & (d["window"] == window) & (d["features"] == features)]
    return _best(d)


def main_table(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Paper Tables 1/8 for one model: Vanilla, then per DAP setting found AP_in, AP_deep, DAP.

    AP_in / AP_deep are the single-point runs equal to the DAP run's first / second point. Columns: l_in,
    l_deep, FRR (%, mean over datasets), then the metric per dataset (WER %, BLEU), and their average.
    """
    d = _not_aux(df[df["model"] == model]) if not df.empty else df
    dap = _sel(d, intervention="dap")
    if dap.empty:
        return pd.DataFrame()
    datasets = sorted(dap["data"].unique())  # the selections DAP was run on (not every run of this model)
    rows: list[dict[str, Any]] = []

    def add(method: str, setting: str, l_in, l_deep, per_data: dict[str, dict | None]):
        rec: dict[str, Any] = {"Setting": setting, "Method": method, "l_in": l_in, "l_deep": l_deep}
        frr = [r["retention"] for r in per_data.values() if r]
        rec["FRR"] = 100 * sum(frr) / len(frr) if frr else math.nan
        vals = []
        for name in datasets:
            r = per_data.get(name)
            metric, v = _metric(r) if r else ("-", math.nan)
            col = f"{name} {metric if r else ''}".strip()
            if metric in ("WER", "BLEU"):
                _cell(rec, col, r, metric.lower(), 100.0 if metric == "WER" else 1.0)
            else:
                rec[col] = v
            rec[f"{name} n"] = r.get("n_mark") if r else math.nan
            vals.append(v)
        good = [v for v in vals if not _isnan(v)]
        rec["Avg."] = sum(good) / len(good) if len(good) == len(vals) and good else math.nan
        if any(r for r in per_data.values()):
            rows.append(rec)

    add("Vanilla", "", "-", "-", {n: _best(_sel(d, intervention="none", data=n)) for n in datasets})
    settings = dap.drop_duplicates(["layer_in", "layer_deep", "threshold_in", "threshold_deep", "window_in",
                                    "window_deep", "features"])
    settings = settings.sort_values(["threshold_in", "threshold_deep"])
    order = ["Aggressive", "Conservative"] if len(settings) == 2 else [None] * len(settings)
    for (_, s), label in zip(settings.iterrows(), order):
        name = _setting_name(s["threshold_in"], s["threshold_deep"], label)
        li, ld, f = int(s["layer_in"]), int(s["layer_deep"]), s["features"]
        add("AP_in", name, li, "-", {n: _single(d, model, n, li, s["threshold_in"], s["window_in"], f) for n in datasets})
        # AP_in at another input point (Whisper: the encoder output, the stand-in for the LLM's l = 0), if run
        aff = _sel(d, intervention="affinity", n_points=1)
        for lo in sorted({int(v) for v in aff["layer"]} - {li, ld}, reverse=True) if not aff.empty else []:
            add(f"AP_in (l={lo})", name, lo, "-",
                {n: _single(d, model, n, lo, s["threshold_in"], s["window_in"], f) for n in datasets})
        add("AP_deep", name, "-", ld, {n: _single(d, model, n, ld, s["threshold_deep"], s["window_deep"], f) for n in datasets})
        same = dap[(dap["threshold_in"] == s["threshold_in"]) & (dap["threshold_deep"] == s["threshold_deep"])
                   & (dap["layer_in"] == li) & (dap["layer_deep"] == ld) & (dap["features"] == f)]
        add("DAP", name, li, ld, {n: _best(same[same["data"] == n]) for n in datasets})
    # columns with a unit per dataset: "<data> WER" (or BLEU); drop unit-less empty ones
    t = pd.DataFrame(rows)
    return _cells_to_attrs(t.drop(columns=[c for c in t.columns if t[c].isna().all()]))


def _best(d: pd.DataFrame) -> dict | None:
    """The complete row with the most utterances (the same setting may exist in several experiments' folders)."""
    if d.empty:
        return None
    keys = ["complete", "n"] if "complete" in d else ["n"]  # a complete run before a partial one of the same setting
    return d.sort_values(keys, ascending=False, kind="stable").iloc[0].to_dict()


FIXED_METHODS = (("speedup", "speedup"), ("interpolate", "interpolate"), ("AP_in", "affinity_ratio"))


def fixed_ratio_table(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Paper Table 3: WER (%) per dataset under fixed token budgets K, for speedup, interpolate and AP_in
    (``affinity_ratio``) at the input point, with the Vanilla row on top. ``Ret.`` is the retention reached (%).

    The input point is layer 0 for the LLMs; Whisper's demo twin puts it at the encoder output (l = n_layers) and
    keeps layer 0 as an extra: when runs exist at several layers, each method is listed per layer, labelled
    ``(l=<layer>)``, the deepest first."""
    d = _not_aux(df[df["model"] == model]) if not df.empty else df
    if d.empty:
        return pd.DataFrame()
    sp = _sel(d, intervention="speedup")
    fr = _sel(d, intervention="fixed_ratio", n_points=1)
    layers = sorted({int(v) for v in fr["layer"]}, reverse=True) if not fr.empty else []
    if sp.empty and fr.empty:
        return pd.DataFrame()
    datasets = sorted(set(sp["data"]) | set(fr["data"]) if not fr.empty else set(sp["data"]))
    rows = []

    def add(budget, method, sub):
        rec = {"Budget": budget, "Method": method}
        vals = []
        for n in datasets:
            r = _best(sub[sub["data"] == n]) if not sub.empty else None
            _cell(rec, n, r, "wer")
            rec[f"{n} n"] = r.get("n_mark") if r else math.nan
            vals.append(rec[n])
        rets = [r for r in sub["retention"]] if not sub.empty else []
        rec["Ret."] = 100 * sum(rets) / len(rets) if rets else math.nan
        good = [v for v in vals if not _isnan(v)]
        rec["Avg."] = sum(good) / len(good) if good and len(good) == len(vals) else math.nan
        if good:
            rows.append(rec)

    add("-", "Vanilla", _sel(d, intervention="none"))
    ratios = sorted({float(r) for r in pd.concat([sp.get("ratio", pd.Series(dtype=float)),
                                                   fr.get("ratio", pd.Series(dtype=float))]).dropna()}, reverse=True)
    for k in ratios:
        for label, op in FIXED_METHODS:
            if op == "speedup":
                cases = [(label, sp)]
            else:
                cases = [(label if len(layers) <= 1 else f"{label} (l={layer})",
                          fr[(fr["operator"] == op) & (fr["layer"] == layer)]) for layer in layers]
            for name, sub in cases:
                sub = sub[sub["ratio"].astype(float).round(3) == round(k, 3)] if not sub.empty else sub
                add(f"{100 * k:g}%", name, sub)
    return _cells_to_attrs(pd.DataFrame(rows))


PEER_NAMES = {"interpolate": "Interpolation", "uniform_merge": "Uniform Merge", "affinity_ratio": "AP (fixed K)",
              "adjacent_merge": "A-ToMe", "ltbm": "LTBM", "cdpruner": "CDPruner", "attention_prune": "FastV",
              "samp": "Samp / SA-MAP", "visionzip": "VisionZip", "fastadasp": "FastAdaSP",
              "speechprune": "SpeechPrune", "segment_topk": "Segment top-K",
              "attention_prune_k": "FastV (exact K)", "samp_k": "Samp (exact K)", "cdpruner_exp": "CDPruner (exp)",
              "visionzip_contiguous": "VisionZip (contiguous)", "fastadasp_k": "FastAdaSP (exact K)"}
# operators whose retention is set by a threshold, not by K (their rows sit at their own retention): marked
THRESHOLD_SET = {"samp": "τ"}


def peer_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Single-point runs of the comparison (``intervention=peer``): one row per (context, operator, layer, K)."""
    d = _not_aux(_sel(df, intervention="peer", n_points=1))
    return d if d.empty else d.sort_values(["context", "layer", "operator", "ratio"])


def peer_table(df: pd.DataFrame, context: str) -> pd.DataFrame:
    """Issue 13's comparison (paper Table 3 extended to the field): rows (layer, operator[, features]), per requested
    retention K the WER (%) and the retention reached (``Ret.``, %, mean over utterances) side by side, and the mean
    over all K (``Ret. (mean)``); the Vanilla row on top. Operators whose retention a threshold sets (Samp: tau) are
    marked "(τ-set)": at a K their retention is what tau left, at most K."""
    d = peer_runs(df)
    d = d[d["context"] == context] if not d.empty else d
    if d.empty:
        return pd.DataFrame()
    ratios = sorted({round(float(r), 3) for r in d["ratio"].dropna()}, reverse=True)
    rows = []
    van = vanilla_of(df, context)
    if van:
        rec = {"Layer": "-", "Operator": "Vanilla"}
        for k in ratios:
            _cell(rec, f"K={100 * k:g}% WER", van, "wer")
            rec[f"K={100 * k:g}% Ret."] = 100.0
            rec[f"K={100 * k:g}% n"] = van.get("n_mark")
        rows.append({**rec, "Ret. (mean)": 100.0})
    by = ["layer", "operator"] + (["features"] if "features" in d.columns and d["features"].nunique() > 1 else [])
    for key, g in d.groupby(by, sort=True):
        layer, op = key[0], key[1]
        name = PEER_NAMES.get(op, op) + (f" ({THRESHOLD_SET[op]}-set)" if op in THRESHOLD_SET else "")
        if len(by) == 3:
            name += f" [{key[2]}]"
        rec: dict[str, Any] = {"Layer": int(layer), "Operator": name}
        for k in ratios:
            r = _best(g[g["ratio"].astype(float).round(3) == k])
            _cell(rec, f"K={100 * k:g}% WER", r, "wer")
            ok = r is not None and not _isnan(rec[f"K={100 * k:g}% WER"])
            rec[f"K={100 * k:g}% Ret."] = 100 * float(r["retention"]) if ok else math.nan
            rec[f"K={100 * k:g}% n"] = r.get("n_mark") if r else math.nan
        rec["Ret. (mean)"] = 100 * float(g["retention"].mean())
        rows.append(rec)
    return _cells_to_attrs(pd.DataFrame(rows))


def trajectories(df: pd.DataFrame, runs: list[Run], utterance: str | None = None) -> tuple[str, pd.DataFrame, str] | None:
    """Paper Tables 9-10: the decoded text of one utterance under each oracle run at the smallest budget.

    Uses the ``trajectories*`` sweeps when present, else every oracle run. Returns (utterance id, table,
    reference) or None when there are no oracle runs with that utterance.
    """
    from speech_redundancy.rescore import trajectory_table

    ora = _sel(df, intervention="oracle", n_points=1)
    if ora.empty:
        return None
    traj = ora[ora["experiment"].fillna("").str.startswith("trajectories")]
    ora = traj if not traj.empty else ora
    budget = ora["budget"].min()
    keys = set(ora[ora["budget"] == budget]["run_key"])
    chosen = [r for r in runs if r.key in keys]
    ids = [set(row["id"] for row in r.rows if row.get("status", "ok") == "ok") for r in chosen]
    common = set.intersection(*ids) if ids else set()
    if utterance is None:
        if not common:
            return None
        utterance = sorted(common)[0]
    rows, reference = [], ""
    for r in chosen:
        p = r.points[0]
        for row in r.rows:
            if str(row["id"]) == str(utterance):
                reference = row.get("reference", reference)
                rows.append({**row, "operator": p["operator"], "layer": p["layer"],
                             "budget": (p.get("params") or {}).get("budget")})
    if not rows:
        return None
    table = trajectory_table(rows, utterance)
    table = table[[c for c in table.columns if not table[c].isna().all()]]  # e.g. no threshold for the oracle
    return utterance, table, reference


def prefill_table(bench: dict[str, Any]) -> pd.DataFrame:
    """Paper Table 2 from ``scripts/bench_prefill.py``'s JSON (``{"meta", "rows"}``), longest bucket first."""
    t = pd.DataFrame(bench.get("rows") or [])
    if t.empty:
        return t
    for key in ("ttft", "t_ap"):  # seconds -> milliseconds
        if f"{key}_s" in t:
            t[f"{key}_ms"] = 1000 * t[f"{key}_s"]
    cols = {"bucket": "Bucket", "method": "Method", "retention": "FRR", "ttft_ms": "TTFT (ms)", "speedup": "Spd.",
            "flops_ideal_speedup": "FLOPs-ideal", "t_ap_ms": "t_AP (ms)", "peak_gb": "m (GB)",
            "increment_gb": "dm (GB)", "saving": "Sav."}
    t = t[[c for c in cols if c in t]].rename(columns=cols)
    if "FRR" in t:
        t["FRR"] = 100 * t["FRR"]
    order = {b: -float(str(b).split("-")[0]) for b in t["Bucket"].unique()}
    return t.sort_values("Bucket", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- protocols
def protocols_table(runs: list[Run], context: str,
                    names: Iterable[str] = protocols.NAMES) -> tuple[pd.DataFrame, list[str]]:
    """The same hypotheses under every scoring protocol: one row per run of ``context`` (its intervention tag and
    ``n``), one column per protocol (``WER % <name>``; ``CER`` / ``MER`` where that protocol counts characters /
    mixed units; ``BLEU <name>`` for translation), each from :func:`metrics.score` over the run's rows. A protocol
    that cannot run here (a tokenizer it needs is missing) is a column of NaN and one problem line."""
    chosen = [r for r in runs if context_key(r.settings) == context
              and not str(experiment_of(r.dirs[0]) or "").startswith(("trajectories", "group_plots"))]
    chosen.sort(key=lambda r: (str((r.settings.get("intervention") or {}).get("tag")), r.key))
    problems, blocked = [], set()
    for name in names:
        why = metrics.protocol_problem(name, (row for r in chosen for row in r.rows if row.get("status", "ok") == "ok"))
        if why:
            blocked.add(name)
            problems.append(f"protocols table: {why}")
    recs, columns = [], {}
    for r in chosen:
        tag = str((r.settings.get("intervention") or {}).get("tag"))
        n_failed = sum(row.get("status", "ok") != "ok" for row in r.rows)
        rec: dict[str, Any] = {"run": tag, "n": n_mark(len(r.rows) - n_failed, r.complete, n_failed)}
        for name in names:
            if name in blocked:
                col = columns.get(name, f"{name} (cannot run here)")
                rec[col] = math.nan
                continue
            got = metrics.score(r.rows, name)
            if got.get("bleu") is not None:
                col, value = f"BLEU {name}", got["bleu"]
            elif got.get("wer") is not None:
                metric = {"char": "CER", "mixed": "MER"}.get(got.get("unit"), "WER")
                col, value = f"{metric} % {name}", 100 * got["wer"]
            else:
                continue
            columns.setdefault(name, col)
            rec[col] = value
        recs.append(rec)
    t = pd.DataFrame(recs)
    if not t.empty and t["run"].duplicated().any():
        t["run"] = [f"{tag} ({r.key[:6]})" for tag, r in zip(t["run"], chosen)]
    return t, problems


# ----------------------------------------------------------------------------------------------- writing tables
def _fmt(v: Any) -> str:
    if v is None or _isnan(v):
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(t: pd.DataFrame) -> str:
    cols = [str(c) for c in t.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in t.itertuples(index=False):  # itertuples keeps each column's type (iterrows upcasts ints)
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in r) + " |")
    return "\n".join(lines) + "\n"


def to_latex(t: pd.DataFrame, caption: str = "") -> str:
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            s = s.replace(a, b)
        return s

    cols = [esc(str(c)) for c in t.columns]
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
             " & ".join(cols) + r" \\", r"\midrule"]
    for r in t.itertuples(index=False):
        lines.append(" & ".join(esc(_fmt(v)) for v in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + esc(caption) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(t: pd.DataFrame, out: Path, stem: str, caption: str = "") -> list[Path]:
    """``<stem>.csv``, ``.md`` and ``.tex`` under ``out``; returns the paths. Every cell's ``n`` column says how
    many utterances it stands on; when one carries :data:`PARTIAL`, the caption says what that means."""
    out.mkdir(parents=True, exist_ok=True)
    marked = any(str(v).endswith(PARTIAL) for c in t.columns if str(c) == "n" or str(c).endswith(" n") for v in t[c])
    if marked:  # the caption says what the mark means
        caption = f"{caption}. {PARTIAL_NOTE}" if caption else PARTIAL_NOTE
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.tex"]
    t.to_csv(paths[0], index=False)
    paths[1].write_text((f"**{caption}**\n\n" if caption else "") + to_markdown(t), encoding="utf-8")
    paths[2].write_text(to_latex(t, caption), encoding="utf-8")
    return paths

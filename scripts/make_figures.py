"""Every paper table and figure from whatever results exist (``make figures``).

    python scripts/make_figures.py [--outputs outputs] [--out outputs/figures] [--utterance ID] [--protocol NAME]
                                   [--resamples 1000] [--seed 0] [--reference main=DAP ...]

Scans ``--outputs`` for run folders (run.json + results.jsonl [+ summary.json]), merges shards and repeated runs
(speech_redundancy.experiments), and writes into ``--out``:

    table4_oracle_<ctx>.{csv,md,tex}       + fig2_oracle_<ctx>.{png,pdf}            (oracle runs)
    table6_affinity_<ctx>_w<ω>_<feat>.*    + fig4_affinity_<ctx>_w<ω>_<feat>.*     (affinity runs, by window/features)
    fig6_sensitivity_layer_<ctx>_w<ω>_<feat>.*                                      (affinity runs over τ, ≥2 τ)
    fig7_window_<ctx>_<feat>.*                                                      (affinity runs, layers with ≥2 ω)
    table1_main_<model>.*                                                           (DAP runs + matching AP runs)
    table2_prefill.*                                                                (scripts/bench_prefill.py JSON)
    table3_fixed_ratio_<model>.*                                                   (speedup / fixed_ratio runs)
    table_peers_<ctx>.* + fig_peers_<ctx>.*                          (intervention=peer runs: WER vs retention)
    fig3_dynamics_<model>_<data>_<feat>.*                                           (analysis dynamics.jsonl)
    fig5_groups_<ctx>_<utt>.*                                                       (runs with save_groups=true)
    table9_trajectories_<model>.*                                                   (oracle runs, one utterance)
    fig2_oracle_models_<data>.*, fig4_affinity_models_<data>_w<ω>_<feat>.*, fig3_dynamics_models_<data>_<feat>.*
                                     (the same panels for two or more models side by side, one dataset: the paper's
                                      Qwen2-Audio | Kimi-Audio layout)
    protocols_<ctx>.*                                          (ASR/ST runs: the same hypotheses under each protocol)
    report.txt                                                                      (what was written / skipped)

Every WER, cWER and BLEU in a table has its 95 % interval beside it (``<column> CI``, a bootstrap over utterances:
speech_redundancy.stats); the comparison tables (oracle, affinity, main, fixed ratio, peers) get a
``<stem>_paired.*`` table beside them: each cell minus Vanilla and minus the reference method (``--reference``)
over the utterances both runs scored, paired on ids, with an interval, a randomisation p-value and Holm's
correction over the table; cells not significantly different from Vanilla say ``ns`` after their interval.
Every run is scored under its own scoring protocol (``--protocol NAME``: all under NAME); captions and
``runs.csv`` name it. Everything comes from the run folders alone (group plots take word boundaries from the rows' ``word_spans``).
Each table or figure without data is skipped with one line saying so; malformed result lines are reported as
file:line; failed jobs are listed with their error and settings (their ``failed.json``), unfinished ones are
reported, and the other jobs still aggregated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pandas as pd  # noqa: E402

from speech_redundancy import experiments as ex  # noqa: E402
from speech_redundancy import figures as figs  # noqa: E402
from speech_redundancy.results import read_json, read_rows  # noqa: E402


# the method every other row of a comparison table is also compared with (besides Vanilla); --reference TABLE=METHOD
REFERENCES = {"main": "DAP", "fixed_ratio": "AP_in", "peers": "AP (fixed K)"}


class Report:
    def __init__(self):
        self.written: list[Path] = []
        self.skipped: list[str] = []
        self.problems: list[str] = []
        self.bootstrap = None  # stats.Bootstrap of --resamples / --seed
        self.references = dict(REFERENCES)

    def wrote(self, paths):
        self.written.extend(paths)

    def skip(self, what: str, why: str):
        self.skipped.append(f"skipped {what}: {why}")

    def text(self) -> str:
        lines = [f"wrote {p}" for p in self.written] + self.skipped + [f"problem: {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in str(s))


def _protocol(d) -> str:
    """'; protocol paper' for a caption: the scoring protocol(s) of the runs in ``d``."""
    used = sorted(set(d["protocol"])) if "protocol" in d and not d.empty else []
    return f"; protocol {', '.join(used)}" if used else ""


def write_compared(t, df, out, stem, caption, rep, *, label, reference=None, within=(), vanilla=None):
    """``t`` with its intervals, cells not significantly different from Vanilla marked ``ns``, and beside it
    ``<stem>_paired``: every cell against Vanilla and ``reference`` over the shared utterances (Holm)."""
    paired = ex.paired_table(t, df, label=label, reference=reference, within=within, vanilla=vanilla,
                             bootstrap=rep.bootstrap)
    rep.wrote(ex.write_table(ex.mark_not_significant(t, paired), out, stem,
                             caption + "; [95% interval over utterances], ns: not significantly different from Vanilla "
                             f"(paired, Holm) — {stem}_paired"))
    if not paired.empty:
        ref = f" and to {reference}" if reference else ""
        rep.wrote(ex.write_table(paired.drop(columns=["row"]), out, f"{stem}_paired",
                                 f"Paired differences to Vanilla{ref} over the same utterances (points; bootstrap "
                                 f"interval, randomisation p, Holm over the table; *: p (Holm) < 0.05) — {stem}"))


def oracle(df, out, rep):
    d = ex.oracle_runs(df)
    if d.empty:
        return rep.skip("Fig. 2 / Tables 4-5 (oracle_layers)", "no single-point oracle runs")
    all_ctx = ex.contexts(d)
    for ctx in ex.contexts(d):
        name = ex.context_name(df, ctx, all_ctx)
        t = ex.oracle_table(df, ctx)
        van = ex.vanilla_of(df, ctx)
        cap = f"Oracle interventions, {name}: WER / cWER (%) per operator, token ratio and layer"
        cap += f"; vanilla WER {100 * van['wer']:.2f}" if van and van.get("wer") is not None else "; no vanilla run"
        cap += _protocol(d[d["context"] == ctx])
        write_compared(t, df, out, f"table4_oracle_{name}", cap, rep, label="Operator", within=("R",),
                       vanilla=van["run_key"] if van else None)
        rep.wrote(figs.oracle_layers(d[d["context"] == ctx], out / f"fig2_oracle_{name}",
                                     f"Layer-wise oracle interventions — {name}", van))


def affinity(df, out, rep):
    d = ex.affinity_runs(df)
    if d.empty:
        rep.skip("Fig. 4 / Tables 6-7 (affinity_layers)", "no single-point affinity runs")
        rep.skip("Figs. 6/8 (sensitivity_layer)", "no single-point affinity runs")
        rep.skip("Fig. 7 (sensitivity_window)", "no single-point affinity runs")
        return
    all_ctx = ex.contexts(d)
    fig6 = fig7 = 0
    for ctx in ex.contexts(d):
        name = ex.context_name(df, ctx, all_ctx)
        van = ex.vanilla_of(df, ctx)
        dc = d[d["context"] == ctx]
        for (window, feat), g in dc.groupby(["window", "features"]):
            stem = f"{name}_w{int(window)}_{feat}"
            if g["layer"].nunique() >= 2:
                t = ex.affinity_table(df, ctx, window, feat)
                write_compared(t, df, out, f"table6_affinity_{stem}",
                               f"Affinity Pooling, {name}, omega={int(window)}, features={feat}: WER, cWER, "
                               f"Ratio (%){_protocol(g)}", rep, label="Layer", vanilla=van["run_key"] if van else None)
                rep.wrote(figs.affinity_layers(g, out / f"fig4_affinity_{stem}",
                                               f"Affinity Pooling ω={int(window)} ({feat}) — {name}", van))
            if g["threshold"].nunique() >= 2 and g["layer"].nunique() >= 2:
                fig6 += 1
                rep.wrote(figs.sensitivity_layer(g, out / f"fig6_sensitivity_layer_{stem}",
                                                 f"Layer sensitivity, ω={int(window)} ({feat}) — {name}", van))
        for feat, g in dc.groupby("features"):
            multi = g.groupby("layer")["window"].nunique()
            layers = list(multi[multi >= 2].index)
            if layers:
                fig7 += 1
                rep.wrote(figs.sensitivity_window(g[g["layer"].isin(layers)], out / f"fig7_window_{name}_{feat}",
                                                  f"Lookback window ablation ({feat}) — {name}", van))
    if not fig6:
        rep.skip("Figs. 6/8 (sensitivity_layer)", "no affinity runs with two or more thresholds at one window")
    if not fig7:
        rep.skip("Fig. 7 (sensitivity_window)", "no layer with affinity runs at two or more windows")


def per_model_table(df, out, rep, build, stem, caption, what, reason, min_rows=1, compare=None):
    """One table per model from ``build(df, model)``; says what was skipped when no model has the data. With
    ``compare`` (:func:`write_compared`'s label / reference / within): the paired table beside it."""
    done = 0
    for m in (sorted(df["model"].unique()) if not df.empty else []):
        t = build(df, m)
        if len(t) < min_rows:
            continue
        done += 1
        cap = caption.format(model=m) + _protocol(df[df["model"] == m])
        if compare:
            write_compared(t, df, out, f"{stem}_{_slug(m)}", cap, rep, **compare)
        else:
            rep.wrote(ex.write_table(t, out, f"{stem}_{_slug(m)}", cap))
    if not done:
        rep.skip(what, reason)


def main_results(df, out, rep):
    per_model_table(df, out, rep, ex.main_table, "table1_main", "Main results, {model}: FRR (%), WER (%) / BLEU per dataset",
                    "Tables 1/8 (main_results)", "no DAP runs (intervention=dap or experiment=main_results)",
                    compare={"label": "Method", "reference": rep.references.get("main"), "within": ("Setting",)})


def fixed_ratio(df, out, rep):
    per_model_table(df, out, rep, ex.fixed_ratio_table, "table3_fixed_ratio",
                    "Fixed retention K at the input point, {model}: WER (%)", "Table 3 (fixed_ratio)",
                    "no speedup or fixed_ratio runs", min_rows=2,
                    compare={"label": "Method", "reference": rep.references.get("fixed_ratio"), "within": ("Budget",)})


def peers(df, out, rep):
    d = ex.peer_runs(df)
    if d.empty:
        return rep.skip("peer comparison (peer_comparison)", "no intervention=peer runs")
    all_ctx = ex.contexts(d)
    for ctx in all_ctx:
        name = ex.context_name(df, ctx, all_ctx)
        dc = d[d["context"] == ctx]
        van = ex.vanilla_of(df, ctx)
        cap = f"The field at fixed retention K, {name}: WER (%) per operator and layer{_protocol(dc)}"
        write_compared(ex.peer_table(df, ctx), df, out, f"table_peers_{name}", cap, rep, label="Operator",
                       reference=rep.references.get("peers"), within=("Layer",))
        rep.wrote(figs.peer_comparison(dc, out / f"fig_peers_{name}", f"WER against retention — {name}", van))


def prefill(outputs, out, rep):
    files = sorted(Path(outputs).rglob("bench_prefill.json")) if Path(outputs).exists() else []
    if not files:
        return rep.skip("Table 2 (prefill_efficiency)", "no bench_prefill.json (run scripts/bench_prefill.py --out "
                                                        f"{outputs}/bench_prefill)")
    for f in files:
        bench, why = read_json(f)
        if why:
            rep.problems.append(why)
            continue
        t = ex.prefill_table(bench)
        meta = bench.get("meta") or {}
        suffix = "" if len(files) == 1 else "_" + _slug(f.parent.name)
        rep.wrote(ex.write_table(t, out, f"table2_prefill{suffix}",
                                 f"Prefill efficiency on {meta.get('device', '?')}" + (" (tiny model)" if meta.get("tiny") else "")))


def _dynamics(f: Path, rep, quiet: bool = False) -> tuple[list[dict], dict]:
    """The rows of a dynamics.jsonl and its meta.json, read by the project's readers (problems named, never run)."""
    rows, bad = read_rows(f, check=lambda r: None if isinstance(r, dict) and isinstance(r.get("layer"), int)
                          else "not a dynamics row (an object with an integer layer)")
    meta, why = read_json(f.with_name("meta.json")) if f.with_name("meta.json").exists() else ({}, None)
    if not quiet:
        rep.problems.extend(bad + ([why] if why else []))
    return rows, meta or {}


def dynamics(outputs, out, rep):
    files = sorted(Path(outputs).rglob("dynamics.jsonl")) if Path(outputs).exists() else []
    if not files:
        return rep.skip("Fig. 3 (cosine_dynamics)", "no dynamics.jsonl (python -m speech_redundancy.analysis ...)")
    for f in files:
        rows, meta = _dynamics(f, rep)
        if not rows:
            rep.skip(f"Fig. 3 for {f}", "empty or unreadable file")
            continue
        rel = f.parent.relative_to(outputs) if f.is_relative_to(outputs) else f.parent
        name = _slug("_".join(rel.parts[-3:]))
        title = f"Cosine similarity dynamics — {meta.get('model', '')} ({meta.get('n_utterances', '?')} utterances, " \
                f"{meta.get('features', 'hidden')}, neighbours {meta.get('neighbours', 'following')})"
        rep.wrote(figs.cosine_dynamics(pd.DataFrame(rows), out / f"fig3_dynamics_{name}", title))


def groups(df, runs, out, rep):
    with_groups = [r for r in runs if any(row.get("groups") for row in r.rows) and len(r.points) == 1]
    if not with_groups:
        return rep.skip("Figs. 5, 9-11 (group_plots)", "no runs with save_groups=true")
    by_key: dict[tuple, list] = {}
    for r in with_groups:
        p = r.points[0]
        params = {k: v for k, v in (p.get("params") or {}).items()}
        key = (ex.context_key(r.settings), p["operator"], json.dumps(params, sort_keys=True))
        by_key.setdefault(key, []).append(r)
    all_ctx = sorted({k[0] for k in by_key})
    for (ctx, op, params), rs in by_key.items():
        name = ex.context_name(df, ctx, all_ctx)
        ids = sorted(set.intersection(*[{row["id"] for row in r.rows if row.get("groups")} for r in rs]))
        for uid in ids[:5]:
            strips = []
            for r in rs:
                row = next(x for x in r.rows if x["id"] == uid)
                strips.append({"layer": r.points[0]["layer"], "groups": row["groups"][0],
                               "hypothesis": row.get("hypothesis", "")})
            # word boundaries as the run stored them (rows of save_groups=true runs carry words and word_spans)
            first = next(x for x in rs[0].rows if x["id"] == uid)
            spans = [tuple(s) for s in first.get("word_spans") or []]
            words = first.get("words") or []
            if not spans:
                rep.problems.append(f"group plot of {uid}: its rows carry no word_spans; plotted without word boundaries")
            p = json.loads(params)
            title = (f"{op} τ={p.get('threshold', '-')} ω={p.get('window', '-')} ({p.get('features', 'hidden')}) — {name} — "
                     f"{uid}\nreference: {first.get('reference', '')}")
            rep.wrote(figs.group_strips(strips, spans, out / f"fig5_groups_{name}_{_slug(uid)}", title, words))


def trajectories(df, runs, out, rep, utterance=None):
    """One table per model (Table 9: Qwen2-Audio, Table 10: Kimi-Audio)."""
    done = 0
    for m in (sorted(df["model"].unique()) if not df.empty else []):
        dm = df[df["model"] == m]
        got = ex.trajectories(dm, [r for r in runs if r.key in set(dm["run_key"])], utterance)
        if got is None:
            continue
        uid, t, ref = got
        done += 1
        rep.wrote(ex.write_table(t, out, f"table9_trajectories_{_slug(m)}",
                                 f"Decoding trajectories of {uid}, {m}. Ground truth: {ref}"))
    if not done:
        rep.skip("Tables 9-10 (trajectories)", "no oracle runs sharing an utterance" +
                 (f" {utterance!r}" if utterance else ""))


def beside(df, outputs, out, rep):
    """Figs. 2, 3, 4 with the models side by side where one dataset has runs of two or more."""
    done = 0
    for (data,), picks in ex.side_by_side(ex.oracle_runs(df)):
        done += 1
        rep.wrote(figs.oracle_layers_models([(m, d, ex.vanilla_of(df, c)) for m, c, d in picks],
                                            out / f"fig2_oracle_models_{_slug(data)}",
                                            f"Layer-wise oracle interventions — {data}"))
    for (data, window, feat), picks in ex.side_by_side(ex.affinity_runs(df), ("window", "features")):
        if min(d["layer"].nunique() for _, _, d in picks) < 2:
            continue
        done += 1
        rep.wrote(figs.affinity_layers_models([(m, d, ex.vanilla_of(df, c)) for m, c, d in picks],
                                              out / f"fig4_affinity_models_{_slug(data)}_w{int(window)}_{feat}",
                                              f"Affinity Pooling ω={int(window)} ({feat}) — {data}"))
    by_data: dict[tuple, list] = {}  # model, data selection and features from each dynamics.jsonl's meta.json
    for f in sorted(Path(outputs).rglob("dynamics.jsonl")) if Path(outputs).exists() else []:
        rows, meta = _dynamics(f, rep, quiet=True)
        if meta.get("model") and isinstance(meta.get("data"), dict) and rows:
            key = (ex.data_label(meta["data"]), str(meta.get("features", "hidden")))
            by_data.setdefault(key, []).append((meta["model"], pd.DataFrame(rows)))
    for (data, feat), panels in sorted(by_data.items()):
        if len({m for m, _ in panels}) >= 2:
            done += 1
            rep.wrote(figs.cosine_dynamics_models(panels, out / f"fig3_dynamics_models_{_slug(data)}_{_slug(feat)}",
                                                  f"Cosine similarity dynamics — {data} ({feat})"))
    if not done:
        rep.skip("Figs. 2-4, models side by side", "no dataset with runs of two or more models")


def protocols(df, runs, out, rep):
    done = 0
    all_ctx = ex.contexts(df)
    for ctx in all_ctx:
        t, problems = ex.protocols_table(runs, ctx)
        rep.problems.extend(problems)
        if t.empty or len(t.columns) <= 2:
            continue
        done += 1
        name = ex.context_name(df, ctx, all_ctx)
        rep.wrote(ex.write_table(t, out, f"protocols_{name}", f"The same hypotheses under each scoring protocol, "
                                 f"{name}: WER / CER / MER (%) or BLEU (README: Scoring protocols)"))
    if not done:
        rep.skip("protocols table", "no ASR or translation runs")


def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs", type=Path, default=Path(os.environ.get("SR_OUTPUTS", ROOT / "outputs")),
                    help="folder scanned for run folders (default $SR_OUTPUTS or outputs/)")
    ap.add_argument("--out", type=Path, default=None, help="where tables and figures go (default <outputs>/figures)")
    ap.add_argument("--utterance", default=None, help="utterance id for the trajectory table")
    ap.add_argument("--protocol", default=None, choices=ex.protocols.NAMES,
                    help="score every run under this protocol (default: each run's own)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per interval and test")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--reference", action="append", default=[], metavar="TABLE=METHOD",
                    help=f"the method a comparison table is also compared with (default {REFERENCES})")
    args = ap.parse_args(argv)
    out = args.out or args.outputs / "figures"
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    rep.bootstrap = ex.stats.Bootstrap(resamples=args.resamples, seed=args.seed)
    for item in args.reference:
        table, sep, method = item.partition("=")
        if not sep or table not in REFERENCES:
            ap.error(f"--reference {item!r}: expected TABLE=METHOD with TABLE one of {', '.join(REFERENCES)}")
        rep.references[table] = method or None
    df, runs, problems = ex.collect(args.outputs, args.protocol, rep.bootstrap)
    rep.problems.extend(problems)
    if not df.empty:
        df.drop(columns=["dirs", "utt"], errors="ignore").to_csv(out / "runs.csv", index=False)
        rep.wrote([out / "runs.csv"])
    sections = [(oracle, (df,)), (affinity, (df,)), (main_results, (df,)), (fixed_ratio, (df,)), (peers, (df,)),
                (prefill, (args.outputs,)), (dynamics, (args.outputs,)), (groups, (df, runs)),
                (trajectories, (df, runs), args.utterance), (beside, (df, args.outputs)), (protocols, (df, runs))]
    for build, inputs, *extra in sections:
        try:  # results folders come from others: one section's bad data is a named problem, the others still run
            build(*inputs, out, rep, *extra)
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{build.__name__}: not drawn, the data under {args.outputs} did not fit it "
                                f"({type(e).__name__}: {e})")
    text = rep.text()
    (out / "report.txt").write_text(text, encoding="utf-8")
    print(f"{len(runs)} runs found under {args.outputs}")
    print(text, end="")
    return rep


if __name__ == "__main__":
    main()

"""Experiment presets, resumable sweeps, aggregation into tables, make_figures, cosine dynamics, the notebook."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONF, ROOT
from speech_redundancy import analysis, experiments as ex
from speech_redundancy.data.records import read_manifest, write_manifest

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEMO_RUN_PRESETS = [p for p in PRESETS if p.endswith("_demo") and p != "cosine_dynamics_demo"]
# layers valid on Whisper tiny.en (4 encoder layers: 0..4)
TINY_LAYERS = ["layer=2", "++layer_deep=3"]


def compose_hydra(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def two_clips(demo_manifest, tmp_path_factory):
    """The two shortest real clips with word timings (oracle runs need them)."""
    utts = [u for u in read_manifest(demo_manifest) if u.extra.get("kind") == "real" and u.words]
    utts = sorted(utts, key=lambda u: u.duration)[:2]
    path = tmp_path_factory.mktemp("two") / "manifest.jsonl"
    write_manifest(path, utts)
    return path


# ------------------------------------------------------------------------------------------ presets compose
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_with_a_deterministic_sweep_folder(name):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from speech_redundancy.runner import build_points

    cfg = compose_hydra([f"experiment={name}", "++data.root=/data"])
    assert cfg.experiment_name == name
    assert cfg.hydra.sweep.dir.endswith(f"multirun/{name}")
    assert cfg.hydra.sweep.subdir.startswith(str(cfg.run_name) + "/shard")
    iv = OmegaConf.to_container(cfg.intervention, resolve=True)
    assert iv["tag"] and "${" not in iv["tag"]
    build_points(cfg)  # every point is valid
    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    parser = OverridesParser.create()
    for key, value in params.items():  # each sweep axis parses as a Hydra sweep, and every value composes
        ov = parser.parse_override(f"{key}={value}")
        values = list(ov.sweep_iterator())
        for v in {values[0], values[-1]}:  # the ends of each axis (all values: slow)
            one = compose_hydra([f"experiment={name}", "++data.root=/data", f"{key}={v}"])
            build_points(one)


def test_main_results_methods_are_the_papers_rows():
    from omegaconf import OmegaConf

    cfg = compose_hydra(["experiment=main_results", "intervention=dap", "data.root=/x"])
    iv = OmegaConf.to_container(cfg.intervention, resolve=True)
    assert [(p["layer"], p["params"]["threshold"], p["params"]["window"]) for p in iv["points"]] == [(0, 0.8, 1), (29, 0.7, 3)]
    cons = compose_hydra(["experiment=main_results", "intervention=ap_deep_conservative", "data.root=/x"])
    assert OmegaConf.to_container(cons.intervention, resolve=True)["points"] == [
        {"layer": 29, "operator": "affinity", "params": {"threshold": 0.8, "window": 3, "features": "hidden"}}]
    # the rows are the same runs (same folder, same fingerprint) as the plain interventions
    plain = compose_hydra(["intervention=dap", "model=qwen2audio", "data=librispeech", "data.root=/x"])
    assert cfg.run_name == plain.run_name
    assert OmegaConf.to_container(cfg.intervention, resolve=True) == OmegaConf.to_container(plain.intervention, resolve=True)
    ap_in = compose_hydra(["experiment=main_results", "intervention=ap_in_conservative", "data.root=/x"])
    same = compose_hydra(["intervention=affinity", "layer=0", "threshold=0.9", "window=1", "model=qwen2audio",
                          "data=librispeech", "data.root=/x"])
    assert ap_in.run_name == same.run_name
    # the sweep axis is the table's seven rows, each composed from the intervention configs
    rows = OmegaConf.to_container(cfg.hydra.sweeper.params)["intervention"].split(",")
    assert len(rows) == 7 and len(set(rows)) == 7
    names = {compose_hydra(["experiment=main_results", f"intervention={r}", "data.root=/x"]).run_name for r in rows}
    assert len(names) == 7  # seven distinct run folders: no two sweep jobs share one


# ------------------------------------------------------------------------------------------ demo presets run
def test_demo_presets_run_on_two_utterances(two_clips, tmp_path):
    from speech_redundancy.runner import run

    for name in DEMO_RUN_PRESETS:
        cfg = compose_hydra([f"experiment={name}", "model=whisper_tiny_en", "data=manifest", f"data.manifest={two_clips}",
                             "data.subset=null", "data.sample=null", "data.limit=1", "max_new_tokens=24",
                             *TINY_LAYERS])
        summary = run(cfg, tmp_path / name)
        assert summary["n_utterances"] == 1 and summary["n_failed"] == 0, name
        assert 0 < summary["retention"] <= 1.0


def test_cosine_dynamics_runner_writes_one_row_per_layer(two_clips, tmp_path):
    out = analysis.main(["experiment=cosine_dynamics_demo", "model=whisper_tiny_en", "data=manifest",
                         f"data.manifest={two_clips}", "data.subset=null", f"dynamics.out_dir={tmp_path}"])
    rows = [json.loads(x) for x in (out / "dynamics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]  # tiny.en: 4 encoder layers + output
    for r in rows:
        assert r["n_utterances"] == 2
        assert -1 <= r["global_mean"] <= r["neighbour_k1"] <= 1  # adjacent frames are more alike than any two
        assert r["neighbour_k10"] <= r["neighbour_k1"]
        assert not math.isnan(r["max_within_words"])
    assert (out / "dynamics.csv").exists() and json.loads((out / "meta.json").read_text())["n_utterances"] == 2


# ------------------------------------------------------------------------------------------ sweeps
def _sweep(tmp_path, manifest, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SR_OUTPUTS": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "experiment=oracle_layers_demo", "model=whisper_tiny_en",
           "data=manifest", f"data.manifest={manifest}", "data.subset=null", "data.sample=null", "max_new_tokens=24",
           "layer=1", "operator=uniform_merge", "budget=2,4", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_killed_sweep_resumes_to_one_row_per_utterance_and_job(two_clips, tmp_path):
    first = _sweep(tmp_path, two_clips, "hydra/launcher=local")  # submitit: each job a local process
    assert first.returncode == 0, first.stderr[-2000:]
    base = tmp_path / "multirun" / "oracle_layers_demo" / "whisper-tiny.en" / "manifest"
    jobs = sorted(base.glob("oracle-uniform_merge-R*-l1/shard0of1"))
    assert len(jobs) == 2
    before = {j: json.loads((j / "summary.json").read_text()) for j in jobs}
    # kill one job mid-way: its last row half-written, no summary; the other loses a row entirely
    lines = (jobs[0] / "results.jsonl").read_text().splitlines()
    (jobs[0] / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    (jobs[0] / "summary.json").unlink()
    (jobs[1] / "results.jsonl").write_text(
        (jobs[1] / "results.jsonl").read_text().splitlines()[1] + "\n")
    # make_figures meanwhile: the broken job is reported (file:line and missing summary), the other still counts
    df, runs, problems = ex.collect(tmp_path)
    assert any(f"{jobs[0]}/results.jsonl:2" in p for p in problems)
    assert any(str(jobs[0]) in p and "no summary.json" in p for p in problems)
    assert len(df) == 2
    again = _sweep(tmp_path, two_clips)  # the same sweep, resumed (basic launcher, same folders)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already done" in again.stdout
    for j in jobs:
        rows = [json.loads(x) for x in (j / "results.jsonl").read_text().splitlines() if x.strip()]
        assert len(rows) == 2 and len({r["id"] for r in rows}) == 2
        after = json.loads((j / "summary.json").read_text())
        assert after["wer"] == before[j]["wer"] and after["n_utterances"] == 2


# ------------------------------------------------------------------------------------------ aggregation
def _fake_run(root: Path, rel: str, intervention: dict, rows: list[dict], *, data=None, summary=True, model="m"):
    d = root / rel
    d.mkdir(parents=True)
    settings = {"model": {"name": model, "token_rate": 50}, "data": data or {"name": "fake", "shard_index": 0, "shard_count": 1},
                "task": {"name": "asr"}, "intervention": intervention, "seed": 0, "max_new_tokens": 8}
    (d / "run.json").write_text(json.dumps({"fingerprint": "x", "settings": settings}))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (d / "summary.json").write_text("{}")
    return d


def _rows(edits, ref=10, tin=100, tout=50, groups=None):
    """Rows whose texts hold ``e`` substitutions in ``ref`` words (the scorer counts from the texts)."""
    out = []
    words = [f"w{k}" for k in range(ref)]
    for i, e in enumerate(edits):
        hyp = ["x"] * e + words[e:]
        r = {"id": f"u{i}", "status": "ok", "task": "asr", "language": "en", "reference": " ".join(words),
             "hypothesis": " ".join(hyp), "edits": e, "ref_words": ref, "tokens_in": tin, "tokens_out": tout,
             "loop": False}
        if groups is not None:
            r["groups"] = [groups]
        out.append(r)
    return out


def _oracle(op, budget, layer):
    return {"name": "oracle", "tag": f"oracle-{op}-R{budget}-l{layer}",
            "points": [{"layer": layer, "operator": op, "params": {"budget": budget, "gaps": "unit"}}]}


def _affinity(layer, t, w=3, f="hidden"):
    return {"name": "affinity", "tag": f"affinity-l{layer}-t{t}-w{w}-{f}",
            "points": [{"layer": layer, "operator": "affinity", "params": {"threshold": t, "window": w, "features": f}}]}


@pytest.fixture()
def fake_outputs(tmp_path):
    root = tmp_path / "outputs"
    _fake_run(root, "runs/m/fake/vanilla", {"name": "none", "tag": "vanilla", "points": []}, _rows([1, 0]))
    for layer in (0, 2):
        for budget in (2, 4):
            edits = [layer + budget, 1] if budget == 2 else [0, 1]
            _fake_run(root, f"multirun/oracle_layers/m/fake/o-{layer}-{budget}/shard0of1",
                      _oracle("uniform_merge", budget, layer), _rows(edits, tout=25 * budget))
    for layer in (0, 2):
        for t in (0.8, 0.9):
            _fake_run(root, f"multirun/affinity_layers/m/fake/a-{layer}-{t}/shard0of1", _affinity(layer, t),
                      _rows([2, 0], tout=int(100 * t) - 10 * layer, groups=[0] * 30 + [1] * 40 + [2] * 30))
    # a sharded run: two shards of one logical run, merged back
    for i in (0, 1):
        _fake_run(root, f"multirun/affinity_layers/m/fake/a-4-0.9/shard{i}of2", _affinity(4, 0.9),
                  [{**r, "id": f"s{i}"} for r in _rows([3])],
                  data={"name": "fake", "shard_index": i, "shard_count": 2})
    # a failed sweep job: results but no summary, and a malformed line
    bad = _fake_run(root, "multirun/affinity_layers/m/fake/a-6-0.9/shard0of1", _affinity(6, 0.9), _rows([5, 5]),
                    summary=False)
    with (bad / "results.jsonl").open("a") as f:
        f.write('{"id": "u9", "status": "ok", "edits": \n')
    (root / "dynamics" / "m" / "fake" / "hidden").mkdir(parents=True)
    (root / "dynamics" / "m" / "fake" / "hidden" / "dynamics.jsonl").write_text("".join(
        json.dumps({"layer": l, "neighbour_k1": 0.9 - 0.1 * l, "neighbour_k3": 0.8 - 0.1 * l, "global_mean": 0.3,
                    "max_within_words": 0.95}) + "\n" for l in range(3)))
    return root


def test_collect_merges_shards_and_recomputes_metrics(fake_outputs):
    df, runs, problems = ex.collect(fake_outputs)
    sharded = df[(df["intervention"] == "affinity") & (df["layer"] == 4)]
    assert len(sharded) == 1 and sharded.iloc[0]["n"] == 2  # two shards -> one run, one row per utterance
    assert sharded.iloc[0]["wer"] == pytest.approx(6 / 20)
    failed = df[(df["intervention"] == "affinity") & (df["layer"] == 6)].iloc[0]
    assert not failed["complete"] and failed["n"] == 2 and failed["wer"] == pytest.approx(0.5)
    assert any("results.jsonl:3" in p and "malformed" in p for p in problems)
    t = ex.oracle_table(df, df["context"].iloc[0])
    row = t[t["R"] == 2].iloc[0]
    assert row["L2 WER"] == pytest.approx(100 * (4 + 1) / 20) and row["L0 cWER"] == pytest.approx(100 * 3 / 20)
    assert row["Token Ratio"] == pytest.approx(50.0)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_figures_writes_what_has_data_and_says_what_it_skips(fake_outputs, tmp_path, monkeypatch):
    mk = _load_script("make_figures")
    out = tmp_path / "figs"
    rep = mk.main(["--outputs", str(fake_outputs), "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    for stem in ("table4_oracle_m_fake", "table6_affinity_m_fake_w3_hidden"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.tex"} <= names
    for stem in ("fig2_oracle_m_fake", "fig4_affinity_m_fake_w3_hidden", "fig6_sensitivity_layer_m_fake_w3_hidden",
                 "fig3_dynamics_m_fake_hidden"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (out / f"{stem}.png").stat().st_size > 5000
    assert any(n.startswith("fig5_groups_m_fake_u0") for n in names)
    assert "table9_trajectories_m.md" in names
    report = (out / "report.txt").read_text()
    for skipped in ("Tables 1/8", "Table 2", "Table 3", "Fig. 7"):
        assert f"skipped {skipped}" in report
    assert "results.jsonl:3: malformed" in report and "no summary.json" in report
    assert not any("Fig. 2" in s for s in rep.skipped)
    assert "; protocol paper" in (out / "table4_oracle_m_fake.md").read_text()  # every table names its protocol
    assert {"protocols_m_fake.csv", "protocols_m_fake.md"} <= names
    assert "protocol" in (out / "runs.csv").read_text().splitlines()[0].split(",")


def test_protocols_table_scores_the_same_hypotheses_under_each_protocol(tmp_path):
    root = tmp_path / "outputs"
    row = {"id": "u0", "status": "ok", "task": "asr", "language": "en", "tokens_in": 10, "tokens_out": 10,
           "reference": "He paid twenty dollars, ah, for 5 apples.", "hypothesis": "he paid $20 for five apples"}
    d = _fake_run(root, "runs/m/fake/vanilla", {"name": "none", "tag": "vanilla", "points": []}, [row])
    meta = json.loads((d / "run.json").read_text())
    (d / "run.json").write_text(json.dumps({**meta, "protocol": "ultraeval"}))  # run under UltraEval's rules
    _fake_run(root, "runs/m/fake/affinity", _affinity(0, 0.9), [{**row, "hypothesis": "he paid for apples"}])
    df, runs, _ = ex.collect(root)
    assert dict(zip(df["tag"], df["protocol"])) == {"vanilla": "ultraeval", "affinity-l0-t0.9-w3-hidden": "paper"}
    assert df.set_index("tag").loc["vanilla", "wer"] == pytest.approx(1 / 8)  # its own protocol: '$' is a unit
    assert set(ex.collect(root, "paper")[0]["protocol"]) == {"paper"}
    t, problems = ex.protocols_table(runs, df["context"].iloc[0])
    assert not problems
    assert list(t.columns) == ["run", "n", "WER % paper", "WER % kimi_evalkit", "WER % lmms_eval", "WER % ultraeval",
                               "WER % audiobench"]
    van = t.set_index("run").loc["vanilla"]
    # paper, kimi, lmms: 'ah' deleted of 7 words; ultraeval: '$ 20' makes 8 units; audiobench: 'ah' is a filler
    assert list(van.iloc[1:]) == pytest.approx([100 / 7, 100 / 7, 100 / 7, 100 / 8, 0.0])
    aff = t.set_index("run").loc["affinity-l0-t0.9-w3-hidden"]
    # hyp 'he paid for apples': paper deletes 20, ah, 5 of 7 units; audiobench $twenty, five of 6
    assert aff["WER % paper"] == pytest.approx(300 / 7) and aff["WER % audiobench"] == pytest.approx(200 / 6)


def test_main_table_pairs_dap_with_its_single_point_runs(tmp_path):
    root = tmp_path / "o"
    _fake_run(root, "runs/v", {"name": "none", "tag": "vanilla", "points": []}, _rows([1, 1], tout=100))
    _fake_run(root, "runs/in", _affinity(0, 0.8, 1), _rows([2, 0], tout=80))
    _fake_run(root, "runs/deep", _affinity(5, 0.7, 3), _rows([1, 1], tout=20))
    _fake_run(root, "runs/other", _affinity(5, 0.9, 3), _rows([9, 9], tout=90))  # not part of the setting
    dap = {"name": "dap", "tag": "dap", "points": [_affinity(0, 0.8, 1)["points"][0], _affinity(5, 0.7, 3)["points"][0]]}
    _fake_run(root, "runs/dap", dap, _rows([3, 0], tout=15))
    df, _, _ = ex.collect(root)
    t = ex.main_table(df, "m")
    assert list(t["Method"]) == ["Vanilla", "AP_in", "AP_deep", "DAP"]
    assert list(t["FRR"].round(2)) == [100.0, 80.0, 20.0, 15.0]
    assert t.iloc[3]["fake WER"] == pytest.approx(15.0) and t.iloc[2]["fake WER"] == pytest.approx(10.0)
    assert t.iloc[1]["Setting"].startswith("Setting A: Aggressive")


# ------------------------------------------------------------------------------------------ dynamics math
def test_similarity_measures_on_known_states():
    e = torch.eye(4)
    same = torch.ones(5, 3)
    assert analysis.neighbour_similarity(same, 3) == pytest.approx(1.0)
    assert analysis.neighbour_similarity(e, 1) == pytest.approx(0.0)
    h = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    # following k=1: pairs (0,1)=1, (1,2)=0, (2,3)=1 -> per-token means 1, 0, 1 -> 2/3
    assert analysis.neighbour_similarity(h, 1) == pytest.approx(2 / 3)
    # symmetric k=1: token means 1, 0.5, 0.5, 1 -> 0.75
    assert analysis.neighbour_similarity(h, 1, "symmetric") == pytest.approx(0.75)
    x = torch.randn(7, 5)
    u = torch.nn.functional.normalize(x, dim=-1)
    brute = ((u @ u.T).sum() - 7) / 42
    assert analysis.global_mean_similarity(x) == pytest.approx(float(brute), abs=1e-6)
    spans = torch.tensor([[0, 2], [2, 4]])
    assert analysis.max_within_words(h, spans) == pytest.approx(1.0)
    assert analysis.max_within_words(h, torch.tensor([[1, 3]])) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------ notebook
def test_notebook_is_valid_and_its_cells_run(fake_outputs, monkeypatch, tmp_path):
    nb = json.loads((ROOT / "notebooks" / "redraw_figure.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    monkeypatch.setenv("SR_OUTPUTS", str(fake_outputs))
    monkeypatch.chdir(ROOT)
    scope = {"display": print}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "redraw_figure.ipynb", "exec"), scope)
    assert list((fake_outputs / "figures").glob("redrawn_fig2_*.png"))


def test_make_figures_puts_two_models_side_by_side(fake_outputs, tmp_path):
    """A second model ("k", Kimi-Audio's place) on the same data: its own tables and figures, the two-model panels
    of Figs. 2-4 and one trajectory table per model; a model with no affinity runs gives no Fig. 4 pair."""
    for layer in (0, 3):
        for budget in (1, 2):
            _fake_run(fake_outputs, f"multirun/oracle_layers_kimi/k/fake/o-{layer}-{budget}/shard0of1",
                      _oracle("uniform_merge", budget, layer), _rows([budget, 1], tout=20 * budget), model="k")
    (fake_outputs / "dynamics" / "k" / "fake" / "hidden").mkdir(parents=True)
    for model in ("m", "k"):
        folder = fake_outputs / "dynamics" / model / "fake" / "hidden"
        (folder / "meta.json").write_text(json.dumps({"model": model, "data": {"name": "fake"}, "features": "hidden"}))
        (folder / "dynamics.jsonl").write_text("".join(
            json.dumps({"layer": l, "neighbour_k1": 0.9 - 0.1 * l, "global_mean": 0.3}) + "\n" for l in range(3)))
    mk = _load_script("make_figures")
    out = tmp_path / "figs"
    mk.main(["--outputs", str(fake_outputs), "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    for stem in ("fig2_oracle_models_fake", "fig3_dynamics_models_fake_hidden", "fig2_oracle_k_fake", "table4_oracle_k_fake"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names or f"{stem}.md" in names, stem
    assert not any(n.startswith("fig4_affinity_models") for n in names)  # "k" has no affinity runs
    assert {"table9_trajectories_m.md", "table9_trajectories_k.md"} <= names
    df, _, _ = ex.collect(fake_outputs)
    ((data,), picks), = ex.side_by_side(ex.oracle_runs(df))
    assert data == "fake" and [m for m, _, _ in picks] == ["k", "m"]  # same token rate: by name
    assert ex.side_by_side(ex.oracle_runs(df[df["model"] == "m"])) == []


# ------------------------------------------------------------------------------------------ GPU presets, tiny model
# the Kimi-Audio presets (*_kimi) run on the tiny Kimi-Audio in tests/test_kimi.py
GPU_RUN_PRESETS = [p for p in PRESETS if not p.endswith(("_demo", "_kimi")) and p != "cosine_dynamics"]


@pytest.mark.parametrize("name", GPU_RUN_PRESETS)
def test_gpu_presets_run_on_the_tiny_qwen2audio(name, two_clips, tmp_path):
    """The Qwen2-Audio presets end to end (one clip, random tiny LSLM, layers moved into its 4-layer stack)."""
    from speech_redundancy.runner import run

    extra = ["intervention=dap"] if name in ("main_results", "prefill_efficiency") else []
    cfg = compose_hydra([f"experiment={name}", "model=tiny_qwen2audio", "data=manifest", f"data.manifest={two_clips}",
                         "data.limit=1", "++data.buckets=null", "max_new_tokens=4", "layer=2", "++layer_deep=3", *extra])
    summary = run(cfg, tmp_path / name)
    assert summary["n_utterances"] == 1 and summary["n_failed"] == 0, name
    assert 0 < summary["retention"] <= 1.0


def test_cosine_dynamics_on_the_tiny_qwen2audio(two_clips, tmp_path):
    out = analysis.main(["experiment=cosine_dynamics", "model=tiny_qwen2audio", "data=manifest",
                         f"data.manifest={two_clips}", "data.sample=null", f"dynamics.out_dir={tmp_path}"])
    rows = [json.loads(x) for x in (out / "dynamics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]  # 4 LLM layers + the normed output
    assert all(r["n_utterances"] == 2 and -1 <= r["global_mean"] <= 1 for r in rows)


def test_presets_define_neither_sweep_folders_nor_tags():
    """The sweep folder layout is config.yaml's alone and tags come only from the intervention configs."""
    from omegaconf import OmegaConf

    for name in PRESETS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert "tag:" not in text and "subdir:" not in text and "points:" not in text, name
        cfg = compose_hydra([f"experiment={name}", "++data.root=/data"])
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        assert sweep["dir"] == "${paths.output_dir}/multirun/${experiment_name}", name
        assert cfg.experiment_name == name


# ------------------------------------------------------------------------------------------ intervals, pairing
def test_tables_carry_intervals_and_paired_differences_with_holm(tmp_path):
    from speech_redundancy import stats

    root = tmp_path / "o"
    van, ap_in, dap_e = [1, 1, 0, 0, 1, 0, 0, 0], [2, 0, 1, 1, 2, 1, 0, 1], [3, 3, 2, 3, 4, 5, 3, 4]
    _fake_run(root, "runs/v", {"name": "none", "tag": "vanilla", "points": []}, _rows(van, tout=100))
    _fake_run(root, "runs/in", _affinity(0, 0.8, 1), _rows(ap_in, tout=80))
    _fake_run(root, "runs/deep", _affinity(5, 0.7, 3), _rows(van, tout=20))
    dap = {"name": "dap", "tag": "dap", "points": [_affinity(0, 0.8, 1)["points"][0], _affinity(5, 0.7, 3)["points"][0]]}
    _fake_run(root, "runs/dap", dap, _rows(dap_e, tout=15))
    boot = stats.Bootstrap(resamples=1000, seed=0)
    df, _, _ = ex.collect(root, bootstrap=boot)
    t = ex.main_table(df, "m")
    lo, hi = stats.rate_interval(van, [10] * 8, boot)
    assert t.iloc[0]["fake WER CI"] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
    p = ex.paired_table(t, df, label="Method", reference="DAP", within=("Setting",), bootstrap=boot).set_index("Method")
    # 8 utterances: exact randomisation over 2^8 swaps, then Holm over the three comparisons with Vanilla
    raw = [stats.paired_rate(x, van, [10] * 8, boot).p for x in (ap_in, van, dap_e)]
    assert list(p["vs Vanilla p"].iloc[1:]) == pytest.approx(raw)
    assert list(p["vs Vanilla p (Holm)"].iloc[1:]) == pytest.approx(stats.holm(raw))
    assert p.loc["DAP", "vs Vanilla"] == pytest.approx(100 * (sum(dap_e) - sum(van)) / 80)
    assert p.loc["DAP", "vs Vanilla sig"] == "*" and p.loc["AP_deep", "vs Vanilla sig"] == "ns"
    assert p.loc["AP_in", "vs DAP"] == pytest.approx(100 * (sum(ap_in) - sum(dap_e)) / 80)
    marked = ex.mark_not_significant(t, p.reset_index())
    assert marked.iloc[2]["fake WER CI"].endswith(" ns") and not marked.iloc[3]["fake WER CI"].endswith(" ns")


def test_runs_over_different_utterances_are_not_silently_paired(tmp_path):
    root = tmp_path / "o"
    _fake_run(root, "runs/v", {"name": "none", "tag": "vanilla", "points": []}, _rows([1, 0, 1, 0]))
    _fake_run(root, "runs/a", _affinity(0, 0.8), [{**r, "id": f"other{i}"} for i, r in enumerate(_rows([2, 2]))])
    _fake_run(root, "runs/b", _affinity(2, 0.8), _rows([2, 2]))  # u0, u1: two of vanilla's four
    df, _, _ = ex.collect(root)
    rec = {r["tag"]: r for r in df.to_dict("records")}
    c, note = ex.compare_runs(rec["affinity-l0-t0.8-w3-hidden"], rec["vanilla"])
    assert c is None and "no shared utterances" in note
    c, note = ex.compare_runs(rec["affinity-l2-t0.8-w3-hidden"], rec["vanilla"])
    assert c.n == 2 and note == "paired on 2 of 2 / 4 utterances"
    assert c.diff == pytest.approx(100 * (4 - 1) / 20)
    changed = [{**r, "reference": r["reference"] + " extra"} for r in _rows([2, 2])]
    _fake_run(root, "runs/c", _affinity(4, 0.8), changed)
    df, _, _ = ex.collect(root)
    rec = {r["tag"]: r for r in df.to_dict("records")}
    c, note = ex.compare_runs(rec["affinity-l4-t0.8-w3-hidden"], rec["vanilla"])
    assert c is None and "different references" in note

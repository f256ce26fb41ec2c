"""Sweeps on a real SLURM cluster: ``python run.py -m ... hydra/launcher=slurm`` as submitit array jobs.

Runs on the local single-node test cluster (``scripts/slurm_cluster.sh start``, as root; ``.ci/run`` starts it and
sets SR_REQUIRE_SLURM=1 so that the test fails instead of skipping when no cluster answers). On another cluster it
runs only when asked to: SR_SLURM_PARTITION=<partition>.

Four jobs of the tiny random Qwen2-Audio on the first utterances of the demo set (layer 0, 2 x tau 0.5, 0.9); one
array task is cancelled with ``scancel`` after it has written its first row, the same command is submitted again,
and every job must end with exactly one row per utterance, which ``make figures`` aggregates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from speech_redundancy.data.records import read_manifest

# utterances per job: enough that the cancelled job is still decoding when SIGKILL arrives, which takes 1-2 s after
# scancel on the local cluster (KillWait=0) while the tiny model decodes an utterance (up to max_new_tokens=256) in
# 0.1-0.8 s of CPU: on the project's 2-core VM, 5 more rows were written in between
N_UTTS = 24
SWEEP = ["layer=0,2", "threshold=0.5,0.9"]
SETTINGS = {(0, 0.5), (0, 0.9), (2, 0.5), (2, 0.9)}


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _cluster_partition() -> str:
    """The partition to submit to, or skip (fail under SR_REQUIRE_SLURM=1) saying why no cluster can be used."""
    def unavailable(why: str):
        if os.environ.get("SR_REQUIRE_SLURM") == "1":
            pytest.fail(f"SR_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)

    if shutil.which("sinfo") is None or shutil.which("scancel") is None:
        unavailable("no SLURM client (sinfo/scancel); start the local test cluster with `sudo scripts/slurm_cluster.sh start`")
    info = _sh("sinfo", "-h", "-o", "%P %T")
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        unavailable(f"no SLURM controller answers ({last[:200]}); "
                    "start the local test cluster with `sudo scripts/slurm_cluster.sh start`")
    rows = [line.split() for line in info.stdout.splitlines() if line.strip()]
    chosen = os.environ.get("SR_SLURM_PARTITION")
    if chosen is None:
        conf = dict(line.split("=", 1) for line in _sh("scontrol", "show", "config").stdout.splitlines() if "=" in line)
        if {k.strip(): v.strip() for k, v in conf.items()}.get("ClusterName") != "sr-local":
            unavailable("a SLURM cluster answers but it is not the local test cluster (scripts/slurm_cluster.sh); "
                        "set SR_SLURM_PARTITION=<partition> to run this test on it")
        default = [p for p, _ in rows if p.endswith("*")] or [p for p, _ in rows]
        chosen = default[0].rstrip("*") if default else ""
    states = [s for p, s in rows if p.rstrip("*") == chosen]
    if not any(s.startswith(("idle", "mix")) for s in states):
        unavailable(f"partition {chosen!r} has no idle node (sinfo: {info.stdout.strip()})")
    return chosen


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.exists() else []


def _array_tasks(array_id: str) -> list[str]:
    out = _sh("squeue", "-h", "-o", "%i").stdout.split()
    return [t for t in out if t == array_id or t.startswith(array_id + "_")]


def _submitted_arrays(sweep_dir: Path) -> set[str]:
    """SLURM array ids submitit used under ``sweep_dir`` (its folders are named ``<array>`` and ``<array>_<task>``)."""
    return {p.name.split("_")[0] for p in (sweep_dir / ".submitit").glob("*") if p.name.split("_")[0].isdigit()}


@pytest.fixture
def cancel_leftovers(tmp_path):
    """Whatever the test's outcome, no task it submitted is left queued or running."""
    yield
    arrays = sorted(_submitted_arrays(tmp_path / "multirun" / "sweeps"))
    if arrays and any(_array_tasks(a) for a in arrays):
        _sh("scancel", *arrays)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_slurm_sweep_cancelled_job_resumes_to_one_row_per_utterance(demo_manifest, tmp_path, cancel_leftovers):
    partition = _cluster_partition()
    expected_ids = [u.id for u in read_manifest(demo_manifest)[:N_UTTS]]
    # one thread per task (cpus_per_task=1; the local cluster does not bind tasks to cores)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SR_OUTPUTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "model=tiny_qwen2audio", "intervention=affinity", *SWEEP,
           f"data.limit={N_UTTS}",
           "hydra/launcher=slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
    base = tmp_path / "multirun" / "sweeps" / "tiny-qwen2audio" / "demo"
    t0 = time.monotonic()

    # ---- first submission: cancel one array task as soon as it has written a row
    first_log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=first_log, stderr=subprocess.STDOUT, text=True)
    try:
        victim = None
        deadline = time.monotonic() + 400
        while victim is None and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            for d in sorted(base.glob("affinity-*/shard0of1")):
                if _rows(d / "results.jsonl") and not (d / "summary.json").exists():
                    victim = d
                    break
            time.sleep(0.1)
        assert victim is not None, "no job wrote a row within 400 s"
        hydra_yaml = (victim / ".hydra" / "hydra.yaml").read_text(encoding="utf-8")
        task_id = next(line.split(":", 1)[1].strip().strip("'\"") for line in hydra_yaml.splitlines()
                       if line.strip().startswith("id:"))  # hydra.job.id = the SLURM array task, e.g. 8_1
        array_id = task_id.split("_")[0]
        cancel = _sh("scancel", task_id)
        assert cancel.returncode == 0, cancel.stderr
        t_cancel = time.monotonic() - t0
        at_cancel = len(_rows(victim / "results.jsonl"))
        # the other three run to the end; the cancelled one gets SIGTERM (submitit ignores it), then SIGKILL
        while _array_tasks(array_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _array_tasks(array_id), f"array job {array_id} still queued after 400 s"
    finally:
        # Without accounting (no slurmdbd) submitit cannot learn that the cancelled task ended and would wait for
        # its result forever; with accounting it raises for that task. Either way the user's next step is to
        # submit the same command again.
        if first.poll() is None:
            first.terminate()
        first.wait(timeout=30)
        first_log.close()
    t_first = time.monotonic() - t0

    cut = _rows(victim / "results.jsonl")
    assert 1 <= len(cut) < N_UTTS and not (victim / "summary.json").exists(), (
        f"the cancelled job {task_id} was not cut short ({len(cut)} of {N_UTTS} rows): it finished before SIGKILL")
    for d in base.glob("affinity-*/shard0of1"):
        if d != victim:
            assert len(_rows(d / "results.jsonl")) == N_UTTS and (d / "summary.json").exists(), d

    # ---- the same command again: the cancelled job resumes, the finished ones skip their utterances
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    t_total = time.monotonic() - t0
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]

    jobs = sorted(base.glob("affinity-*/shard0of1"))  # one folder per job: <run_name>/shard<i>of<n>
    assert len(jobs) == 4, jobs
    seen = set()
    for d in jobs:
        rows = _rows(d / "results.jsonl")
        ids = [r["id"] for r in rows]
        assert sorted(ids) == sorted(expected_ids), (d, ids)                         # one row per utterance
        assert len(ids) == len(set(ids)) == N_UTTS, (d, ids)                        # no duplicates
        assert all(r["status"] == "ok" for r in rows), d
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        assert summary["n_utterances"] == N_UTTS and summary["n_failed"] == 0, d
        assert not list(d.glob("*.tmp")), list(d.glob("*.tmp"))
        point = summary["points"][0]
        seen.add((point["layer"], point["params"]["threshold"]))
    assert seen == SETTINGS
    # the resumed job kept the rows written before the cancellation (they are not decoded again)
    kept = {r["id"]: r for r in _rows(victim / "results.jsonl")}
    assert all(kept[r["id"]] == r for r in cut)
    logs = "".join(p.read_text(errors="replace") for p in (base.parents[2] / "sweeps" / ".submitit").glob("*/*_log.out"))
    assert f"{len(cut)} of {N_UTTS} utterances already done" in logs
    assert logs.count(f"{N_UTTS} of {N_UTTS} utterances already done") == 3

    # ---- make figures aggregates all four jobs; each WER is the plain sum of edits over reference words
    figures = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"), "--outputs", str(tmp_path),
                              "--out", str(tmp_path / "figures")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert figures.returncode == 0, figures.stderr[-3000:]
    assert "problem:" not in (tmp_path / "figures" / "report.txt").read_text()
    import pandas as pd

    runs = pd.read_csv(tmp_path / "figures" / "runs.csv")
    assert len(runs) == 4 and set(zip(runs["layer"], runs["threshold"])) == SETTINGS
    assert (runs["n"] == N_UTTS).all() and runs["complete"].all() and (runs["n_failed"] == 0).all()
    (table,) = (tmp_path / "figures").glob("table6_affinity_*_w3_hidden.csv")
    t = pd.read_csv(table).set_index("Layer")
    for d in jobs:
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        layer, tau = summary["points"][0]["layer"], summary["points"][0]["params"]["threshold"]
        rows = _rows(d / "results.jsonl")
        wer = 100 * sum(r["edits"] for r in rows) / sum(r["ref_words"] for r in rows)
        assert t.loc[layer, f"tau={tau:g} WER"] == pytest.approx(wer), (d, t)
    print(f"slurm sweep: cancelled {task_id} at {t_cancel:.0f} s with {at_cancel} rows, killed after {len(cut)} of "
          f"{N_UTTS}; "
          f"first submission drained at {t_first:.0f} s; resubmission done at {t_total:.0f} s")

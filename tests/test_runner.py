"""End-to-end runs on real Whisper tiny.en over real demo speech: outputs, resume, interventions, bad input, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose
from speech_redundancy.data.records import read_manifest, write_manifest
from speech_redundancy.metrics import corpus_wer, utterance_edits
from speech_redundancy.compress import Point
from speech_redundancy.models.base import Request
from speech_redundancy.runner import RunError, run

TINY = ["model=whisper_tiny_en"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def real_subset(demo_manifest, tmp_path_factory):
    """A manifest of four real read-speech clips (shortest first, to keep the suite fast)."""
    utts = [u for u in read_manifest(demo_manifest) if u.extra.get("kind") == "real"]
    utts = sorted(utts, key=lambda u: u.duration)[:4]
    path = tmp_path_factory.mktemp("real") / "manifest.jsonl"
    write_manifest(path, utts)
    return path


@pytest.fixture(scope="module")
def tiny_adapter(whisper_tiny):
    from speech_redundancy.models.whisper import WhisperModel

    model, processor = whisper_tiny
    return WhisperModel(model, processor, name="whisper-tiny.en")


def test_vanilla_run_writes_results_and_summary(real_subset, tmp_path):
    cfg = compose(TINY + ["data=manifest", f"data.manifest={real_subset}"])
    summary = run(cfg, tmp_path)
    for key in ("wer", "cwer", "retention", "n_utterances", "n_failed"):
        assert key in summary
    assert summary["n_utterances"] == 4 and summary["n_failed"] == 0
    assert summary["retention"] == 1.0
    assert summary["wer"] <= 0.25  # tiny.en on clean read speech
    rows = _rows(tmp_path / "results.jsonl")
    scored = corpus_wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])  # the summary is its rows'
    assert (summary["wer"], summary["cwer"]) == pytest.approx((scored["wer"], scored["cwer"]))
    assert sorted(r["id"] for r in rows) == sorted(u.id for u in read_manifest(real_subset))
    for r in rows:
        for key in ("id", "reference", "hypothesis", "edits", "ref_words", "tokens_in", "tokens_out", "seconds"):
            assert key in r
        assert r["tokens_in"] == r["tokens_out"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["wer"] == summary["wer"]
    assert (tmp_path / "config.yaml").exists() and "code_version" in json.loads((tmp_path / "run.json").read_text())


def test_interrupted_run_resumes_without_duplicates(real_subset, tmp_path):
    cfg = compose(TINY + ["data=manifest", f"data.manifest={real_subset}"])
    full = run(cfg, tmp_path / "full")
    # simulate a crash after two rows, with a half-written third line
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / "results.jsonl").read_text().splitlines()
    (part / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    (part / "run.json").write_text((tmp_path / "full" / "run.json").read_text())
    resumed = run(cfg, part)
    rows = _rows(part / "results.jsonl")
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    assert resumed["wer"] == full["wer"] and resumed["n_failed"] == 0
    # different settings in the same folder are refused, not mixed
    other = compose(TINY + ["data=manifest", f"data.manifest={real_subset}", "max_new_tokens=10"])
    with pytest.raises(RunError, match="different settings"):
        run(other, part)


def test_no_compression_is_bit_identical_to_stock_whisper(tiny_adapter, demo_manifest):
    from speech_redundancy.audio import load_audio

    utt = next(u for u in read_manifest(demo_manifest) if u.extra.get("kind") == "real")
    req = Request(utt=utt, audio=load_audio(utt.audio))
    model, processor = tiny_adapter.model, tiny_adapter.processor
    feats = processor.feature_extractor(req.audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        stock = model.model.encoder(feats).last_hidden_state
        stock_ids = model.generate(feats, max_new_tokens=40)
    captured = {}
    hook = model.model.encoder.register_forward_hook(lambda m, a, o: captured.setdefault("h", o.last_hidden_state))
    try:
        out = tiny_adapter.generate([req], [Point(2, "none"), Point(4, "none")], max_new_tokens=40)[0]
    finally:
        hook.remove()
    assert torch.equal(captured["h"], stock)
    assert out.text == processor.batch_decode(stock_ids, skip_special_tokens=True)[0].strip()
    assert out.tokens_out == out.tokens_in == out.tokens_per_point[-1]


@pytest.mark.parametrize("overrides, check", [
    (["intervention=affinity", "layer=0", "threshold=0.9", "window=1", "features=normed"], "merged"),
    (["intervention=affinity", "layer=4", "threshold=0.7", "window=3"], "merged"),
    (["intervention=oracle", "layer=2", "operator=uniform_merge", "budget=2"], "merged"),
    (["intervention=oracle", "layer=1", "operator=random_drop", "budget=2"], "merged"),
])
def test_interventions_compress_the_utterance_frames(real_subset, tmp_path, overrides, check):
    cfg = compose(TINY + ["data=manifest", f"data.manifest={real_subset}", "data.limit=2", "save_groups=true"]
                  + overrides)
    summary = run(cfg, tmp_path)
    assert summary["n_failed"] == 0 and summary["n_utterances"] == 2
    assert 0 < summary["retention"] < 1
    for r in _rows(tmp_path / "results.jsonl"):
        groups = r["groups"][0]
        assert len(groups) == r["tokens_in"]
        assert max(groups) + 1 == r["tokens_out"]


def test_oracle_random_drop_depends_only_on_seed(real_subset, tmp_path):
    base = TINY + ["data=manifest", f"data.manifest={real_subset}", "data.limit=2", "intervention=oracle",
                   "layer=1", "operator=random_drop", "budget=2", "save_groups=true"]
    run(compose(base), tmp_path / "a")
    run(compose(base), tmp_path / "b")
    run(compose(base + ["seed=1"]), tmp_path / "c")
    a, b, c = (_rows(tmp_path / x / "results.jsonl") for x in "abc")
    assert [r["groups"] for r in a] == [r["groups"] for r in b]
    assert [r["groups"] for r in a] != [r["groups"] for r in c]


@pytest.mark.parametrize("overrides, needle", [
    (["intervention=affinity", "threshold=1.5"], "threshold"),
    (["intervention=affinity", "window=0"], "window"),
    (["intervention=oracle", "budget=0"], "budget"),
    (["intervention=oracle", "layer=9"], "layer=9"),
    (["intervention=oracle", "operator=shuffle"], "operator"),
    (["intervention=affinity", "features=pitch"], "features"),
    (["protocol=harness"], "protocol='harness' is not allowed: use one of paper, kimi_evalkit"),
])
def test_invalid_settings_are_refused_before_compute(real_subset, tmp_path, overrides, needle):
    cfg = compose(TINY + ["data=manifest", f"data.manifest={real_subset}"] + overrides)
    with pytest.raises((RunError, ValueError), match=needle):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.jsonl").exists() or not _rows(tmp_path / "results.jsonl")


def test_protocol_is_named_everywhere_and_not_in_the_fingerprint(real_subset, tmp_path):
    base = TINY + ["data=manifest", f"data.manifest={real_subset}"]
    first = run(compose(base), tmp_path)
    rows = _rows(tmp_path / "results.jsonl")
    meta = json.loads((tmp_path / "run.json").read_text())
    assert first["protocol"] == meta["protocol"] == "paper" and all(r["protocol"] == "paper" for r in rows)
    again = run(compose(base + ["protocol=audiobench"]), tmp_path)  # resumes: nothing is decoded again
    rescored = _rows(tmp_path / "results.jsonl")
    meta2 = json.loads((tmp_path / "run.json").read_text())
    assert meta2["fingerprint"] == meta["fingerprint"] and meta2["protocol"] == "audiobench"
    assert again["protocol"] == json.loads((tmp_path / "summary.json").read_text())["protocol"] == "audiobench"
    metric = {"protocol", "edits", "ref_words"}
    for old, new in zip(rows, rescored):
        assert {k: v for k, v in old.items() if k not in metric} == {k: v for k, v in new.items() if k not in metric}
        assert new["protocol"] == "audiobench"
        assert (new["edits"], new["ref_words"]) == utterance_edits(old["reference"], old["hypothesis"],
                                                                   protocol="audiobench")
    assert (again["edits"], again["ref_words"]) == (sum(r["edits"] for r in rescored), sum(r["ref_words"] for r in rescored))


def test_broken_audio_is_counted_not_dropped(real_subset, tmp_path):
    utts = read_manifest(real_subset)[:2]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    utts[1].audio = str(bad)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, utts)
    cfg = compose(TINY + ["data=manifest", f"data.manifest={manifest}"])
    with pytest.raises(Exception, match="bad.wav"):
        run(cfg, tmp_path / "raise")
    summary = run(compose(TINY + ["data=manifest", f"data.manifest={manifest}", "data.on_error=skip"]),
                  tmp_path / "skip")
    assert summary["n_utterances"] + summary["n_failed"] == 2 and summary["n_failed"] == 1
    assert "bad.wav" in json.dumps(summary["failed"])


def test_oracle_needs_alignment(real_subset, tmp_path):
    utts = read_manifest(real_subset)[:1]
    utts[0].words = None
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, utts)
    cfg = compose(TINY + ["data=manifest", f"data.manifest={manifest}", "intervention=oracle", "layer=1"])
    with pytest.raises(RunError, match=f"{utts[0].id}: the oracle needs word alignments"):
        run(cfg, tmp_path / "out")


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), SR_OUTPUTS=os.environ.get("SR_TEST_OUTPUTS", "/tmp/sr-cli"))
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_oracle_form_runs(real_subset, tmp_path):
    res = _cli("model=whisper_tiny_en", "intervention=oracle", "layer=3", "operator=uniform_merge", "budget=2",
               "data=manifest", f"data.manifest={real_subset}", "data.limit=1", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WER" in res.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["n_utterances"] == 1


def test_cli_missing_qwen2audio_weights_is_one_clear_line(tmp_path):
    res = _cli("model=qwen2audio", "intervention=oracle", "layer=5", "data.limit=1", f"hydra.run.dir={tmp_path}",
               "model.path=/nonexistent/qwen2-audio")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Qwen2-Audio" in err[0] and "model.path" in err[0]


def test_cli_scores_a_librispeech_folder_end_to_end(demo_manifest, tmp_path):
    """The issue's LibriSpeech form on a folder in LibriSpeech's own layout (flac + trans.txt), built from the real
    LibriVox clips of the demo set: loads, transcribes with real Whisper weights, and scores."""
    import soundfile as sf

    from speech_redundancy.audio import load_audio

    clips = [u for u in read_manifest(demo_manifest) if u.id.startswith("librivox-")][:3]
    assert len(clips) == 3
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1995" / "1826"
    chapter.mkdir(parents=True)
    lines = []
    for i, u in enumerate(clips):
        uid = f"1995-1826-{i:04d}"
        sf.write(chapter / f"{uid}.flac", load_audio(u.audio), 16000, subtype="PCM_16")
        lines.append(f"{uid} {u.text.upper()}")
    (chapter / "1995-1826.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    res = _cli("model=whisper_tiny_en", "data=librispeech", f"data.root={tmp_path}", "data.split=test-clean",
               f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_utterances"] == 3 and summary["n_failed"] == 0
    assert summary["wer"] < 0.25  # real speech, real weights: a broken loader or scorer gives ~100%
    rows = _rows(out / "results.jsonl")
    assert sorted(r["id"] for r in rows) == ["1995-1826-0000", "1995-1826-0001", "1995-1826-0002"]
    assert [r["reference"].lower() for r in sorted(rows, key=lambda r: r["id"])] == [u.text for u in clips]


def test_torch_threads_follow_the_setting_then_slurm(monkeypatch):
    from speech_redundancy.runner import torch_threads

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert torch_threads({"num_threads": None}) is None
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert torch_threads({"num_threads": None}) == 3  # a SLURM task uses the CPUs it was given
    assert torch_threads({"num_threads": 1}) == 1  # an explicit setting wins

"""The offline demo set (real + piper speech with pocketsphinx word timings) and the aligner behind it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from omegaconf import OmegaConf

from speech_redundancy.audio import load_audio
from speech_redundancy.data import demo
from speech_redundancy.data.align import AlignmentError, align, align_spans, align_words, in_dictionary, normalize_words
from speech_redundancy.data.records import read_manifest
from speech_redundancy.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def utts(demo_manifest):
    return read_manifest(demo_manifest)


@pytest.fixture(scope="module")
def synth():
    return demo.Synthesizer(*demo.voice_files(cache_dir() / "voices"))


# ---------------------------------------------------------------- the built set


def test_demo_set_size_durations_and_provenance(utts):
    assert len(utts) >= 60
    assert len({u.id for u in utts}) == len(utts)
    assert sum(u.duration for u in utts) >= 8 * 60
    for u in utts:
        assert 1.0 <= u.duration <= 30.0, u.id
        assert u.extra["kind"] in ("real", "synthetic") and u.extra["source"], u.id
        info = sf.info(u.audio)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), u.id
        assert abs(info.duration - u.duration) < 1e-3, u.id
    sources = {u.extra["source"] for u in utts}
    assert {"librivox", "pocketsphinx-test", "pyannote-sample", "piper"} <= sources
    real = [u for u in utts if u.extra["kind"] == "real"]
    assert len(real) >= 10 and sum(u.extra["source"] == "librivox" for u in real) == 5
    assert any(u.duration >= 20 for u in utts if u.extra["kind"] == "synthetic")  # long passages are there


def test_every_record_has_ordered_word_times_inside_the_clip(utts):
    for u in utts:
        assert u.words, u.id
        assert [w.word for w in u.words] == normalize_words(u.text), u.id
        for w in u.words:
            assert 0.0 <= w.start <= w.end <= u.duration + 0.01, (u.id, w)
        starts = [w.start for w in u.words]
        assert starts == sorted(starts), u.id
        assert all(a.end <= b.start + 1e-6 for a, b in zip(u.words, u.words[1:])), u.id  # no overlaps


def test_alignment_coverage_is_at_least_95_percent(utts, demo_manifest):
    ref = sum(len(u.words) for u in utts)
    timed = sum(u.extra["n_aligned_words"] for u in utts)
    assert timed / ref >= 0.95
    assert all(u.extra["n_aligned_words"] == len(u.words) for u in utts if u.extra["kind"] == "synthetic")
    marker = demo.read_marker(demo_manifest.parent)
    assert marker["coverage"] == pytest.approx(timed / ref, abs=1e-4)
    assert marker["n_utterances"] == len(utts)


def test_second_build_is_cached_and_fingerprinted(demo_manifest):
    mtime = demo_manifest.stat().st_mtime_ns
    start = time.perf_counter()
    assert demo.build_demo() == demo_manifest
    assert time.perf_counter() - start < 2.0
    assert demo_manifest.stat().st_mtime_ns == mtime
    texts = demo.read_sentences()
    fp = demo.fingerprint(texts, demo.SynthesisSettings())
    assert demo.read_marker(demo_manifest.parent)["fingerprint"] == fp
    assert demo.fingerprint(texts + ["One more sentence."], demo.SynthesisSettings()) != fp
    assert demo.fingerprint(texts, demo.SynthesisSettings(seed=1)) != fp


def test_cli_prints_the_statistics(demo_manifest, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_demo_cli", ROOT / "scripts" / "build_demo.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    n = len(read_manifest(demo_manifest))
    assert f"{n} utterances" in out and "coverage" in out and "librivox 5" in out and "piper" in out


# ---------------------------------------------------------------- synthesis


def test_synthesis_is_bit_identical_across_runs_and_matches_the_build(utts, synth, tmp_path):
    text = demo.read_sentences()[1]
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / name / "clip.wav")
        demo.write_wav(paths[-1], synth(text))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    built = next(u for u in utts if u.id == "piper-001")
    assert built.text == text
    assert Path(built.audio).read_bytes() == paths[0].read_bytes()


def test_sentences_are_all_in_the_aligner_dictionary():
    words = {w for text in demo.read_sentences() for w in normalize_words(text)}
    assert [w for w in sorted(words) if not in_dictionary(w)] == []


# ---------------------------------------------------------------- alignment


def test_align_words_on_a_synthetic_clip(utts):
    u = next(u for u in utts if u.id == "piper-012")
    audio = load_audio(u.audio)
    words = align_words(audio, u.text, name=u.id)
    assert [w.word for w in words] == normalize_words(u.text)
    starts = [w.start for w in words]
    assert all(a < b for a, b in zip(starts, starts[1:]))
    assert 0.0 <= starts[0] < 1.0 and words[-1].end <= len(audio) / 16000 + 0.01
    # same clip given at 22.05 kHz: timings agree to within two frames
    resampled = align_words(soxr.resample(audio, 16000, 22050), u.text, sample_rate=22050, name=u.id)
    assert max(abs(a.start - b.start) for a, b in zip(words, resampled)) <= 0.02


def test_out_of_dictionary_words_are_interpolated_and_flagged(utts):
    u = next(u for u in utts if u.id == "librivox-0880")  # "he was not an ill disposed young man"
    text = u.text.replace("young", "qzxvjk")
    result = align(load_audio(u.audio), text, name=u.id)
    assert [w.word for w in result.words] == normalize_words(text)
    assert result.oov == ["qzxvjk"] and result.aligned.count(False) == 1
    assert result.coverage == pytest.approx(7 / 8)
    i = normalize_words(text).index("qzxvjk")
    assert result.words[i - 1].end <= result.words[i].start <= result.words[i].end <= result.words[i + 1].start


def test_alignment_errors_name_the_utterance():
    with pytest.raises(AlignmentError, match="clip-7: transcript .* has no words"):
        align_words(np.zeros(16000, np.float32), " ... ", name="clip-7")
    with pytest.raises(AlignmentError, match="clip-8"):
        align_words(np.zeros(100, np.float32), "hello there my friend", name="clip-8")
    with pytest.raises(ValueError, match="mono"):
        align_words(np.zeros((2, 16000), np.float32), "hello", name="clip-9")


def test_align_spans_offsets_times_and_interpolates_failed_spans(utts):
    u = next(u for u in utts if u.id == "librivox-0880")
    audio = load_audio(u.audio)
    silence = np.zeros(8000, np.float32)
    joined = np.concatenate([audio, silence])
    spans = [(0.0, u.duration, u.text), (u.duration, u.duration + 0.5, "hello there")]
    with pytest.raises(AlignmentError, match="x span 1"):
        align_spans(joined, spans, name="x")
    result = align_spans(joined, spans, name="x", on_failure="interpolate")
    assert result.aligned == [True] * 8 + [False] * 2
    assert result.words[-2].start == pytest.approx(u.duration, abs=1e-3)
    assert result.words[-1].end == pytest.approx(u.duration + 0.5, abs=1e-3)
    with pytest.raises(ValueError, match="on_failure='skip'; allowed: raise, interpolate"):
        align_spans(joined, spans, on_failure="skip")


def test_normalize_words():
    words = normalize_words("Twenty-five o'clock, Mr. Smith\u2019s CAT!")
    assert words == ["twenty", "five", "o'clock", "mr", "smith's", "cat"]
    assert normalize_words("  ?! ") == []


# ---------------------------------------------------------------- source parsing


def test_cards_transcription_and_stm_parsing():
    cards = demo.parse_cards_transcription("<s> ten of clubs  </s> (001)\n<s> five five  </s> (004)\n")
    assert cards == {"001": "ten of clubs", "004": "five five"}
    stm = "s 1 A 0.5 1.0 Hello?\ns 1 B 1.2 2.0 Hi.\ns 1 A 2.1 5.0 How are you today?\ns 1 B 5.1 5.6 Fine.\n"
    segs = demo.parse_stm(stm)
    assert [s.speaker for s in segs] == ["A", "B", "A", "B"] and segs[2].text == "How are you today?"
    groups = demo.group_segments(segs, min_seconds=3.0)
    assert [[s.text for s in g] for g in groups] == [["Hello?", "Hi.", "How are you today?", "Fine."]]
    groups = demo.group_segments(segs, min_seconds=1.0)
    assert [len(g) for g in groups] == [2, 2]  # the short last turn joins the group before it
    spans = demo.cut_points(groups, total=6.0, pad=0.2)
    assert spans == [(0.3, pytest.approx(2.05)), (pytest.approx(2.05), 5.8)]
    with pytest.raises(demo.DemoError, match="STM line 1 has 3 fields"):
        demo.parse_stm("a b c\n")


def test_hydra_config_keys():
    cfg = OmegaConf.load(ROOT / "conf" / "data" / "demo.yaml")
    assert OmegaConf.to_container(cfg) == {
        "name": "demo", "manifest": None, "subset": None, "limit": None, "sample": None, "seed": 0, "on_error": "raise",
        "align_root": None, "buckets": None, "shard_index": 0, "shard_count": 1,  # every documented data.* key
    }

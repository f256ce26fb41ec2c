"""Corpus loaders on small fixtures built in each corpus's real layout, TextGrids, selection, the dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from speech_redundancy.audio import AudioError, load_audio
from speech_redundancy.data import select
from speech_redundancy.data.corpora import (
    CorpusError,
    load_covost2,
    load_hf,
    load_kespeech,
    load_librispeech,
    load_manifest,
    load_openbookqa,
    load_sdqa,
    load_trivia_qa,
    probe_duration,
)
from speech_redundancy.data.corpora.qa import parse_choices
from speech_redundancy.data.dataset import LOADERS, load_dataset
from speech_redundancy.data.records import Utterance, write_manifest
from speech_redundancy.data.textgrid import AlignmentError, coverage, read_textgrid, words_match

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def tone(path: Path, seconds: float, sr: int = 16000, channels: int = 1, subtype: str = "PCM_16", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 220 * t)
    if channels == 2:
        wav = np.stack([wav, 0.5 * wav], axis=1)
    sf.write(str(path), wav, sr, subtype=subtype, format=fmt)
    return path


def wav_bytes(seconds: float, sr: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.ones(int(seconds * sr)), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


# ------------------------------------------------------------------ LibriSpeech


TRANSCRIPTS = {
    "1089-134686-0000": "HE HOPED THERE WOULD BE STEW FOR DINNER",
    "1089-134686-0001": "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM",
    "121-121726-0000": "ALSO A POPULAR CONTRIVANCE",
}


def make_librispeech(root: Path, split: str = "test-clean") -> Path:
    """``root/LibriSpeech/<split>/<spk>/<chapter>/`` with flac of various rates, channels and bit depths."""
    base = root / "LibriSpeech" / split
    specs = {  # id: (seconds, rate, channels, subtype)
        "1089-134686-0000": (1.0, 16000, 1, "PCM_16"),
        "1089-134686-0001": (1.5, 44100, 2, "PCM_24"),
        "121-121726-0000": (0.5, 8000, 1, "PCM_16"),
    }
    for uid, (sec, sr, ch, st) in specs.items():
        spk, chap, _ = uid.split("-")
        tone(base / spk / chap / f"{uid}.flac", sec, sr, ch, st)
    for spk, chap in {("1089", "134686"), ("121", "121726")}:
        lines = [f"{u} {t}" for u, t in TRANSCRIPTS.items() if u.startswith(f"{spk}-{chap}-")]
        (base / spk / chap / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_librispeech_layouts_and_records(tmp_path):
    make_librispeech(tmp_path)
    for root in (tmp_path, tmp_path / "LibriSpeech", tmp_path / "LibriSpeech" / "test-clean"):
        utts = load_librispeech(root, "test-clean")
        assert [u.id for u in utts] == ["1089-134686-0000", "1089-134686-0001", "121-121726-0000"]
    u = {u.id: u for u in utts}
    assert u["1089-134686-0000"].text == TRANSCRIPTS["1089-134686-0000"]
    assert u["1089-134686-0001"].duration == pytest.approx(1.5, abs=1e-3)
    assert u["121-121726-0000"].duration == pytest.approx(0.5, abs=1e-3)
    assert all(x.language == "en" and x.task == "asr" and x.words is None for x in utts)
    assert u["121-121726-0000"].extra["speaker"] == "121"
    # the records point at files the runner can decode: stereo 44.1 kHz 24-bit -> 16 kHz mono
    assert load_audio(u["1089-134686-0001"].audio).shape == (24000,)


def test_librispeech_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*expected <root>/<split>/<speaker>"):
        load_librispeech(tmp_path / "nowhere", "test-clean")
    make_librispeech(tmp_path)
    with pytest.raises(FileNotFoundError, match="test-other"):
        load_librispeech(tmp_path, "test-other")
    with pytest.raises(FileNotFoundError, match="this is the LibriSpeech test-clean folder, but split=test-other"):
        load_librispeech(tmp_path / "LibriSpeech" / "test-clean", "test-other")


def test_librispeech_bad_items_raise_or_skip(tmp_path):
    make_librispeech(tmp_path)
    chap = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    (chap / "1089-134686-0000.flac").write_bytes(b"not audio at all")
    (chap / "1089-134686-0001.flac").write_bytes(b"")
    with pytest.raises(AudioError, match="1089-134686-0000.flac"):
        load_librispeech(tmp_path, "test-clean")
    failures = []
    utts = load_librispeech(tmp_path, "test-clean", on_error="skip", failures=failures)
    assert [u.id for u in utts] == ["121-121726-0000"]
    assert sorted(f["id"] for f in failures) == ["1089-134686-0000", "1089-134686-0001"]
    assert all("flac" in f["error"] for f in failures)
    assert any("audio file is empty" in f["error"] for f in failures)


def test_probe_duration_names_bad_files(tmp_path):
    sf.write(str(tmp_path / "header_only.wav"), np.zeros(0), 16000)
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "junk.flac").write_bytes(b"fLaC but not really")
    cases = {"header_only.wav": "audio file is empty", "zero.wav": "empty", "junk.flac": "cannot read audio",
             "missing.wav": "audio file not found"}
    for name, message in cases.items():
        with pytest.raises(AudioError, match=rf"{name}: .*{message}|{name}: {message}"):
            probe_duration(tmp_path / name)
    assert probe_duration(tone(tmp_path / "ok.wav", 0.25, 24000, 2, "PCM_U8")) == pytest.approx(0.25)


def test_librispeech_missing_and_non_utf8_transcripts(tmp_path):
    make_librispeech(tmp_path)
    base = tmp_path / "LibriSpeech" / "test-clean"
    (base / "121" / "121726" / "121-121726.trans.txt").unlink()
    with pytest.raises(CorpusError, match=r"121-121726\.trans\.txt: transcript file not found"):
        load_librispeech(tmp_path, "test-clean")
    (base / "1089" / "134686" / "1089-134686.trans.txt").write_bytes(b"1089-134686-0000 CAF\xe9 AU LAIT\n")
    failures = []
    with pytest.raises(CorpusError, match=r"1089-134686\.trans\.txt: transcript is not UTF-8"):
        load_librispeech(tmp_path, "test-clean")
    assert load_librispeech(tmp_path, "test-clean", on_error="skip", failures=failures) == []
    assert len(failures) == 2 and all("file" in f for f in failures)


def test_librispeech_audio_without_transcript_line(tmp_path):
    make_librispeech(tmp_path)
    tone(tmp_path / "LibriSpeech" / "test-clean" / "121" / "121726" / "121-121726-0009.flac", 0.3)
    with pytest.raises(CorpusError, match="no line for 121-121726-0009"):
        load_librispeech(tmp_path, "test-clean")


# ------------------------------------------------------------------ MFA TextGrids


def textgrid_long(intervals: list[tuple[float, float, str]], xmax: float) -> str:
    """An MFA-style TextGrid in Praat's long text format, a words tier and a phones tier."""
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {xmax}",
             "tiers? <exists>", "size = 2", "item []:"]
    tiers = [("words", intervals), ("phones", [(0.0, xmax, "")])]
    for k, (name, ivs) in enumerate(tiers, 1):
        lines += [f"    item [{k}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                  "        xmin = 0", f"        xmax = {xmax}", f"        intervals: size = {len(ivs)}"]
        for j, (a, b, t) in enumerate(ivs, 1):
            lines += [f"        intervals [{j}]:", f"            xmin = {a}", f"            xmax = {b}", f'            text = "{t}"']
    return "\n".join(lines) + "\n"


def textgrid_short(intervals: list[tuple[float, float, str]], xmax: float) -> str:
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", str(xmax), "<exists>", "1",
             '"IntervalTier"', '"words"', "0", str(xmax), str(len(intervals))]
    for a, b, t in intervals:
        lines += [str(a), str(b), f'"{t}"']
    return "\n".join(lines) + "\n"


STEW = [(0.0, 0.05, "sil"), (0.05, 0.2, "he"), (0.2, 0.4, "hoped"), (0.4, 0.5, "there"), (0.5, 0.6, "would"),
        (0.6, 0.65, "be"), (0.65, 0.8, "stew"), (0.8, 0.85, "for"), (0.85, 0.95, "dinner"), (0.95, 1.0, "")]


def test_read_textgrid_long_and_short_formats(tmp_path):
    for fmt, writer in (("long", textgrid_long), ("short", textgrid_short)):
        p = tmp_path / f"{fmt}.TextGrid"
        p.write_text(writer(STEW, 1.0))
        words = read_textgrid(p)
        assert [w.word for w in words] == "he hoped there would be stew for dinner".split()
        assert (words[0].start, words[0].end, words[-1].end) == (0.05, 0.2, 0.95)
    bad = tmp_path / "bad.TextGrid"
    bad.write_text("this is not a textgrid")
    with pytest.raises(AlignmentError, match="bad.TextGrid"):
        read_textgrid(bad)


def test_words_match_ignores_case_punctuation_and_chinese_segmentation():
    assert words_match(["he", "hoped"], "HE HOPED.")
    assert words_match(["don't", "<unk>"], "Don't, Panic!")
    assert words_match(["今天", "天气", "好"], "今天天气 好")
    assert not words_match(["he", "hoped"], "HE HOPED THERE")


def test_librispeech_with_mfa_alignments(tmp_path):
    make_librispeech(tmp_path)
    align = tmp_path / "mfa_out"
    (align / "1089").mkdir(parents=True)
    (align / "1089" / "1089-134686-0000.TextGrid").write_text(textgrid_long(STEW, 1.0))
    cfg = {"name": "librispeech", "root": str(tmp_path), "split": "test-clean", "align_root": str(align)}
    utts, _ = load_dataset(cfg)
    u = {x.id: x for x in utts}
    assert [w.word for w in u["1089-134686-0000"].words][-1] == "dinner"
    assert u["121-121726-0000"].words is None
    assert coverage(utts) == pytest.approx(1 / 3)
    # mismatch: the file is named, or with skip the utterance stays, unaligned, and the problem is listed
    (align / "1089" / "1089-134686-0001.TextGrid").write_text(textgrid_long(STEW, 1.5))
    with pytest.raises(AlignmentError, match=r"1089-134686-0001\.TextGrid: TextGrid words do not match"):
        load_dataset(cfg)
    utts, failures = load_dataset({**cfg, "on_error": "skip"})
    assert len(utts) == 3 and [f["id"] for f in failures] == ["1089-134686-0001"]
    assert {x.id: x for x in utts}["1089-134686-0001"].words is None


# ------------------------------------------------------------------ KeSpeech


def make_kespeech(root: Path) -> Path:
    corpus = root / "KeSpeech"
    lists = corpus / "Tasks" / "ASR" / "test"
    lists.mkdir(parents=True)
    tone(corpus / "Audio" / "1000001" / "phase1" / "1000001_a1.wav", 1.2, 16000, subtype="PCM_24")
    tone(corpus / "Audio" / "1000002" / "phase1" / "1000002_b1.wav", 0.8, 16000, subtype="FLOAT")
    (lists / "wav.scp").write_text(
        "1000001_a1 Audio/1000001/phase1/1000001_a1.wav\n1000002_b1 Audio/1000002/phase1/1000002_b1.wav\n")
    (lists / "text").write_text("1000001_a1 今天天气很好\n1000002_b1 <SPOKEN_NOISE> 我们走吧\n", encoding="utf-8")
    (lists / "utt2subdialect").write_text("1000001_a1 Mandarin\n1000002_b1 Southwestern\n")
    (lists / "utt2spk").write_text("1000001_a1 1000001\n1000002_b1 1000002\n")
    return corpus


def test_kespeech_records(tmp_path):
    corpus = make_kespeech(tmp_path)
    for root in (tmp_path, corpus, corpus / "Tasks" / "ASR" / "test"):
        utts = load_kespeech(root, "test")
        assert [u.id for u in utts] == ["1000001_a1", "1000002_b1"]
    assert [u.text for u in utts] == ["今天天气很好", "我们走吧"]
    assert all(u.language == "zh" and u.task == "asr" for u in utts)
    assert utts[1].extra["subdialect"] == "Southwestern" and utts[0].duration == pytest.approx(1.2, abs=1e-3)


def test_kespeech_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Tasks/ASR/<split>"):
        load_kespeech(tmp_path, "test")
    corpus = make_kespeech(tmp_path)
    lists = corpus / "Tasks" / "ASR" / "test"
    (lists / "text").write_text("1000001_a1 今天天气很好\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"text: no transcript for 1000002_b1"):
        load_kespeech(corpus, "test")
    failures = []
    assert len(load_kespeech(corpus, "test", on_error="skip", failures=failures)) == 1
    assert failures[0]["id"] == "1000002_b1"
    (lists / "text").write_bytes("1000001_a1 今天".encode("gbk"))
    with pytest.raises(CorpusError, match=r"Tasks/ASR/test/text: list is not UTF-8"):
        load_kespeech(corpus, "test")


# ------------------------------------------------------------------ CoVoST 2


def make_covost(root: Path) -> tuple[Path, Path]:
    en = root / "cv" / "en"
    tone(en / "clips" / "common_voice_en_1.mp3", 1.0, 48000, fmt="MP3", subtype="MPEG_LAYER_III")
    tone(en / "clips" / "common_voice_en_2.wav", 0.7, 22050)  # pre-converted: same stem, wav
    (en / "covost_v2.en_zh-CN.test.tsv").write_text(
        "path\tsentence\ttranslation\tclient_id\n"
        'common_voice_en_1.mp3\tHe said "hello".\t他说"你好"。\tc1\n'
        "common_voice_en_2.mp3\tGood morning.\t早上好。\tc2\n", encoding="utf-8")
    zh = root / "cv" / "zh-CN"
    tone(zh / "clips" / "common_voice_zh-CN_9.mp3", 1.0, 48000, fmt="MP3", subtype="MPEG_LAYER_III")
    tsvs = root / "covost_tsv"
    tsvs.mkdir()
    (tsvs / "covost_v2.zh-CN_en.test.tsv").write_text(
        "path\tsentence\ttranslation\tclient_id\ncommon_voice_zh-CN_9.mp3\t早上好\tGood morning\tc9\n", encoding="utf-8")
    return en, zh


def test_covost2_both_directions(tmp_path):
    en, zh = make_covost(tmp_path)
    utts = load_covost2(en, "en", "zh-CN", "test")
    assert [u.id for u in utts] == ["common_voice_en_1", "common_voice_en_2"]
    assert utts[0].text == '他说"你好"。' and utts[0].extra["transcript"] == 'He said "hello".'
    assert (utts[0].task, utts[0].language, utts[0].extra["target_language"]) == ("st", "en", "zh")
    assert utts[0].audio.endswith(".mp3") and utts[0].duration == pytest.approx(1.0, abs=0.05)
    assert utts[1].audio.endswith("common_voice_en_2.wav")
    assert load_audio(utts[0].audio).shape[0] == pytest.approx(16000, abs=1200)  # soundfile decodes mp3
    zh_utts = load_covost2(zh, "zh-CN", "en", "test", tsv_dir=tmp_path / "covost_tsv")
    assert (zh_utts[0].language, zh_utts[0].extra["target_language"], zh_utts[0].text) == ("zh", "en", "Good morning")


def test_covost2_missing_clip_and_tsv(tmp_path):
    en, _ = make_covost(tmp_path)
    (en / "clips" / "common_voice_en_2.wav").unlink()
    with pytest.raises(AudioError, match=r"clips/common_voice_en_2\.mp3: audio file not found"):
        load_covost2(en, "en", "zh-CN")
    failures = []
    assert len(load_covost2(en, "en", "zh-CN", on_error="skip", failures=failures)) == 1
    assert failures[0]["id"] == "common_voice_en_2"
    with pytest.raises(FileNotFoundError, match=r"covost_v2\.en_de\.test\.tsv"):
        load_covost2(en, "en", "de")


# ------------------------------------------------------------------ Hugging Face datasets on disk


AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path))
    return path


def test_sdqa_parquet_with_audio_bytes(tmp_path):
    vb = tmp_path / "voicebench"
    for split in ("usa", "gbr"):
        write_parquet(vb / "sd-qa" / f"{split}-00000-of-00001.parquet", {
            "audio": pa.array([{"bytes": wav_bytes(1.0), "path": "q1.wav"},
                               {"bytes": wav_bytes(0.5, 8000, "FLAC"), "path": None}], type=AUDIO_TYPE),
            "prompt": ["who wrote hamlet", "capital of france"],
            "reference": ["Shakespeare", "Paris"],
        })
    out = tmp_path / "clips"
    utts = load_sdqa(vb, "usa", audio_dir=out)
    assert [u.id for u in utts] == ["sdqa-usa-000000", "sdqa-usa-000001"]
    assert [Path(u.audio).name for u in utts] == ["sdqa-usa-000000.wav", "sdqa-usa-000001.flac"]
    assert utts[1].duration == pytest.approx(0.5) and utts[0].extra["question"] == "who wrote hamlet"
    assert (utts[0].text, utts[0].task) == ("Shakespeare", "qa")
    mtime = Path(utts[0].audio).stat().st_mtime_ns
    assert load_sdqa(vb / "sd-qa", "usa", audio_dir=out)[0].audio == utts[0].audio  # written once
    assert Path(utts[0].audio).stat().st_mtime_ns == mtime
    with pytest.raises(CorpusError, match=r"no files for split 'xyz'.*gbr"):
        load_sdqa(vb, "xyz", audio_dir=out)


def test_hf_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SR_CACHE", str(tmp_path / "cache"))
    f = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "audio": pa.array([{"bytes": wav_bytes(0.2), "path": "x.wav"}], type=AUDIO_TYPE), "text": ["hi"]})
    (u,) = load_hf(tmp_path, "test")
    assert Path(u.audio).parent.parent == tmp_path / "cache" / "hf" and u.text == "hi"
    assert u.id == "test-000000" and f.is_file()


def test_openbookqa_choices_from_prompt(tmp_path):
    prompt = "Which conducts heat best?\nA. wood\nB. a steel spoon\nC. plastic\nD. air"
    write_parquet(tmp_path / "voicebench" / "openbookqa" / "test-00000-of-00001.parquet", {
        "audio": pa.array([{"bytes": wav_bytes(2.0, 24000), "path": "o.wav"}], type=AUDIO_TYPE),
        "prompt": [prompt], "reference": ["B"]})
    (u,) = load_openbookqa(tmp_path / "voicebench", audio_dir=tmp_path / "clips")
    assert u.extra["choices"] == {"A": "wood", "B": "a steel spoon", "C": "plastic", "D": "air"}
    assert (u.text, u.extra["answer"]) == ("B", "B")
    assert parse_choices("no options here") is None


def save_to_disk_folder(folder: Path, table: pa.Table) -> Path:
    """What ``Dataset.save_to_disk`` writes: an Arrow IPC stream file plus state.json."""
    folder.mkdir(parents=True)
    with pa.ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_trivia_qa_save_to_disk_with_arrays(tmp_path):
    arr_type = pa.struct([("array", pa.list_(pa.float32())), ("sampling_rate", pa.int64())])
    table = pa.table({
        "audio": pa.array([{"array": [0.1] * 22050, "sampling_rate": 22050},
                           {"array": [0.2] * 16000, "sampling_rate": 16000}], type=arr_type),
        "question": ["Which planet is red?", "Who painted the Mona Lisa?"],
        "answer": [["Mars", "the red planet"], ["Leonardo da Vinci"]],
    })
    folder = save_to_disk_folder(tmp_path / "trivia", table)
    utts = load_trivia_qa(folder, audio_dir=tmp_path / "clips")
    assert [u.text for u in utts] == ["Mars", "Leonardo da Vinci"]
    assert utts[0].extra["answer"] == ["Mars", "the red planet"]
    assert utts[0].duration == pytest.approx(1.0) and Path(utts[0].audio).suffix == ".wav"


def test_generic_hf_dataset_dict_custom_columns_and_bad_audio(tmp_path):
    table = pa.table({
        "speech": pa.array([{"bytes": wav_bytes(0.3), "path": "a.wav"}, {"bytes": b"garbage!", "path": "b.wav"},
                            {"bytes": None, "path": str(tone(tmp_path / "ext" / "c.flac", 0.4))}], type=AUDIO_TYPE),
        "transcription": ["one", "two", "three"], "utt_id": ["u/1", "u/2", "u/3"], "speaker": ["s1", "s2", "s3"]})
    root = tmp_path / "dd"
    save_to_disk_folder(root / "test", table)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    kw = dict(audio_column="speech", text_column="transcription", id_column="utt_id", audio_dir=tmp_path / "clips")
    with pytest.raises(AudioError, match=r"u_2-[0-9a-f]{8}\.wav: cannot read audio.*row 1 of .*data-00000-of-00001\.arrow"):
        load_hf(root, "test", **kw)
    failures = []
    utts = load_hf(root, "test", on_error="skip", failures=failures, **kw)
    assert [u.id for u in utts] == ["u/1", "u/3"] and failures[0]["id"] == "u/2"
    assert utts[1].audio == str(tmp_path / "ext" / "c.flac") and utts[0].extra["speaker"] == "s1"
    with pytest.raises(CorpusError, match=r"no column 'sentence'"):
        load_hf(root, "test", audio_column="speech", text_column="sentence")


# ------------------------------------------------------------------ selection


def utts_with(durations: list[float]) -> list[Utterance]:
    return [Utterance(f"u{i:03d}", f"/x/{i}.wav", "t", d) for i, d in enumerate(durations)]


def test_sample_is_seeded_order_independent_and_nested():
    utts = utts_with([1.0] * 50)
    a = select.sample(utts, 10, seed=3)
    assert [u.id for u in a] == [u.id for u in select.sample(list(reversed(utts)), 10, seed=3)]
    assert [u.id for u in a] != [u.id for u in select.sample(utts, 10, seed=4)]
    assert {u.id for u in a} <= {u.id for u in select.sample(utts, 20, seed=3)}
    assert select.limit(utts, 3) == utts[:3] and select.limit(utts, None) == utts


def test_duration_buckets_and_shards():
    durations = [5.0] * 30 + [25.0] * 5 + [45.0] * 12 + [70.0] * 3
    buckets = select.duration_buckets(utts_with(durations), (0, 20, 40, 60), n_per_bucket=10, seed=0)
    assert {k: len(v) for k, v in buckets.items()} == {"0-20": 10, "20-40": 5, "40-60": 10}
    assert all(u.extra["bucket"] == "40-60" and 40 <= u.duration < 60 for u in buckets["40-60"])
    again = select.duration_buckets(list(reversed(utts_with(durations))), n_per_bucket=10, seed=0)
    assert [u.id for u in again["0-20"]] == [u.id for u in buckets["0-20"]]
    utts = utts_with([1.0] * 23)
    parts = [select.shard(list(reversed(utts)), i, 4) for i in range(4)]
    ids = [u.id for p in parts for u in p]
    assert sorted(ids) == [u.id for u in utts] and len(set(ids)) == 23
    assert [len(p) for p in parts] == [6, 6, 6, 5]
    assert [u.id for u in parts[1]] == [u.id for u in utts][1::4]  # stable: every 4th id in id order
    with pytest.raises(ValueError, match="shard index"):
        select.shard(utts, 4, 4)


# ------------------------------------------------------------------ dispatcher and configs


def test_load_dataset_librispeech_selection_and_skip(tmp_path):
    make_librispeech(tmp_path)
    cfg = OmegaConf.load(CONF / "librispeech.yaml")
    cfg.root = str(tmp_path)
    utts, failures = load_dataset(cfg)
    assert len(utts) == 3 and failures == []
    cfg.sample, cfg.shard_count, cfg.shard_index = 2, 2, 1
    utts, _ = load_dataset(cfg)
    assert len(utts) == 1
    (tmp_path / "LibriSpeech" / "test-clean" / "121" / "121726" / "121-121726-0000.flac").write_bytes(b"")
    plain = {"name": "librispeech", "root": str(tmp_path), "split": "test-clean", "on_error": "skip"}
    utts, failures = load_dataset(plain)
    assert len(utts) == 2 and failures == [{"id": "121-121726-0000", "error": failures[0]["error"]}]
    assert "121-121726-0000.flac" in failures[0]["error"]
    with pytest.raises(AudioError, match="121-121726-0000.flac"):
        load_dataset({**plain, "on_error": "raise"})


def test_load_dataset_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"data\.root is required for data=librispeech"):
        load_dataset(OmegaConf.load(CONF / "librispeech.yaml"))
    with pytest.raises(ValueError, match=r"unknown data.name 'libri'; allowed: demo, librispeech, kespeech, covost2"):
        load_dataset({"name": "libri"})
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_dataset({"name": "librispeech", "root": str(tmp_path), "on_error": "ignore"})


def test_load_dataset_manifest_subset_buckets_and_demo(tmp_path):
    utts = [Utterance(f"{k}{i}", str(tone(tmp_path / "a" / f"{k}{i}.wav", d)), "x", 0.0, extra={"kind": k})
            for i, (k, d) in enumerate([("real", 0.5), ("synthetic", 1.5), ("real", 2.5), ("synthetic", 0.7)])]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, utts)
    loaded = load_manifest(manifest)
    assert [u.duration for u in loaded] == pytest.approx([0.5, 1.5, 2.5, 0.7])  # missing durations read from files
    got, _ = load_dataset({"name": "demo", "manifest": str(manifest), "subset": "real"})
    assert sorted(u.id for u in got) == ["real0", "real2"]
    got, _ = load_dataset({"name": "manifest", "manifest": str(manifest), "buckets": {"edges": [0, 1, 2], "n_per_bucket": 5}})
    assert sorted((u.id, u.extra["bucket"]) for u in got) == [("real0", "0-1"), ("synthetic1", "1-2"), ("synthetic3", "0-1")]
    with pytest.raises(ValueError, match="no utterance in subset 'fake'"):
        load_dataset({"name": "manifest", "manifest": str(manifest), "subset": "fake"})


def test_every_data_config_names_a_loader_and_requires_its_path():
    files = sorted(CONF.glob("*.yaml"))
    ours = {"librispeech", "kespeech", "covost2_en2zh", "covost2_zh2en", "sdqa", "openbookqa", "trivia_qa", "hf", "manifest"}
    assert ours <= {f.stem for f in files}
    for f in files:
        if f.stem not in ours:
            continue
        cfg = OmegaConf.load(f)
        assert cfg.name in LOADERS, f
        assert OmegaConf.is_missing(cfg, "manifest" if cfg.name == "manifest" else "root"), f
        assert cfg.on_error == "raise" and cfg.shard_count == 1, f


# ------------------------------------------------------------------ scripts


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_scripts_write_loadable_manifests(tmp_path, capsys):
    make_librispeech(tmp_path)
    align = tmp_path / "mfa" / "1089"
    align.mkdir(parents=True)
    (align / "1089-134686-0000.TextGrid").write_text(textgrid_short(STEW, 1.0))
    out = tmp_path / "ls.jsonl"
    assert _script("prepare_librispeech").main(["--root", str(tmp_path), "--align-root", str(tmp_path / "mfa"), "--out", str(out)]) == 0
    assert "33.3% of utterances" in capsys.readouterr().out
    utts = load_manifest(out)
    assert len(utts) == 3 and utts[0].words[1].word == "hoped"

    write_parquet(tmp_path / "vb" / "sd-qa" / "usa-00000-of-00001.parquet", {
        "audio": pa.array([{"bytes": wav_bytes(0.4), "path": "a.wav"}], type=AUDIO_TYPE),
        "prompt": ["q"], "reference": ["a"]})
    assert _script("prepare_hf").main(["--preset", "sdqa", "--root", str(tmp_path / "vb"), "--out-dir", str(tmp_path / "sd")]) == 0
    (u,) = load_manifest(tmp_path / "sd" / "manifest.jsonl")
    assert Path(u.audio) == tmp_path / "sd" / "audio" / "sdqa-usa-000000.wav" and u.extra["question"] == "q"

"""scripts/align_manifest.py: pocketsphinx word timings for a user's manifest, resumable, failures listed."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT
from speech_redundancy.data.records import Utterance, read_manifest, write_manifest


def _script():
    spec = importlib.util.spec_from_file_location("align_manifest", ROOT / "scripts" / "align_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aligns_resumes_and_lists_failures(demo_manifest, tmp_path, capsys):
    real = [u for u in read_manifest(demo_manifest) if u.id.startswith("librivox-")][:2]
    expected = {u.id: [(w.word, w.start, w.end) for w in u.words] for u in real}
    bare = [Utterance(u.id, u.audio, u.text, u.duration) for u in real]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF-not-audio")
    bare.append(Utterance("broken", str(broken), "hello world", 1.0))
    src = tmp_path / "in.jsonl"
    write_manifest(src, bare)
    out = tmp_path / "aligned.jsonl"
    # an interrupted earlier run: the first utterance done (with deliberately marked timings), a torn line after it
    marked = [{"word": "resumed", "start": 0.0, "end": 0.1}]
    (tmp_path / "aligned.jsonl.partial").write_text(
        json.dumps({"id": real[0].id, "words": marked, "aligned": [True]}) + "\n" + '{"id": "torn')
    assert _script().main(["--manifest", str(src), "--out", str(out)]) == 0
    got = {u.id: u for u in read_manifest(out)}
    assert list(got) == [real[0].id, real[1].id, "broken"]
    assert [(w.word, w.start, w.end) for w in got[real[0].id].words] == [("resumed", 0.0, 0.1)]  # not redone
    # the same aligner as the demo set's builder: the same timings
    assert [(w.word, w.start, w.end) for w in got[real[1].id].words] == expected[real[1].id]
    assert got["broken"].words is None
    err = capsys.readouterr().err
    assert "not aligned: broken" in err and "broken.wav" in err
    assert not (tmp_path / "aligned.jsonl.partial").exists()

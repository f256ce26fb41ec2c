"""Metrics against hand-computed numbers, jiwer and sacrebleu; failure detectors on the paper's own examples;
prompts; re-scoring a hand-written results.jsonl."""

from __future__ import annotations

import json
import math

import jiwer
import pytest
import sacrebleu

from speech_redundancy import metrics as M
from speech_redundancy.normalize import english_spelling_mapping, normalize, normalizer_id
from speech_redundancy.prompts import get_prompt, split_task
from speech_redundancy.rescore import rescore, trajectory_table

# ---------------------------------------------------------------------------------------------- WER / cWER


def test_loop_makes_cwer_lower_than_wer_by_hand():
    refs = ["the cat sat", "a b c d"]
    hyps = ["the cat sat on on on on on on on", "a b x d"]
    # utt 1: N=3, E=7 (seven insertions); utt 2: N=4, E=1 (one substitution)
    r = M.corpus_wer(refs, hyps, normalize=False)
    assert (r["edits"], r["ref_words"], r["n"]) == (8, 7, 2)
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (1, 0, 7)
    assert r["wer"] == pytest.approx(8 / 7)
    assert r["cwer"] == pytest.approx((3 + 1) / 7)  # min(7, 3) + min(1, 4)
    assert r["cwer"] < r["wer"]


def test_equals_jiwer_without_normalisation():
    refs = ["The quick brown fox", "jumps over the lazy dog", "hello world again", "x"]
    hyps = ["the quick brown fox", "jumps over lazy dog dog", "", "y z"]
    assert M.corpus_wer(refs, hyps, normalize=False)["wer"] == pytest.approx(jiwer.wer(refs, hyps))


def test_normalised_wer_by_hand():
    # "mister smith can not go" vs "mister smith cannot go": can->cannot (S), not deleted (D)
    r = M.corpus_wer(["Mr. Smith can't go."], ["mister smith cannot go"])
    assert (r["edits"], r["ref_words"], r["substitutions"], r["deletions"]) == (2, 5, 1, 1)
    assert r["wer"] == pytest.approx(0.4)
    assert r["unit"] == "word"


def test_english_normaliser_examples():
    assert normalize("Mr. Smith can't go.") == "mister smith can not go"
    assert normalize("It was TWENTY-FIVE years <|endoftext|>") == "it was 25 years"
    assert normalize("Hmm, well (laughs) okay!") == "well okay"
    assert normalize("  ") == ""


def test_spelling_list_loads_from_a_file(tmp_path):
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}))
    assert english_spelling_mapping(str(path)) == {"colour": "color"}
    assert english_spelling_mapping(str(tmp_path)) == {"colour": "color"}  # a tokenizer folder works too
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="word -> word"):
        english_spelling_mapping(str(bad))
    assert normalizer_id("en").startswith("whisper-en+basic")


def test_chinese_cer_by_hand():
    refs = ["今天天气很好。", "我有3个苹果"]
    hyps = ["今天天汽很好啊", "我有三个苹果"]  # 气->汽 (S), 啊 (I); 3 and 三 agree after normalisation
    r = M.corpus_wer(refs, hyps, language="zh")
    assert (r["edits"], r["ref_words"], r["substitutions"], r["insertions"]) == (2, 12, 1, 1)
    assert r["wer"] == pytest.approx(2 / 12)
    assert r["unit"] == "char"
    assert normalize("你好，世界！ ABC", "zh") == "你好世界abc"


def test_utterance_edits_and_aggregate_match_corpus():
    refs = ["the cat sat", "a b c d", "red blue"]
    hyps = ["the cat sat on on on on on on on", "a b x d", "red"]
    rows = [dict(zip(("edits", "ref_words"), M.utterance_edits(r, h))) for r, h in zip(refs, hyps)]
    assert [(x["edits"], x["ref_words"]) for x in rows] == [(7, 3), (1, 4), (1, 2)]
    rows.append({"status": "failed", "error": "boom"})
    agg = M.aggregate(rows)
    direct = M.corpus_wer(refs, hyps)
    assert agg["wer"] == pytest.approx(direct["wer"]) and agg["cwer"] == pytest.approx(direct["cwer"])
    assert agg["n_failed"] == 1 and agg["n"] == 3
    with pytest.raises(ValueError, match="row 0 lacks"):
        M.aggregate([{"edits": 1}])


def test_empty_reference_and_hypothesis():
    r = M.corpus_wer(["", "a b"], ["x y", ""], normalize=False)
    # empty reference: E=2 insertions, N=0, clamped to 0; empty hypothesis: 2 deletions
    assert (r["edits"], r["clamped_edits"], r["ref_words"], r["empty_refs"]) == (4, 2, 2, 1)
    assert r["wer"] == pytest.approx(2.0) and r["cwer"] == pytest.approx(1.0)
    assert math.isnan(M.corpus_wer([""], [""])["wer"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        M.corpus_wer(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="hypothesis 1 is NoneType"):
        M.corpus_wer(["a", "b"], ["a", None])
    with pytest.raises(TypeError, match="reference 0 is bytes"):
        M.corpus_wer([b"a"], ["a"])


# ---------------------------------------------------------------------------------------------- BLEU


def test_bleu_en2zh_uses_zh_tokenizer():
    refs = ["我今天很高兴见到你。", "这本书非常有趣。"]
    hyps = ["我今天很高兴看到你。", "这本书很有趣。"]
    r = M.corpus_bleu(refs, hyps, "zh")
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert r["bleu"] != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score)
    assert "tok:zh" in r["signature"]


def test_bleu_zh2en_uses_13a():
    refs = ["The cat is on the mat.", "There is a book on the table."]
    hyps = ["The cat sits on the mat.", "A book is on the table."]
    r = M.corpus_bleu(refs, hyps, "en")
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score)
    assert "tok:13a" in r["signature"]


# ---------------------------------------------------------------------------------------------- failures

# Paper Tables 9-10 (and Figure 11), hypotheses marked "… Looping", as printed (data).
PAPER_LOOPS = [
    ("en", "it was strange too that he an own own own own own own own"),
    ("en", "it was strange too that he an and and and and and and and and and and and and and"),
    ("en", "it was strange too that he he he he he he he he he he he he he he he he he"),
    ("en", "it was strange he heard the arduous labours of the church and the obscure toil of the church and the "
           "obscure toil of the church and the obscure toil of the church"),
    ("en", "it was strange too he he found an arid pleasure in following up to the end the the the the the the the "
           "the the the"),
    ("en", "it was strange too that he found an arid pleasure in following to the end the rigid lines of the "
           "doctrines of the church and penetrating into the arid lines of the doctrines of the church and "
           "penetrating into the arid lines of"),
    ("zh", "它是一个人的心灵的镜子,它是一个人的心灵的镜子,它是一个人的心灵的镜子,它是一个人的心灵的镜子,它是一个人的心灵的镜子"),
    ("en", "The ghost of the ghost of the ghost of the ghost of the ghost of the ghost of the ghost of the ghost of "
           "the ghost of"),
    ("en", "The kingdom of the danes had the kingdom of the danes had the kingdom of the danes had the kingdom of "
           "the danes had the kingdom of the danes"),
    ("en", "A moment before the ghost of the ancient kingdom of the danes had looked forth through the vesture of "
           "the haze hazed of the danes had looked forth through the vesture of the"),
    ("en", '"Be ware of be ware of be ware of be ware of be ware of be ware of be ware of be ware of be ware of '
           "be ware of be ware of be ware of"),
]
# Not loops: ground truths and non-looping hypotheses from the same tables, and ordinary repetitions.
# (Table 9, Uniform Drop, layer 5 is marked Looping in the paper, but its printed prefix repeats nothing.)
NOT_LOOPS = [
    ("en", "It was strange too that he found an arid pleasure in following up to the end the rigid lines of the "
           "doctrines of the church and penetrating into obscure silences only to hear and feel the more deeply "
           "his own condemnation."),
    ("en", "it was strange he found an arid pleasure in following to the end the obscure of the church and to hear "
           "and feel the more own of the narration <|endoftext|>"),
    ("en", "A moment before the spirit of the kingdom of the danes had passed through the veil of the misty night"),
    ("en", "The kingdom of the danes had the vesture of the city <|endoftext|>"),
    ("en", "that that is is that that is not is not is that it it is"),
    ("en", "ha ha ha ha"),
    ("en", "go on go on"),
    ("zh", "我们一天一天地长大，谢谢大家"),
    ("en", ""),
]


@pytest.mark.parametrize("lang,text", PAPER_LOOPS)
def test_paper_loops_are_detected(lang, text):
    assert M.repetition_loop(text, lang)


@pytest.mark.parametrize("lang,text", NOT_LOOPS)
def test_non_loops_are_not(lang, text):
    assert not M.repetition_loop(text, lang)


def test_language_switch():
    assert M.language_switch(PAPER_LOOPS[6][1], "en")  # Table 9, Uniform Merge, layer 10: Chinese for English
    assert not M.language_switch(PAPER_LOOPS[0][1], "en")
    assert not M.language_switch("这是iPhone的测试", "zh")
    assert M.language_switch("this is an english answer", "zh")
    assert not M.language_switch("", "en")


def test_failure_rates_by_hand():
    hyps = [PAPER_LOOPS[0][1], PAPER_LOOPS[6][1], "<|endoftext|>", "a fine answer"]
    r = M.failure_rates(hyps, "en")
    # the Chinese loop is both a loop (counted in characters) and a language switch
    assert r["n"] == 4
    assert r["switch_rate"] == pytest.approx(1 / 4)
    assert r["empty_rate"] == pytest.approx(1 / 4)
    assert r["loop_rate"] == pytest.approx(2 / 4)


def test_qa_accuracy():
    r = M.qa_accuracy([True, False, None, True, {"verdict": True}])
    assert (r["correct"], r["n_judged"], r["n_failed"]) == (3, 4, 1)
    assert r["accuracy"] == pytest.approx(0.75)
    with pytest.raises(TypeError, match="verdict 0"):
        M.qa_accuracy(["yes"])


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts():
    assert get_prompt("qwen2_audio", "asr") == "Detect the language and recognize the speech: <|en|>"
    assert get_prompt("qwen2-audio", "st_en2zh") == (
        "Translate the speech into Chinese and only output the translation: <|en|>"
    )
    assert get_prompt("qwen2_audio", "st", source_lang="zh", target_lang="en").endswith("translation: <|zh|>")
    assert get_prompt("kimi_audio", "asr") == "Please transcribe the spoken content into written text."
    assert get_prompt("kimi_audio", "asr", source_lang="zh") == "请把这段语音转录成文本。"
    assert get_prompt("kimi_audio", "qa") == ""
    assert get_prompt("whisper", "st_zh2en") == {"language": "zh", "task": "translate"}
    assert get_prompt("whisper", "asr", source_lang="zh") == {"language": "zh", "task": "transcribe"}
    assert get_prompt("qwen2_audio", "asr", override="Transcribe:") == "Transcribe:"
    assert split_task("st_en2zh") == ("st", "en", "zh")
    with pytest.raises(ValueError, match="only into English"):
        get_prompt("whisper", "st_en2zh")
    with pytest.raises(ValueError, match="no prompt for model family"):
        get_prompt("nosuchmodel", "asr")
    with pytest.raises(ValueError, match="needs a target language"):
        get_prompt("qwen2_audio", "st")


# ---------------------------------------------------------------------------------------------- rescore


def _write(path, lines):
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line, ensure_ascii=False) + "\n").encode())


def test_rescore_hand_written_run(tmp_path, capsys):
    asr = dict(task="asr", language="en", status="ok")
    _write(
        tmp_path / "results.jsonl",
        [
            {"id": "u1", "reference": "the cat sat", "hypothesis": "the cat sat on on on on on on on", **asr},
            {"id": "u2", "reference": "a b c d", "hypothesis": "a b x d", **asr},
            {"id": "u3", "task": "asr", "language": "en", "status": "failed", "error": "CUDA OOM", "reference": "x"},
            b"{not json\n",
            b'{"id": "u5", "task": "asr", "language": "en", "status": "ok", "reference": "\xff\xfe"}\n',
            {"id": "u6", "task": "asr", "language": "en", "status": "ok", "reference": "a"},  # no hypothesis
            {"id": "q1", "task": "qa", "language": "en", "status": "ok", "question": "Which?", "choices": ["x", "y"],
             "answer": "B", "reference": "y", "hypothesis": "The answer is B."},
            {"id": "q2", "task": "qa", "language": "en", "status": "ok", "question": "Capital of France?",
             "reference": "Paris", "hypothesis": "I think it is Paris."},
            {"id": "q3", "task": "qa", "language": "en", "status": "ok", "question": "Capital of Spain?",
             "reference": "Madrid", "hypothesis": "Barcelona"},
            {"id": "s1", "task": "st_en2zh", "language": "en", "status": "ok", "reference": "我很高兴。",
             "hypothesis": "我很高兴。"},
        ],
    )
    summary = rescore(tmp_path)
    assert summary["n_malformed"] == 3
    assert any(p.endswith("results.jsonl:4: malformed result line skipped: not JSON (Expecting property name "
                          "enclosed in double quotes)") for p in summary["malformed"])
    assert any(":5: malformed result line skipped: not UTF-8" in p for p in summary["malformed"])
    assert any(":6: malformed result line skipped: missing ['hypothesis']" in p for p in summary["malformed"])
    g = summary["groups"]["asr/en"]
    assert (g["n"], g["n_failed"], g["edits"], g["ref_words"]) == (3, 1, 8, 7)
    assert g["wer"] == pytest.approx(8 / 7) and g["cwer"] == pytest.approx(4 / 7)
    assert g["loop_rate"] == pytest.approx(1 / 2)
    q = summary["groups"]["qa/en"]
    assert (q["correct"], q["n_judged"], q["judge"]) == (2, 3, "offline-match")
    assert q["accuracy"] == pytest.approx(2 / 3)
    assert summary["groups"]["st/en2zh"]["bleu"] == pytest.approx(100.0)
    saved = json.loads((tmp_path / "rescored.json").read_text())
    assert saved["groups"]["asr/en"]["edits"] == 8
    out = capsys.readouterr()
    assert "WER%" in out.out and "114.29" in out.out and "57.14" in out.out
    assert "skipped" in out.err
    # intervals: the one scorer's, printed beside each number; two utterances resampled as Σ edits / Σ words
    assert g["wer_ci"] == M.score([{"id": "u1", "reference": "the cat sat", "hypothesis": "the cat sat on on on on on on on",
                                    **asr}, {"id": "u2", "reference": "a b c d", "hypothesis": "a b x d", **asr}])["wer_ci"]
    assert g["wer_ci"] == pytest.approx([1 / 4, 7 / 3])  # both resamples of one utterance only are the extremes
    assert q["accuracy_ci"] == pytest.approx([0.0, 1.0]) and g["loop_rate_ci"] == [0.0, 1.0]
    assert "[25.00, 233.33]" in out.out and "95% CI" in out.out


def test_rescore_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results file not found"):
        rescore(tmp_path)


def test_trajectory_table():
    gt = "it was strange too that he found an arid pleasure"
    base = dict(id="u", language="en", operator="random_drop", budget=2)
    rows = [
        {**base, "layer": 15, "hypothesis": PAPER_LOOPS[2][1]},
        {**base, "layer": 0, "hypothesis": "it was too that he an"},
        {**base, "layer": 25, "hypothesis": gt},
        {**base, "layer": 30, "hypothesis": gt},
        {**base, "layer": 10, "operator": "uniform_merge", "hypothesis": PAPER_LOOPS[6][1]},
        {**base, "id": "other", "layer": 0, "hypothesis": "x"},
    ]
    df = trajectory_table(rows, "u", max_words=8)
    assert list(df["layer"]) == ["0", "15", "25 & 30", "10"]
    assert list(df["operator"]) == ["random_drop"] * 3 + ["uniform_merge"]
    assert df.loc[1, "hypothesis"] == "it was strange too that he he he … Looping"
    assert bool(df.loc[1, "loop"]) and not bool(df.loc[0, "loop"])
    assert bool(df.loc[3, "language_switch"]) and df.loc[3, "hypothesis"].endswith("… Looping")
    with pytest.raises(ValueError, match="no result rows"):
        trajectory_table(rows, "missing")


# ---------------------------------------------------------------------------------------------- rows only


def test_scoring_reads_rows_only_never_the_prompts():
    import subprocess
    import sys

    code = ("import sys, speech_redundancy.metrics, speech_redundancy.rescore, speech_redundancy.experiments; "
            "print(sorted(m for m in sys.modules if m in ('speech_redundancy.prompts', 'speech_redundancy.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_task_parts_of_stored_rows():
    expected = {"asr": ("asr", None, None), "qa": ("qa", None, None), "st": ("st", None, None),
                "st_en2zh": ("st", "en", "zh"), "st_zh2en": ("st", "zh", "en")}
    for task, parts in expected.items():
        assert M.task_parts(task) == parts
    for bad in ("st_en", "asr_x"):
        with pytest.raises(ValueError):
            M.task_parts(bad)
    # old rows: task and languages stored as they always were
    assert M.group_key({"task": "st_en2zh", "language": "en"}) == ("st", "en", "zh")
    assert M.group_key({"task": "st", "language": "zh"}) == ("st", "zh", "en")
    assert M.group_key({"task": "st", "language": "en", "target_language": "de"}) == ("st", "en", "de")
    assert M.group_key({"language": "zh"}) == ("asr", "zh", None)

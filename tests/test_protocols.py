"""Scoring protocols on hand cases: each harness's documented behaviour, with the expected units and numbers
written out here (read off the harnesses' code, not computed with ours), and rescoring that changes only metrics."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import sacrebleu

from speech_redundancy import metrics as M
from speech_redundancy import protocols as P
from speech_redundancy.normalize import cn_tn, normalize, tokenize
from speech_redundancy.rescore import rescore

NAMES = ("paper", "kimi_evalkit", "lmms_eval", "ultraeval", "audiobench")


def u(text, lang="en", protocol="paper", hyp=False):
    return P.units(text, lang, protocol, hypothesis=hyp)


def asr(ref, hyp, lang="en", i=0):
    return {"id": f"u{i}", "status": "ok", "task": "asr", "language": lang, "reference": ref, "hypothesis": hyp}


def st(ref, hyp, src="zh", tgt="en", i=0):
    return {"id": f"s{i}", "status": "ok", "task": f"st_{src}2{tgt}", "language": src, "reference": ref,
            "hypothesis": hyp}


# ----------------------------------------------------------------------------------------------- the table


def test_every_protocol_is_in_the_table_and_unknown_names_are_one_line():
    assert M.PROTOCOLS == NAMES == P.NAMES
    for name in NAMES:
        p = P.get(name)
        assert p.source and p.wer and p.notes
    with pytest.raises(ValueError, match="scoring protocol 'harness' is unknown; allowed: paper, kimi_evalkit"):
        M.score([asr("a", "a")], "harness")
    with pytest.raises(ValueError, match="unknown normalisation step"):
        P.Units(("no_such_step",))


@pytest.mark.parametrize("lang, text", [
    ("en", "<|en|>Mr. Smith can't pay $20, he's (laughing) colour 3.5 [noise]."),
    ("en", "Twenty-one APPLES; and   five pears!"),
    ("zh", "<|zh|>我有5个苹果，ABC 公司 2020年。百分之50%"),
    ("yue", "我哋喺度食飯，3個"),
    ("ja", "東京へ行きます。"),
    ("fr", "<|fr|>Bonjour, le café!"),
])
def test_paper_protocol_is_the_projects_normaliser(lang, text):
    assert u(text, lang) == tokenize(normalize(text, lang), lang)


# ----------------------------------------------------------------------------------------------- paper


def test_paper_hand_cases():
    assert u("<|en|>Mr. Smith can't pay $20, colour (laughs)") == ["mister", "smith", "can", "not", "pay", "20", "color"]
    assert u("three point five") == ["3", "5"]  # the basic normaliser splits 3.5
    assert u("他说 Hello 好", "zh") == ["他", "说", "h", "e", "l", "l", "o", "好"]  # letters are characters too
    assert u("我有5个", "zh") == ["我", "有", "五", "个"]


# ----------------------------------------------------------------------------------------------- cn_tn stand-in


@pytest.mark.parametrize("text, expected", [  # what SpeechIO cn_tn.TextNorm() gives for these
    ("我有5个苹果，2020年。", "我有五个苹果 二零二零年 "),
    ("电话13800138000", "电话一三八零零一三八零零零"),
    ("010-12345678", "零一零一二三四五六七八"),
    ("200个", "两百个"), ("1200元", "一千两百元"), ("22岁", "二十二岁"), ("234", "两百三十四"),
    ("2000人", "二零零零人"), ("2000个", "两千个"), ("10086", "一零零八六"),
    ("50%", "百分之五十"), ("0.5%", "百分之零点五"), ("1/3", "三分之一"), ("3.5公斤", "三点五公斤"),
    ("2008年8月8日", "二零零八年八月八日"), ("12月25日", "十二月二十五日"), ("-3度", " 三度"),
    ("P2P", "P2P"), ("05号", "零五号"), ("共1,234元", "共一 两百三十四元"), ("他说 Hello", "他说 Hello"),
])
def test_cn_tn_reads_numbers_as_speechio_cn_tn(text, expected):
    assert cn_tn(text) == expected


# ----------------------------------------------------------------------------------------------- kimi_evalkit


def test_kimi_evalkit_units():
    k = "kimi_evalkit"
    assert u("<|en|>Hello, World! I'm here.", "en", k) == ["hello", "world", "i", "am", "here"]
    # remove_sp drops every space in Mandarin text, then sacrebleu's zh tokenizer keeps Latin runs whole
    assert u("他说 Hello World 好的", "zh", k) == ["他", "说", "helloworld", "好", "的"]
    assert u("我有5个苹果。", "zh", k) == ["我", "有", "五", "个", "苹", "果"]
    # Cantonese: zhconv then the basic normaliser, digits stay
    assert u("食飯，3個", "yue", k) == ["食", "饭", "3", "个"]
    assert P.unit_label("zh", k) == "mixed" and P.unit_label("en", k) == "word"


def test_kimi_evalkit_drops_null_hypotheses_and_counts_empty_references():
    rows = [asr("a b", "null", i=0), asr("c d", "c d", i=1), asr("(noise)", "x y", i=2)]
    got = M.score(rows, "kimi_evalkit")
    # 'null' left out with its reference; the empty reference adds its 2 insertions: (0 + 2) / 2
    assert (got["n_dropped"], got["edits"], got["ref_words"], got["empty_refs"]) == (1, 2, 2, 1)
    assert got["wer"] == pytest.approx(1.0)
    paper = M.score(rows, "paper")
    # paper scores 'null' as a substitution pair and leaves the empty reference out: 2 / 4
    assert (paper["edits"], paper["ref_words"], paper["empty_refs"]) == (2, 4, 1)
    assert "n_dropped" not in paper


# ----------------------------------------------------------------------------------------------- lmms_eval


def test_lmms_eval_units():
    lm = "lmms_eval"
    assert u("<|en|>Mr. Smith can't go.", "en", lm) == ["mister", "smith", "can", "not", "go"]
    assert u("他说 ABC 好。", "zh", lm) == ["他", "说", "a", "b", "c", "好"]
    assert u("食飯，3個", "yue", lm) == ["食", "饭", "3", "个"]


def test_lmms_eval_bleu_zh2en_normalises_then_13a():
    refs, hyps = ["Mr. Smith isn't here."], ["mister smith is not here"]
    got = M.corpus_bleu(refs, hyps, "en", "lmms_eval")
    # both sides become "mister smith is not here" (Whisper English normaliser, punctuation tokens dropped)
    assert got["tokenize"] == "13a" and got["bleu"] == pytest.approx(100.0)
    assert "tok:13a" in got["signature"]
    paper = M.corpus_bleu(refs, hyps, "en", "paper")["bleu"]
    assert paper == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score)
    assert paper < 50


def test_lmms_eval_bleu_en2zh_reads_numbers_and_uses_zh():
    refs, hyps = ["我有三个苹果。"], ["<|zh|>我有3个苹果"]
    got = M.corpus_bleu(refs, hyps, "zh", "lmms_eval")
    assert got["tokenize"] == "zh" and got["bleu"] == pytest.approx(100.0)
    expected_paper = sacrebleu.corpus_bleu(["我有3个苹果"], [refs], tokenize="zh").score
    assert M.corpus_bleu(refs, hyps, "zh", "paper")["bleu"] == pytest.approx(expected_paper)
    assert expected_paper < 100


# ----------------------------------------------------------------------------------------------- ultraeval


def test_ultraeval_units():
    ue = "ultraeval"
    # no basic normaliser: the symbols Whisper's English normaliser keeps are 13a tokens of their own
    assert u("It costs twenty dollars", "en", ue) == ["it", "costs", "$", "20"]
    assert u("three point five percent", "en", ue) == ["3.5", "%"]
    assert u("three point five percent", "en", "paper") == ["3", "5"]
    # special tokens go through the English normaliser's <...> rule
    assert u("<|en|>Hello there", "en", ue) == ["hello", "there"]
    assert u("他说 Hello World 好的", "zh", ue) == ["他", "说", "hello", "world", "好", "的"]
    assert u("食飯，3個", "yue", ue) == ["食", "饭", "三", "个"]


def test_ultraeval_extracts_json_content_from_hypotheses_only():
    answer = '{"content": "Hello there"}'
    assert u(answer, "en", "ultraeval", hyp=True) == ["hello", "there"]
    assert u("```json\n" + answer + "\n```", "en", "ultraeval", hyp=True) == ["hello", "there"]
    assert u(answer, "en", "ultraeval") == ["content", "hello", "there"]  # a reference is left as it is
    assert M.score([asr("hello there", answer)], "ultraeval")["wer"] == 0.0
    assert M.score([asr("hello there", answer)], "paper")["wer"] == pytest.approx(0.5)


def test_ultraeval_bleu_raw_texts_and_empty_references_dropped():
    refs, hyps = ["", "the cat sat on the mat ."], ["words", "the cat sat on the mat ."]
    got = M.corpus_bleu(refs, hyps, "en", "ultraeval")
    assert (got["n"], got["tokenize"]) == (1, "13a") and got["bleu"] == pytest.approx(100.0)
    assert M.corpus_bleu(refs, hyps, "en", "paper")["n"] == 2
    # texts as they are: a special token left in a hypothesis costs BLEU (paper removes it)
    tagged = ["<|en|>the cat sat on the mat ."]
    assert M.corpus_bleu(refs[1:], tagged, "en", "ultraeval")["bleu"] < 100
    assert M.corpus_bleu(refs[1:], tagged, "en", "paper")["bleu"] == pytest.approx(100.0)
    assert M.bleu_tokenizer("zh", "ultraeval") == "zh" and M.bleu_tokenizer("ja", "ultraeval") == "ja-mecab"


# ----------------------------------------------------------------------------------------------- audiobench


def test_audiobench_units():
    ab = "audiobench"
    # Whisper makes digits of number words; AudioBench turns a lone 0-20 or tens number back into a word
    assert u("I have 5 apples", "en", ab) == u("I have five apples", "en", ab) == ["i", "have", "five", "apples"]
    assert u("twenty one pears", "en", ab) == ["21", "pears"]
    assert u("It costs $20", "en", ab) == ["it", "costs", "$twenty"]  # '$' is a symbol, not punctuation
    # fillers beyond Whisper's hmm/mm/uh/um
    assert u("ah I er think umm so", "en", ab) == ["i", "think", "so"]
    assert u("ah I er think umm so", "en", "paper") == ["ah", "i", "er", "think", "umm", "so"]
    assert u("They're here (laughs) [noise] {hum}", "en", ab) == ["they", "are", "here", "hum"]
    # Chinese: no Chinese number reading; a lone digit becomes an English word, a glued one sticks to its neighbours
    assert u("我有 5 个苹果", "zh", ab) == ["我", "有", "five", "个", "苹", "果"]
    assert u("2020年", "zh", ab) == ["2020年"]
    assert u("", "en", ab) == ["empty"]


def test_audiobench_bracket_step_keeps_spans_with_the_letter_n():
    brackets = P.STEPS["audiobench_brackets"]
    assert brackets("a {hum} b") == "a  b"
    assert brackets("a {noise} b") == "a {noise} b"  # the class excludes 'n', meant as a newline


def test_audiobench_wer_is_s_d_i_over_s_d_h_and_empty_is_a_word():
    # ref a b c d / hyp a x c d e: S=1, D=0, I=1, H=3 -> (1+0+1) / (1+0+3)
    assert M.score([asr("a b c d", "a x c d e")], "audiobench")["wer"] == pytest.approx(0.5)
    rows = [asr("(laughs)", "", i=0), asr("a b", "a b", i=1)]
    got = M.score(rows, "audiobench")
    assert (got["edits"], got["ref_words"], got["empty_refs"]) == (0, 3, 0)  # "empty" vs "empty"
    assert M.score(rows, "paper")["ref_words"] == 2


def test_audiobench_bleu_needs_flores101_and_says_so():
    assert M.bleu_tokenizer("zh", "audiobench") == M.bleu_tokenizer("en", "audiobench") == "flores101"
    refs, hyps, tok = P.bleu_inputs(["", "He left."], ["", "<|en|>He left."], "en", "audiobench")
    assert (refs, hyps, tok) == (["empty", "He left."], ["empty", "<|en|>He left."], "flores101")
    why = P.tokenizer_problem("flores101")
    if why is None:  # sentencepiece and the model are here: the number is sacrebleu's
        expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="flores101").score
        assert M.corpus_bleu(["", "He left."], ["", "<|en|>He left."], "en", "audiobench")["bleu"] == pytest.approx(expected)
    else:
        assert "flores101" in why
        with pytest.raises(ValueError, match="protocol=audiobench: sacrebleu tokenizer flores101 needs"):
            M.corpus_bleu(["He left."], ["He left."], "en", "audiobench")
        assert "audiobench cannot score BLEU into en" in M.protocol_problem("audiobench", [st("他走了", "He left.")])
    assert M.protocol_problem("audiobench", [asr("a", "a")]) is None


# ----------------------------------------------------------------------------------------------- all of them


@pytest.mark.parametrize("name, zh, en", [
    ("paper", "zh", "13a"), ("kimi_evalkit", "zh", "13a"), ("lmms_eval", "zh", "13a"), ("ultraeval", "zh", "13a"),
    ("audiobench", "flores101", "flores101"),
])
def test_bleu_tokenizer_per_direction(name, zh, en):
    assert M.bleu_tokenizer("zh", name) == zh and M.bleu_tokenizer("en", name) == en
    assert M.bleu_tokenizer("zh-CN", name) == zh


@pytest.mark.parametrize("name", NAMES)
def test_tags_stripped_contractions_expanded_numbers_normalised_everywhere(name):
    ref, hyp = "Mister Smith can not pay twenty one dollars.", "<|en|>Mr. Smith can't pay $21!"
    got = M.score([asr(ref, hyp)], name)
    assert got["wer"] == 0.0 and got["protocol"] == name
    assert got["normalizer"].startswith("whisper-en+basic" if name == "paper" else f"{name}:")


def test_one_corpus_scores_differently_under_each_protocol():
    rows = [asr("He paid twenty dollars, ah, for 5 apples.", "he paid $20 for five apples", i=0),
            asr("他说 Hello World 好的", "他说 hello word 好的", "zh", i=1)]
    en = {n: M.score(rows[:1], n)["wer"] for n in NAMES}
    # paper/kimi/lmms: 'ah' is one deletion of 7 words; ultraeval: the '$' token makes 8 units;
    # audiobench: 'ah' is a filler and 5/five agree
    assert en["paper"] == en["kimi_evalkit"] == en["lmms_eval"] == pytest.approx(1 / 7)
    assert en["ultraeval"] == pytest.approx(1 / 8)
    assert en["audiobench"] == 0.0
    zh = {n: M.score(rows[1:], n) for n in NAMES}
    # paper, lmms_eval: 14 characters, one letter missing; kimi_evalkit: spaces removed, 'helloworld' is one of
    # 5 units; ultraeval, audiobench: hello / world are words among 6 units
    assert {n: (g["unit"], g["edits"], g["ref_words"]) for n, g in zh.items()} == {
        "paper": ("char", 1, 14), "lmms_eval": ("char", 1, 14), "kimi_evalkit": ("mixed", 1, 5),
        "ultraeval": ("mixed", 1, 6), "audiobench": ("mixed", 1, 6)}


# ----------------------------------------------------------------------------------------------- rescoring


def _run_folder(path, rows, protocol="paper"):
    path.mkdir(parents=True, exist_ok=True)
    stored = [{**r, **M.row_metrics(r, protocol), "loop": False, "tokens_in": 10, "tokens_out": 8}
              if r["status"] == "ok" else r for r in rows]
    (path / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stored))
    (path / "run.json").write_text(json.dumps({"fingerprint": "x", "settings": {}, "protocol": protocol}))
    (path / "summary.json").write_text(json.dumps(M.score(stored, protocol)))
    return stored


METRIC_KEYS = {"protocol", "edits", "ref_words"}


@pytest.mark.parametrize("name", ["kimi_evalkit", "lmms_eval", "ultraeval", "audiobench"])
def test_rescoring_under_another_protocol_changes_only_the_metrics(tmp_path, name):
    rows = [asr("He paid twenty dollars, ah, for 5 apples.", "he paid $20 for five apples", i=0),
            asr("the cat sat", "the cat sat on on on on on on", i=1),
            {"id": "u9", "status": "failed", "task": "asr", "language": "en", "error": "OOM", "reference": "x"}]
    stored = _run_folder(tmp_path, rows)
    before = {f: (tmp_path / f).read_bytes() for f in ("results.jsonl", "summary.json", "run.json")}
    summary = rescore(tmp_path, protocol=name, quiet=True)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # the run's own files untouched
    assert summary["protocol"] == name and summary["groups"]["asr/en"]["protocol"] == name
    saved = json.loads((tmp_path / f"rescored.{name}.json").read_text())
    assert saved["groups"]["asr/en"]["wer"] == pytest.approx(M.score(stored, name)["wer"])
    again = [json.loads(x) for x in (tmp_path / f"rescored.{name}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in again] == [r["id"] for r in stored]
    for old, new in zip(stored, again):
        assert {k: v for k, v in old.items() if k not in METRIC_KEYS} == \
            {k: v for k, v in new.items() if k not in METRIC_KEYS}
        if old["status"] == "ok":
            assert new["protocol"] == name
            assert (new["edits"], new["ref_words"]) == M.utterance_edits(old["reference"], old["hypothesis"],
                                                                         protocol=name)
    if name in ("ultraeval", "audiobench"):  # English counts as paper does under kimi_evalkit and lmms_eval
        assert (stored[0]["edits"], stored[0]["ref_words"]) != (again[0]["edits"], again[0]["ref_words"])


def test_rescore_without_protocol_uses_the_runs_own(tmp_path):
    _run_folder(tmp_path, [asr("I have 5 apples", "I have five apples")], protocol="ultraeval")
    summary = rescore(tmp_path, quiet=True)
    assert summary["protocol"] == "ultraeval" and (tmp_path / "rescored.json").exists()
    assert not list(tmp_path.glob("rescored.*.json"))


def test_rescore_refuses_a_protocol_that_cannot_run_before_writing(tmp_path):
    _run_folder(tmp_path, [st("他走了。", "He left.")])
    with pytest.raises(ValueError, match="unknown"):
        rescore(tmp_path, protocol="harness", quiet=True)
    if P.tokenizer_problem("flores101"):
        with pytest.raises(ValueError, match="audiobench cannot score BLEU into en"):
            rescore(tmp_path, protocol="audiobench", quiet=True)
        assert not (tmp_path / "rescored.audiobench.json").exists()


def test_rescore_cli_all_protocols_side_by_side(tmp_path, capsys):
    from conftest import ROOT
    import importlib.util

    spec = importlib.util.spec_from_file_location("rescore_cli", ROOT / "scripts" / "rescore.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    _run_folder(tmp_path, [asr("He paid twenty dollars, ah, for 5 apples.", "he paid $20 for five apples")])
    assert cli.main([str(tmp_path), "--protocol", "all"]) == 0
    out = capsys.readouterr().out
    head, line = out.strip().splitlines()[-2:]
    assert head.split() == ["group", *NAMES]
    assert line.split() == ["asr/en", "14.29", "WER", "14.29", "WER", "14.29", "WER", "12.50", "WER", "0.00", "WER"]
    for name in NAMES:
        assert (tmp_path / f"rescored.{name}.json").exists()
    assert cli.main([str(tmp_path), "--protocol", "harness"]) == 2
    assert "error: scoring protocol 'harness' is unknown" in capsys.readouterr().err


def test_no_reference_unit_is_nan():
    got = M.score([asr("(laughs)", "")], "kimi_evalkit")
    assert math.isnan(got["wer"]) and got["empty_refs"] == 1


# ----------------------------------------------------------------------------------------------- official scorer

_OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "normalize_golden"
                        / "qwen2audio_eval_audio.json").read_text())["cases"]


@pytest.mark.parametrize("protocol", ["paper", "lmms_eval"])
@pytest.mark.parametrize("case", _OFFICIAL, ids=lambda c: f"{c['language']}:{c['text'][:24]}")
def test_units_equal_the_official_eval_audio_scorer(case, protocol):
    """QwenLM/Qwen2-Audio evaluate_asr.py's own units (tests/fixtures/normalize_golden/README.md): Whisper's English
    pipeline, SpeechIO cn_tn for Mandarin (1234 -> 一二三四, 200元 -> 两百元, phone numbers digit by digit)."""
    if case["language"] == "en" and P.units("colour", "en", protocol) != ["color"]:
        pytest.skip("Whisper's English spelling list is not installed here (normalize.find_english_spelling_file)")
    assert P.units(case["text"], case["language"], protocol) == case["units"]


def test_each_protocol_names_its_long_audio_layout():
    assert {n: P.get(n).long_audio for n in NAMES} == {
        "paper": "truncate", "kimi_evalkit": "truncate", "lmms_eval": "items", "ultraeval": None,
        "audiobench": "truncate"}
    with pytest.raises(ValueError, match="long_audio must be truncate, span, items or None"):
        P.Protocol(name="x", source="x", asr={"*": P.Units(())}, bleu={"*": P.BleuRule("13a")}, wer="x",
                   long_audio="chunks")

"""Scoring protocols: how an evaluation harness turns references and hypotheses into WER units and BLEU input.

Harnesses disagree on normalisation, tokenisation and BLEU tokenizer, so a WER from one is not a WER from another
(shared/FACTS.md §6). A :class:`Protocol` is a declarative record of one harness's rules, read from its public
code and re-implemented here from named steps (:data:`STEPS`); :data:`TABLE` holds them all and
:func:`speech_redundancy.metrics.score` applies one by name. jiwer aligns and counts, sacrebleu tokenises and
computes BLEU; nothing here counts edits by hand.

- ``paper`` (default): Qwen2-Audio's ``eval_audio`` rules (Whisper English normaliser then the basic one; Mandarin
  SpeechIO cn_tn then characters; Cantonese zhconv then the basic normaliser; sacrebleu ``zh`` for en->zh, ``13a``
  otherwise), checked against the official scorer's outputs (tests/fixtures/normalize_golden/).
- ``kimi_evalkit``, ``lmms_eval``, ``ultraeval``, ``audiobench``: each harness as its code does it, quirks
  included; every quirk and every stand-in is a line of the record's ``notes`` (README, *Scoring protocols*).

Each record also names the long-audio layout its harness feeds Qwen2-Audio (``long_audio``: ``truncate``,
``span``, ``items``; ``models/qwen2audio.py``), so a result can say which inputs its numbers assume.

Stand-ins, labelled in the step names: SpeechIO's ``cn_tn.TextNorm`` (Chinese numbers and punctuation, used by
kimi_evalkit, lmms_eval and ultraeval) is not on PyPI, so ``cn_tn(ours)`` is our re-implementation of its rules
(:func:`speech_redundancy.normalize.cn_tn`). AudioBench's BLEU tokenizer ``flores101`` needs sentencepiece and the
FLORES-101 SentencePiece model that sacrebleu downloads; offline, :func:`problem` names the file to put in place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping

from speech_redundancy import normalize as N

# ----------------------------------------------------------------------------------------------- steps


def _json_content(text: str) -> str:
    """UltraEval's ``json_content`` post-process: the ``content`` of a JSON object answer (optionally in a
    Markdown code fence); any other text unchanged."""
    s = text.strip()
    if s.startswith("```"):
        s = re.sub(r"^```(?:json)?", "", s).removesuffix("```").strip()
    try:
        got = json.loads(s)
    except ValueError:
        return text
    return str(got["content"]) if isinstance(got, dict) and "content" in got else text


def _number_words() -> dict[str, str]:
    ones = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
            "seventeen eighteen nineteen twenty").split()
    tens = "thirty forty fifty sixty seventy eighty ninety".split()
    words = {str(i): w for i, w in enumerate(ones)}
    words.update({str(30 + 10 * i): w for i, w in enumerate(tens)})
    return words


# AudioBench (preprocess_text.normalize_text): a lone number 0-20 or a multiple of ten up to 90 becomes its
# English word again, after Whisper's normaliser made digits of number words; then 22 contractions are expanded.
_AB_NUMBERS = _number_words()
_AB_CONTRACTIONS = dict(
    pair.split("=") for pair in (
        "i'm=i am,you're=you are,he's=he is,she's=she is,it's=it is,we're=we are,they're=they are,i've=i have,"
        "you've=you have,we've=we have,they've=they have,isn't=is not,aren't=are not,wasn't=was not,"
        "weren't=were not,hasn't=has not,haven't=have not,hadn't=had not,doesn't=does not,don't=do not,"
        "didn't=did not,that's=that is").split(","))


# one pass does what AudioBench's 50 re.sub calls do: no replacement produces another key, and \b on both sides
# makes the alternation pick "10" over "1"
_AB_WORDS = {**_AB_NUMBERS, **_AB_CONTRACTIONS}
_AB_WORD = re.compile(r"\b(" + "|".join(map(re.escape, _AB_WORDS)) + r")\b")


def _audiobench_words(text: str) -> str:
    return _AB_WORD.sub(lambda m: _AB_WORDS[m.group(1)], text)


@lru_cache(maxsize=1 << 16)
def _whisper_english_lower(text: str) -> str:
    return N.whisper_english(text)


def _whisper_english(text: str) -> str:
    # the normaliser lower-cases first, so the lower-cased text is the cache key: five protocols, one call
    return _whisper_english_lower(text.lower())


# AudioBench's bracket pattern: one of [({< , then no ( ) [ ] backslash or letter "n" (its class reads \\n, meant
# as a newline), then one of ])}> -- so a bracketed span holding an "n" stays.
_AB_BRACKETS = re.compile(r"[\[({<][^()\[\]\\n]*[\])}>]")
_AB_FILLERS = re.compile(r"\b(uh|umm|um|er|ah)\b")
_CJK_RUN = re.compile(r"([\u4e00-\u9fff]+)")


@lru_cache(maxsize=1)
def _audiobench_jiwer():
    import jiwer

    return jiwer.Compose([jiwer.RemoveMultipleSpaces(), jiwer.ExpandCommonEnglishContractions(),
                          jiwer.RemoveKaldiNonWords(), jiwer.RemovePunctuation()])


def _space_cjk(text: str) -> str:
    """AudioBench's ``separate_and_space_chinese``: CJK Unified Ideographs (U+4E00-9FFF) one per token."""
    return _CJK_RUN.sub(lambda m: " ".join(m.group(1)), text)


# name -> (text -> text). A step's name is its label in results; a stand-in says so in its name.
STEPS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "remove_sp": lambda s: N.strip_special_tokens(s, "en"),  # <|...|> out, whitespace collapsed, no space before !,.?;:
    "remove_spaces": lambda s: re.sub(r"\s+", "", s),
    "whisper_en": _whisper_english,
    "whisper_basic": N.normalize_basic,
    "t2s": N.to_simplified,
    "zh_paper": N.normalize_chinese,  # this project's Mandarin normaliser (normalize.py)
    "cn_tn(ours)": N.cn_tn,
    "json_content": _json_content,
    "audiobench_words": _audiobench_words,
    "audiobench_brackets": lambda s: _AB_BRACKETS.sub("", s),
    "jiwer(spaces,contractions,kaldi,punct)": lambda s: _audiobench_jiwer()(s),
    "audiobench_fillers": lambda s: _AB_FILLERS.sub("", s).strip(),
    "space_cjk": _space_cjk,
}


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Units:
    """How one language's text becomes the units WER counts: ``steps`` in order, then ``tokenizer`` (a sacrebleu
    tokenizer, or None: split on whitespace), then tokens made only of punctuation dropped (``drop_punctuation``),
    tokens lower-cased (``lowercase``) and, with ``chars``, split into characters. ``unit`` labels the result:
    ``word``, ``char`` or ``mixed`` (CJK characters and other-script words)."""

    steps: tuple[str, ...]
    unit: str = "word"
    tokenizer: str | None = None
    drop_punctuation: bool = False
    lowercase: bool = False
    chars: bool = False

    def __post_init__(self):
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown normalisation step(s) {unknown}; known: {', '.join(STEPS)}")

    def label(self) -> str:
        steps = [("whisper_en-nospelling" if s == "whisper_en" and N.find_english_spelling_file() is None else s)
                 for s in self.steps]
        tok = [f"sacrebleu-{self.tokenizer}" if self.tokenizer else "split"]
        tok += [flag for flag, on in (("nopunct", self.drop_punctuation), ("lower", self.lowercase),
                                      ("chars", self.chars)) if on]
        return "+".join(steps or ["raw"]) + "|" + ",".join(tok)


@dataclass(frozen=True)
class BleuRule:
    """BLEU for one target language: ``text`` (normalise and pre-tokenise both sides, tokens re-joined with spaces;
    None: the texts as they are), ``hypothesis_steps`` (on hypotheses only), pairs with an empty reference dropped
    (``drop_empty_refs``), then sacrebleu ``corpus_bleu`` with ``tokenize``."""

    tokenize: str
    text: Units | None = None
    hypothesis_steps: tuple[str, ...] = ()
    drop_empty_refs: bool = False


@dataclass(frozen=True)
class Protocol:
    """One harness's scoring rules. ``asr`` and ``bleu`` are keyed by language (``*``: any other);
    ``hypothesis_steps`` run on every hypothesis first (WER and BLEU); a hypothesis equal to one of
    ``drop_hypotheses`` is left out with its reference; ``empty_as`` replaces a text left empty (after
    normalisation for WER, as it is for BLEU); ``empty_refs``: ``skip`` leaves a row whose reference normalises to
    nothing out of WER (counted), ``count`` adds its insertions to the edits (the harness sums edits and lengths).
    ``wer`` says the WER definition, ``source`` where the rules come from, ``notes`` every quirk and stand-in;
    ``long_audio`` the layout in which the harness feeds Qwen2-Audio a clip over 30 s (``truncate``, ``span`` or
    ``items``, as ``model.long_audio``; None where its code does not say)."""

    name: str
    source: str
    asr: Mapping[str, Units]
    bleu: Mapping[str, BleuRule]
    wer: str
    long_audio: str | None = None
    empty_refs: str = "count"
    empty_as: str | None = None
    drop_hypotheses: tuple[str, ...] = ()
    hypothesis_steps: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.empty_refs not in ("skip", "count"):
            raise ValueError(f"protocol {self.name}: empty_refs must be 'skip' or 'count', not {self.empty_refs!r}")
        for s in self.hypothesis_steps:
            if s not in STEPS:
                raise ValueError(f"protocol {self.name}: unknown step {s!r}")
        if "*" not in self.asr or "*" not in self.bleu:
            raise ValueError(f"protocol {self.name}: asr and bleu need a '*' entry")
        if self.long_audio not in (None, "truncate", "span", "items"):
            raise ValueError(f"protocol {self.name}: long_audio must be truncate, span, items or None, "
                             f"not {self.long_audio!r}")

    def units_for(self, language: str) -> Units:
        return self.asr.get(language, self.asr["*"])

    def bleu_for(self, target: str) -> BleuRule:
        t = target.lower()
        return self.bleu.get(t, self.bleu.get(t.split("-")[0].split("_")[0], self.bleu["*"]))


_CORPUS_WER = "Σ edit distance / Σ reference units over the corpus"

_EN = ("remove_sp", "whisper_en", "whisper_basic")
_EVAL_TOK = dict(tokenizer="none", drop_punctuation=True, lowercase=True, chars=True)  # its EvaluationTokenizer, chars
PAPER = Protocol(
    name="paper",
    source="QwenLM/Qwen2-Audio eval_audio/evaluate_asr.py (remove_sp, compute_wer) and evaluate_st.py",
    asr={
        "en": Units(_EN),
        "zh": Units(("remove_sp", "remove_spaces", "cn_tn(ours)"), "char", **_EVAL_TOK),
        "ja": Units(("zh_paper",), "char", chars=True),
        "yue": Units(("remove_sp", "t2s", "whisper_basic"), "char", **_EVAL_TOK),
        "*": Units(("remove_sp", "whisper_basic")),
    },
    bleu={"zh": BleuRule("zh", hypothesis_steps=("remove_sp",)), "*": BleuRule("13a", hypothesis_steps=("remove_sp",))},
    wer=_CORPUS_WER + "; a reference empty after normalisation is left out (and counted); cWER = Σ min(E_i, N_i) / Σ N_i",
    empty_refs="skip",
    long_audio="truncate",
    notes=(
        "Mandarin: remove_sp (all spaces out), cn_tn(ours) for SpeechIO cn_tn as evaluate_asr.py configures it, "
        "tokens of punctuation only dropped, lower-cased, then every character is a unit, Latin letters included",
        "Cantonese: zhconv traditional -> simplified, then the basic normaliser (evaluate_asr.py's Chinese branch is "
        "for zh only, so digits stay), then characters",
        "Japanese (not in eval_audio): as Mandarin (zh_paper: the same chain as one step)",
        "empty references left out of WER (counted) where evaluate_asr.py would divide by their zero length",
        "BLEU: special tokens removed from hypotheses (Qwen2-Audio decodes with skip_special_tokens); references as they are",
        "long audio: eval_audio hands the whole clip to the processor, which keeps the first 30 s (truncate)",
    ),
)

_KIMI_TOK = dict(tokenizer="zh", drop_punctuation=True, lowercase=True)
KIMI_EVALKIT = Protocol(
    name="kimi_evalkit",
    source="MoonshotAI/Kimi-Audio-Evalkit almeval/metrics/wer.py compute_wer, almeval/datasets/ds_asr.py",
    asr={
        "en": Units(_EN, **_KIMI_TOK),
        "zh": Units(("remove_sp", "remove_spaces", "cn_tn(ours)"), "mixed", **_KIMI_TOK),
        "yue": Units(("remove_sp", "t2s", "whisper_basic"), "mixed", **_KIMI_TOK),
        "*": Units(("remove_sp", "whisper_basic"), **_KIMI_TOK),
    },
    bleu={"zh": BleuRule("zh"), "ja": BleuRule("ja-mecab"), "*": BleuRule("13a")},
    wer=_CORPUS_WER + " (editdistance); a reference empty after normalisation adds its insertions",
    drop_hypotheses=("null",),
    long_audio="truncate",
    notes=(
        "English: Whisper's English normaliser and then the basic one (its if/else sends every language but zh "
        "through the basic normaliser)",
        "units: sacrebleu's zh tokenizer, lower-cased, tokens of punctuation only dropped: Mandarin is scored on "
        "characters but a Latin word or digit run inside it stays one unit (mixed)",
        "Mandarin: cn_tn(ours), our re-implementation of SpeechIO cn_tn (not on PyPI): years, phone numbers and "
        "other runs of 4+ digits digit by digit, 两 before 百/千/万/亿, punctuation -> spaces; our measure-word list",
        "Cantonese: zhconv to simplified then the basic normaliser, not the Chinese one (numbers stay digits)",
        "a hypothesis that is the string 'null' is left out with its reference",
        "BLEU: the evalkit has no translation task; as Qwen2-Audio evaluate_st.py (texts as they are; zh, ja-mecab, 13a)",
        "long audio: its Qwen2Audio and Qwen2AudioChat hand one clip to the processor, which keeps 30 s (truncate)",
    ),
)

_LMMS_TOK = dict(tokenizer="none", drop_punctuation=True, lowercase=True)
LMMS_EVAL = Protocol(
    name="lmms_eval",
    source="EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/librispeech/utils.py, tasks/asr_wer_utils.py, "
           "tasks/covost2/utils.py",
    asr={
        "en": Units(_EN, **_LMMS_TOK),
        "zh": Units(("remove_sp", "remove_spaces", "cn_tn(ours)"), "char", chars=True, **_LMMS_TOK),
        "yue": Units(("remove_sp", "t2s", "whisper_basic"), "char", chars=True, **_LMMS_TOK),
        "*": Units(("remove_sp", "whisper_basic"), **_LMMS_TOK),
    },
    bleu={
        "zh": BleuRule("zh", Units(("remove_sp", "cn_tn(ours)"), "mixed", tokenizer="zh", drop_punctuation=True,
                                   lowercase=True)),
        "*": BleuRule("13a", Units(("remove_sp", "whisper_en"), tokenizer="none", drop_punctuation=True, lowercase=True)),
    },
    wer=_CORPUS_WER + " (editdistance); a reference empty after normalisation adds its insertions",
    long_audio="items",
    notes=(
        "ASR as Qwen2-Audio evaluate_asr.py: Whisper English then basic normaliser, no extra tokenizer, Mandarin and "
        "Cantonese on characters (Latin letters included)",
        "Mandarin: cn_tn(ours) for SpeechIO cn_tn (see kimi_evalkit); Cantonese: zhconv then the basic normaliser",
        "BLEU en->zh: cn_tn on both sides, sacrebleu zh pre-tokenisation, lower-cased, punctuation tokens dropped, "
        "then corpus BLEU with zh",
        "BLEU zh->en: Whisper's English normaliser only (no basic one), lower-cased, punctuation tokens dropped, then "
        "13a; lmms-eval used zh here from 3 to 7 Feb 2025 (PR #515 to the fix in PR #522)",
        "long audio: models/simple/qwen2_audio.py sends each 30 s chunk as its own 'Audio k:' chat item (items)",
    ),
)

_ULTRA = ("lower", "whisper_en")
ULTRAEVAL = Protocol(
    name="ultraeval",
    source="OpenBMB/UltraEval-Audio audio_evals/agg/base.py (PracticeWER, BLEU), audio_evals/lib/wer.py compute_wer",
    asr={
        "zh": Units(_ULTRA + ("cn_tn(ours)",), "mixed", tokenizer="zh", lowercase=True),
        "yue": Units(_ULTRA + ("t2s", "cn_tn(ours)"), "mixed", tokenizer="zh", lowercase=True),
        "ja": Units(_ULTRA, "mixed", tokenizer="ja-mecab", lowercase=True),
        "*": Units(_ULTRA, tokenizer="13a", lowercase=True),
    },
    bleu={"zh": BleuRule("zh", drop_empty_refs=True), "ja": BleuRule("ja-mecab", drop_empty_refs=True),
          "*": BleuRule("13a", drop_empty_refs=True)},
    wer=_CORPUS_WER + " (editdistance); a reference empty after normalisation adds its insertions",
    hypothesis_steps=("json_content",),
    notes=(
        "hypotheses: a JSON answer {\"content\": ...} is replaced by its content (the json_content post-process)",
        "Whisper's English normaliser on every language, Chinese too, and no basic normaliser; special tokens go "
        "only through its <...> bracket rule",
        "units: sacrebleu 13a (zh for Mandarin and Cantonese: mixed), lower-cased, punctuation kept: the symbols the "
        "English normaliser keeps ($ % £ € ¢) are units of their own",
        "Mandarin: cn_tn(ours) for SpeechIO cn_tn (see kimi_evalkit); Japanese needs MeCab (mecab-python3, ipadic)",
        "BLEU: texts as they are (no normaliser, special tokens kept), pairs with an empty reference dropped; zh, "
        "ja-mecab, 13a",
        "long audio: its repository has no Qwen2-Audio model file here, so its layout is not known (None)",
    ),
)

_AB_EN = ("lower", "whisper_en", "audiobench_words", "audiobench_brackets", "jiwer(spaces,contractions,kaldi,punct)",
          "audiobench_fillers")
AUDIOBENCH = Protocol(
    name="audiobench",
    source="AudioLLMs/AudioBench src/dataset_src/text_normalizer/preprocess_text.py, librispeech_test_clean.py, "
           "aishell_asr_zh_test.py, covost2_*_test.py compute_score",
    asr={
        "zh": Units(_AB_EN + ("space_cjk",), "mixed"),
        "yue": Units(_AB_EN + ("space_cjk",), "mixed"),
        "ja": Units(_AB_EN + ("space_cjk",), "mixed"),
        "*": Units(_AB_EN),
    },
    bleu={"*": BleuRule("flores101")},
    wer="Σ(S+D+I) / Σ(S+D+H) over the corpus (jiwer per utterance; equal to Σ edits / Σ reference units)",
    empty_as="empty",
    long_audio="truncate",
    notes=(
        "lower case, Whisper's English normaliser, then a lone 0-20 or tens number back to its English word "
        "(\"five\" -> 5 -> five, but \"twenty one\" -> 21 stays), 22 contractions expanded, bracketed spans removed, "
        "jiwer RemoveMultipleSpaces, ExpandCommonEnglishContractions, RemoveKaldiNonWords, RemovePunctuation, "
        "fillers uh/umm/um/er/ah removed",
        "its bracket pattern keeps a span that holds the letter n ('\\\\n' in its character class, meant as newline)",
        "Chinese: the same English chain, then CJK ideographs U+4E00-9FFF one unit each (mixed); no Chinese number "
        "normaliser, so Arabic digits stay digits",
        "a text left empty becomes the word 'empty' on either side (an empty reference then has one unit)",
        "BLEU: texts as they are (special tokens kept), empty -> 'empty', sacrebleu flores101 for both directions "
        "(needs sentencepiece and the FLORES-101 SentencePiece model file)",
        "long audio: model_src/qwen2_audio_7b_instruct.py keeps the first 30 s (truncate), except ASR, where it "
        "decodes each 30 s chunk on its own and joins the texts (a layout this project does not offer)",
    ),
)

TABLE: dict[str, Protocol] = {p.name: p for p in (PAPER, KIMI_EVALKIT, LMMS_EVAL, ULTRAEVAL, AUDIOBENCH)}
NAMES = tuple(TABLE)


def get(name: str) -> Protocol:
    """The protocol called ``name`` (one line naming the allowed ones otherwise)."""
    if isinstance(name, Protocol):
        return name
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"scoring protocol {name!r} is unknown; allowed: {', '.join(NAMES)}") from None


# ----------------------------------------------------------------------------------------------- applying


@lru_cache(maxsize=16)
def _sacrebleu_tokenizer(name: str):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=name).tokenizer


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(c)[0] == "P" for c in token)


def apply(steps: Iterable[str], text: str) -> str:
    for s in steps:
        text = STEPS[s](text)
    return text


def tokens(text: str, rule: Units) -> list[str]:
    """The units of ``text`` under ``rule`` (steps, tokenizer, punctuation, case, characters)."""
    text = apply(rule.steps, text)
    if rule.tokenizer is not None:
        text = _sacrebleu_tokenizer(rule.tokenizer)(text)
    out = text.split()
    if rule.drop_punctuation:
        out = [t for t in out if not _is_punctuation(t)]
    if rule.lowercase:
        out = [t.lower() for t in out]
    if rule.chars:
        out = [c for t in out for c in t]
    return out


@lru_cache(maxsize=1 << 16)
def _units_cached(text: str, language: str, name: str, hypothesis: bool) -> tuple[str, ...]:
    p = TABLE[name]
    if hypothesis:
        text = apply(p.hypothesis_steps, text)
    got = tokens(text, p.units_for(language))
    if not got and p.empty_as is not None:
        got = [p.empty_as]
    return tuple(got)


def units(text: str, language: str = "en", protocol: str = "paper", *, hypothesis: bool = False) -> list[str]:
    """The WER units of one reference (or, with ``hypothesis``, one hypothesis) in ``language``."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return list(_units_cached(text, language, get(protocol).name, hypothesis))


def unit_label(language: str, protocol: str = "paper") -> str:
    """``word``, ``char`` or ``mixed``: what one WER unit is for ``language`` under ``protocol``."""
    return get(protocol).units_for(language).unit


def normalizer_label(language: str, protocol: str = "paper") -> str:
    """The normalisation and tokenisation in force, to store with the scores (paper: :func:`normalize.normalizer_id`)."""
    p = get(protocol)
    if p.name == "paper":
        return N.normalizer_id(language)
    return f"{p.name}:{p.units_for(language).label()}"


def bleu_inputs(refs: list[str], hyps: list[str], target: str, protocol: str = "paper") -> tuple[list[str], list[str], str]:
    """(references, hypotheses, sacrebleu tokenizer) as ``protocol`` hands them to ``corpus_bleu``."""
    p = get(protocol)
    rule = p.bleu_for(target)
    hyps = [apply(p.hypothesis_steps + rule.hypothesis_steps, h) for h in hyps]
    if rule.text is not None:
        refs = [" ".join(tokens(r, rule.text)) for r in refs]
        hyps = [" ".join(tokens(h, rule.text)) for h in hyps]
    if rule.drop_empty_refs:
        kept = [(r, h) for r, h in zip(refs, hyps) if r]
        refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    if p.empty_as is not None:
        refs = [r if r else p.empty_as for r in refs]
        hyps = [h if h else p.empty_as for h in hyps]
    return list(refs), list(hyps), rule.tokenize


# ----------------------------------------------------------------------------------------------- what is needed


def flores101_model_path() -> str:
    """Where sacrebleu looks for the FLORES-101 SentencePiece model (``$SACREBLEU``, default ``~/.sacrebleu``)."""
    from sacrebleu.utils import SACREBLEU_DIR

    return os.path.join(SACREBLEU_DIR, "models", "sacrebleu_tokenizer_spm.model")


def tokenizer_problem(tokenize: str) -> str | None:
    """Why sacrebleu's tokenizer ``tokenize`` cannot run here without the network (None when it can)."""
    if tokenize in ("flores101", "spm"):
        if importlib.util.find_spec("sentencepiece") is None:
            return f"sacrebleu tokenizer {tokenize} needs sentencepiece (pip install sentencepiece==0.2.3)"
        path = flores101_model_path()
        if not os.path.isfile(path):
            return (f"sacrebleu tokenizer {tokenize} needs the FLORES-101 SentencePiece model at {path} (sacrebleu "
                    "downloads it from dl.fbaipublicfiles.com; copy it there, or point $SACREBLEU at a folder with "
                    "models/sacrebleu_tokenizer_spm.model)")
    if tokenize == "ja-mecab":
        missing = [m for m in ("MeCab", "ipadic") if importlib.util.find_spec(m) is None]
        if missing:
            return "sacrebleu tokenizer ja-mecab needs mecab-python3 and ipadic (pip install 'sacrebleu[ja]')"
    return None


def problem(protocol: str, asr_languages: Iterable[str] = (), bleu_targets: Iterable[str] = ()) -> str | None:
    """One line saying why ``protocol`` cannot score these ASR languages / BLEU targets here, or None."""
    p = get(protocol)
    needs = [(f"ASR in {lang}", p.units_for(lang).tokenizer) for lang in asr_languages]
    needs += [(f"BLEU into {tgt}", p.bleu_for(tgt).tokenize) for tgt in bleu_targets]
    for what, tok in needs:
        why = tokenizer_problem(tok) if tok else None
        if why:
            return f"protocol={p.name} cannot score {what}: {why}"
    return None

"""Text normalisation before scoring, following the Qwen2-Audio evaluation protocol.

Peers (Qwen2-Audio's ``eval_audio/evaluate_asr.py``, reused unchanged by Kimi-Audio-Evalkit and lmms-eval)
score ASR like this, and so do we:

- every language: special tokens ``<|...|>`` become spaces, whitespace collapses, a space before
  ``!,.?;:`` is dropped;
- English (``en``): Whisper's ``EnglishTextNormalizer`` (contractions, titles, numbers spelt out as digits,
  British -> American spelling, symbols removed), then Whisper's ``BasicTextNormalizer`` (their if/else applies
  the basic normaliser to every language that is not ``zh``), then words;
- Mandarin (``zh``): special tokens and all whitespace out, SpeechIO's ``cn_tn`` text normaliser (numbers,
  dates, percentages, fractions, phone numbers read out in Chinese characters; punctuation -> spaces), tokens
  made only of punctuation dropped, Latin lower-cased, then characters, so the score is a character error rate.
  The protocol does not convert traditional to simplified characters for ``zh`` (only for Cantonese, ``yue``);
  ``simplify=True`` adds it.
- Cantonese (``yue``): traditional -> simplified (zhconv), then Whisper's basic normaliser (their Chinese branch is
  for ``zh`` only, so digits stay digits), then characters.
- other languages: the basic normaliser, then words.

Differences from the peers' exact code, all small:
- SpeechIO's ``cn_tn.py`` is not on PyPI: :func:`cn_tn` is our re-implementation of its rules in its order
  (cardinals read with ``cn2an``); tests/fixtures/normalize_golden/ holds the official normaliser's outputs it is
  checked against. Japanese (not in ``eval_audio``) is scored as Mandarin here.
- Whisper's English normaliser needs its British -> American spelling list (1,739 pairs). transformers ships the
  normaliser class but not the list: it comes with a Whisper tokenizer's ``normalizer.json``, which needs the
  model hub. :func:`english_spelling_mapping` finds the list offline (see there). Without it, British spellings
  ("colour") are not mapped, so they count as errors against American references; :func:`normalizer_id` then
  says ``nospelling`` so a run's results show it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

CHAR_LANGUAGES = frozenset({"zh", "yue", "ja"})  # scored on characters, not words
CJK_LANGUAGES = CHAR_LANGUAGES
_SPECIAL = re.compile(r"<\|.*?\|>")
_PUNCS = "!,.?;:"  # Qwen2-Audio evaluate_asr.py: PUNCS

# Where the Whisper English spelling list is looked for, in order (after an explicit path and $SR_ENGLISH_SPELLING):
# - PyPI whisper-normalizer==0.1.15 (the package Qwen2-Audio's evaluation imports): whisper_normalizer/normalizers/english.json
# - PyPI openai-whisper: whisper/normalizers/english.json
# Both hold the same file (MIT, OpenAI; md5 33bb184e238f06bb228a05f6dd41c47c).
_SPELLING_PACKAGES = (("whisper_normalizer", "normalizers/english.json"), ("whisper", "normalizers/english.json"))


def strip_special_tokens(text: str, language: str = "en") -> str:
    """Qwen2-Audio's ``remove_sp``: special tokens out, whitespace collapsed, no space before ``!,.?;:``."""
    out = _SPECIAL.sub(" ", text)
    out = re.sub(r"\s+", " ", out)
    out = re.sub(f" ?([{re.escape(_PUNCS)}])", r"\1", out)
    out = out.strip()
    if language in CHAR_LANGUAGES:
        out = re.sub(r"\s+", "", out)
    return out


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def find_english_spelling_file(path: str | Path | None = None) -> Path | None:
    """Where the Whisper English spelling list is: ``path``, ``$SR_ENGLISH_SPELLING``, then installed packages."""
    explicit = path or os.environ.get("SR_ENGLISH_SPELLING")
    if explicit:
        p = Path(explicit)
        if p.is_dir():  # a Whisper tokenizer folder
            p = p / "normalizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"English spelling list not found: {p}")
        return p
    for package, relative in _SPELLING_PACKAGES:
        found = _package_file(package, relative)
        if found is not None:
            return found
    return None


@lru_cache(maxsize=4)
def english_spelling_mapping(path: str | None = None) -> dict[str, str]:
    """Whisper's British -> American spelling list, or ``{}`` (with a warning) when none is installed."""
    found = find_english_spelling_file(path)
    if found is None:
        warnings.warn(
            "Whisper English spelling list not found (pip install whisper-normalizer==0.1.15, or set "
            "SR_ENGLISH_SPELLING); British spellings will not be mapped",
            stacklevel=2,
        )
        return {}
    mapping = json.loads(found.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{found}: expected a JSON object of word -> word")
    return mapping


@lru_cache(maxsize=4)
def _english(path: str | None = None):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(english_spelling_mapping(path))


@lru_cache(maxsize=1)
def _basic():
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize_basic(text: str) -> str:
    """Whisper's basic normaliser: lower case, bracketed spans and symbols removed."""
    return " ".join(_basic()(text).split())


def whisper_english(text: str) -> str:
    """Whisper's ``EnglishTextNormalizer`` alone (transformers' class with Whisper's spelling list)."""
    return _english()(text)


def normalize_english(text: str) -> str:
    """Whisper English normaliser then the basic one (Qwen2-Audio protocol), single-spaced."""
    return normalize_basic(_english()(strip_special_tokens(text, "en")))


@lru_cache(maxsize=1)
def _cn2an():
    try:
        import cn2an  # noqa: PLC0415
    except ImportError:
        warnings.warn("cn2an not installed (pip install cn2an==0.5.24): Arabic numerals stay as they are", stacklevel=3)
        return None
    return cn2an


def to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese characters (zhconv, ``zh-cn``)."""
    import zhconv  # noqa: PLC0415

    return zhconv.convert(text, "zh-cn")


def normalize_chinese(text: str, *, simplify: bool = False) -> str:
    """Mandarin normaliser as Qwen2-Audio's ``evaluate_asr.py`` applies it: ``remove_sp`` (special tokens and all
    whitespace out), SpeechIO ``cn_tn`` (our :func:`cn_tn`), then tokens made only of punctuation dropped and the
    rest lower-cased and joined (its ``EvaluationTokenizer``); ``simplify`` converts traditional characters first."""
    out = strip_special_tokens(text, "zh")
    if simplify:
        out = to_simplified(out)
    return _units_text(cn_tn(out))


def normalize_cantonese(text: str) -> str:
    """Cantonese as ``evaluate_asr.py`` scores it: special tokens out, traditional -> simplified (zhconv), Whisper's
    basic normaliser (its Chinese branch is for ``zh`` only, so digits stay), punctuation tokens dropped."""
    return _units_text(normalize_basic(to_simplified(strip_special_tokens(text, "yue"))))


def _units_text(text: str) -> str:
    """``EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True)`` on a Chinese text,
    joined without spaces (every character is then a unit)."""
    tokens = [t for t in text.split() if not all(unicodedata.category(c)[0] == "P" for c in t)]
    return "".join(tokens).lower()


def _is_cn_tn_punct(ch: str) -> bool:
    # SpeechIO cn_tn replaces Chinese punctuation and ASCII string.punctuation with spaces; we take Unicode
    # punctuation (P*), every ASCII non-alphanumeric printable and the full-width forms of those (U+FF01-FF5E)
    if unicodedata.category(ch)[0] == "P":
        return True
    code = ord(ch)
    if 0xFF01 <= code <= 0xFF5E:
        code -= 0xFEE0
    return 0x21 <= code <= 0x7E and not chr(code).isalnum()


_ZH_DIGITS = "零一二三四五六七八九"
# Common measure words and units after which cn_tn reads a number as a quantity ("2000个" -> 两千个) rather than
# digit by digit ("2000人" -> 二零零零人); our own selection, so rare measure words may be read differently.
_ZH_MEASURES = ("个 只 条 张 本 件 位 名 回 场 首 辆 棵 颗 粒 块 片 根 支 枝 双 对 套 家 户 层 座 幢 页 岁 年 月 日 天 周 季 "
                "代 世 纪 秒 分 时 刻 米 千米 厘米 毫米 里 尺 寸 丈 克 千克 斤 两 升 杯 碗 瓶 盒 袋 箱 桶 盘 罐 壶 盆 锅 "
                "堆 群 队 口 头 匹 道 面 钱 元 角 毛 亿 万 千 百").split()
_ZH_NUMBER = r"(\d+(?:\.\d+)?)"


def _zh_digits(digits: str) -> str:
    return "".join(_ZH_DIGITS[int(d)] for d in digits if d.isdigit())


def _zh_cardinal(number: str) -> str:
    """cn_tn's reading of a cardinal: cn2an's, with 两 for a 2 before 百/千/万/亿 that starts the number or follows
    one of those units (200 -> 两百, 1200 -> 一千两百, 22 -> 二十二), and a leading zero kept before one digit."""
    whole, _, frac = number.partition(".")
    stripped = whole.lstrip("0")
    if len(stripped) <= 1 and len(whole) > len(stripped) and stripped:
        out = "零" + _ZH_DIGITS[int(stripped)]
    else:
        converter = _cn2an()
        if converter is None:
            return number
        try:
            out = converter.an2cn(str(int(whole)) if whole else "0", "low")
        except (ValueError, KeyError, IndexError):  # past cn2an's 16 digits: digit by digit
            out = _zh_digits(whole)
    units = "百千万亿"
    chars = list(out)
    for i, ch in enumerate(chars):
        if ch == "二" and i + 1 < len(chars) and chars[i + 1] in units and (i == 0 or chars[i - 1] in units):
            chars[i] = "两"
    out = "".join(chars)
    return out + ("点" + _zh_digits(frac) if frac else "")


def cn_tn(text: str) -> str:
    """Stand-in for SpeechIO's ``cn_tn.TextNorm`` as the harnesses configure it (no case change, spaces kept), our
    own code after its rules, in its order: years digit by digit, months and days, money and numbers before a
    measure word as cardinals, mobile and fixed phone numbers digit by digit, fractions, percentages, other runs of
    4+ digits digit by digit, the remaining numbers as cardinals (:func:`_zh_cardinal`), ``P2P``-style codes kept;
    then punctuation -> spaces. Approximations: our measure-word list, and cardinal reading by cn2an."""
    out = text
    out = re.sub(r"(?<!\d)((?:19|20)\d{2}|[089]\d)(?=年)", lambda m: _zh_digits(m.group(1)), out)
    out = re.sub(r"(?<!\d)(\d{1,2})(?=月)", lambda m: _zh_cardinal(m.group(1)), out)
    out = re.sub(r"(?<=月)(\d{1,2})(?=[日号])", lambda m: _zh_cardinal(m.group(1)), out)
    out = re.sub(r"(?<!\d)((?:\+?86 ?)?1(?:[38]\d|5[0-35-9]|7[678]|9[89])\d{8})(?!\d)",
                 lambda m: _zh_digits(m.group(1).removeprefix("+")), out)
    out = re.sub(r"(?<!\d)((?:0(?:10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})(?!\d)", lambda m: _zh_digits(m.group(1)), out)
    out = re.sub(r"(\d+)/(\d+)", lambda m: _zh_cardinal(m.group(2)) + "分之" + _zh_cardinal(m.group(1)), out)
    out = re.sub(_ZH_NUMBER + r"[%％]", lambda m: "百分之" + _zh_cardinal(m.group(1)), out)
    measures = "|".join(sorted(map(re.escape, _ZH_MEASURES), key=len, reverse=True))
    out = re.sub(_ZH_NUMBER + rf"(?=[多余几]?(?:{measures}))", lambda m: _zh_cardinal(m.group(1)), out)
    out = re.sub(r"\d{4,32}", lambda m: _zh_digits(m.group(0)), out)
    out = re.sub(_ZH_NUMBER, lambda m: _zh_cardinal(m.group(1)), out)
    out = re.sub(r"([a-zA-Z]+)二([a-zA-Z]+)", r"\g<1>2\g<2>", out)
    return "".join(" " if _is_cn_tn_punct(ch) else ch for ch in out)


def normalize(text: str, language: str = "en", *, simplify_zh: bool = False) -> str:
    """Normalise one text for scoring in ``language`` (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    if language == "en":
        return normalize_english(text)
    if language == "yue":
        return normalize_cantonese(text)
    if language in CHAR_LANGUAGES:
        return normalize_chinese(text, simplify=simplify_zh)
    return normalize_basic(strip_special_tokens(text, language))


def unit(language: str) -> str:
    """``"char"`` for languages scored on characters (zh, yue, ja), else ``"word"``."""
    return "char" if language in CHAR_LANGUAGES else "word"


def tokenize(text: str, language: str = "en") -> list[str]:
    """Scoring units of an (already normalised or raw) text: words, or non-space characters for zh/yue/ja."""
    if language in CHAR_LANGUAGES:
        return [ch for ch in text if not ch.isspace()]
    return text.split()


def normalizer_id(language: str = "en") -> str:
    """A short label of the normalisation in force for ``language``, to store with the scores."""
    if language == "en":
        found = find_english_spelling_file()
        return "whisper-en+basic" + ("" if found is not None else "-nospelling")
    if language == "yue":
        return "t2s+whisper-basic+char"
    if language in CHAR_LANGUAGES:
        return ("cn_tn(ours)" if importlib.util.find_spec("cn2an") is not None else "cn_tn(ours,no-numbers)") + "+char"
    return "whisper-basic"

"""Spoken-QA answer judges and a verdict cache.

The paper judges answers with Qwen3-30B-A3B and the prompt of its Appendix C.2 (:data:`JUDGE_PROMPT`). Three
judges share one interface (``id`` and ``judge(item) -> {"verdict", "raw", "error"}``):

- :class:`OfflineJudge` (``judge: "offline-match"``): no model. Multiple choice (OpenBookQA): the chosen letter
  is read from the answer and compared with the key, as VoiceBench scores OpenBookQA with rules. Open answers
  (SD-QA, TriviaQA): correct when the normalised reference occurs in the normalised answer (UltraEval's
  exist-match for TriviaQA). Stricter than an LLM judge on paraphrases.
- :class:`HFJudge`: a local transformers causal LM, greedy decoding.
- :class:`HTTPJudge`: any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, ...), standard
  library only, with retries and backoff.

A judge that cannot give a verdict (server down, timeout, a reply that is neither true nor false) returns
``verdict: None`` with an ``error``: such items are counted as failed, never as wrong. :func:`judge_all` keeps
verdicts in a JSONL cache keyed by a hash of (judge id, question, answer, reference), so re-scoring a run
costs nothing; failures are not cached, so a later call retries them.

An item is a dict with ``question``, ``hypothesis`` (the model's answer), ``reference`` (str, or a list of
accepted answers), and for multiple choice ``choices`` (list of options in letter order, or a dict letter ->
text) and ``answer`` (the key letter; when absent, it is read from ``reference``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Protocol

from speech_redundancy.normalize import normalize

# Paper, Appendix C.2 ("Prompt for QA Evaluation Assistant"), word for word; the PDF text flattens lines, so the
# line breaks before the "##" headings are ours.
JUDGE_PROMPT = (
    "You are an evaluation assistant for audio model responses.\n"
    "## Task\n"
    'Determine if an audio model’s answer ("audio_answer") is correct by comparing with reference ("ref"). '
    "Accept paraphrasing and synonyms. Mark as correct only if core information matches.\n"
    "## Output only true or false\n"
    "## Evaluate\n"
    "Question: {question}\n"
    "Audio Answer: {audio_answer}\n"
    "Reference: {ref}"
)
PROMPT_VERSION = hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()[:8]
LETTERS = "ABCDEFGH"


class Judge(Protocol):
    id: str

    def judge(self, item: dict[str, Any]) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------- item fields


def _choices(item: dict[str, Any]) -> dict[str, str]:
    """Choices as letter -> text (empty for open questions)."""
    ch = item.get("choices")
    if not ch:
        return {}
    if isinstance(ch, dict):
        return {str(k).strip().upper(): str(v) for k, v in ch.items()}
    if isinstance(ch, (list, tuple)):
        out = {}
        for i, c in enumerate(ch):  # "A. text" / "(A) text" keep their letter, bare options get the next one
            m = re.match(r"^\s*\(?([A-H])[.):]\s*(.*)$", str(c))
            out[m.group(1) if m else LETTERS[i]] = m.group(2) if m else str(c)
        return out
    raise TypeError(f"choices must be a list or dict, not {type(ch).__name__}")


def _references(item: dict[str, Any]) -> list[str]:
    ref = item.get("reference", item.get("ref"))
    if ref is None:
        raise ValueError(f"item {item.get('id', '?')} has no reference")
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    return [str(r) for r in refs]


def answer_key(item: dict[str, Any]) -> str | None:
    """The correct letter of a multiple-choice item (``answer``, else a letter or option text in ``reference``)."""
    choices = _choices(item)
    key = item.get("answer")
    if isinstance(key, str) and key.strip().upper() in choices:
        return key.strip().upper()
    for ref in _references(item):
        letter = ref.strip().strip("()").rstrip(".").upper()
        if letter in choices:
            return letter
        hits = [k for k, v in choices.items() if normalize(v) == normalize(ref)]
        if len(hits) == 1:
            return hits[0]
    return None


def _hypothesis(item: dict[str, Any]) -> str:
    hyp = item.get("hypothesis", item.get("audio_answer"))
    if not isinstance(hyp, str):
        raise ValueError(f"item {item.get('id', '?')} has no hypothesis string")
    return hyp


# ----------------------------------------------------------------------------------------------- offline judge


def extract_choice(text: str, choices: dict[str, str]) -> str | None:
    """The option letter an answer picks: explicit letters first, then a unique option text; else None."""
    letters = "".join(sorted(choices)) or "ABCD"
    cls = f"[{letters}]"
    t = text.strip()
    m = re.match(rf"^[\s\"'*(\[]*({cls})\s*(?:[.):\]]|$)", t)  # "B", "B.", "(B)", "B) ..."
    if m:
        return m.group(1)
    m = re.search(rf"(?i:answer|option|choice)(?i:\s+is|\s*:)?\s*[\"'*(\[]*({cls})\b", t)  # "the answer is (C)"
    if m:
        return m.group(1)
    found = set(re.findall(rf"\(({cls})\)", t)) | set(re.findall(rf"\b({cls})[.):]", t))
    found |= {x for x in re.findall(rf"\b({cls})\b", t) if x != "A"}  # bare "A" is usually the article
    if len(found) == 1:
        return found.pop()
    norm = f" {normalize(t)} "
    hits = [k for k, v in choices.items() if normalize(v) and f" {normalize(v)} " in norm]
    if len(hits) == 1:
        return hits[0]
    return None


class OfflineJudge:
    """Rule judge: letter match for multiple choice, normalised containment for open answers."""

    id = "offline-match"

    def judge(self, item: dict[str, Any]) -> dict[str, Any]:
        """Verdict for one item, with the extracted letter (multiple choice) as ``raw``."""
        hyp = _hypothesis(item)
        choices = _choices(item)
        if choices:
            key = answer_key(item)
            if key is None:
                return {"verdict": None, "raw": None, "error": "no answer key among the choices"}
            picked = extract_choice(hyp, choices)
            return {"verdict": picked == key, "raw": picked, "error": None}
        refs = [normalize(r) for r in _references(item)]
        refs = [r for r in refs if r]
        if not refs:
            return {"verdict": None, "raw": None, "error": "reference is empty after normalisation"}
        answer = f" {normalize(hyp)} "
        return {"verdict": any(f" {r} " in answer for r in refs), "raw": None, "error": None}


# ----------------------------------------------------------------------------------------------- LLM judges


def judge_prompt(item: dict[str, Any]) -> str:
    """The paper's judge prompt for one item (options listed under the question for multiple choice)."""
    question = str(item.get("question", ""))
    choices = _choices(item)
    refs = _references(item)
    if choices:
        question += "\n" + "\n".join(f"{k}. {v}" for k, v in sorted(choices.items()))
        key = answer_key(item)
        ref = f"{key}. {choices[key]}" if key else refs[0]
    else:
        ref = " / ".join(refs)
    return JUDGE_PROMPT.format(question=question, audio_answer=_hypothesis(item), ref=ref)


def parse_verdict(reply: str) -> bool | None:
    """``True``/``False`` from a judge's reply (thinking blocks ignored); None when it says neither or both."""
    text = re.sub(r"<think>.*?(</think>|$)", " ", reply, flags=re.S).strip().lower()
    text = re.sub(r"[*_`\"'#.:!,]", " ", text).strip()
    if re.search(r"\b(true or false|false or true)\b", text):  # the question echoed back: no answer
        return None
    first = text.split()[:1]
    if first and first[0] in ("true", "false"):
        return first[0] == "true"
    has_t, has_f = bool(re.search(r"\btrue\b", text)), bool(re.search(r"\bfalse\b", text))
    if has_t != has_f:
        return has_t
    return None


def _llm_record(reply: str) -> dict[str, Any]:
    verdict = parse_verdict(reply)
    error = None if verdict is not None else f"unparsable judge reply: {reply[:80]!r}"
    return {"verdict": verdict, "raw": reply, "error": error}


class HTTPJudge:
    """Judge through an OpenAI-compatible chat-completions endpoint (urllib only)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        if not base_url or not model:
            raise ValueError("HTTPJudge needs base_url and model")
        root = base_url.rstrip("/")
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.extra_body = max_tokens, dict(extra_body or {})
        self.id = f"http:{model}:{PROMPT_VERSION}"

    def _post(self, prompt: str) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        return payload["choices"][0]["message"]["content"] or ""

    def judge(self, item: dict[str, Any]) -> dict[str, Any]:
        """Ask the server; network errors and timeouts are retried, then reported as a failed verdict."""
        prompt = judge_prompt(item)
        error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return _llm_record(self._post(prompt))
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} from {self.url}"
                if e.code < 500 and e.code != 429:
                    break  # the request itself is wrong: retrying will not help
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                error = f"{'timeout' if isinstance(reason, TimeoutError) else 'connection error'} at {self.url}: {reason}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                error = f"malformed reply from {self.url}: {e!r}"
        return {"verdict": None, "raw": None, "error": f"{error} (after {attempt + 1} tries)"}


class HFJudge:
    """Judge with a local transformers causal LM (greedy); the model loads on first use."""

    def __init__(self, model_name_or_path: str, max_new_tokens: int = 16, device: str | None = None, model=None, tokenizer=None):
        self.name = model_name_or_path
        self.max_new_tokens, self.device = max_new_tokens, device
        self._model, self._tok = model, tokenizer
        self.id = f"hf:{model_name_or_path}:{PROMPT_VERSION}"

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.name)
            self._model = AutoModelForCausalLM.from_pretrained(self.name, dtype="auto", device_map=self.device).eval()
        return self._model, self._tok

    def judge(self, item: dict[str, Any]) -> dict[str, Any]:
        """Generate greedily from the judge prompt and parse true/false."""
        import torch

        model, tok = self._load()
        messages = [{"role": "user", "content": judge_prompt(item)}]
        if getattr(tok, "chat_template", None):
            # enable_thinking=False: Qwen3 answers directly; other chat templates ignore the keyword
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        else:
            text = messages[0]["content"]
        inputs = tok(text, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return _llm_record(reply)


def make_judge(kind: str = "offline", url: str | None = None, model: str | None = None, **kwargs: Any) -> Judge:
    """Build a judge from config: ``offline``, ``hf`` (needs model) or ``http`` (needs url and model)."""
    if kind == "offline":
        return OfflineJudge()
    if kind == "hf":
        if not model:
            raise ValueError("judge kind 'hf' needs judge.model")
        return HFJudge(model, **kwargs)
    if kind == "http":
        if not url or not model:
            raise ValueError("judge kind 'http' needs judge.url and judge.model")
        return HTTPJudge(url, model, **kwargs)
    raise ValueError(f"unknown judge kind {kind!r}; expected offline, hf or http")


# ----------------------------------------------------------------------------------------------- cache


def cache_key(judge_id: str, item: dict[str, Any]) -> str:
    """Hash of (judge id, question, answer, reference[, choices])."""
    hyp = item.get("hypothesis", item.get("audio_answer"))
    parts = [judge_id, item.get("question", ""), hyp, item.get("reference", item.get("ref"))]
    if item.get("choices"):
        parts += [item.get("choices"), item.get("answer")]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def read_cache(path: str | Path) -> dict[str, dict[str, Any]]:
    """Verdicts by key from a JSONL cache; malformed lines are skipped with a warning."""
    path = Path(path)
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{path}:{n}: malformed cache line skipped", stacklevel=2)
    return out


def judge_all(
    items: Iterable[dict[str, Any]], judge: Judge, cache_path: str | Path | None = None, workers: int = 1
) -> list[dict[str, Any]]:
    """One record per item (``id``, ``verdict``, ``judge``, ``error``, ``raw``, ``cached``), in order, using the cache."""
    items = list(items)
    cache = read_cache(cache_path) if cache_path else {}
    keys = [cache_key(judge.id, it) for it in items]
    todo = [i for i, k in enumerate(keys) if k not in cache]

    def run(i: int) -> dict[str, Any]:
        try:
            return judge.judge(items[i])
        except (ValueError, TypeError) as e:  # a malformed item fails alone
            return {"verdict": None, "raw": None, "error": str(e)}

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            fresh = dict(zip(todo, pool.map(run, todo)))
    else:
        fresh = {i: run(i) for i in todo}
    if cache_path and fresh:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        with Path(cache_path).open("a", encoding="utf-8") as f:
            for i, rec in fresh.items():
                if rec["verdict"] is not None:
                    f.write(json.dumps({"key": keys[i], "judge": judge.id, **rec}, ensure_ascii=False) + "\n")
    out = []
    for i, (it, k) in enumerate(zip(items, keys)):
        rec = fresh[i] if i in fresh else cache[k]
        out.append(
            {
                "id": it.get("id", i),
                "verdict": rec["verdict"],
                "judge": judge.id,
                "error": rec.get("error"),
                "raw": rec.get("raw"),
                "cached": i not in fresh,
            }
        )
    return out

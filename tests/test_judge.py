"""QA judges: choice extraction, open-answer matching, an OpenAI-compatible judge against a fake local server
(true / false / garbage / slow / server error), failure records, and the verdict cache."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from speech_redundancy.judge import (
    JUDGE_PROMPT,
    HFJudge,
    HTTPJudge,
    OfflineJudge,
    answer_key,
    extract_choice,
    judge_all,
    judge_prompt,
    make_judge,
    parse_verdict,
)

CHOICES = {"A": "the sun", "B": "the moon", "C": "a rock", "D": "the ocean"}


@pytest.mark.parametrize(
    "text,letter",
    [
        ("B", "B"),
        ("(C) a rock", "C"),
        ("D. the ocean", "D"),
        ("The answer is C.", "C"),
        ("I think the correct option is (A).", "A"),
        ("Answer: B", "B"),
        ("A plant needs light, so the answer is the sun.", "A"),  # option text, article "A" ignored
        ("It must be the moon, because it reflects light.", "B"),
        ("I am not sure.", None),
        ("Either B or C.", None),  # two letters: no single choice
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, CHOICES) == letter


def test_answer_key_from_answer_or_reference():
    assert answer_key({"choices": ["x", "y", "z"], "answer": "c", "reference": "z"}) == "C"
    assert answer_key({"choices": ["x", "y", "z"], "reference": "(B)"}) == "B"
    assert answer_key({"choices": ["A. cats", "B. dogs"], "reference": "dogs"}) == "B"


def test_offline_judge():
    j = OfflineJudge()
    assert j.id == "offline-match"
    mc = {"question": "q", "choices": CHOICES, "answer": "B", "reference": "the moon"}
    assert j.judge({**mc, "hypothesis": "The answer is B."})["verdict"] is True
    assert j.judge({**mc, "hypothesis": "The answer is C."})["verdict"] is False
    assert j.judge({**mc, "hypothesis": "no idea"})["verdict"] is False
    open_q = {"question": "Who wrote Hamlet?", "reference": "William Shakespeare"}
    assert j.judge({**open_q, "hypothesis": "It was written by William Shakespeare."})["verdict"] is True
    assert j.judge({**open_q, "hypothesis": "Shakespeare"})["verdict"] is False  # containment, not fuzzy
    assert j.judge({"reference": ["1776", "seventeen seventy-six"], "hypothesis": "In 1776."})["verdict"] is True
    assert j.judge({"reference": "?!", "hypothesis": "x"})["verdict"] is None  # empty after normalisation


def test_prompt_and_parsing():
    p = judge_prompt({"question": "Who?", "reference": "Paris", "hypothesis": "Paris, France"})
    assert p.startswith("You are an evaluation assistant for audio model responses.")
    assert "Question: Who?\nAudio Answer: Paris, France\nReference: Paris" in p
    assert "## Output only true or false" in JUDGE_PROMPT
    assert parse_verdict("true") is True and parse_verdict("**False**.") is False
    assert parse_verdict("<think>true or false? hmm</think>\nfalse") is False
    assert parse_verdict("The answer is correct: true") is True
    assert parse_verdict("maybe") is None and parse_verdict("true or false") is None


# ---------------------------------------------------------------------------------------------- fake server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        prompt = body["messages"][0]["content"]
        mode = prompt.split("MODE:")[1].split()[0]
        if mode == "error500":
            self.send_response(500)
            self.end_headers()
            return
        if mode == "slow":
            time.sleep(0.6)
        reply = {"true": "true", "false": "False.", "garbage": "I cannot tell."}.get(mode, "true")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _item(i, mode):
    return {"id": f"q{i}", "question": f"MODE:{mode} question {i}", "reference": "ref", "hypothesis": "answer"}


def test_http_judge_verdicts_and_failures(server):
    url = f"http://127.0.0.1:{server.server_address[1]}"
    judge = HTTPJudge(url, "fake-judge", api_key="k", timeout=0.25, retries=1, backoff=0.01)
    recs = judge_all([_item(0, "true"), _item(1, "false"), _item(2, "garbage"), _item(3, "slow"), _item(4, "error500")], judge)
    assert [r["verdict"] for r in recs] == [True, False, None, None, None]
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3", "q4"]
    assert "unparsable judge reply" in recs[2]["error"]
    assert "timeout" in recs[3]["error"] and "after 2 tries" in recs[3]["error"]
    assert "HTTP 500" in recs[4]["error"]
    body = server.requests[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0
    assert body["messages"][0]["content"].startswith("You are an evaluation assistant")
    # unparsable: asked once; slow and 500: asked 1 + 1 retry each
    assert len(server.requests) == 2 + 1 + 2 + 2


def test_cache_spares_the_server(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = HTTPJudge(url, "fake-judge", timeout=2, retries=0)
    cache = tmp_path / "judge_cache.jsonl"
    items = [_item(0, "true"), _item(1, "false"), _item(2, "garbage")]
    first = judge_all(items, judge, cache_path=cache)
    assert len(server.requests) == 3 and not any(r["cached"] for r in first)
    second = judge_all(items, judge, cache_path=cache)
    assert [r["verdict"] for r in second] == [True, False, None]
    assert [r["cached"] for r in second] == [True, True, False]  # failures are asked again
    assert len(server.requests) == 4
    # another judge id does not reuse the verdicts
    other = HTTPJudge(url, "other-judge", timeout=2, retries=0)
    judge_all(items[:1], other, cache_path=cache)
    assert len(server.requests) == 5


def test_connection_refused_is_a_failure_record():
    judge = HTTPJudge("http://127.0.0.1:9", "x", timeout=0.5, retries=0)  # port 9 (discard): nothing listens
    rec = judge_all([_item(0, "true")], judge)[0]
    assert rec["verdict"] is None and "connection error" in rec["error"]


def test_hf_judge_with_injected_model():
    import torch

    class Tok:
        chat_template = None

        def __call__(self, text, return_tensors=None):
            self.prompt = text
            return _Batch({"input_ids": torch.tensor([[1, 2, 3]])})

        def decode(self, ids, skip_special_tokens=True):
            return "true" if ids.tolist() == [7] else "?"

    class _Batch(dict):
        def to(self, device):
            return self

    class Model:
        device = "cpu"

        def generate(self, input_ids, max_new_tokens, do_sample):
            assert do_sample is False
            return torch.cat([input_ids, torch.tensor([[7]])], dim=1)

    tok = Tok()
    judge = HFJudge("fake/qwen3", model=Model(), tokenizer=tok)
    rec = judge.judge({"question": "q", "reference": "r", "hypothesis": "h"})
    assert rec["verdict"] is True and "Reference: r" in tok.prompt
    assert judge.id.startswith("hf:fake/qwen3:")


def test_make_judge():
    assert isinstance(make_judge("offline"), OfflineJudge)
    with pytest.raises(ValueError, match="needs judge.url and judge.model"):
        make_judge("http", url=None, model="m")
    with pytest.raises(ValueError, match="unknown judge kind"):
        make_judge("gpt")

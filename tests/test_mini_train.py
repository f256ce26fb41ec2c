"""scripts/train_projector.py on a tiny assembly: the loss reaches the projector only, the curve is written as it
goes, training resumes where it stopped, and held-out texts stay out of the training texts."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_redundancy.models import mini_qwen2audio as mq

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_projector", ROOT / "scripts" / "train_projector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_build(monkeypatch):
    from test_mini_qwen2audio import parts

    whisper, llm, tok, fe = parts.__wrapped__()
    built = []

    def build(projector=None, dtype=torch.float32, **_):
        out = mq.assemble(mq.encoder_state(whisper.state_dict()), mq.audio_config_from_whisper(whisper.config),
                          copy.deepcopy(llm), copy.deepcopy(tok), fe, seed=0)
        built.append(out[0])
        return out

    monkeypatch.setattr(mq, "build", build)
    return built


def _work(tmp_path: Path) -> Path:
    (tmp_path / "clips").mkdir()
    plan = [{"id": f"s{i}", "text": "hello there", "split": "eval" if i < 2 else "train"} for i in range(5)]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rng = np.random.default_rng(0)
    for p in plan:
        np.savez(tmp_path / "clips" / f"{p['id']}.npz", features=rng.standard_normal((10, 16)).astype(np.float16))
    return tmp_path


def test_trains_only_the_projector_and_resumes(tmp_path, tiny_build):
    tp = _script()
    work = _work(tmp_path)
    common = ["train", "--work", str(work), "--eval-every", "2", "--n-wer", "2", "--batch", "2", "--dtype", "float32"]
    tp.main([*common, "--steps", "4"])
    model = tiny_build[-1]
    llm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    curve = [json.loads(x) for x in (work / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 2, 4] and "eval_wer" in curve[0] and "eval_wer" in curve[2]
    assert (work / "curve.png").is_file()
    first = torch.load(work / "state.pt", weights_only=False)
    assert first["step"] == 4
    tp.main([*common, "--steps", "6"])
    state = torch.load(work / "state.pt", weights_only=False)
    assert state["step"] == 6
    assert not torch.equal(state["projector"]["weight"], first["projector"]["weight"])
    assert [c["step"] for c in map(json.loads, (work / "curve.jsonl").read_text().splitlines())] == [0, 2, 4, 6]
    for k, v in model.model.language_model.state_dict().items():  # the frozen LLM did not move
        assert torch.equal(v.float(), llm_before[k].float()), k


def test_held_out_texts_are_filtered():
    tp = _script()
    held = ["Could you send me the map before lunch tomorrow?"]
    texts = ["Please send me the map before lunch tomorrow, thanks.", "Dogs are better than cats."]
    assert tp.held_out_filter(texts, held) == ["Dogs are better than cats."]

"""scripts/device_check.py off the GPU: its refusal, its wheel selection, that it imports without the packages GPU
machines lack, and its three steps and report on a narrow random Qwen2-Audio on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINES = ("hydra", "omegaconf", "jiwer", "soundfile")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    return _load("device_check")


@pytest.fixture(scope="module")
def bench():
    return _load("bench_prefill")


def test_refuses_without_cuda_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    got = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert got.returncode == 2
    assert got.stdout == ""
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check: no CUDA device") and "needs one GPU" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written, nothing built


def test_wheel_tags(check):
    major, minor = sys.version_info[:2]
    machine = platform.machine()
    other = "aarch64" if machine == "x86_64" else "x86_64"
    here = f"cp{major}{minor}"
    assert check.wheel_fits("tqdm-4.70.1-py3-none-any.whl")
    assert check.wheel_fits(f"regex-1-{here}-{here}-manylinux2014_{machine}.manylinux_2_17_{machine}.whl")
    assert check.wheel_fits(f"tokenizers-1-cp{major}{minor - 1}-abi3-manylinux_2_17_{machine}.whl")  # abi3: older ok
    assert not check.wheel_fits(f"regex-1-cp{major}{minor + 1}-cp{major}{minor + 1}-manylinux2014_{machine}.whl")
    assert not check.wheel_fits(f"regex-1-{here}-{here}-manylinux2014_{other}.manylinux_2_17_{other}.whl")
    assert not check.wheel_fits(f"regex-1-{here}-{here}-manylinux_9_99_{machine}.whl")  # glibc 9.99 is not here
    assert not check.wheel_fits("six-1-py2-none-any.whl")


def test_wheels_are_unpacked_first_on_sys_path(check, tmp_path, monkeypatch):
    import zipfile

    folder = tmp_path / ".whl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "srprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("srprobe/__init__.py", "VALUE = 41\n")
        z.writestr("srprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: srprobe\nVersion: 1.0\n")
    with zipfile.ZipFile(folder / "srprobe2-1.0-cp27-cp27m-manylinux1_x86_64.whl", "w") as z:
        z.writestr("srprobe2/__init__.py", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the unpacked folder goes under tmp_path
    got = check.use_wheels(folder)
    assert got["wheels"] == ["srprobe-1.0-py3-none-any.whl"] and got["skipped"] == [
        "srprobe2-1.0-cp27-cp27m-manylinux1_x86_64.whl"]
    assert sys.path[0] == got["site"] and got["site"].startswith(str(tmp_path))
    import importlib.metadata

    assert importlib.import_module("srprobe").VALUE == 41 and importlib.metadata.version("srprobe") == "1.0"
    assert check.use_wheels(tmp_path / "none") == {"wheels": [], "site": None}


def test_imports_and_runs_without_the_packages_gpu_machines_lack(tmp_path):
    """In a fresh interpreter whose site-packages lack hydra, omegaconf, jiwer and soundfile (a copy of this
    environment's as symbolic links, those left out): the check's module and everything its steps import load, and a
    narrow random Qwen2-Audio generates under DAP."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().lstrip("_").startswith(ABSENT_ON_GPU_MACHINES):
            (shadow / entry.name).symlink_to(entry)
    code = f"""
import sys
sys.path[:0] = [{str(ROOT / 'scripts')!r}, {str(ROOT / 'src')!r}, {str(shadow)!r}]
import device_check, bench_prefill, torch
from speech_redundancy.engine import compression
config = bench_prefill.config_7b(4, 2)
t, a = config.text_config, config.audio_config
t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 64, 128, 4, 4
a.d_model, a.encoder_ffn_dim, a.encoder_attention_heads = 32, 64, 2
model = bench_prefill.build_7b(config, torch.device("cpu"), torch.float32)
batch, _, _ = bench_prefill.clip_inputs(5, config.audio_token_index, bench_prefill.AUDIO_BOS, bench_prefill.AUDIO_EOS,
                                        t.vocab_size, "cpu", torch.float32, 0)
with torch.inference_mode(), compression(model, bench_prefill.methods(4)["DAP"], bench_prefill.qwen2audio.reach(model)):
    model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
import importlib.util
print([m for m in {ABSENT_ON_GPU_MACHINES!r} if importlib.util.find_spec(m) is not None])
"""
    # -S: no site-packages of this environment (nor its editable install); only the shadow copy
    got = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip().splitlines()[-1] == "[]"


def _narrow(bench):
    """Qwen2-Audio's real vocabulary, token ids and 30 s windows; 4 LLM layers of width 64, 2 encoder layers."""
    config = bench.config_7b(4, 2)
    t, a = config.text_config, config.audio_config
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 64, 128, 4, 4
    a.d_model, a.encoder_ffn_dim, a.encoder_attention_heads = 32, 64, 2
    model = bench.build_7b(config, torch.device("cpu"), torch.float32)
    return model, config.audio_token_index, bench.AUDIO_BOS, bench.AUDIO_EOS


def test_steps_and_report_on_a_narrow_model(check, bench, tmp_path):
    built = _narrow(bench)
    cpu = torch.device("cpu")
    correct = check.correctness(bench, built[0], cpu, new_tokens=3)
    assert correct["deep_layer"] == 3
    for v in correct["no_merge_equals_stock"].values():
        assert v["tokens_equal"] and v["logits_equal"] and v["max_abs_logit_diff"] == 0
    assert correct["passed"] is True
    pre = check.prefill(bench, built, cpu, per_bucket=1, repeats=1, warmup=0)
    assert [r["method"] for r in pre["rows"][:4]] == ["Vanilla", "AP_in", "AP_deep", "DAP"] and len(pre["rows"]) == 12
    ops = check.operators(cpu, repeats=2, sizes=((250,), (64,)))
    assert len(ops["rows"]) == 4 and {r["dtype"] for r in ops["rows"]} == {"float32", "bfloat16"}
    report = {"meta": {"date": "2026-12-01", "gpu": "NoGPU 9000", "torch": "x", "cuda": None, "python": "3.12",
                       "transformers": "5.24.0", "transformers_from": "shipped wheel", "seconds": 12.0},
              "steps": {"correctness": {"status": "passed", "result": correct},
                        "prefill": {"status": "passed", "result": pre},
                        "operators": {"status": "FAILED its check", "result": ops},
                        "extra": {"status": "error", "error": "RuntimeError: boom"}}}
    check.write(report, tmp_path)
    md = (tmp_path / "device_check.md").read_text()
    assert md.startswith("# Device check (2026-12-01)") and "NoGPU 9000" in md
    assert "## correctness: passed" in md and "## operators: FAILED its check" in md
    assert "## extra: error (RuntimeError: boom)" in md
    assert md.count("| 40-60 s | DAP |") == 1 and "| bfloat16 | 250 | 64 | 3 |" in md
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["steps"]["prefill"]["result"]["rows"][3]["method"] == "DAP"

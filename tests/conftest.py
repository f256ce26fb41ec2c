"""Shared fixtures: the real demo set and real Whisper tiny.en weights are built once per session (cached on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_manifest() -> Path:
    from speech_redundancy.data.demo import build_demo

    return build_demo()


@pytest.fixture(scope="session")
def whisper_tiny():
    from speech_redundancy.weights import load_whisper

    return load_whisper("whisper-tiny.en")


@pytest.fixture(scope="session")
def tiny_qwen():
    """attn implementation ("sdpa", "eager") -> adapter over one random tiny Qwen2-Audio (same weights for both)."""
    from speech_redundancy.models import qwen2audio as q

    out = {}
    for attn in ("sdpa", "eager"):
        model, processor = q.build_tiny(seed=0, attn_implementation=attn)
        out[attn] = q.Qwen2AudioModel(model, processor, name=f"tiny-{attn}")
    return out


def compose(overrides: list[str]):
    """The run config exactly as ``python run.py <overrides>`` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)

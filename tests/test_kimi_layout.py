"""Kimi-Audio's real checkpoint layouts (tests/fixtures/layouts/, written from public sources: README there) against
the project's loader and its tiny writer. The records were not written by the code they check: the tensor names and
shapes come from the official module definitions at the real sizes, the index facts from a public inspector of the
published files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speech_redundancy.models import glm4_speech_tokenizer as glm
from speech_redundancy.models import kimi
from speech_redundancy.models import kimi_checkpoint as ckpt

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
KIMI = json.loads((LAYOUTS / "kimi_audio_7b_instruct.json").read_text())
WHISPER = json.loads((LAYOUTS / "kimi_audio_whisper_large_v3.json").read_text())
GLM = json.loads((LAYOUTS / "kimi_glm4_voice_tokenizer.json").read_text())
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi-layout")
    return ckpt.write_tiny(root / "tiny-kimiaudio", root / "tiny-glm4-voice-tokenizer")


def _stored(folder: Path, files: list[str] | None = None) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of every tensor in the folder's safetensors files (or the ones given)."""
    out = {}
    for path in [folder / f for f in files] if files else sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                out[k] = (list(t.get_shape()), t.get_dtype())
    return out


def _pattern(name: str) -> str:
    return re.sub(r"\.(\d+)\.", ".N.", name)


def _symbols(sizes: dict[str, int]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for sym, n in sizes.items():
        out.setdefault(int(n), set()).add(sym)
    return out


def _assert_same_layout(record: dict, stored: dict[str, tuple[list[int], str]], real: dict[str, int],
                        tiny: dict[str, int], counts: dict[str, tuple[int, int]]) -> None:
    """The same names up to layer indices (each stack with its own count), the same dtypes, and shapes that name the
    same sizes (hidden, ffn, vocab, ...) in the real and the tiny config."""
    want = {_pattern(k): v for k, v in record.items()}
    got = {_pattern(k): v for k, v in stored.items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    for stack, (n_real, n_tiny) in counts.items():
        idx = lambda names: {int(m.group(1)) for k in names if (m := re.match(re.escape(stack) + r"\.(\d+)\.", k))}
        assert idx(record) == set(range(n_real)) and idx(stored) == set(range(n_tiny)), stack
    real_sym, tiny_sym = _symbols(real), _symbols(tiny)
    for name, (shape, dtype) in got.items():
        w = want[name]
        assert dtype == w["dtype"], name
        assert len(shape) == len(w["shape"]), name
        for r, t in zip(w["shape"], shape):
            assert real_sym.get(r, {r}) & tiny_sym.get(t, {t}) or r == t, (name, w["shape"], shape)


# ----------------------------------------------------------------------------- the tiny writer writes these names
def test_tiny_checkpoint_has_exactly_the_real_tensor_names(folders):
    folder = folders[0]
    index = json.loads((folder / ckpt.INDEX).read_text())["weight_map"]
    stored = _stored(folder, sorted(set(index.values())))
    assert set(stored) == set(index)
    cfg = json.loads((folder / "config.json").read_text())
    real = KIMI["config"]
    head = real["hidden_size"] // real["num_attention_heads"]
    t_head = cfg["hidden_size"] // cfg["num_attention_heads"]
    _assert_same_layout(
        KIMI["tensors"], stored,
        {"hidden": real["hidden_size"], "ffn": real["intermediate_size"], "vocab": real["vocab_size"],
         "kv": real["num_key_value_heads"] * head, "adaptor_in": real["kimia_adaptor_input_dim"], "rope": head // 2},
        {"hidden": cfg["hidden_size"], "ffn": cfg["intermediate_size"], "vocab": cfg["vocab_size"],
         "kv": cfg["num_key_value_heads"] * t_head, "adaptor_in": cfg["kimia_adaptor_input_dim"], "rope": t_head // 2},
        {"model.layers": (real["num_hidden_layers"], cfg["num_hidden_layers"]),
         "model.mimo_layers": (real["kimia_mimo_layers"], cfg["kimia_mimo_layers"])})
    shard_of_heads = {index[k] for k in KIMI["index"]["model-36-of-36.safetensors"]}
    assert len(shard_of_heads) == 1 and set(k for k, v in index.items() if v in shard_of_heads) == set(
        KIMI["index"]["model-36-of-36.safetensors"])  # as in the real index: heads, embeddings and norms together


def test_tiny_whisper_folder_has_exactly_the_real_tensor_names(folders):
    wdir = folders[0] / ckpt.WHISPER_DIR
    stored = _stored(wdir)
    cfg = json.loads((wdir / "config.json").read_text())
    real = WHISPER["config"]
    keys = ("d_model", "encoder_ffn_dim", "num_mel_bins", "vocab_size", "max_source_positions",
            "max_target_positions")
    _assert_same_layout(WHISPER["tensors"], stored, {k: real[k] for k in keys}, {k: cfg[k] for k in keys},
                        {"model.encoder.layers": (real["encoder_layers"], cfg["encoder_layers"]),
                         "model.decoder.layers": (real["decoder_layers"], cfg["decoder_layers"])})


def test_tiny_speech_tokenizer_has_exactly_the_real_tensor_names(folders):
    tdir = folders[1]
    cfg = json.loads((tdir / "config.json").read_text())
    real = GLM["config"]
    keys = ("d_model", "encoder_ffn_dim", "num_mel_bins", "max_source_positions", "quantize_vocab_size")
    sizes = lambda c: {**{k: c[k] for k in keys}, "pooled": -(-c["max_source_positions"] // c["pooling_kernel_size"])}
    _assert_same_layout(GLM["tensors"], _stored(tdir), sizes(real), sizes(cfg),
                        {"layers": (real["quantize_position"], cfg["quantize_position"])})


# ----------------------------------------------------------------------------- the loader takes exactly these names
def test_the_loader_sorts_the_real_index_exactly():
    """At the real sizes (meta device, no weights): every name of the real index is a backbone tensor of the stock
    Qwen2ForCausalLM, the VQ adaptor's, or ignored (MIMO branch, rotary buffers), with the record's shapes."""
    from transformers import Qwen2ForCausalLM

    config = ckpt.KimiConfig.from_json({**KIMI["config"], "rope_theta": 1e6})  # rope_theta: not in the record
    with torch.device("meta"):
        backbone = Qwen2ForCausalLM(config.qwen2_config())
        adaptor = ckpt.vq_adaptor(config.adaptor_input_dim, config.hidden, config.rms_norm_eps)
    persistent = {k: v for k, v in backbone.state_dict().items() if k not in dict(backbone.named_buffers())}
    weight_map = {k: "model-1-of-35.safetensors" for k in KIMI["tensors"]}
    by_shard, adaptor_shards, ignored, unexpected = ckpt.split_keys(weight_map, set(persistent))
    assert unexpected == []
    assert sorted(sum(by_shard.values(), [])) == sorted(persistent)
    assert sorted(sum(adaptor_shards.values(), [])) == sorted(ckpt.ADAPTOR_PREFIX + k for k in adaptor.state_dict())
    assert len(ignored) == 6 * 12 + 2 + 34 and all(ckpt.IGNORED.match(k) for k in ignored)
    for k, v in persistent.items():
        assert list(v.shape) == KIMI["tensors"][k]["shape"], k
    for k, v in adaptor.state_dict().items():
        assert list(v.shape) == KIMI["tensors"][ckpt.ADAPTOR_PREFIX + k]["shape"], k
    assert len(KIMI["tensors"]) == KIMI["index"]["tensors"] == 453


def test_the_record_matches_the_published_index_size():
    """Names, shapes and dtypes of the record add up to the published index's total_size, to the byte."""
    width = {"BF16": 2, "F16": 2, "F32": 4}
    total = sum(width[t["dtype"]] * int(torch.tensor(t["shape"]).prod()) for t in KIMI["tensors"].values())
    assert total == KIMI["index"]["total_size"] == 19_532_673_280


def test_the_loader_takes_the_real_whisper_and_tokenizer_names():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    with torch.device("meta"):
        encoder = WhisperEncoder(WhisperConfig(**WHISPER["config"]))
    enc = {f"model.encoder.{k}": list(v.shape) for k, v in encoder.state_dict().items()}
    rest = set(WHISPER["tensors"]) - set(enc)
    assert {k: WHISPER["tensors"][k]["shape"] for k in enc} == enc
    assert all(k.startswith("model.decoder.") for k in rest)  # read and ignored by load_whisper
    with torch.device("meta"):
        tok = glm.SpeechTokenizer(glm.SpeechTokenizerConfig.from_json(GLM["config"]))
    mine = {k: list(v.shape) for k, v in tok.state_dict().items()}
    assert {k: GLM["tensors"][k]["shape"] for k in mine} == mine
    assert set(GLM["tensors"]) - set(mine) == {"ema_count", "ema_weight"}  # ignored by load_state


def test_special_ids_and_config_fields_are_the_records(folders):
    model_ids = kimi.load({"family": "kimi", "path": str(folders[0]), "speech_tokenizer": str(folders[1]),
                           "dtype": "float32", "device": "cpu", "n_layers": 4}).tokenizer.ids
    from speech_redundancy.models.kimi_prompt import SPECIAL_NAMES

    assert {SPECIAL_NAMES[f]: getattr(model_ids, f) for f in SPECIAL_NAMES} == KIMI["special_tokens"]
    cfg = json.loads((folders[0] / "config.json").read_text())
    for k in ("architectures", "kimia_token_offset", "kimia_text_output_vocab", "kimia_media_begin",
              "kimia_media_end", "kimia_mimo_audiodelaytokens", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "use_whisper_feature", "torch_dtype"):
        assert cfg[k] == KIMI["config"][k], k


# ----------------------------------------------------------------------------- old names: refused, named
def _rewrite(folder: Path, rename) -> None:
    """Rename (or drop, when ``rename`` gives None) tensors in every shard and in the index."""
    index_path = folder / ckpt.INDEX
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        tensors.pop(None, None)
        (folder / shard).unlink()
        save_file(tensors, str(folder / shard))
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items() if rename(k) is not None}
    index_path.unlink()
    index_path.write_text(json.dumps(index))


def _copy(folders, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(folders[0], tmp_path / "ckpt"))


def test_the_old_adaptor_names_are_refused_in_one_line(folders, tmp_path):
    dst = _copy(folders, tmp_path)
    _rewrite(dst, lambda k: k.replace("model.vq_adaptor.layers.", "model.vq_adaptor."))
    with pytest.raises(ValueError, match=r"model\.vq_adaptor\.0\.bias: .*old names.*model\.vq_adaptor\.layers\.N"):
        kimi.load({"family": "kimi", "path": str(dst), "speech_tokenizer": str(folders[1]), "dtype": "float32",
                   "device": "cpu"})


def test_a_missing_adaptor_tensor_is_refused_by_name(folders, tmp_path):
    dst = _copy(folders, tmp_path)
    _rewrite(dst, lambda k: None if k == "model.vq_adaptor.layers.4.bias" else k)
    with pytest.raises(ValueError, match=r"missing \['4\.bias'\]"):
        kimi.load({"family": "kimi", "path": str(dst), "speech_tokenizer": str(folders[1]), "dtype": "float32",
                   "device": "cpu"})

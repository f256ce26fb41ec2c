"""One loader per benchmark corpus, each reading the layout users already have on disk.

Every loader returns :class:`~speech_redundancy.data.records.Utterance` records pointing at audio files
(decoded later with :func:`speech_redundancy.audio.load_audio`), durations read from file headers. Each takes
``on_error`` ("raise", or "skip": bad items are left out and appended to ``failures`` as ``{"id" or "file", "error"}``).
Where to get each corpus and its exact layout: ``docs/datasets.md``.
"""

from speech_redundancy.data.corpora.common import CorpusError, probe_duration
from speech_redundancy.data.corpora.covost2 import load_covost2
from speech_redundancy.data.corpora.hf import find_tables, load_hf
from speech_redundancy.data.corpora.kespeech import load_kespeech
from speech_redundancy.data.corpora.librispeech import load_librispeech
from speech_redundancy.data.corpora.manifest import load_manifest
from speech_redundancy.data.corpora.qa import load_openbookqa, load_sdqa, load_trivia_qa

__all__ = [
    "CorpusError",
    "find_tables",
    "load_covost2",
    "load_hf",
    "load_kespeech",
    "load_librispeech",
    "load_manifest",
    "load_openbookqa",
    "load_sdqa",
    "load_trivia_qa",
    "probe_duration",
]

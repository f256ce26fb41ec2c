"""Speech data: one common record (:class:`Utterance`), manifests, loaders, alignment and the demo set."""

from speech_redundancy.data.records import Utterance, Word, read_manifest, write_manifest

__all__ = ["Utterance", "Word", "read_manifest", "write_manifest"]

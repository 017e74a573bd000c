"""Records shared by the corpus readers, the batching and the loops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Utterance:
    """One utterance of a corpus manifest.

    Attributes:
        id: LibriSpeech utterance id ``<speaker>-<chapter>-<utt>``.
        path: where the audio is: a local path, or an ``s3://bucket/key`` URI.
        duration: length in seconds, read from the file header (no decoding).
        text: the transcript as written in the corpus (upper case for LibriSpeech).
        speaker: the speaker id.
    """

    id: str
    path: str
    duration: float
    text: str
    speaker: str

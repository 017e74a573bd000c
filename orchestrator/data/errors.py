"""Errors raised by the corpus readers."""

from __future__ import annotations


class CorpusError(ValueError):
    """A corpus, an audio file or its storage cannot be used.

    The message is one line for people: what went wrong, where, and how to fix it.
    """

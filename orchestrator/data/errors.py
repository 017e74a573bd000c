"""Errors raised by the corpus readers."""

from __future__ import annotations

from models.typed_config import UserError  # the base of every user error (orchestrator.errors)


class CorpusError(UserError, ValueError):
    """A corpus, an audio file or its storage cannot be used.

    The message is one line for people: what went wrong, where, and how to fix it.
    """

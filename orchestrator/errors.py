"""The user-error classes of the orchestrator, all derived from one base, :class:`UserError`.

A user error is a mistake in what someone wrote or set up -- a spec or run file, a ``--set``, a
corpus, an unreachable service -- as opposed to a bug. Its message is one line naming where the
problem is (the file and the key, or the service's URI), what is wrong and how to fix it. Every
command-line entry point (:func:`cli_main`) catches :class:`UserError`, prints ``error: <message>``
to stderr and exits with code 2.

The base and :class:`ConfigError` live in :mod:`models.typed_config` (``models`` may not import
``orchestrator``); this module re-exports them next to the errors of the sweep. Errors of other
modules derive from :class:`UserError` where they are defined: ``StorageError``
(:mod:`orchestrator.storage`), ``TrackingError`` (:mod:`orchestrator.tracking`), ``CorpusError``
(:mod:`orchestrator.data.errors`) and ``PreflightError`` (:mod:`orchestrator.preflight`). The
training stages (:mod:`orchestrator.train`) raise :class:`StageError` for their own input checks.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from models.typed_config import ConfigError, UserError

SpecError = ConfigError
"""A sweep spec is invalid (the same class as :class:`ConfigError`: one loader, one error)."""

USER_ERROR_EXIT = 2


class SweepError(UserError, RuntimeError):
    """The sweep cannot start or resume (no such sweep to resume, Ray unreachable, too few resources)."""


class StageError(UserError, ValueError):
    """A training stage cannot use what it was given: a checkpoint or run folder (missing, of another
    stage or model), a tokenizer folder, an LM or lexicon file, a device or precision this machine lacks."""


NOISY_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore", "filelock")


def configure_logging(*, quiet: bool = False) -> None:
    """The one logging set-up of every CLI: ``time level name: message`` lines on stderr."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries that log routine INFO lines of their own (botocore: "Found credentials in
    # environment variables") speak only when something is wrong: an error stays one line.
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(text: object) -> str:
    """``text`` with all whitespace runs (newlines included) turned into single spaces."""
    return " ".join(str(text).split())


def cli_main(body: Callable[[], int]) -> int:
    """Run a CLI's ``body``; a :class:`UserError` becomes one ``error: ...`` line and exit code 2."""
    try:
        return body()
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_EXIT


__all__ = ["ConfigError", "SpecError", "StageError", "SweepError", "USER_ERROR_EXIT", "UserError", "cli_main", "configure_logging", "one_line"]

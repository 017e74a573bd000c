"""MLflow tracking: one parent run per sweep, one child run per trial, found again on resume.

Runs are keyed by deterministic ids stored as tags (``sweep_id`` on the parent, ``trial_key``
on a child), so a resumed sweep or a restarted trial re-attaches to its run instead of opening a
duplicate. Parameters are logged once: MLflow refuses to change a logged parameter, so a value
already present is skipped and a *different* value is an error naming the parameter.

Only the sweep driver, the trial driver and rank 0 of each trial's workers call this module.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SWEEP_ID_TAG = "sweep_id"
TRIAL_KEY_TAG = "trial_key"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message says how to fix it."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else an SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_tracking(uri: str, experiment: str, *, timeout_s: float = 20.0) -> str:
    """Make sure the store answers and the experiment exists; return the experiment id.

    Raises:
        TrackingError: one line naming the URI and what to do, when the server is unreachable
            or the store cannot be opened.
    """
    if uri.startswith(("http://", "https://")):
        # Fail fast instead of MLflow's minutes of retries on a dead server.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    try:
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return client.create_experiment(experiment)
        except Exception:  # created concurrently by another process
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - any store failure becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"MLflow tracking store {redact_uri(uri)} is not usable ({first[:300]}); start the "
            "server or fix tracking.uri / MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db for a local file)"
        ) from None


_URI_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]+):([^\s/@'\"]+)@")
REDACT_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".md", ".log", ".cfg", ".toml", ".tsv", ".csv")
MAX_REDACTED_BYTES = 16 << 20


def redact_text(text: str) -> str:
    """Hide the password of every ``scheme://user:password@host`` URI inside ``text``."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


def _redacted(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: redact_text(str(v))[:5000] for k, v in (tags or {}).items()}


def redact_uri(uri: str) -> str:
    """Hide a password in ``scheme://user:password@host`` URIs (logs and errors never show it)."""
    if "://" not in uri or "@" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` with values as MLflow stores them (strings)."""
    flat: dict[str, Any] = {}
    _flatten("", params, flat)
    out = {}
    for key, value in flat.items():
        text = value if isinstance(value, str) else repr(value) if isinstance(value, (tuple, list)) else str(value)
        out[key] = text[:MAX_PARAM_LENGTH]
    return out


@dataclass
class Tracker:
    """A thin, resumable layer over ``MlflowClient``.

    Attributes:
        uri: the tracking URI.
        experiment_id: the experiment all runs go to.
    """

    uri: str
    experiment_id: str

    @classmethod
    def open(cls, uri: str, experiment: str) -> "Tracker":
        return cls(uri=uri, experiment_id=check_tracking(uri, experiment))

    @property
    def client(self):
        return _client(self.uri)

    def _find(self, filter_string: str):
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=10, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    def sweep_run(self, sweep_id: str, name: str, *, tags: Mapping[str, str] | None = None) -> str:
        """Return the parent run of ``sweep_id``, creating it the first time."""
        found = self._find(f"tags.{SWEEP_ID_TAG} = '{sweep_id}' and tags.run_kind = 'sweep'")
        if found is not None:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={SWEEP_ID_TAG: sweep_id, "run_kind": "sweep", **_redacted(tags)},
        )
        return run.info.run_id

    def trial_run(
        self, parent_run_id: str, trial_key: str, name: str, *, tags: Mapping[str, str] | None = None
    ) -> str:
        """Return the child run keyed by ``trial_key`` under the parent, creating it once."""
        found = self._find(f"tags.{TRIAL_KEY_TAG} = '{trial_key}' and tags.{PARENT_TAG} = '{parent_run_id}'")
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={PARENT_TAG: parent_run_id, TRIAL_KEY_TAG: trial_key, "run_kind": "trial", **_redacted(tags)},
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log flattened params once; skip identical ones; a changed value is an error."""
        from mlflow.entities import Param

        flat = {key: redact_text(value) for key, value in flatten_params(params).items()}
        existing = self.client.get_run(run_id).data.params
        new = []
        for key, value in flat.items():
            if key in existing:
                if existing[key] != value:
                    raise TrackingError(
                        f"run {run_id} already has parameter {key}={existing[key]!r}, refusing to log "
                        f"{value!r}: a resumed trial must keep its sampled values"
                    )
                continue
            new.append(Param(key, value))
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, int(step or 0))
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start : start + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _redacted(tags).items()])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """Log a file; a text file holding a URI with a password is logged with the password hidden."""
        if path.endswith(REDACT_SUFFIXES) and os.path.getsize(path) <= MAX_REDACTED_BYTES:
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                text = handle.read()
            clean = redact_text(text)
            if clean != text:
                folder = tempfile.mkdtemp(prefix="redacted-")
                try:
                    copy = os.path.join(folder, os.path.basename(path))
                    with open(copy, "w", encoding="utf-8", errors="surrogateescape") as handle:
                        handle.write(clean)
                    self.client.log_artifact(run_id, copy, artifact_path)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                return
        self.client.log_artifact(run_id, path, artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def children(self, parent_run_id: str) -> list:
        """All trial runs under a sweep run."""
        runs = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'",
                max_results=500, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

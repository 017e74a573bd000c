"""MLflow tracking: one parent run per sweep, one child run per trial, found again on resume.

Runs are keyed by deterministic ids stored as tags (``sweep_id`` on the parent, ``trial_key``
on a child), so a resumed sweep or a restarted trial re-attaches to its run instead of opening a
duplicate. Parameters are logged once: MLflow refuses to change a logged parameter, so a value
already present is skipped and a *different* value is an error naming the parameter.

Only the sweep driver, the trial driver and rank 0 of each trial's workers call this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.typed_config import UserError  # the base of every user error (orchestrator.errors)

log = logging.getLogger(__name__)

SWEEP_ID_TAG = "sweep_id"
TRIAL_KEY_TAG = "trial_key"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
# MLflow 3 opens an experiment without this tag in its GenAI (traces) overview; ours are
# model-training experiments, whose default view is the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
MAX_TAG_LENGTH = 8000  # MLflow's limit on a tag value
EVAL_ARTIFACTS = "eval"  # artifact folder of a trial run holding its per-utterance records


class TrackingError(UserError, RuntimeError):
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
        if found is None:
            try:
                return client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # created concurrently by another process
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag, or by hand
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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


def trial_run_name(plan: str, trial_key: str) -> str:
    """The name of a trial's run: its layer plan and a short stable id, e.g. ``2xmha_relpos+2xpom(k3,D2) · 3f9a1c``.

    The id is a hash of the trial key, so a restarted trial gets the same name and two trials
    of the same plan (other hyperparameters, another seed) are told apart.
    """
    return f"{plan} \u00b7 {hashlib.sha1(trial_key.encode()).hexdigest()[:6]}"


def experiment_page_url(ui_base: str, experiment_id: str, *, order_by_metric: str | None = None,
                        ascending: bool = True) -> str:
    """The experiment's runs table in the MLflow UI, every trial on its own row.

    MLflow 3.17's UI picks its view from a global "GenAI / Model training" switch (default GenAI,
    whatever the experiment's kind tag says), so the link asks for the model-training view. Sorted
    by a metric, the table lists child runs on their own rows instead of folding them under the
    sweep's run.
    """
    query = "workflowType=machine_learning"
    if order_by_metric:
        query += f"&orderByKey=metrics.%60{order_by_metric}%60&orderByAsc={'true' if ascending else 'false'}"
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


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

    def set_run_name(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description in the MLflow UI (markdown; cut to MLflow's tag limit)."""
        text = redact_text(markdown)
        if len(text) > MAX_TAG_LENGTH:
            text = text[: MAX_TAG_LENGTH - 40].rsplit("\n", 1)[0] + "\n\n(cut: see report/report.md)"
        self.client.set_tag(run_id, NOTE_TAG, text)

    def log_eval_records(self, run_id: str, eval_dir: str | Path) -> list[str]:
        """Log the per-utterance records of an evaluation folder (``<subset>.tsv``) as ``eval/`` artifacts.

        The report pairs trials on these records, from MLflow alone. Returns the files logged.
        """
        files = sorted(str(p) for p in Path(eval_dir).glob("*.tsv")) if Path(eval_dir).is_dir() else []
        for path in files:
            self.log_artifact(run_id, path, EVAL_ARTIFACTS)
        return files

    def download_eval_records(self, run_id: str, dst: str | Path) -> dict[str, Path]:
        """Download a trial run's ``eval/<subset>.tsv`` artifacts into ``dst``: ``{subset: path}``."""
        out: dict[str, Path] = {}
        # One progress bar per small file would bury the report's table.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for info in self.client.list_artifacts(run_id, EVAL_ARTIFACTS):
            if not info.is_dir and info.path.endswith(".tsv"):
                local = self.client.download_artifacts(run_id, info.path, str(dst))
                out[Path(info.path).stem] = Path(local)
        return out

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

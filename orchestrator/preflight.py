"""Checks the tuner runs before Ray starts any trial: services, resources, then the corpus.

Each failed check is one :class:`PreflightError` line naming the spec file, the field
(``data.root``, ``storage.path`` or ``tracking.uri``), what failed and how to fix it; the CLI
prints it and exits with code 2, like a bad spec. Every check is quick: S3 calls use the corpus
reader's client (3 s connect timeout, one retry), the MLflow server gets one ``GET /health`` with
a short timeout, databases one connection with a connect timeout.

* ``data.root`` / ``storage.path`` on ``s3://``: the endpoint answers, the credentials are
  accepted, the bucket exists; the corpus prefix holds objects; the storage prefix is writable.
* ``tracking.uri``: ``http(s)://`` servers answer ``/health``; ``sqlite:///`` files have an
  existing folder; ``postgresql://`` and other SQLAlchemy URIs accept a connection.
* Resources: one trial's worker group (``resources.workers`` x ``cpus_per_worker`` /
  ``gpus_per_worker``) fits on this machine, or on the live nodes of the cluster at ``--address``
  (checked right after connecting); otherwise a trial would wait forever.
* The corpus: every subset a trial reads (pre-training, training, dev, test) has a manifest with
  usable utterances. The files the reader skipped (corrupt audio, missing transcripts) come back
  in a :class:`DataReport`, which the driver logs to the sweep's MLflow run
  (:meth:`DataReport.log_to`).

Before Ray starts, :func:`preflight` also stops Ray Tune from copying AWS credentials into the
trials' runtime envs, which Ray logs in plain text (:func:`keep_credentials_out_of_ray`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import SweepError

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0
DB_CONNECT_TIMEOUT_S = 5
SKIPPED_ARTIFACT = "skipped_files.tsv"
"""Under the ``data/`` artifact folder of the sweep's run: subset, kind, path and reason per line."""
MAX_TAGGED_PATHS = 20


class PreflightError(SweepError):
    """A service or the corpus cannot be used; one line says which field, what failed, the fix."""


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(str(text).split())[:limit]


def _fail(source: str, field_name: str, value: str, message: str) -> PreflightError:
    return PreflightError(f"{source}: {field_name}={value}: {_one_line(message, 800)}")


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


def check_s3(uri: str, *, source: str, field_name: str, need_objects: bool, writable: bool) -> None:
    """Check an ``s3://bucket/prefix`` location: reachable, credentials, bucket, prefix.

    Args:
        uri: the location.
        source: the spec file, for the message.
        field_name: ``data.root`` or ``storage.path``.
        need_objects: the prefix must hold at least one object (a corpus).
        writable: write and delete one small marker object under the prefix (storage).

    Raises:
        PreflightError: one line naming ``source``, ``field_name`` and the fix.
    """
    from botocore import exceptions as bx

    from orchestrator.data import s3
    from orchestrator.data.errors import CorpusError

    try:
        bucket, prefix = s3.split_s3_uri(uri)
        client = s3.get_client()
    except CorpusError as err:
        raise _fail(source, field_name, uri, str(err)) from None
    except (bx.BotoCoreError, ValueError) as err:  # e.g. a malformed AWS_ENDPOINT_URL
        raise _fail(source, field_name, uri, f"cannot create an S3 client ({err}): check AWS_ENDPOINT_URL and "
                    "AWS_DEFAULT_REGION") from None
    prefix = prefix.strip("/")
    base = f"{prefix}/" if prefix else ""
    where = s3.describe_endpoint()

    def call(action: str, fn, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise _fail(source, field_name, uri, str(s3.s3_error(exc, uri, action))) from None

    # A listing (not HEAD, whose errors carry no code) tells a missing bucket from refused keys.
    reply = call("list", client.list_objects_v2, Bucket=bucket, Prefix=base, MaxKeys=1)
    if need_objects and not (reply.get("KeyCount") or reply.get("Contents")):
        raise _fail(source, field_name, uri,
                    f"no objects under s3://{bucket}/{base} at {where}: check the prefix, or upload the corpus with "
                    f"`python -m orchestrator.data.librispeech upload LOCAL_FOLDER {uri}`")
    if writable:
        key = f"{base}.preflight-{uuid.uuid4().hex}"
        call("write to", client.put_object, Bucket=bucket, Key=key, Body=b"")
        call("delete from", client.delete_object, Bucket=bucket, Key=key)


# --------------------------------------------------------------------------------------------
# MLflow tracking
# --------------------------------------------------------------------------------------------

_FIX = "or fix tracking.uri / MLFLOW_TRACKING_URI (sqlite:///mlflow.db keeps runs in a local file)"


def check_tracking_uri(uri: str, *, source: str, timeout_s: float = HTTP_TIMEOUT_S) -> None:
    """Check that the MLflow tracking store at ``uri`` answers (quickly; MLflow itself retries for minutes).

    Raises:
        PreflightError: one line naming ``source``, ``tracking.uri`` (password hidden) and the fix.
    """
    from orchestrator.tracking import redact_uri

    shown = redact_uri(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _check_http(uri, shown, source, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, shown, source)
    elif scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql"):
        _check_database(uri, shown, source, scheme.split("+", 1)[0])
    # file:, databricks, plain folders: MLflow's own open (Tracker.open) checks them


def _check_http(uri: str, shown: str, source: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]  # no user:password in the request line or in errors
    url = urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as reply:
            reply.read(64)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise _fail(source, "tracking.uri", shown,
                        f"the MLflow server refused the request (HTTP {err.code}): set MLFLOW_TRACKING_USERNAME / "
                        "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN") from None
        if err.code >= 500:
            raise _fail(source, "tracking.uri", shown,
                        f"the MLflow server answers HTTP {err.code} on /health: check the server's log and its "
                        f"database and artifact store, {_FIX}") from None
        # Another status (e.g. 404 behind a proxy without /health): the server answers; MLflow checks the rest.
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer in {timeout_s:g} s"
        password = _password(uri)
        reason = str(reason).replace(password, "***") if password else str(reason)
        raise _fail(source, "tracking.uri", shown,
                    f"the MLflow tracking server does not answer ({_one_line(reason, 200)}): start it "
                    f"(e.g. infra/local/stack.sh up, or mlflow server --port PORT) {_FIX}") from None


def _check_sqlite(uri: str, shown: str, source: str) -> None:
    path = uri.split("://", 1)[1]
    if path.startswith("/"):
        path = path[1:]  # sqlite:///relative, sqlite:////absolute
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise _fail(source, "tracking.uri", shown,
                    f"the folder {folder} of the SQLite file does not exist: create it, {_FIX}")
    if not os.access(folder, os.W_OK):
        raise _fail(source, "tracking.uri", shown,
                    f"the folder {folder} of the SQLite file is not writable: fix its permissions, {_FIX}")


def _check_database(uri: str, shown: str, source: str, dialect: str) -> None:
    import sqlalchemy

    connect_args = {"connect_timeout": DB_CONNECT_TIMEOUT_S} if dialect in ("postgresql", "postgres", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as err:  # noqa: BLE001 - driver errors (OperationalError, missing module) become one line
        text = str(getattr(err, "orig", None) or err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        password = _password(uri)
        if password:
            first = first.replace(password, "***")
        raise _fail(source, "tracking.uri", shown,
                    f"cannot connect to the tracking database ({_one_line(first, 300)}): start the database, check "
                    f"the host, port, user and password (PGPASSWORD for PostgreSQL), {_FIX}") from None


def _password(uri: str) -> str:
    rest = uri.split("://", 1)[-1]
    if "@" not in rest:
        return ""
    creds = rest.rsplit("@", 1)[0]
    return creds.split(":", 1)[1] if ":" in creds else ""


# --------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What the corpus check found: utterances kept and items skipped, per subset."""

    root: str
    kept: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, Any]] = field(default_factory=list)
    """``(subset, orchestrator.data.librispeech.Skipped)`` pairs."""
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, item in self.skipped:
            out[item.kind] = out.get(item.kind, 0) + 1
        return dict(sorted(out.items()))

    def log_to(self, tracker, run_id: str, folder: str | os.PathLike) -> None:
        """Log to the sweep's run: metric ``data/skipped_files`` (and per kind, per subset),
        tags ``data_skipped_files`` / ``data_skipped_paths``, artifact ``data/skipped_files.tsv``."""
        metrics: dict[str, float] = {"data/skipped_files": float(len(self.skipped))}
        for kind, n in self.counts().items():
            metrics[f"data/skipped/{kind}"] = float(n)
        for subset, n in self.kept.items():
            metrics[f"data/utterances/{subset}"] = float(n)
            metrics[f"data/skipped_files/{subset}"] = float(sum(1 for s, _ in self.skipped if s == subset))
        tracker.log_metrics(run_id, metrics)
        paths = sorted({item.path for _, item in self.skipped})
        tags = {"data_root": self.root, "data_skipped_files": str(len(self.skipped))}
        if paths:
            shown = paths[:MAX_TAGGED_PATHS]
            more = f" (+{len(paths) - len(shown)} more in the data/{SKIPPED_ARTIFACT} artifact)" if len(paths) > len(shown) else ""
            tags["data_skipped_paths"] = " ".join(shown) + more
        tracker.set_tags(run_id, tags)
        if self.skipped:
            path = Path(folder) / SKIPPED_ARTIFACT
            lines = ["subset\tkind\tpath\treason"]
            lines += [f"{subset}\t{item.kind}\t{item.path}\t{_one_line(item.reason, 1000)}" for subset, item in self.skipped]
            from orchestrator.train.checkpoint import atomic_write_bytes

            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
            tracker.log_artifact(run_id, str(path), "data")


def check_data(spec) -> DataReport:
    """Build (or read) the manifest of every subset a trial reads; fail with one line if one is unusable.

    A missing local synthetic corpus is generated first (as trials would).
    """
    from orchestrator.data.errors import CorpusError
    from orchestrator.data.librispeech import load_manifest
    from orchestrator.train.data import ensure_corpus

    started = time.monotonic()
    data = spec.base_config().data
    report = DataReport(root=data.root)
    subsets: list[str] = []
    for name in (*data.pretrain_subset_list, *data.train_subsets, *data.dev_subsets, *data.test_subsets):
        if name not in subsets:
            subsets.append(name)
    try:
        ensure_corpus(data)
        for subset in subsets:
            manifest = load_manifest(data.root, subset, cache_dir=data.cache_dir)
            report.kept[subset] = len(manifest.utterances)
            report.skipped.extend((subset, item) for item in manifest.skipped)
    except CorpusError as err:
        raise _fail(spec.source, "data.root", data.root, str(err)) from None
    report.seconds = time.monotonic() - started
    if report.skipped:
        kinds = ", ".join(f"{k} {n}" for k, n in report.counts().items())
        print(f"warning: {data.root}: {len(report.skipped)} corpus file(s) skipped ({kinds}); "
              f"listed in the sweep's MLflow run (data/{SKIPPED_ARTIFACT})", flush=True)
    return report


# --------------------------------------------------------------------------------------------
# all of it
# --------------------------------------------------------------------------------------------


def check_services(spec, tracking_uri: str | None = None) -> None:
    """The S3 locations and the tracking store of ``spec`` (no corpus read)."""
    from orchestrator.data.s3 import is_s3_uri
    from orchestrator.spec import check_tracking_scheme
    from orchestrator.tracking import default_tracking_uri

    root = spec.base_config().data.root
    if is_s3_uri(root):
        check_s3(root, source=spec.source, field_name="data.root", need_objects=True, writable=False)
    if is_s3_uri(spec.storage.path):
        check_s3(spec.storage.path, source=spec.source, field_name="storage.path", need_objects=False, writable=True)
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri()
    try:  # MLFLOW_TRACKING_URI is not checked by the spec loader
        check_tracking_scheme(uri, "tracking.uri")
    except ValueError as err:
        raise PreflightError(f"{spec.source}: {err} (from tracking.uri or MLFLOW_TRACKING_URI)") from None
    check_tracking_uri(uri, source=spec.source)


# --------------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------------


def local_nodes() -> list[dict[str, float]]:
    """The resources a Ray started on this machine would have: its CPUs and CUDA GPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        import torch

        gpus = torch.cuda.device_count()
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


def ray_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the Ray cluster this process is connected to."""
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def check_resources(spec, nodes: list[dict[str, float]], where: str) -> None:
    """Fail unless one trial's worker group (and its trial driver) fits on ``nodes``.

    Each worker needs ``resources.cpus_per_worker`` CPUs and ``resources.gpus_per_worker`` GPUs on
    one node; the group needs ``resources.workers`` such places. A trial that cannot get them would
    wait forever, so the sweep stops here, before the corpus is generated.

    Raises:
        PreflightError: one line naming the spec file and the ``resources`` key that is too large.
    """
    from orchestrator.trial_driver import driver_resources

    res = spec.resources
    need = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
    keys = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"}
    for kind, amount in need.items():
        most = max((node.get(kind, 0.0) for node in nodes), default=0.0)
        if amount > most:
            raise PreflightError(f"{spec.source}: {keys[kind]}={amount:g}: no node of {where} has {amount:g} "
                                 f"{kind}s (the most on one node: {most:g}); lower it or add nodes that have them")
    driver = {k: v for k, v in driver_resources(getattr(res, "driver", None)).items() if k != "memory" and v > 0}
    for kind, amount in driver.items():
        if not any(node.get(kind, 0.0) >= amount for node in nodes):
            raise PreflightError(f"{spec.source}: resources.driver.{kind}={amount:g}: no node of {where} has it; "
                                 f"start nodes with that custom resource or drop it")
    slots = sum(int(min(node.get(k, 0.0) / v for k, v in need.items() if v > 0) + 1e-9) for node in nodes)
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    if slots < res.workers or res.workers * res.cpus_per_worker + driver.get("CPU", 0.0) > total_cpus + 1e-9:
        raise PreflightError(f"{spec.source}: resources.workers={res.workers}: {where} fits {slots} worker(s) of "
                             f"{res.cpus_per_worker:g} CPU(s) and {res.gpus_per_worker:g} GPU(s) next to a trial "
                             f"driver; lower resources.workers or the per-worker resources")


CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_ray() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into every trial's runtime env.

    Ray Tune puts ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / session tokens from the
    driver's environment into the ``runtime_env`` of each trial actor, and Ray's runtime-env agent
    writes runtime envs in plain text to the session's ``logs/runtime_env_agent.log``. Trials read
    S3 with the credentials of the node they run on instead: the environment its ``ray start`` was
    given (infra/local/stack.sh does this), an instance role, or -- with a Ray that the sweep
    starts itself -- the driver's environment, which its local Ray inherits.
    """
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without this module copies nothing
        return
    current = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if current is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = type(current)(v for v in current if v not in CREDENTIAL_ENV_VARS)


def preflight(spec, tracking_uri: str | None = None, *, nodes: Callable[[], list[dict[str, float]]] | None = None) -> DataReport:
    """Every check, cheapest first: services (seconds), resources, then the corpus (which may be
    generated); returns what the corpus check found.

    Args:
        spec: the loaded spec.
        tracking_uri: overrides ``tracking.uri``.
        nodes: gives the resources of the cluster's nodes (called after the services passed, e.g.
            connecting to ``--address``); default: this machine (:func:`local_nodes`).

    Also keeps S3 credentials out of Ray's runtime envs (and so out of Ray's logs), see
    :func:`keep_credentials_out_of_ray`.
    """
    check_services(spec, tracking_uri)
    if nodes is None:
        check_resources(spec, local_nodes(), "this machine")
    else:
        check_resources(spec, nodes(), "the Ray cluster")
    report = check_data(spec)
    keep_credentials_out_of_ray()
    return report

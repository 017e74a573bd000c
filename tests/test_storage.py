"""Sweep storage (orchestrator/storage.py): a local folder and S3 (an in-process moto server)
behind the same methods: atomic records, listing, checkpoints mirrored and pulled on another
"node" (a fresh working folder), clear errors, and the pyarrow filesystem Ray Tune gets; and no
node-local state reused unless S3 proves it belongs to this store (issue 12, scenario 1)."""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch

from orchestrator.storage import COMPLETE_MARKER, STORAGE_ID, LocalStorage, S3Storage, StorageError, open_storage
from orchestrator.train.checkpoint import list_checkpoints, load_state, save_checkpoint
from tests.conftest import free_port

_buckets = itertools.count()


@pytest.fixture
def aws_env(moto_endpoint, monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "storage-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return moto_endpoint


@pytest.fixture
def bucket(aws_env):
    from orchestrator.data.s3 import get_client

    name = f"runs-{next(_buckets)}"
    get_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "runs")
    name = request.getfixturevalue("bucket")
    return S3Storage(f"s3://{name}/sweeps-root", work_dir=tmp_path / "node-a")


def _objects(bucket: str, prefix: str = "") -> dict[str, int]:
    from orchestrator.data.s3 import get_client

    reply = get_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for o in reply.get("Contents", [])}


def _body(bucket: str, key: str) -> bytes:
    from orchestrator.data.s3 import get_client

    return get_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _purge_and_recreate(bucket: str) -> None:
    """What `stack.sh down --purge` then `up` does to a bucket: every object gone, the bucket new."""
    from orchestrator.data.s3 import get_client

    client = get_client()
    for key in _objects(bucket):
        client.delete_object(Bucket=bucket, Key=key)
    client.delete_bucket(Bucket=bucket)
    client.create_bucket(Bucket=bucket)


def _checkpoint(root, step: int, keep: int = 2):
    return save_checkpoint(root, step, {"step": step, "weights": torch.full((64,), float(step))}, keep=keep,
                           meta={"stage": "pretrain"}, write_files=lambda tmp: (tmp / "tokenizer").mkdir() or
                           (tmp / "tokenizer" / "vocab.txt").write_text(f"vocab {step}\n"))


def test_open_storage_picks_the_backend(tmp_path, bucket):
    assert isinstance(open_storage(str(tmp_path / "runs")), LocalStorage)
    s3 = open_storage(f"s3://{bucket}/some/prefix/", work_dir=tmp_path / "w")
    assert isinstance(s3, S3Storage) and s3.uri == f"s3://{bucket}/some/prefix"
    assert s3.describe("sweeps/a") == f"s3://{bucket}/some/prefix/sweeps/a"
    # The working folder is keyed by the store's identity, written once in S3 at first use.
    local = s3.local("sweeps/a/trial.json")
    keyed = local.relative_to(tmp_path / "w").parts
    assert keyed[0].startswith(f"{bucket}-") and len(keyed[0]) == len(bucket) + 17
    assert keyed[1:] == ("some", "prefix", "sweeps", "a", "trial.json")
    identity = json.loads(_body(bucket, f"some/prefix/{STORAGE_ID}"))["id"]
    assert s3.identity() == identity
    again = open_storage(f"s3://{bucket}/some/prefix", work_dir=tmp_path / "w")
    assert again.identity() == identity and again.local("sweeps/a/trial.json") == local
    other_prefix = open_storage(f"s3://{bucket}/other", work_dir=tmp_path / "w")
    assert other_prefix.identity() != identity
    with pytest.raises(StorageError, match="leaves the storage root"):
        s3.local("../x")


def test_local_storage_is_the_folder_itself(tmp_path):
    store = LocalStorage(tmp_path / "runs")
    path = store.write_json("sweeps/s1/sweep.json", {"a": 1})
    assert path == tmp_path / "runs" / "sweeps" / "s1" / "sweep.json"
    assert store.ray_storage("sweeps/s1") == (str(tmp_path / "runs" / "sweeps" / "s1"), None)
    folder = _checkpoint(store.local("t/run/pretrain/checkpoints"), 4)
    store.push_checkpoint("t/run/pretrain/checkpoints", folder)  # nothing to mirror
    assert store.pull_checkpoint("t/run/pretrain/checkpoints") == folder
    assert store.checkpoint_steps("t/run/pretrain/checkpoints") == [4]


def test_records_round_trip_and_listing(storage):
    assert storage.read_json("sweeps/s1/trials/t1/trial.json") is None
    assert not storage.exists("sweeps/s1/trials/t1/trial.json")
    assert not storage.has_prefix("sweeps/s1") and storage.list_dirs("sweeps") == []
    storage.write_json("sweeps/s1/trials/t1/trial.json", {"mlflow_run_id": "abc", "status": "running"})
    storage.write_json("sweeps/s1/trials/t1/trial.json", {"mlflow_run_id": "abc", "status": "done"})
    storage.write_bytes("sweeps/s2/spec.yaml", b"sweep: {}\n")
    assert storage.read_json("sweeps/s1/trials/t1/trial.json") == {"mlflow_run_id": "abc", "status": "done"}
    assert storage.exists("sweeps/s1/trials/t1/trial.json") and not storage.exists("sweeps/s1/trials")
    assert storage.has_prefix("sweeps/s1") and not storage.has_prefix("sweeps/s3")
    assert storage.list_dirs("sweeps") == ["s1", "s2"]
    assert storage.list_dirs("sweeps/s1/trials") == ["t1"]
    # The working copy is written too (MLflow logs artifacts from it).
    assert storage.local("sweeps/s2/spec.yaml").read_bytes() == b"sweep: {}\n"
    storage.check()


def test_s3_records_are_complete_objects(bucket, tmp_path):
    store = S3Storage(f"s3://{bucket}/p", work_dir=tmp_path / "w")
    store.write_json("sweeps/s/trials/t/trial.json", {"x": list(range(100))})
    objects = _objects(bucket)
    # One object under the exact key (and the store's identity): no temporary names left behind.
    assert sorted(objects) == [f"p/{STORAGE_ID}", "p/sweeps/s/trials/t/trial.json"]
    other = S3Storage(f"s3://{bucket}/p", work_dir=tmp_path / "other-node")
    assert other.read_json("sweeps/s/trials/t/trial.json") == {"x": list(range(100))}
    assert not other.local("sweeps/s/trials/t/trial.json").exists()  # read from S3, not a local file


def test_s3_checkpoints_are_mirrored_and_pulled_on_another_node(bucket, tmp_path):
    rel = "sweeps/s/trials/t/run/pretrain/checkpoints"
    a = S3Storage(f"s3://{bucket}/runs", work_dir=tmp_path / "node-a")
    assert a.checkpoint_steps(rel) == [] and a.pull_checkpoint(rel) is None
    for step in (2, 4, 6):
        a.push_checkpoint(rel, _checkpoint(a.local(rel), step), keep=2)
    assert a.checkpoint_steps(rel) == [4, 6]
    keys = _objects(bucket, f"runs/{rel}/")
    assert not any("step-00000002" in k for k in keys), "pruned like the local folder (keep=2)"
    assert f"runs/{rel}/step-00000006/{COMPLETE_MARKER}" in keys
    assert f"runs/{rel}/step-00000006/tokenizer/vocab.txt" in keys

    b = S3Storage(f"s3://{bucket}/runs", work_dir=tmp_path / "node-b")
    pulled = b.pull_checkpoint(rel)
    assert pulled == b.local(rel) / "step-00000006"
    assert load_state(pulled)["weights"][0].item() == 6.0
    assert (pulled / "tokenizer" / "vocab.txt").read_text() == "vocab 6\n"
    assert list_checkpoints(b.local(rel)) == [pulled]
    assert not [p for p in b.local(rel).iterdir() if p.name.startswith(".")], "no temporary folder left"
    # Already there: nothing downloaded again.
    mtime = (pulled / "state.pt").stat().st_mtime_ns
    assert b.pull_checkpoint(rel) == pulled and (pulled / "state.pt").stat().st_mtime_ns == mtime
    # A newer checkpoint on the local disk that S3 does not hold (written, never uploaded) is
    # not proven complete: it is discarded, and the stage resumes from what S3 holds.
    newer = _checkpoint(b.local(rel), 8)
    assert b.pull_checkpoint(rel) == pulled and not newer.exists()


def test_s3_upload_cut_short_is_never_picked_up(bucket, tmp_path):
    from orchestrator.data.s3 import get_client

    rel = "pretrain/k/pretrain/checkpoints"
    a = S3Storage(f"s3://{bucket}/r", work_dir=tmp_path / "a")
    a.push_checkpoint(rel, _checkpoint(a.local(rel), 2))
    # Step 4: its state.pt made it, its marker did not (the node died during the upload).
    get_client().put_object(Bucket=bucket, Key=f"r/{rel}/step-00000004/state.pt", Body=b"partial")
    b = S3Storage(f"s3://{bucket}/r", work_dir=tmp_path / "b")
    assert b.checkpoint_steps(rel) == [2]
    assert b.pull_checkpoint(rel).name == "step-00000002"
    with pytest.raises(StorageError, match="not a complete checkpoint"):
        a.push_checkpoint(rel, tmp_path / "a" / "nothing" / "step-00000009")


def test_missing_bucket_is_one_clear_error(aws_env, tmp_path):
    store = S3Storage("s3://no-such-bucket-here/runs", work_dir=tmp_path / "w")
    for call in (store.check, lambda: store.read_json("sweeps/x/sweep.json"), lambda: store.list_dirs("sweeps"),
                 lambda: store.write_json("a.json", {})):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "no-such-bucket-here" in message and "\n" not in message and "storage.path" in message, message


def test_unreachable_endpoint_fails_fast(monkeypatch, tmp_path, aws_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = S3Storage("s3://bucket/runs", work_dir=tmp_path / "w")
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach .*AWS_ENDPOINT_URL"):
        store.check()
    assert time.monotonic() - start < 30


def test_ray_storage_is_a_working_pyarrow_filesystem_without_secrets(bucket, tmp_path):
    store = S3Storage(f"s3://{bucket}/runs", work_dir=tmp_path / "w")
    path, fs = store.ray_storage("sweeps/s1")
    assert path == f"{bucket}/runs/sweeps/s1"
    with fs.open_output_stream(f"{path}/tune/probe.txt") as out:
        out.write(b"hello")
    assert store.read_bytes("sweeps/s1/tune/probe.txt") == b"hello"
    assert b"storage-test-secret" not in pickle.dumps(fs)


def test_local_checkpoint_differing_from_its_marker_is_replaced(bucket, tmp_path):
    rel = "pretrain/k/pretrain/checkpoints"
    a = S3Storage(f"s3://{bucket}/r", work_dir=tmp_path / "node")
    a.push_checkpoint(rel, _checkpoint(a.local(rel), 2))
    marker = json.loads(_body(bucket, f"r/{rel}/step-00000002/{COMPLETE_MARKER}"))
    assert marker["step"] == 2 and marker["storage_id"] == a.identity() and len(marker["sha256"]) == 64
    assert set(marker["files"]) == {"state.pt", "meta.json", "tokenizer/vocab.txt"}
    # Same step, other bytes on the node (e.g. a run that crashed before uploading a rerun of it).
    (a.local(rel) / "step-00000002" / "tokenizer" / "vocab.txt").write_text("vocab from another run\n")
    pulled = a.pull_checkpoint(rel)
    assert (pulled / "tokenizer" / "vocab.txt").read_text() == "vocab 2\n"
    # Bytes in S3 that do not match the marker are refused, not used.
    from orchestrator.data.s3 import get_client

    key = f"r/{rel}/step-00000002/meta.json"
    original = _body(bucket, key)
    assert b'"step": 2' in original
    get_client().put_object(Bucket=bucket, Key=key, Body=original.replace(b'"step": 2', b'"step": 3'))  # same size
    b = S3Storage(f"s3://{bucket}/r", work_dir=tmp_path / "other-node")
    with pytest.raises(StorageError, match="does not match its completion marker"):
        b.pull_checkpoint(rel)
    assert b.local(rel).is_dir() and list_checkpoints(b.local(rel)) == []


def test_purged_store_gets_a_new_identity_and_no_local_checkpoint(bucket, tmp_path):
    rel = "pretrain/k/pretrain/checkpoints"
    first = S3Storage(f"s3://{bucket}/stack", work_dir=tmp_path / "node")
    for step in (2, 4):
        first.push_checkpoint(rel, _checkpoint(first.local(rel), step))
    old_folder = first.local(rel)
    _purge_and_recreate(bucket)
    second = S3Storage(f"s3://{bucket}/stack", work_dir=tmp_path / "node")
    assert second.identity() != first.identity()
    assert second.local(rel) != old_folder and list_checkpoints(old_folder)  # the old copy is still on the node
    assert second.pull_checkpoint(rel) is None
    # Even a copy sitting at the new store's own path (an older layout, a hand copy) is not taken.
    shutil.copytree(old_folder, second.local(rel))
    assert second.pull_checkpoint(rel) is None and list_checkpoints(second.local(rel)) == []


def test_purged_store_pretrains_from_step_zero(bucket, tmp_path, small_corpus):
    """Issue 12 scenario 1 with the real pre-training loop: run, purge and recreate the bucket, run again."""
    from orchestrator.train.config import run_config_from_dict
    from orchestrator.train.pretrain import pretrain
    from tests.conftest import micro_run_dict

    folder = "pretrain/k"  # what the trial driver uses: pretrain/<key>, the key unchanged
    checkpoints = f"{folder}/pretrain/checkpoints"

    def run(store: S3Storage) -> tuple[dict, list[int]]:
        # As the Train worker does: pull before the stage, publish every checkpoint.
        store.pull_checkpoint(checkpoints)
        config = run_config_from_dict(micro_run_dict(small_corpus, store.local(folder), tmp_path / "cache"))
        steps: list[int] = []

        def report(metrics, checkpoint_dir) -> None:
            steps.append(int(metrics["step"]))
            if checkpoint_dir is not None:
                store.push_checkpoint(checkpoints, Path(checkpoint_dir), keep=2)

        return pretrain(config, report=report), steps

    uri = f"s3://{bucket}/stack"
    first = S3Storage(uri, work_dir=tmp_path / "node")
    result, steps = run(first)
    assert result["step"] == 4 and steps[0] == 1
    first.write_json(f"{folder}/pretrain.done.json", {"key": "k"})
    stale = first.local(checkpoints)

    _purge_and_recreate(bucket)
    second = S3Storage(uri, work_dir=tmp_path / "node")
    assert not second.exists(f"{folder}/pretrain.done.json")
    assert list_checkpoints(stale), "the previous store's checkpoints are still on this node"
    result, steps = run(second)
    assert steps[0] == 1 and result["step"] == 4, "pre-training started again from step 0"
    assert second.checkpoint_steps(checkpoints) == [2, 4], "and its checkpoints are in the new store"


def test_nodes_starting_at_once_agree_on_the_store_identity(bucket, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    stores = [S3Storage(f"s3://{bucket}/race", work_dir=tmp_path / f"node-{i}") for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        identities = set(pool.map(lambda s: s.identity(), stores))
    assert len(identities) == 1  # a conditional PUT: the first writer's id, read back by everyone


def test_unreadable_identity_record_is_one_clear_error(bucket, tmp_path):
    from orchestrator.data.s3 import get_client

    get_client().put_object(Bucket=bucket, Key=f"bad/{STORAGE_ID}", Body=b"\x00 not json")
    with pytest.raises(StorageError, match=f"{STORAGE_ID} is not a storage identity record: delete it"):
        S3Storage(f"s3://{bucket}/bad", work_dir=tmp_path / "w").local("x")

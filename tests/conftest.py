"""Shared fixtures: a small generated corpus (made once per test session) and a tiny run config."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Before torch loads OpenMP: sleep instead of spinning while waiting for work, so tests on a CPU
# shared with other jobs do not burn several times their useful CPU time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests share the machine with other jobs: two threads each is plenty for the tiny models here.
torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL_CORPUS_SIZES = {"train-clean-100": 40, "dev-clean": 8, "test-clean": 8}


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A generated LibriSpeech-layout corpus: 40 train, 8 dev-clean, 8 test-clean utterances (seed 0)."""
    from orchestrator.data.synth import generate_corpus

    root = tmp_path_factory.mktemp("corpus") / "synth"
    generate_corpus(root, seed=0, sizes=SMALL_CORPUS_SIZES, workers=2)
    return root


def micro_run_dict(corpus: Path, out: Path, cache: Path, **sections) -> dict:
    """A run config dict for a very small model (1 layer, d 32) on ``corpus``: seconds per stage."""
    base = {
        "preset": "cpu",
        "model": {
            "preset": "tiny",
            "model_dim": 32,
            "encoder": {"num_layers": 1, "ffn_dim": 64, "conv_kernel": 7},
            "frontend": {"conv_channels": [8, 8]},
            "best_rq": {"codebook_size": 64},
            "ctc": {"hidden_dim": 32, "num_hidden_layers": 1},
        },
        "data": {
            "root": str(corpus),
            "generate": False,
            "cache_dir": str(cache),
            "dev_subsets": ["dev-clean"],
            "test_subsets": ["test-clean"],
            "stats_utterances": 10,
        },
        "pretrain": {"steps": 4, "warmup_steps": 2, "max_batch_seconds": 12.0, "log_every": 1, "checkpoint_every": 2},
        "finetune": {
            "steps": 4, "warmup_steps": 2, "max_batch_seconds": 12.0, "log_every": 1, "checkpoint_every": 2,
            "eval_every": 2,
        },
        "eval": {"decoder": "greedy", "lexicon_from_train": False, "lm_from_train": False, "bootstrap_samples": 20,
                 "max_batch_seconds": 30.0},
        "output_dir": str(out),
        "device": "cpu",
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return base


# -- an in-process S3 (moto server) on 127.0.0.1 -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()

"""Smoke tests of the benchmark scripts: each ``--quick`` mode runs and prints the JSON it promises.

No timing is asserted (timings belong in the benchmarks' JSON, not in tests). The scripts run
concurrently as subprocesses, exactly as a user runs them, each writing its files under a
temporary directory; the memory-measurement helpers are checked against allocations of known size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "mixer_profile": ["mixer_profile.py", "--quick", "--out-dir", str(tmp / "mixer")],
        "encoder_profile": ["mixer_profile.py", "--quick", "--encoder", "--out-dir", str(tmp / "encoder")],
        "pom_roofline": ["pom_roofline.py", "--quick", "--out", str(tmp / "roofline.json")],
        "vs_torchaudio": ["vs_torchaudio.py", "--quick", "--out", str(tmp / "vs_torchaudio.json")],
        "learning": ["learning.py", "--quick", "--threads", "1", "--out", str(tmp / "learning")],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Run every ``--quick`` command at once; name -> (parsed stdout JSON, output dir)."""
    tmp = tmp_path_factory.mktemp("bench")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / cmd[0]), *cmd[1:]],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in commands(tmp).items()
    }
    outputs: dict[str, tuple[dict, Path]] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
        outputs[name] = (json.loads(stdout), tmp)
    return outputs


def test_mixer_profile_quick(runs) -> None:
    payload, tmp = runs["mixer_profile"]
    assert payload["benchmark"] == "mixer_profile"
    assert payload["failures"] == []
    seen = {(r["mixer"], r["pass"]) for r in payload["results"]}
    assert seen == {(m, p) for m in ("mha_relpos", "pom") for p in ("fwd", "fwdbwd")}
    for record in payload["results"]:
        for key in ("frames", "seconds", "batch", "time_s", "time_rel", "ref_time_s", "repeats",
                    "peak_alloc_bytes", "peak_rss_bytes", "baseline_bytes", "peak_total_bytes", "threads"):
            assert key in record, key
        assert record["frames"] == 25  # 1 s of 40 ms frames
        assert record["time_s"] > 0 and record["time_rel"] > 0
        assert record["peak_alloc_bytes"] > 0
        assert record["peak_total_bytes"] == record["peak_alloc_bytes"] + record["baseline_bytes"]
    for pass_ in ("fwd", "fwdbwd"):
        ratios = payload["summary"][pass_]["1"]["mha_relpos"]
        assert set(ratios) == {
            "memory_total_vs_pom", "memory_peak_vs_pom", "memory_rss_vs_pom", "time_vs_pom", "time_s_vs_pom"
        }
    assert Path(payload["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(payload["json_path"]).read_text())["results"] == payload["results"]


def test_encoder_profile_quick(runs) -> None:
    payload, _ = runs["encoder_profile"]
    assert payload["benchmark"] == "encoder_profile"
    assert payload["failures"] == []
    assert {r["plan"] for r in payload["results"]} == {"mha_relpos", "pom"}
    for record in payload["results"]:
        assert record["pass"] == "fwd" and record["preset"] == "tiny"
        assert record["scope"] == "frontend+encoder" and record["fbank_frames"] == 4 * record["frames"]
        assert record["parameters"] > 0 and record["peak_alloc_bytes"] > 0
    assert "memory_total_vs_pom" in payload["summary"]["fwd"]["1"]["mha_relpos"]


def test_pom_roofline_quick(runs) -> None:
    payload, _ = runs["pom_roofline"]
    assert payload["benchmark"] == "pom_roofline"
    assert [r["frames"] for r in payload["results"]] == [64, 128]
    for row in payload["results"]:
        assert {"matmuls_s", "pom_s", "ratio", "repeats", "variants"} <= set(row)
        assert row["ratio"]["median"] > 0
        assert set(row["variants"]) == {"fused", "state_mm", "state_mm+fold", "inplace", "chunked"}
    assert set(payload["target"]) == {"ratio_max", "from_frames", "worst_ratio", "met"}
    assert payload["target"]["worst_ratio"] is None  # quick lengths are all below 2000
    assert max(max(d.values()) for d in payload["prototype_check_max_abs_diff"].values()) < 1e-4
    assert payload["profile"]["ops"]


def test_vs_torchaudio_quick(runs) -> None:
    payload, _ = runs["vs_torchaudio"]
    assert payload["benchmark"] == "vs_torchaudio"
    assert payload["size"]["num_layers"] == 4 and payload["size"]["model_dim"] == 128
    assert payload["parameters"]["ours"] > 0 and payload["parameters"]["torchaudio"] > 0
    for pass_ in ("fwdbwd", "fwd"):
        assert {"ours_s", "torchaudio_s", "ratio"} <= set(payload["results"][pass_])
    assert set(payload["target"]) == {"ratio_max", "ratio", "met", "slower_by"}


def test_learning_quick(runs) -> None:
    payload, tmp = runs["learning"]
    assert payload["pretrain_steps"] == 4 and payload["finetune_steps"] == 4
    assert (tmp / "learning" / "corpus" / "corpus.json").is_file()  # its own small corpus, not data/synth
    for key in ("dev_wer", "dev_wer_lexicon", "random_init_dev_wer", "wall_seconds", "parameters"):
        assert payload[key] >= 0, key


def test_cpu_alloc_peak_sees_a_known_allocation() -> None:
    from benchmarks.common import measure_peak_memory

    nbytes = 8 * 2**20

    def call() -> None:
        a = torch.ones(nbytes // 4)  # 8 MiB live ...
        b = a * 2  # ... then 16 MiB at the peak
        del a, b

    memory = measure_peak_memory(call, torch.device("cpu"))
    assert 2 * nbytes <= memory["peak_alloc_bytes"] < 2 * nbytes + 2**20
    if memory["peak_rss_bytes"] is not None:  # Linux: the kernel's high-water mark agrees
        assert memory["peak_rss_bytes"] >= 1.5 * nbytes

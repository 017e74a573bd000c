"""The one list of the metrics a trial reports to Ray Tune (and logs to its MLflow run).

A sweep's ``sweep.objective`` and ``sweep.extra_objectives`` must name one of
:data:`OBJECTIVE_METRICS`; the spec loader refuses anything else before Ray starts. The names are
the keys of the trial's final report (``orchestrator/worker.py`` and
``orchestrator/trial_driver.py``) and the columns of the sweep report (``orchestrator/report.py``);
``dev_wer``/``dev_cer`` are also in every intermediate report (the ASHA rungs).
"""

from __future__ import annotations

TRIAL_METRICS: dict[str, str] = {
    "dev_wer": "greedy word error rate on the dev subsets at the last fine-tuning evaluation",
    "dev_cer": "greedy character error rate on the dev subsets at the last fine-tuning evaluation",
    "test_wer": "word error rate of the final decoding on the first test subset",
    "test_cer": "character error rate of the final decoding on the first test subset",
    "encoder_peak_mem_mb": "peak memory of the encoder's forward pass at the longest profile length (profile.enabled)",
    "encoder_time_s": "forward time of the encoder at the longest profile length (profile.enabled)",
    "params": "parameters of the BEST-RQ model (front-end, encoder and heads)",
    "wall_time_s": "seconds from the trial's start to its end, waiting for a shared pre-training excluded",
}
"""Metric name -> what it measures, for every metric a sweep can optimise."""

OBJECTIVE_METRICS: tuple[str, ...] = tuple(TRIAL_METRICS)
"""The names ``sweep.objective`` and ``sweep.extra_objectives`` may use."""

PROFILE_METRICS: tuple[str, ...] = ("encoder_peak_mem_mb", "encoder_time_s")
"""Objectives that only exist when the trial profiles its encoder (``profile.enabled: true``)."""

RUNG_METRICS: tuple[str, ...] = ("dev_wer", "dev_cer")
"""Objectives every intermediate report carries (what ASHA can stop trials on)."""

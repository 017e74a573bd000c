"""Run presets: named starting points for a run file's (or sweep spec's) top-level ``preset:``.

Two levels of presets, with different names so no name means two things:

* **model presets** (``tiny``, ``base``, ``large``; :data:`models.config.PRESETS`) size the
  encoder; a ``model:`` section picks one with ``model.preset``;
* **run presets** (``default``, ``cpu``, ``demo``, ``paper``; :data:`RUN_PRESETS`, here) give a
  whole run -- the model section (naming its model preset), data, both training stages and the
  evaluation. A run file's own keys are merged onto its run preset's (:func:`run_preset_dict`).

Which run preset uses which model preset: ``default``, ``cpu`` and ``demo`` -> ``tiny``;
``paper`` -> ``base``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.config import PRESETS as MODEL_PRESETS
from models.typed_config import ConfigError, deep_merge, where


def _default_run() -> dict[str, Any]:
    """The section defaults of :class:`~orchestrator.train.config.RunConfig` with the ``tiny`` model."""
    return {"model": {"preset": "tiny"}}


def _cpu_run() -> dict[str, Any]:
    """The tiny CPU learning setting (see benchmarks/learning.py for what it reaches).

    The ``tiny`` encoder (4 x d128 relative-position MHA) with two changes that make a step about
    40 % cheaper on a CPU and that short runs do not miss: no front-end dropout and front-end
    channels (32, 16) instead of (64, 16) (dropout on the large front-end activations was a
    quarter of the step time). No encoder dropout and no augmentation: a few epochs of a few
    hours of audio underfit, they do not overfit. Fine-tuning learning rates are higher than the
    paper's (3e-3 head, 1e-3 encoder, against 3e-4 and 5e-5 for 200k-step runs at 95M).
    """
    return {
        "model": {
            "preset": "tiny",
            "frontend": {"dropout_p": 0.0, "conv_channels": [32, 16]},
            "encoder": {"dropout_p": 0.0},
        },
        "data": {"stats_utterances": 100},
        "pretrain": {
            "steps": 600, "lr": 2e-3, "warmup_steps": 100, "max_batch_seconds": 60.0,
            "log_every": 20, "checkpoint_every": 200,
        },
        "finetune": {
            "steps": 800, "head_lr": 3e-3, "encoder_lr": 1e-3, "warmup_steps": 50, "max_batch_seconds": 30.0,
            "log_every": 20, "checkpoint_every": 400, "eval_every": 400,
            "augment": {"speed_factors": [1.0], "num_freq_masks": 0, "num_time_masks": 0},
        },
        # Greedy character output of a model this small misspells most words; a lexicon of the
        # training words (several hundred) turns that into whole words (dev WER 0.71 -> 0.28).
        # The test subsets are also decoded with a word 3-gram LM of the training transcripts;
        # alpha 0.5 (ln) and beta 1.0 picked on dev-clean (lexicon beam 32, dev WER 0.316 -> 0.258).
        "eval": {
            "beam_size": 32, "lexicon_from_train": True, "lm_from_train": True, "lm_order": 3,
            "lm_weight": 0.5, "lm_score_base": "ln", "word_score": 1.0, "bootstrap_samples": 200,
        },
        "output_dir": "runs/cpu",
    }


def _demo_run() -> dict[str, Any]:
    """The embedded sweep setting (the shipped search spaces default to it): the ``cpu`` recipe
    with budgets that fit four trials, two at a time, into the 15 minutes of a 2-core machine.

    200 BEST-RQ steps of 45 s batches + 600 CTC steps of 30 s batches. Measured on the hybrid
    grid with ``benchmarks/sweep_demo.py`` (README, "Sweeps"; greedy dev CER): 14.4 min wall,
    every cell 0.38 to 0.45; 300 steps of 60 s + 800 CTC steps reached 0.32 to 0.35 but took
    18.6 min; 60 + 100 steps left every trial on the blank plateau (CER 1.0). Dev is scored
    greedily every 200 steps (the objective and the best-dev checkpoint); test with the lexicon
    beam and the 3-gram LM of the training transcripts, as in ``cpu``.
    """
    run = _cpu_run()
    run["pretrain"].update({"steps": 200, "max_batch_seconds": 45.0, "checkpoint_every": 100, "log_every": 20})
    run["finetune"].update({"steps": 600, "eval_every": 200, "checkpoint_every": 200, "log_every": 20})
    run["output_dir"] = "runs/demo"
    return run


def _paper_run() -> dict[str, Any]:
    """The paper's base setting (GPU cluster, LibriSpeech; give ``data.root``).

    The encoder is the model preset ``base``, the released one (``models.config``): SpeechBrain
    fbank and front-end LayerNorm, dropout after the front-end's Linear, xavier-normal init, no
    dropout on the mixer output, SpeechBrain's RelPosMHAXL on every ``mha_relpos`` layer and the
    PoM mean over all frames (each one ``--set`` away, e.g. ``model.plan_options.pad_mean=masked``).

    BEST-RQ on LibriSpeech 960 h for 200k steps (AdamW 1e-3, betas (0.9, 0.98), eps 1e-9, weight
    decay 0.1, Noam warm-up 25k, clip 10, fp16 autocast with a GradScaler: the paper's; ``bf16``
    is one ``--set`` away), about 5600 s of audio per step (here: ``max_batch_seconds`` per worker
    x workers x ``accum_steps``; 8 workers x 700 s).

    CTC fine-tuning, the released recipe: 30 epochs over train-clean-100; AdamW head 3e-4 /
    encoder 5e-5, weight decay 1e-3, no warm-up, NewBob on the dev loss (threshold 0.0025,
    patience 0, x0.5 head, x0.7 encoder) evaluated after each epoch; fp16; on the waves, in
    sequence, speed {95, 100, 105} %, DropFreq (1-3 bands of width 0.05), DropChunk (1-5 chunks
    of 1000-2000 samples), the clean batch concatenated (effective batch x2), no SpecAugment;
    the checkpoint with the best greedy dev-clean WER is tested. Batches: the paper has 6
    utterances per GPU sorted by length; here dynamic batches of at most 80 s of audio per
    worker (about 6 utterances of train-clean-100's 12.7 s mean, fewer long ones, more short
    ones), shuffled by length bucket. Utterances of 2 s to 60 s.
    """
    return {
        "model": {"preset": "base"},
        "data": {
            "generate": False,
            "pretrain_subsets": ["train-clean-100", "train-clean-360", "train-other-500"],
            "train_subsets": ["train-clean-100"],
            "dev_subsets": ["dev-clean"],
            "test_subsets": ["test-clean", "test-other"],
            "min_duration": 2.0, "max_duration": 60.0, "stats_utterances": 2000, "num_workers": 4,
        },
        "pretrain": {
            "steps": 200_000, "lr": 1e-3, "warmup_steps": 25_000, "max_batch_seconds": 700.0,
            "clip_norm": 10.0, "precision": "fp16", "log_every": 100, "checkpoint_every": 2000,
        },
        "finetune": {
            "epochs": 30, "steps": None, "head_lr": 3e-4, "encoder_lr": 5e-5, "weight_decay": 1e-3,
            "schedule": "newbob", "warmup_steps": 0, "newbob_head_factor": 0.5, "newbob_encoder_factor": 0.7,
            "newbob_threshold": 0.0025, "newbob_patience": 0,
            "max_batch_seconds": 80.0, "precision": "fp16", "log_every": 100, "checkpoint_every": 2000,
            "eval_every": "epoch",
            "augment": {
                "speed_factors": [0.95, 1.0, 1.05], "drop_freq_bands": [1, 3], "drop_freq_width": 0.05,
                "drop_chunk_count": [1, 5], "drop_chunk_length": [1000, 2000], "concat_clean": True,
                "num_freq_masks": 0, "num_time_masks": 0,
            },
        },
        # Test as released: CTC beam search, beam 200, beam_prune_logp -10, token_prune_min_logp
        # -5; "+LM" with the LibriSpeech 4-gram ARPA (user-supplied: eval.lm_path), alpha 0.8 on
        # natural-log LM scores, beta 1.2. flashlight decodes a word LM over a lexicon, spelled
        # here from the LM's words; the decoding without LM stays lexicon-free, as the paper's.
        "eval": {
            "decoder": "beam", "beam_size": 200, "beam_threshold": 10.0, "token_prune_min_logp": -5.0,
            "lm_weight": 0.8, "lm_score_base": "ln", "word_score": 1.2, "lexicon_from_lm": True,
            "lexicon_without_lm": False, "bootstrap_samples": 1000,
        },
        "output_dir": "runs/paper",
    }


RUN_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": _default_run,
    "cpu": _cpu_run,
    "demo": _demo_run,
    "paper": _paper_run,
}
"""Run presets by name; each returns a fresh dict of run-file sections."""


def run_preset_dict(data: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``data`` (a run file's sections, maybe with ``preset``) merged onto its run preset's.

    The merge is deep everywhere, the ``model:`` section included: ``model: {encoder: {dropout_p:
    0.2}}`` changes one field of the preset's model and keeps its size.

    Raises:
        ConfigError: ``preset`` is not a run preset (a model preset name says where it belongs).
    """
    data = dict(data)
    name = data.pop("preset", "default")
    if name not in RUN_PRESETS:
        hint = f" ({name!r} is a model preset: set model.preset)" if name in MODEL_PRESETS else ""
        raise ConfigError(f"{where(source, 'preset')}: {name!r} is not a run preset{hint}; "
                          f"allowed values: {', '.join(RUN_PRESETS)}")
    return deep_merge(RUN_PRESETS[name](), data)

"""Test evaluation of a fine-tuned model: beam search (or greedy), WER/CER per subset, bootstrap CI.

    evaluate_run(config, report=...)
      -> the fine-tuning checkpoint with the best greedy dev WER (``checkpoints/best.json``; the
         newest without one) or ``checkpoint=``: model config, weights, tokenizer
      -> per test subset: this rank's share decoded with torchaudio's CTC beam search
         (lexicon-free, or constrained to a lexicon, e.g. the training words; optional KenLM
         n-gram), hypotheses gathered from all ranks
      -> WER, CER and a 95% bootstrap interval of WER per subset (resampling utterances)
      -> ``<output_dir>/eval/results.json`` and ``<subset>.tsv`` (id, reference, hypothesis)

Reported metrics: ``<subset>/wer``, ``<subset>/cer``, ``<subset>/wer_ci_low``,
``<subset>/wer_ci_high``, ``<subset>/utterances``, ``<subset>/words``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from models.config import config_from_dict
from models.ctc import CTCModel
from orchestrator.data.tokenizers import load_tokenizer
from orchestrator.train.checkpoint import atomic_write_bytes, checkpoint_to_test, load_state
from orchestrator.train.config import RunConfig
from orchestrator.train.data import ensure_corpus, load_utterances
from orchestrator.train.decoding import BeamSearchDecoder, Scores, bootstrap_wer_ci, write_lexicon
from orchestrator.train.finetune import TOKENIZER_DIR, eval_loaders, evaluate
from orchestrator.train.loop import write_json
from orchestrator.train.runtime import Report, Runtime, all_gather_objects, barrier, log

STAGE = "eval"


def load_finetuned(checkpoint: Path, runtime: Runtime) -> tuple[CTCModel, Any, dict]:
    """A fine-tuned ``CTCModel`` (eval mode), its tokenizer and the checkpoint's meta, from one folder."""
    state = load_state(checkpoint, map_location=runtime.device)
    if state.get("stage") != "finetune":
        raise ValueError(f"{checkpoint} is a {state.get('stage')!r} checkpoint; evaluation needs a fine-tuning one")
    model = CTCModel(config_from_dict(state["model_config"], source=str(checkpoint / "state.pt"))).to(runtime.device)
    model.load_state_dict(state["model"])
    model.eval()
    tokenizer = load_tokenizer(checkpoint / TOKENIZER_DIR)
    return model, tokenizer, {**state.get("meta", {}), "step": int(state["step"])}


def make_decoder(config: RunConfig, tokenizer, runtime: Runtime | None = None):
    """The test decoder of ``config.eval``: ``None`` for greedy, else a :class:`BeamSearchDecoder`."""
    ec = config.eval
    if ec.decoder == "greedy":
        return None
    for name in ("lm_path", "lexicon_path"):
        path = getattr(ec, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"eval.{name}: {path} does not exist")
    lexicon = ec.lexicon_path
    if ec.lexicon_from_train:
        lexicon = str(Path(config.output_dir) / STAGE / "lexicon.txt")
        if runtime is None or runtime.is_main:
            Path(lexicon).parent.mkdir(parents=True, exist_ok=True)
            texts = [u.text for u in load_utterances(config.data, config.data.train_subsets)]
            count = write_lexicon(texts, tokenizer, lexicon)
            log.info("lexicon of %d training words -> %s", count, lexicon)
        barrier()
    return BeamSearchDecoder(
        tokenizer,
        beam_size=ec.beam_size,
        beam_threshold=ec.beam_threshold,
        lm_path=ec.lm_path,
        lexicon_path=lexicon,
        lm_weight=ec.lm_weight,
        word_score=ec.word_score,
    )


def evaluate_run(
    config: RunConfig,
    *,
    report: Report | None = None,
    checkpoint: str | Path | None = None,
    subsets: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Evaluate the run's fine-tuned model on the test subsets.

    Args:
        config: the run configuration (``eval`` settings, ``data`` subsets, ``output_dir``).
        report: ``report(metrics, None)`` on every rank once all subsets are scored.
        checkpoint: a fine-tuning checkpoint folder; default this run's best dev WER one.
        subsets: subsets to evaluate; default ``config.data.test_subsets``.

    Returns:
        ``{"checkpoint", "decoder", "subsets": {name: {"wer", "cer", "wer_ci_low", "wer_ci_high",
        "utterances", "words", "seconds"}}}``, also written to ``<output_dir>/eval/results.json``.
    """
    ec = config.eval
    runtime = Runtime.create(config.device, "fp32" if config.finetune.precision == "auto" else config.finetune.precision)
    if checkpoint is None:
        folder = Path(config.output_dir) / "finetune" / "checkpoints"
        found = checkpoint_to_test(folder)
        if found is None:
            raise ValueError(f"no fine-tuning checkpoint in {folder}: run `python -m orchestrator.run finetune` first")
        checkpoint = found
    checkpoint = Path(checkpoint)
    model, tokenizer, meta = load_finetuned(checkpoint, runtime)
    ensure_corpus(config.data)
    decoder = make_decoder(config, tokenizer, runtime)
    subsets = tuple(subsets or config.data.test_subsets)
    loaders = eval_loaders(config, subsets, tokenizer, runtime, ec.max_batch_seconds)

    results: dict[str, Any] = {}
    metrics: dict[str, Any] = {"stage": STAGE, "step": meta["step"]}
    out_dir = Path(config.output_dir) / STAGE
    for subset, loader in loaders.items():
        start = time.perf_counter()
        _, scores = evaluate(model, loader, tokenizer, runtime, decode=decoder)
        total = Scores.empty()
        for part in all_gather_objects(scores):
            total.extend(part)
        low, high = bootstrap_wer_ci(total.word_errors, total.words, samples=ec.bootstrap_samples, seed=ec.seed)
        results[subset] = {
            "wer": total.wer,
            "cer": total.cer,
            "wer_ci_low": low,
            "wer_ci_high": high,
            "utterances": len(total.ids),
            "words": sum(total.words),
            "seconds": time.perf_counter() - start,
        }
        for key in ("wer", "cer", "wer_ci_low", "wer_ci_high", "utterances", "words"):
            metrics[f"{subset}/{key}"] = results[subset][key]
        log.info(
            "%s: WER %.4f [%.4f, %.4f] CER %.4f on %d utterances (%s)",
            subset, total.wer, low, high, total.cer, len(total.ids), ec.decoder,
        )
        if runtime.is_main:
            _write_hypotheses(out_dir / f"{subset}.tsv", total)
    summary = {
        "checkpoint": str(checkpoint),
        "decoder": ec.decoder,
        "beam_size": ec.beam_size if ec.decoder == "beam" else None,
        "lm_path": ec.lm_path,
        "lexicon": ec.lexicon_path or ("train" if ec.lexicon_from_train else None),
        "bootstrap_samples": ec.bootstrap_samples,
        "subsets": results,
    }
    if runtime.is_main:
        write_json(out_dir / "results.json", summary)
    if report is not None:
        report(metrics, None)
    return summary


def _write_hypotheses(path: Path, scores: Scores) -> None:
    lines = ["id\tword_errors\twords\treference\thypothesis"]
    rows = zip(scores.ids, scores.word_errors, scores.words, scores.references, scores.hypotheses)
    for uid, errors, words, ref, hyp in sorted(rows):
        lines.append(f"{uid}\t{errors}\t{words}\t{ref}\t{hyp}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

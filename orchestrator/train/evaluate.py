"""Test evaluation of a fine-tuned model: beam search (or greedy), WER/CER per subset, bootstrap CI.

    evaluate_run(config, report=...)
      -> the fine-tuning checkpoint with the best greedy dev WER (``checkpoints/best.json``; the
         newest without one) or ``checkpoint=``: model config, weights, tokenizer
      -> the word n-gram LM: ``eval.lm_path`` (user-supplied, e.g. LibriSpeech's 4-gram) or, with
         ``eval.lm_from_train``, one estimated from the TRAINING transcripts only
         (``orchestrator.data.ngram``, written to ``<output_dir>/eval/lm.arpa``)
      -> per test subset: this rank's share through the model once, its emissions decoded twice
         with torchaudio's CTC beam search, without and with the LM (same beam and pruning;
         lexicon-free or constrained to a lexicon, e.g. the training words), hypotheses gathered
      -> WER, CER and a 95% bootstrap interval of WER per subset and decoding
      -> ``<output_dir>/eval/results.json``, ``<subset>.tsv`` and ``<subset>.lm.tsv``
         (id, errors, words, reference, hypothesis)

Reported metrics per subset: ``<subset>/wer``, ``<subset>/cer``, ``<subset>/wer_ci_low``,
``<subset>/wer_ci_high`` (the decoding without LM), ``<subset>/utterances``, ``<subset>/words``,
and with an LM ``<subset>/wer_lm``, ``<subset>/cer_lm``, ``<subset>/wer_lm_ci_low``,
``<subset>/wer_lm_ci_high`` and the LM's gain ``<subset>/wer_lm_gain`` (``wer - wer_lm``) with the
95% interval of a paired bootstrap over the same utterances (``wer_lm_gain_ci_low/high``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from models.config import config_from_dict
from models.ctc import CTCModel
from orchestrator.errors import StageError
from orchestrator.stats import paired_bootstrap
from orchestrator.train.checkpoint import atomic_write_bytes, checkpoint_to_test, load_state
from orchestrator.train.config import RunConfig
from orchestrator.train.data import ensure_corpus, load_utterances
from orchestrator.data.ngram import arpa_vocabulary, build_arpa
from orchestrator.train.decoding import BeamSearchDecoder, Scores, bootstrap_wer_ci, score, write_lexicon
from orchestrator.train.finetune import eval_loaders, evaluate, load_saved_tokenizer
from orchestrator.train.loop import write_json
from orchestrator.train.runtime import Report, Runtime, all_gather_objects, log

STAGE = "eval"


def load_finetuned(checkpoint: Path, runtime: Runtime) -> tuple[CTCModel, Any, dict]:
    """A fine-tuned ``CTCModel`` (eval mode), its tokenizer and the checkpoint's meta, from one folder."""
    state = load_state(checkpoint, map_location=runtime.device)
    if state.get("stage") != "finetune":
        raise StageError(f"{checkpoint} is a {state.get('stage')!r} checkpoint; evaluation needs a fine-tuning one")
    model = CTCModel(config_from_dict(state["model_config"], source=str(checkpoint / "state.pt"))).to(runtime.device)
    model.load_state_dict(state["model"])
    model.eval()
    tokenizer = load_saved_tokenizer(checkpoint)
    return model, tokenizer, {**state.get("meta", {}), "step": int(state["step"])}


def _train_texts(config: RunConfig) -> list[str]:
    return [u.text for u in load_utterances(config.data, config.data.train_subsets)]


def prepare_language_files(config: RunConfig, tokenizer, runtime: Runtime | None = None) -> dict[str, Any]:
    """The lexicon and LM files of ``config.eval``, building those made from the training text.

    Returns:
        ``{"lexicon": path or None, "lm": path or None, "lm_stats": {...}, "lexicon_source":
        lexicon_path | "train" | "lm" | None}``; the files made here are written by the main rank into
        ``<output_dir>/eval/``.
    """
    ec = config.eval
    for name in ("lm_path", "lexicon_path"):
        path = getattr(ec, name)
        if path is not None and not Path(path).is_file():
            raise StageError(f"eval.{name}: {path} does not exist")
    from_lm = ec.lexicon_from_lm and (ec.lm_path is not None or ec.lm_from_train)
    source = ec.lexicon_path or ("train" if ec.lexicon_from_train else "lm" if from_lm else None)
    out = {"lexicon": ec.lexicon_path, "lm": ec.lm_path, "lm_stats": {}, "lexicon_source": source}
    if not (ec.lexicon_from_train or ec.lm_from_train or from_lm):
        return out
    folder = Path(config.output_dir) / STAGE
    if ec.lexicon_from_train or from_lm:
        out["lexicon"] = str(folder / "lexicon.txt")
    if ec.lm_from_train:
        out["lm"] = str(folder / "lm.arpa")
    result: tuple[str | None, dict] = (None, {})
    if runtime is None or runtime.is_main:
        try:
            result = (None, _write_language_files(config, tokenizer, out, from_lm))
        except (ValueError, OSError) as error:  # every rank raises it, none waits for the others
            result = (str(error), {})
    error, out["lm_stats"] = all_gather_objects(result)[0]
    if error is not None:
        raise StageError(error)
    return out


def _write_language_files(config: RunConfig, tokenizer, out: dict[str, Any], from_lm: bool) -> dict[str, Any]:
    """Write the lexicon and LM files named in ``out``; the LM's statistics (empty without one)."""
    ec = config.eval
    Path(config.output_dir, STAGE).mkdir(parents=True, exist_ok=True)
    texts = _train_texts(config) if ec.lexicon_from_train or ec.lm_from_train else []
    stats: dict[str, Any] = {}
    if ec.lexicon_from_train:
        count = write_lexicon(texts, tokenizer, out["lexicon"])
        log.info("lexicon of %d training words -> %s", count, out["lexicon"])
    if ec.lm_from_train:
        held_out = [u.text for u in load_utterances(
            config.data, (*config.data.dev_subsets, *config.data.test_subsets), filter_durations=False)]
        stats = build_arpa(texts, out["lm"], order=ec.lm_order, held_out=held_out)
        log.info(
            "%d-gram LM of %d training sentences (%d words) -> %s; %d of %d dev/test sentences also in "
            "training, dev/test OOV rate %.4f",
            ec.lm_order, stats["sentences"], stats["vocabulary"], out["lm"],
            stats["held_out_in_train"], stats["held_out_sentences"], stats["held_out_oov_rate"],
        )
    if from_lm:
        try:
            words = arpa_vocabulary(out["lm"])
        except ValueError as error:
            raise StageError(f"eval.lexicon_from_lm: {error}; give eval.lexicon_path instead") from None
        count = write_lexicon(words, tokenizer, out["lexicon"])
        log.info("lexicon of the LM's %d words -> %s", count, out["lexicon"])
    return stats


def make_decoders(config: RunConfig, tokenizer, runtime: Runtime | None = None):
    """The test decoders of ``config.eval``: ``(without_lm, with_lm, files)``.

    ``without_lm`` is ``None`` for greedy decoding; ``with_lm`` is ``None`` without an LM. Both
    share beam size, thresholds and token pruning; the lexicon constrains the LM decoding and,
    unless ``eval.lexicon_without_lm`` is off, the decoding without LM too. ``lm_weight`` and
    ``word_score`` apply to the LM decoding only.
    """
    ec = config.eval
    if ec.decoder == "greedy":
        return None, None, {"lexicon": None, "lm": None, "lm_stats": {}, "lexicon_source": None}
    files = prepare_language_files(config, tokenizer, runtime)
    common = {
        "beam_size": ec.beam_size,
        "beam_threshold": ec.beam_threshold,
        "beam_size_token": ec.beam_size_token,
        "token_prune_min_logp": ec.token_prune_min_logp,
    }
    plain_lexicon = files["lexicon"] if ec.lexicon_without_lm else None
    without_lm = BeamSearchDecoder(tokenizer, lexicon_path=plain_lexicon, **common)
    with_lm = None
    if files["lm"] is not None:
        with_lm = BeamSearchDecoder(
            tokenizer, lm_path=files["lm"], lexicon_path=files["lexicon"], lm_weight=ec.lm_weight,
            lm_score_base=ec.lm_score_base, word_score=ec.word_score, **common,
        )
    return without_lm, with_lm, files


class _TwoDecodings:
    """A ``decode`` callable for ``finetune.evaluate``: returns the decoding without LM and keeps
    the LM decoding of the same emissions aside, in the same utterance order."""

    def __init__(self, without_lm, with_lm) -> None:
        self.without_lm, self.with_lm = without_lm, with_lm
        self.lm_texts: list[str] = []
        self.seconds = {"without_lm": 0.0, "with_lm": 0.0}

    def __call__(self, log_probs, lengths) -> list[str]:
        start = time.perf_counter()
        self.lm_texts += self.with_lm(log_probs, lengths)
        middle = time.perf_counter()
        texts = self.without_lm(log_probs, lengths)
        self.seconds["with_lm"] += middle - start
        self.seconds["without_lm"] += time.perf_counter() - middle
        return texts


def _gather(scores: Scores) -> Scores:
    total = Scores.empty()
    for part in all_gather_objects(scores):
        total.extend(part)
    return total


def _summarise(total: Scores, ec, suffix: str = "") -> dict[str, Any]:
    low, high = bootstrap_wer_ci(total.word_errors, total.words, samples=ec.bootstrap_samples, seed=ec.seed)
    return {f"wer{suffix}": total.wer, f"cer{suffix}": total.cer, f"wer{suffix}_ci_low": low, f"wer{suffix}_ci_high": high}


def evaluate_run(
    config: RunConfig,
    *,
    report: Report | None = None,
    checkpoint: str | Path | None = None,
    subsets: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Evaluate the run's fine-tuned model on the test subsets, without and (if any) with the LM.

    Args:
        config: the run configuration (``eval`` settings, ``data`` subsets, ``output_dir``).
        report: ``report(metrics, None)`` on every rank once all subsets are scored.
        checkpoint: a fine-tuning checkpoint folder; default this run's best dev WER one.
        subsets: subsets to evaluate; default ``config.data.test_subsets``.

    Returns:
        ``{"checkpoint", "decoder", ..., "lm", "subsets": {name: {"wer", "cer", "wer_ci_low",
        "wer_ci_high", "utterances", "words", "seconds", "decode_seconds"}}}`` plus, with an LM,
        ``"wer_lm", "cer_lm", "wer_lm_ci_low", "wer_lm_ci_high", "wer_lm_gain",
        "wer_lm_gain_ci_low", "wer_lm_gain_ci_high", "decode_lm_seconds"`` per subset; also
        written to ``<output_dir>/eval/results.json``.
    """
    ec = config.eval
    runtime = Runtime.create(config.device, "fp32" if config.finetune.precision == "auto" else config.finetune.precision)
    if checkpoint is None:
        folder = Path(config.output_dir) / "finetune" / "checkpoints"
        found = checkpoint_to_test(folder)
        if found is None:
            raise StageError(f"no fine-tuning checkpoint in {folder}: run `python -m orchestrator.run finetune` first")
        checkpoint = found
    checkpoint = Path(checkpoint)
    model, tokenizer, meta = load_finetuned(checkpoint, runtime)
    ensure_corpus(config.data)
    without_lm, with_lm, files = make_decoders(config, tokenizer, runtime)
    subsets = tuple(subsets or config.data.test_subsets)
    loaders = eval_loaders(config, subsets, tokenizer, runtime, ec.max_batch_seconds)

    results: dict[str, Any] = {}
    metrics: dict[str, Any] = {"stage": STAGE, "step": meta["step"]}
    out_dir = Path(config.output_dir) / STAGE
    for subset, loader in loaders.items():
        start = time.perf_counter()
        decode = _TwoDecodings(without_lm, with_lm) if with_lm is not None else without_lm
        _, scores = evaluate(model, loader, tokenizer, runtime, decode=decode)
        total = _gather(scores)
        results[subset] = {**_summarise(total, ec), "utterances": len(total.ids), "words": sum(total.words)}
        if with_lm is not None:
            lm_total = _gather(score(scores.ids, scores.references, decode.lm_texts))
            results[subset].update(_summarise(lm_total, ec, "_lm"))
            gain = paired_bootstrap(total.word_errors, lm_total.word_errors, total.words,
                                    samples=ec.bootstrap_samples, seed=ec.seed) if total.ids and ec.bootstrap_samples else None
            results[subset].update({"wer_lm_gain": total.wer - lm_total.wer,
                                    "wer_lm_gain_ci_low": gain.low if gain else math.nan,
                                    "wer_lm_gain_ci_high": gain.high if gain else math.nan})
            results[subset]["decode_seconds"] = decode.seconds["without_lm"]
            results[subset]["decode_lm_seconds"] = decode.seconds["with_lm"]
        results[subset]["seconds"] = time.perf_counter() - start
        for key, value in results[subset].items():
            if "seconds" not in key:
                metrics[f"{subset}/{key}"] = value
        r = results[subset]
        log.info(
            "%s: WER %.4f [%.4f, %.4f] CER %.4f on %d utterances (%s)%s",
            subset, r["wer"], r["wer_ci_low"], r["wer_ci_high"], r["cer"], r["utterances"], ec.decoder,
            f"; with the LM WER {r['wer_lm']:.4f} [{r['wer_lm_ci_low']:.4f}, {r['wer_lm_ci_high']:.4f}]"
            if with_lm is not None else "",
        )
        if runtime.is_main:
            _write_hypotheses(out_dir / f"{subset}.tsv", total)
            if with_lm is not None:
                _write_hypotheses(out_dir / f"{subset}.lm.tsv", lm_total)
    summary = {
        "checkpoint": str(checkpoint),
        "decoder": ec.decoder,
        "beam_size": ec.beam_size if ec.decoder == "beam" else None,
        "lm_path": files["lm"],
        "lm": {"from_train": ec.lm_from_train, "order": ec.lm_order if ec.lm_from_train else None,
               "lm_weight": ec.lm_weight, "lm_score_base": ec.lm_score_base, "word_score": ec.word_score,
               **files["lm_stats"]} if files["lm"] else None,
        "lexicon": files["lexicon_source"],
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

"""CTC fine-tuning model: shapes, pre-trained weight transfer, greedy decoding, augmentation hook."""

from __future__ import annotations

import pytest
import torch

from models.builder import build_best_rq, build_ctc
from models.config import ModelConfig, make_config
from models.ctc import BACKBONE, CTCModel, greedy_decode


def _config(model_dim: int = 32, n_mels: int = 16) -> ModelConfig:
    return make_config(
        "tiny",
        plan="pom",
        model_dim=model_dim,
        encoder={"num_layers": 2, "ffn_dim": 48},
        frontend={"conv_channels": [8, 4], "n_mels": n_mels},
        best_rq={"codebook_size": 64},
        ctc={"hidden_dim": 24, "num_hidden_layers": 2},
    )


def test_forward_shapes_and_log_probs() -> None:
    model = build_ctc(_config())
    assert isinstance(model, CTCModel)
    wave, lengths = torch.randn(2, 4000), torch.tensor([4000, 2500])
    out = model(wave, lengths)
    frames = [1 + (n - 400) // 160 for n in (4000, 2500)]
    assert out.lengths.tolist() == [-(-(-(-f // 2)) // 2) for f in frames]
    assert out.log_probs.shape == (2, out.lengths.max().item(), 29)
    torch.testing.assert_close(out.log_probs.logsumexp(-1), torch.zeros(out.log_probs.shape[:2]))
    targets, target_lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    loss = model.ctc_loss(out, targets, target_lengths)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.head.output.weight.grad is not None


def test_load_pretrained_report_and_values() -> None:
    config = _config()
    pretrained = build_best_rq(config)
    pretrained.normalizer.set_statistics(torch.full((16,), 3.0), torch.full((16,), 25.0), 1.0)
    model = build_ctc(config)
    report = model.load_pretrained(pretrained.state_dict())
    backbone = sorted(k for k in model.state_dict() if k.split(".")[0] in BACKBONE)
    assert report.loaded == backbone
    assert report.skipped == sorted(["heads.0.weight", "heads.0.bias", "quantizer.projection", "quantizer.codebooks"])
    assert report.missing and all(k.startswith("head.") for k in report.missing)
    for key in backbone:
        assert torch.equal(model.state_dict()[key], pretrained.state_dict()[key])
    assert model.normalizer.mean[0].item() == 3.0 and int(model.normalizer.count) == 1


def test_load_pretrained_prefix_and_strictness() -> None:
    config = _config()
    state = {f"module.{k}": v for k, v in build_best_rq(config).state_dict().items()}
    model = build_ctc(config)
    report = model.load_pretrained(state, prefix="module.")
    assert report.loaded and all(not k.startswith("module.") for k in report.loaded)
    partial = {k: v for k, v in build_best_rq(config).state_dict().items() if not k.startswith("normalizer.")}
    with pytest.raises(ValueError, match="normalizer"):
        model.load_pretrained(partial)
    report = model.load_pretrained(partial, strict=False)
    assert "normalizer.mean" in report.missing


@pytest.mark.parametrize(("model_dim", "n_mels", "key"), [(40, 16, "frontend.proj.weight"), (32, 24, "normalizer.mean")])
def test_load_pretrained_shape_mismatch_names_the_key(model_dim: int, n_mels: int, key: str) -> None:
    state = build_best_rq(_config(model_dim=model_dim, n_mels=n_mels)).state_dict()
    model = build_ctc(_config())
    before = model.frontend.proj.weight.clone()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model.load_pretrained(state)
    assert torch.equal(model.frontend.proj.weight, before)  # nothing copied on error


def test_greedy_decode_collapses_repeats_and_drops_blanks() -> None:
    # frame labels: a a _ a b b _ _ | c c (last two frames beyond the length)
    labels = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0, 3, 3], [0, 4, 4, 0, 0, 5, 5, 5, 0, 0]])
    log_probs = torch.nn.functional.one_hot(labels, 6).float().log_softmax(-1)
    assert greedy_decode(log_probs, torch.tensor([8, 10])) == [[1, 1, 2], [4, 5]]
    assert greedy_decode(log_probs, torch.tensor([8, 10]), blank=1) == [[0, 2, 0], [0, 4, 0, 5, 0]]
    assert greedy_decode(log_probs, torch.tensor([0, 1])) == [[], []]


def test_augment_hook_runs_in_training_only() -> None:
    model = build_ctc(_config())
    calls = []

    def augment(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        calls.append((features.shape, lengths.tolist()))
        return features + 1.0  # writes into padding too: the model must re-zero it

    wave, lengths = torch.randn(2, 4000), torch.tensor([4000, 2000])
    model.train()
    model(wave, lengths, augment=augment)
    assert calls == [((2, 23, 16), [23, 11])]
    model.eval()
    with torch.no_grad():
        plain = model(wave, lengths)
        same = model(wave, lengths, augment=augment)
    assert len(calls) == 1
    torch.testing.assert_close(plain.log_probs, same.log_probs)

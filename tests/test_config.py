"""Configuration: validation naming the bad field, plans, presets, strict dict round trip."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import pickle
import textwrap

import pytest
import yaml

from models.config import (
    BestRQConfig,
    CTCConfig,
    EncoderConfig,
    FrontendConfig,
    MixerSpec,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_preset,
    hybrid_plan,
    make_config,
    plan_label,
)

SECTION_CLASSES = [MixerSpec, FrontendConfig, EncoderConfig, BestRQConfig, CTCConfig, ModelConfig]


def _small_encoder(**fields) -> EncoderConfig:
    values = dict(model_dim=32, num_layers=2, ffn_dim=48, conv_kernel=5, layers=(MixerSpec(name="pom"),) * 2)
    values.update(fields)
    return EncoderConfig(**values)


# ------------------------------------------------------------------------------------ sections


def test_defaults_are_the_papers_base_relpos_encoder() -> None:
    cfg = ModelConfig()
    assert (cfg.encoder.model_dim, cfg.encoder.num_layers, cfg.encoder.ffn_dim, cfg.encoder.conv_kernel) == (576, 12, 2048, 31)
    assert cfg.encoder.mixer_names == ("mha_relpos",) * 12
    assert cfg.encoder.layers[0].options["num_heads"] == 8
    assert (cfg.frontend.n_mels, cfg.frontend.win_length, cfg.frontend.hop_length, cfg.frontend.conv_channels) == (80, 400, 160, (128, 32))
    assert (cfg.best_rq.codebook_size, cfg.best_rq.codebook_dim, cfg.best_rq.mask_prob, cfg.best_rq.mask_span) == (8192, 16, 0.15, 4)
    assert (cfg.ctc.hidden_dim, cfg.ctc.num_hidden_layers, cfg.ctc.dropout_p, cfg.ctc.vocab_size, cfg.ctc.blank) == (1280, 3, 0.15, 29, 0)
    assert cfg == make_config("base")


@pytest.mark.parametrize("cls", SECTION_CLASSES)
def test_sections_are_frozen_keyword_only_and_documented(cls: type) -> None:
    params = inspect.signature(cls).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    documented = {
        stmt.target.id
        for stmt, after in zip(body, body[1:])
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }
    assert documented == {f.name for f in dataclasses.fields(cls)}
    instance = cls(name="pom") if cls is MixerSpec else cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, dataclasses.fields(cls)[0].name, None)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: _small_encoder(conv_kernel=30), "conv_kernel"),
        (lambda: _small_encoder(conv_kernel=0), "conv_kernel"),
        (lambda: _small_encoder(dropout_p=1.0), "dropout_p"),
        (lambda: _small_encoder(num_layers=3), "num_layers"),
        (lambda: _small_encoder(layers=(MixerSpec(name="mha", options={"num_heads": 5}),) * 2), "model_dim"),
        (lambda: _small_encoder(layers=(MixerSpec(name="pom", options={"pad_mean": "median"}),) * 2), "pad_mean"),
        (lambda: MixerSpec(name="transformer"), "mixer"),
        (lambda: MixerSpec(name="pom", options={"num_heads": 4}), "num_heads"),
        (lambda: MixerSpec(name="pom", options={"degree": [1, 2]}), "degree"),
        (lambda: FrontendConfig(positional="relative"), "positional"),
        (lambda: FrontendConfig(conv_channels=(128, 0)), "conv_channels"),
        (lambda: FrontendConfig(hop_ms=30.0), "hop_ms"),
        (lambda: FrontendConfig(n_mels=0), "n_mels"),
        (lambda: BestRQConfig(mask_prob=0.0), "mask_prob"),
        (lambda: BestRQConfig(codebook_size=1), "codebook_size"),
        (lambda: BestRQConfig(noise_std=-1.0), "noise_std"),
        (lambda: CTCConfig(blank=29), "blank"),
        (lambda: CTCConfig(num_hidden_layers=-1), "num_hidden_layers"),
        (lambda: ModelConfig(best_rq=BestRQConfig(stack_frames=2)), "stack_frames"),
    ],
)
def test_bad_values_raise_naming_the_field(build, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def test_unknown_mixer_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown mixer 'conformer'.*mha_relpos.*pom"):
        MixerSpec(name="conformer")


def test_mixer_spec_is_hashable_comparable_and_picklable() -> None:
    a = MixerSpec(name="pom", options={"degree": 3, "expand": 1})
    b = MixerSpec(name="pom", options={"expand": 1, "degree": 3})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(TypeError):
        a.options["degree"] = 2  # type: ignore[index]
    cfg = make_config("tiny", plan="pom")
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))


# -------------------------------------------------------------------------------------- plans


def test_hybrid_plan() -> None:
    plan = hybrid_plan(6, 2, upper_options={"degree": 3})
    assert [s.name for s in plan] == ["mha_relpos"] * 2 + ["pom"] * 4
    assert plan[-1].options == {"degree": 3}
    assert plan_label(plan) == "2xmha_relpos+4xpom(k3)"
    assert plan_label(hybrid_plan(2, 1)) == "1xmha_relpos+1xpom"
    assert [s.name for s in hybrid_plan(3, 0)] == ["pom"] * 3
    assert [s.name for s in hybrid_plan(3, 3, lower="mha")] == ["mha"] * 3


@pytest.mark.parametrize("attention_layers", [-1, 5, 2.0])
def test_hybrid_plan_rejects_bad_attention_layers(attention_layers) -> None:
    with pytest.raises(ValueError, match="attention_layers"):
        hybrid_plan(4, attention_layers)


def test_make_config_plans_and_defaults() -> None:
    cfg = make_config("tiny", plan="pom", attention_layers=1, model_dim=64)
    assert cfg.encoder.mixer_names == ("mha_relpos", "pom", "pom", "pom")
    assert cfg.encoder.layers[0].options == {"num_heads": 4, "dropout_p": 0.1}
    assert cfg.encoder.layers[1].options == {"degree": 2, "expand": 2}
    explicit = make_config("tiny", plan=hybrid_plan(4, 1), model_dim=64)
    assert explicit == cfg
    # the encoder's dropout flows into the mixers that have one (attention, SummaryMixing)
    cfg = make_config("tiny", plan="summary_mixing", model_dim=64, encoder={"dropout_p": 0.2})
    assert cfg.encoder.dropout_p == 0.2 and cfg.encoder.layers[0].options["dropout_p"] == 0.2
    # explicit options win over the preset's
    cfg = make_config("tiny", plan=[MixerSpec(name="mha", options={"num_heads": 2})] * 4, model_dim=64)
    assert cfg.encoder.layers[0].options["num_heads"] == 2
    from_yaml = make_config("tiny", plan=[{"name": "pom", "options": {"degree": 3}}, "mha", "pom", "pom"], model_dim=64)
    assert from_yaml.encoder.layers[0].options == {"degree": 3, "expand": 2}
    with pytest.raises(ValueError, match=r"plan\[0\]: mixer 'pom' has no option 'heads'"):
        make_config("tiny", plan=[{"name": "pom", "options": {"heads": 3}}] * 4, model_dim=64)
    assert make_config("base", plan="mha").encoder.model_dim == 576
    assert make_config("base", plan="pom").encoder.model_dim == 488


def test_make_config_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="attention_layers"):
        make_config("tiny", plan="pom", attention_layers=5)
    with pytest.raises(ValueError, match="model_dim"):
        make_config("tiny", plan="mha", model_dim=66)  # 4 heads
    with pytest.raises(ValueError, match="unknown mixer"):
        make_config("tiny", plan="transformer")
    with pytest.raises(ValueError, match="plan has 2 layers"):
        make_config("tiny", plan=["pom", "pom"])
    with pytest.raises(ValueError, match="unknown override 'decoder'"):
        make_config("tiny", decoder={"layers": 2})
    with pytest.raises(ValueError, match="conv_kernel"):
        make_config("tiny", encoder={"conv_kernel": 14})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")


def test_presets_build_on_base() -> None:
    tiny, base, large = (get_preset(n).config for n in ("tiny", "base", "large"))
    assert (tiny.encoder.num_layers, tiny.encoder.model_dim, tiny.encoder.ffn_dim, tiny.encoder.conv_kernel) == (4, 128, 256, 15)
    assert tiny.best_rq.codebook_size == 1024
    assert (large.encoder.num_layers, large.encoder.model_dim, large.encoder.layers[0].options["num_heads"]) == (24, 768, 16)
    assert tiny.best_rq.mask_prob == base.best_rq.mask_prob == large.best_rq.mask_prob


# ------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("plan", ["mha_relpos", "pom", "hybrid"])
def test_dict_round_trip_through_json_and_yaml(plan: str) -> None:
    cfg = make_config("tiny", plan="pom", attention_layers=2) if plan == "hybrid" else make_config("tiny", plan=plan)
    data = config_to_dict(cfg)
    assert isinstance(data["encoder"]["layers"], list) and isinstance(data["frontend"]["conv_channels"], list)
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg
    assert config_to_dict(config_from_dict(data)) == data


def test_from_dict_fills_defaults_and_accepts_mixer_name_shorthand() -> None:
    cfg = config_from_dict(
        {"encoder": {"model_dim": 64, "num_layers": 2, "layers": ["pom", {"name": "mha", "options": {"num_heads": 4}}]},
         "frontend": {"win_ms": 25}},
        source="spec.yaml",
    )
    assert cfg.encoder.mixer_names == ("pom", "mha") and cfg.ctc == CTCConfig()
    assert isinstance(cfg.frontend.win_ms, float)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"encoder": {"model_dims": 4}}, r"spec\.yaml: unknown key 'encoder\.model_dims'; allowed keys at encoder: model_dim, num_layers"),
        ({"decoder": {}}, r"spec\.yaml: unknown key 'decoder'; allowed keys at the top level: frontend, encoder, best_rq, ctc"),
        ({"encoder": {"model_dim": "576"}}, r"spec\.yaml: encoder\.model_dim must be an integer, got str '576'"),
        ({"encoder": {"model_dim": True}}, r"encoder\.model_dim must be an integer, got bool"),
        ({"encoder": {"dropout_p": "0.1"}}, r"encoder\.dropout_p must be a number"),
        ({"frontend": {"positional": "rel"}}, r"spec\.yaml: frontend\.positional must be one of \['auto', 'absolute', 'none'\]"),
        ({"frontend": {"conv_channels": [128, "32"]}}, r"frontend\.conv_channels\[1\] must be an integer"),
        ({"frontend": 3}, r"spec\.yaml: frontend must be a mapping"),
        ({"encoder": {"num_layers": 1, "layers": [{"name": "pom", "opts": {}}]}}, r"spec\.yaml: unknown key 'encoder\.layers\[0\]\.opts'; allowed keys at encoder\.layers\[0\]: name, options"),
        ({"encoder": {"num_layers": 1, "layers": ["tranformer"]}}, r"spec\.yaml: encoder\.layers\[0\]: unknown mixer 'tranformer'; valid mixers: .*pom"),
        ({"encoder": {"num_layers": 1, "layers": [{"name": "pom", "options": {"heads": 2}}]}}, r"encoder\.layers\[0\]: mixer 'pom' has no option 'heads'"),
        ({"encoder": {"conv_kernel": 32}}, r"spec\.yaml: encoder\.conv_kernel must be an odd integer"),
        ({"best_rq": {"stack_frames": 2}}, r"spec\.yaml: best_rq\.stack_frames=2 must equal"),
    ],
)
def test_from_dict_errors_name_source_path_and_allowed_values(data: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        config_from_dict(data, source="spec.yaml")


def test_apply_overrides_with_dotted_keys() -> None:
    cfg = make_config("tiny")
    new = apply_overrides(cfg, {"encoder.dropout_p": 0.2, "best_rq.mask_prob": 0.1}, source="trial 7")
    assert new.encoder.dropout_p == 0.2 and new.best_rq.mask_prob == 0.1 and new.frontend == cfg.frontend
    with pytest.raises(ValueError, match=r"trial 7: unknown key 'encoder\.dropout'"):
        apply_overrides(cfg, {"encoder.dropout": 0.2}, source="trial 7")

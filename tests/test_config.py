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
    config_from_dict,
    config_to_dict,
    get_preset,
    hybrid_plan,
    make_config,
    model_from_section,
    plan_label,
)
from models.typed_config import ConfigError, UserError, deep_merge, section_from_dict, set_path

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
    with pytest.raises(ValueError, match=r"make_config\(preset='tiny'\): decoder: unknown override; allowed: frontend"):
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
        ({"encoder": {"model_dims": 4}}, r"spec\.yaml: encoder\.model_dims: unknown key; allowed keys: conv_kernel, .*model_dim, num_layers"),
        ({"decoder": {}}, r"spec\.yaml: decoder: unknown key; allowed keys: best_rq, ctc, encoder, frontend"),
        ({"encoder": {"model_dim": "576"}}, r"spec\.yaml: encoder\.model_dim: expected an integer, got str '576'"),
        ({"encoder": {"model_dim": True}}, r"encoder\.model_dim: expected an integer, got bool"),
        ({"encoder": {"model_dim": 576.0}}, r"encoder\.model_dim: expected an integer, got float 576\.0"),
        ({"encoder": {"dropout_p": "0.1"}}, r"encoder\.dropout_p: expected a number"),
        ({"frontend": {"positional": "rel"}}, r"spec\.yaml: frontend\.positional: 'rel' is not allowed; allowed values: auto, absolute, none"),
        ({"frontend": {"conv_channels": [128, "32"]}}, r"frontend\.conv_channels\[1\]: expected an integer"),
        ({"frontend": 3}, r"spec\.yaml: frontend: expected a mapping"),
        ({"encoder": {"num_layers": 1, "layers": [{"name": "pom", "opts": {}}]}}, r"spec\.yaml: encoder\.layers\[0\]\.opts: unknown key; allowed keys: name, options"),
        ({"encoder": {"num_layers": 1, "layers": ["tranformer"]}}, r"spec\.yaml: encoder\.layers\[0\]: unknown mixer 'tranformer'; valid mixers: .*pom"),
        ({"encoder": {"num_layers": 1, "layers": [{"name": "pom", "options": {"heads": 2}}]}}, r"encoder\.layers\[0\]: mixer 'pom' has no option 'heads'"),
        ({"encoder": {"conv_kernel": 32}}, r"spec\.yaml: encoder\.conv_kernel must be an odd integer"),
        ({"best_rq": {"stack_frames": 2}}, r"spec\.yaml: best_rq\.stack_frames=2 must equal"),
    ],
)
def test_from_dict_errors_name_source_path_and_allowed_values(data: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        config_from_dict(data, source="spec.yaml")


def test_set_path_is_the_one_dotted_setter() -> None:
    data = {"encoder": {"dropout_p": 0.1}, "ctc": {"hidden_dim": 8}}
    new = set_path(data, "encoder.dropout_p", 0.2)
    assert new == {"encoder": {"dropout_p": 0.2}, "ctc": {"hidden_dim": 8}} and data["encoder"]["dropout_p"] == 0.1
    assert set_path({}, "best_rq.mask_prob", 0.1) == {"best_rq": {"mask_prob": 0.1}}
    with pytest.raises(ConfigError, match=r"--set x: ctc\.hidden_dim\.y: ctc\.hidden_dim holds a value \(8\), not a section"):
        set_path(data, "ctc.hidden_dim.y", 1, source="--set x")
    cfg = config_from_dict(set_path(config_to_dict(make_config("tiny")), "encoder.dropout_p", 0.2), source="trial 7")
    assert cfg.encoder.dropout_p == 0.2
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


# ------------------------------------------------------------------------- the loader's rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Typed:
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    pair: tuple[float, float] = (0.0, 1.0)
    maybe: int | None = None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"count": 3}, {"count": 3}),
        ({"rate": 3}, {"rate": 3.0}),  # an integer is a number
        ({"pair": [1, 2]}, {"pair": (1.0, 2.0)}),
        ({"maybe": None}, {"maybe": None}),
    ],
)
def test_coercion_accepts(data: dict, expected: dict) -> None:
    loaded = section_from_dict(_Typed, data, source="f.yaml", path="s")
    assert {k: getattr(loaded, k) for k in expected} == expected
    assert type(loaded.rate) is float


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": 3.0}, "f.yaml: s.count: expected an integer, got float 3.0"),  # never int from a float
        ({"count": "3"}, "f.yaml: s.count: expected an integer, got str '3'"),
        ({"count": True}, "f.yaml: s.count: expected an integer, got bool True"),
        ({"rate": "1e-3"}, "f.yaml: s.rate: expected a number, got str '1e-3'"),
        ({"name": 3}, "f.yaml: s.name: expected a string, got int 3"),
        ({"flag": "yes"}, "f.yaml: s.flag: expected true or false, got str 'yes'"),
        ({"pair": [1]}, "f.yaml: s.pair: expected a list of 2 values, got 1"),
        ({"count": None}, "f.yaml: s.count: must not be null; expected an integer"),
        ({"maybe": 1.5}, "f.yaml: s.maybe: expected an integer or null, got float 1.5"),
        ({"cuont": 1}, "f.yaml: s.cuont: unknown key; allowed keys: count, flag, maybe, name, pair, rate"),
    ],
)
def test_coercion_refuses_with_one_line(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        section_from_dict(_Typed, data, source="f.yaml", path="s")
    assert str(info.value) == message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_model_section_merges_onto_its_preset() -> None:
    """Trap 1: an encoder override alone keeps the preset's size (tiny stays d128 x 4)."""
    cfg = model_from_section({"preset": "tiny", "encoder": {"dropout_p": 0.2}}, source="f.yaml")
    assert (cfg.encoder.model_dim, cfg.encoder.num_layers, cfg.encoder.dropout_p) == (128, 4, 0.2)
    assert cfg.frontend == make_config("tiny").frontend
    # config_to_dict output (every field spelled out) reads back equal through the same loader
    full = make_config("tiny", plan="pom", attention_layers=1)
    assert model_from_section({"preset": "tiny", **config_to_dict(full)}, source="f.yaml") == full


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"preset": "tiny", "param_budget": 1}, r"f\.yaml: model\.param_budget: 1 parameters is below the smallest model"),
        ({"preset": "tiny", "param_budget": 1e13}, r"f\.yaml: model\.param_budget: 1e\+13 parameters is more than this plan reaches"),
        ({"preset": "huge"}, r"f\.yaml: model\.preset: 'huge' is not a model preset; allowed values: tiny, base, large"),
        ({"preset": "tiny", "plan": [{"name": "pom", "options": {"heads": 2}}] * 4}, r"f\.yaml: model\.plan\[0\]: mixer 'pom' has no option 'heads'"),
        ({"preset": "tiny", "attention_layers": 2.0}, r"f\.yaml: model\.attention_layers: expected an integer or null, got float 2\.0"),
        ({"preset": "tiny", "encoder": {"conv_kernel": 4}}, r"f\.yaml: model: encoder\.conv_kernel must be an odd integer"),
        ({"preset": "tiny", "model_dim": 64, "encoder": {"model_dim": 64}}, r"f\.yaml: model\.encoder\.model_dim: give model\.encoder\.model_dim, model\.model_dim or"),
        ({"preset": "tiny", "plan": "pom", "encoder": {"num_layers": 1, "layers": ["pom"]}}, r"f\.yaml: model\.plan: give model\.encoder\.layers \(every layer\) or model\.plan, not both"),
        ({"preset": "tiny", "encoder": {"layers": ["pom"]}}, r"f\.yaml: model: encoder\.layers has 1 entries but encoder\.num_layers is 4"),
        ({"preset": "tiny", "decoder": {}}, r"f\.yaml: model\.decoder: unknown key; allowed keys: attention_layers, best_rq"),
    ],
)
def test_model_section_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_from_section(data, source="f.yaml")


def test_one_loader_machinery() -> None:
    """No second coercion, merge or dotted setter in the configuration modules."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [root / "models" / "config.py", root / "orchestrator" / "train" / "config.py",
             root / "orchestrator" / "train" / "presets.py", root / "orchestrator" / "spec.py", root / "orchestrator" / "search.py"]
    pattern = re.compile(r"^def (_?coerce|_?deep_merge|_?set_path|_?set_spec_path_copy|dataclass_from_dict|apply_overrides)\(", re.M)
    assert [f.name for f in files if pattern.search(f.read_text())] == []

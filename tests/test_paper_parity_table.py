"""The README's paper parity table states what ``preset: paper`` resolves to, row by row.

The table (README, "Paper parity (`preset: paper`)") has one row per setting of the paper's
recipe. Its "our key" cell names a dotted path of the resolved run config (``[*]``: every
element of a list; a backticked ``key=value`` after it: resolved with that ``--set`` as well)
or a ``resources.*`` / ``profile.*`` key of ``search_spaces/paper_base.yaml``; ``n/a``: no
config key (skipped, counted). The first backticked span of its "our value" cell, read as YAML,
must equal the resolved value. Mixer options are compared as the module will use them (the
mixer's own defaults filled in).

The second half checks issue 11's dry-run criterion: ``--set preset=paper`` on every shipped
search space resolves, prints the recipe in its resolved config, and gives every trial's
``mha_relpos`` layers the released attention and every PoM layer the released time mean.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import tuner
from orchestrator.spec import build_run_config, load_spec
from orchestrator.train.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "### Paper parity (`preset: paper`)"
COLUMNS = ["setting", "paper", "our key", "our value in `preset: paper`", "same?", "cpu / demo presets"]
PAPER_SPACE = ROOT / "search_spaces" / "paper_base.yaml"
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
SPEC_SECTIONS = ("resources", "profile")
MIN_CHECKED_ROWS = 25
TICK = re.compile(r"`([^`]+)`")


# ------------------------------------------------------------------------------------------ table


def table_rows(text: str) -> list[list[str]]:
    """The rows (cells, header excluded) of the first table under :data:`HEADING`."""
    lines = text.splitlines()
    assert HEADING in lines, f"README.md has no section {HEADING!r}"
    rows: list[list[str]] = []
    for line in lines[lines.index(HEADING) + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert rows, f"README.md, {HEADING}: no table"
    header, separator, *body = rows
    assert header == COLUMNS, f"README.md parity table: columns {header}, expected {COLUMNS}"
    assert all(set(cell) <= set("-: ") for cell in separator)
    for row in body:
        assert len(row) == len(COLUMNS), f"README.md parity table: row {row[0]!r} has {len(row)} cells, not {len(COLUMNS)}"
    return body


def parse_row(row: list[str]) -> tuple[str, list[str], Any] | None:
    """``(key, extra --sets, expected value)`` of a row, ``None`` when its key is not a config key."""
    keys = TICK.findall(row[2])
    if not keys:
        assert row[2] == "n/a", f"parity row {row[0]!r}: 'our key' must hold a `key` or read n/a, got {row[2]!r}"
        return None
    key, *sets = keys
    assert "=" not in key and all("=" in s for s in sets), f"parity row {row[0]!r}: bad key cell {row[2]!r}"
    values = TICK.findall(row[3])
    assert values, f"parity row {row[0]!r}: 'our value' has no `value` to check"
    return key, sets, yaml.safe_load(values[0])


def resolved_tree(config: RunConfig) -> dict[str, Any]:
    """The config as plain data, each layer's options with the mixer's defaults filled in."""
    tree = config.to_dict()
    for layer, spec in zip(tree["model"]["encoder"]["layers"], config.model.encoder.layers):
        layer["options"] = spec.resolved_options()
    return tree


def lookup(tree: Any, key: str) -> list[Any]:
    """The values at dotted ``key`` (``name[i]`` an index, ``name[*]`` every element)."""
    found = [tree]
    for part in key.split("."):
        match = re.fullmatch(r"([A-Za-z_]\w*)(?:\[(\*|\d+)\])?", part)
        assert match, f"bad key part {part!r} in {key!r}"
        name, index = match.groups()
        nxt = []
        for node in found:
            node = node[name] if isinstance(node, dict) else getattr(node, name)
            if index is None:
                nxt.append(node)
            elif index == "*":
                assert len(node) > 0, f"{key}: {name} is empty"
                nxt.extend(node)
            else:
                nxt.append(node[int(index)])
        found = nxt
    return found


def same(got: Any, want: Any) -> bool:
    if isinstance(got, tuple):
        got = list(got)
    if isinstance(want, list) or isinstance(got, list):
        return isinstance(got, list) and isinstance(want, list) and len(got) == len(want) and all(
            same(g, w) for g, w in zip(got, want))
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)
    return got == want


@cache
def paper_tree(sets: tuple[str, ...]) -> dict[str, Any]:
    return resolved_tree(load_run_config(None, ["preset=paper", *sets]))


@cache
def paper_space():
    return load_spec(PAPER_SPACE)


def rows_with_keys() -> tuple[list[tuple[str, str, list[str], Any]], list[str]]:
    checked, skipped = [], []
    for row in table_rows(README.read_text(encoding="utf-8")):
        parsed = parse_row(row)
        if parsed is None:
            skipped.append(row[0])
        else:
            checked.append((row[0], *parsed))
    return checked, skipped


def test_the_table_states_what_preset_paper_resolves_to():
    checked, skipped = rows_with_keys()
    assert len(checked) >= MIN_CHECKED_ROWS, f"only {len(checked)} checked rows (skipped: {skipped})"
    assert len(skipped) <= 5, f"{len(skipped)} rows without a config key: {skipped}"
    wrong = []
    for setting, key, sets, want in checked:
        if key.split(".")[0] in SPEC_SECTIONS:
            assert not sets, f"parity row {setting!r}: a --set on a paper_base.yaml key"
            got = lookup(paper_space(), key)
        else:
            got = lookup(paper_tree(tuple(sets)), key)
        if not all(same(g, want) for g in got):
            wrong.append(f"{setting}: {key} {' '.join(sets)} is {got if len(got) > 1 else got[0]!r}, the table says {want!r}")
    assert not wrong, "README parity table out of date:\n" + "\n".join(wrong)


def test_the_table_check_can_fail():
    """A changed value, a key that does not exist and a row without a value are caught."""
    assert not same(lookup(paper_tree(()), "finetune.epochs")[0], 31)
    assert same(lookup(paper_tree(()), "eval.token_prune_min_logp")[0], -5)  # numbers compare as numbers
    assert not same(lookup(paper_tree(()), "eval.token_prune_min_logp")[0], -10)
    assert not same(lookup(paper_tree(()), "finetune.steps")[0], 0)
    assert not same(True, 1) and not same([1, 3], [1, 3, 5])
    with pytest.raises(KeyError):
        lookup(paper_tree(()), "finetune.epoch")
    with pytest.raises(AssertionError, match="no `value`"):
        parse_row(["x", "y", "`finetune.epochs`", "thirty", "=", ""])
    with pytest.raises(AssertionError, match="n/a"):
        parse_row(["x", "y", "finetune.epochs", "`30`", "=", ""])


def test_pretraining_audio_per_step_is_the_papers_5600_s():
    spec = paper_space()
    pretrain = spec.base_config().pretrain
    assert pretrain.max_batch_seconds * spec.resources.workers * pretrain.accum_steps == pytest.approx(5600.0)


# -------------------------------------------------------------------------------------- dry runs

RECIPE = {  # issue 11's recipe, as every space's resolved config must show it under preset=paper
    "pretrain.steps": 200_000, "pretrain.precision": "fp16", "pretrain.warmup_steps": 25_000,
    "finetune.schedule": "newbob", "finetune.epochs": 30, "finetune.steps": None, "finetune.weight_decay": 1e-3,
    "finetune.eval_every": "epoch", "finetune.augment.concat_clean": True,
    "finetune.augment.speed_factors": [0.95, 1.0, 1.05],
    "eval.beam_size": 200, "eval.beam_threshold": 10.0, "eval.token_prune_min_logp": -5.0,
    "eval.lm_weight": 0.8, "eval.word_score": 1.2,
    "model.encoder.init": "xavier_normal", "model.encoder.mixer_dropout": False,
    "model.frontend.fbank": "speechbrain", "model.frontend.norm": "channels_freq",
}
RUN_PREFIXES = ("data.", "pretrain.", "finetune.", "eval.", "model.frontend.", "model.best_rq.", "model.ctc.",
                "model.encoder.init", "model.encoder.mixer_dropout", "model.encoder.dropout_p",
                "model.encoder.ffn_dim", "model.encoder.conv_kernel", "model.encoder.num_layers")
"""Table keys that no shipped space's model plan changes (the plan changes d_model and the layers)."""

RELEASED_OPTIONS = {
    "mha_relpos": {"score_scale": "model_dim", "symmetric_positions": True, "bias": False, "out_bias": True},
    "pom": {"pad_mean": "all"},
}


def dry_run_printout(space: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any], str]:
    """``--dry-run --set preset=paper`` of ``space`` in-process; the spec, its trials and the printout.

    The step-time measurement (a forward and backward of the 95M model, about a minute on two
    cores) is replaced by a constant here; ``test_paper_base_dry_run_cli`` runs the real command.
    """
    monkeypatch.setattr(tuner, "estimate_step_seconds", lambda spec, params: 1.0)
    spec = load_spec(space, ["preset=paper"])
    out = io.StringIO()
    result = tuner.dry_run(spec, out=out)
    return spec, result, out.getvalue()


def printed_config(printout: str) -> dict[str, Any]:
    body = printout.split("# resolved defaults:\n", 1)[1].split("# trials:", 1)[0]
    return yaml.safe_load(body)


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.name)
def test_preset_paper_dry_run_on_every_space_shows_the_recipe(space: Path, monkeypatch: pytest.MonkeyPatch):
    spec, result, printout = dry_run_printout(space, monkeypatch)
    config = printed_config(printout)
    for key, want in RECIPE.items():
        (got,) = lookup(config, key)
        assert same(got, want), f"{space.name} --set preset=paper: {key} is {got!r}, the recipe's {want!r}"
    searched = set(spec.raw.get("search") or {})
    fixed_model = {f"model.{k}" for k in (spec.raw.get("model") or {})}
    for setting, key, sets, want in rows_with_keys()[0]:
        if sets or not key.startswith(RUN_PREFIXES) or key in searched or key in fixed_model:
            continue
        (got,) = lookup(config, key)
        assert same(got, want), f"{space.name} --set preset=paper: {setting} ({key}) is {got!r}, the table says {want!r}"
    assert result["trials"], f"{space.name}: no trial"
    for params in result["trials"]:
        layers = build_run_config(spec.run, params, source=str(space)).model.encoder.layers
        for i, layer in enumerate(layers):
            options = layer.resolved_options()
            for key, want in RELEASED_OPTIONS.get(layer.name, {}).items():
                assert options[key] == want, f"{space.name} trial {params}: layer {i} ({layer.name}) {key}={options[key]!r}"


@pytest.mark.slow
def test_paper_base_dry_run_cli():
    """The documented command, as a subprocess (it measures one training step of the 95M model)."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(PAPER_SPACE), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = printed_config(proc.stdout)
    for key, want in RECIPE.items():
        (got,) = lookup(config, key)
        assert same(got, want), f"paper_base.yaml --dry-run: {key} is {got!r}, the recipe's {want!r}"
    assert "4 trials (grid)" in proc.stdout and "# estimate:" in proc.stdout

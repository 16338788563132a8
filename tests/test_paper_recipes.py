"""The papers' recipes: recipes/luong2015/*.yaml (Luong et al. 2015, Table 4, §4.1 settings) and
recipes/bahdanau2015/{rnnencdec,rnnsearch}.yaml (Bahdanau et al. 2015, App. B.2).

Every recipe loads through ``resolve_config``, validates once the data's values are filled in,
and builds (at reduced size); the command line written in each recipe's comment gives exactly
the recipe's config through the real ``nmtkit train`` flag parser; ``nmtkit train --help``
lists every registered name and every flag those command lines use.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import nmtkit.train
from nmtkit.cli import app
from nmtkit.config import Config, resolve_config
from nmtkit.model import build_model
from nmtkit.registry import ATTENTIONS, BRIDGES, DECODERS, ENCODERS, WINDOWS
from nmtkit.train import prepare_config

from conftest import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))
PAPER_RECIPES = sorted((ROOT / "recipes").glob("luong2015/*.yaml")) + sorted((ROOT / "recipes").glob("bahdanau2015/*.yaml"))
TABLE_4 = {("global", "luong-location"), ("global", "luong-dot"), ("global", "luong-general"),
           ("local-m", "luong-dot"), ("local-m", "luong-general"),
           ("local-p", "luong-dot"), ("local-p", "luong-general")}
DATA = SimpleNamespace(manifest={"src_vocab_size": 8000, "tgt_vocab_size": 8000, "max_len": 80})


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def recipe_command(path: Path) -> list[str]:
    """The flags of the 'nmtkit train DATA --save DIR ...' command written in a recipe's comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "nmtkit train DATA --save DIR" in line)
    text = lines[start].split("nmtkit train DATA --save DIR", 1)[1]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        text += " " + line[1:]
    return shlex.split(text)


def test_every_paper_row_has_a_recipe() -> None:
    """Luong Table 4 (7 rows) + concat, Bahdanau's RNNencdec and RNNsearch."""
    luong = {(c.model.window, c.model.attention)
             for c in (resolve_config(p, {}) for p in PAPER_RECIPES if p.parent.name == "luong2015")}
    assert TABLE_4 <= luong and ("global", "luong-concat") in luong
    bahdanau = {p.stem: resolve_config(p, {}).model for p in PAPER_RECIPES if p.parent.name == "bahdanau2015"}
    assert (bahdanau["rnnsearch"].decoder, bahdanau["rnnsearch"].attention) == ("bahdanau", "bahdanau")
    assert (bahdanau["rnnencdec"].decoder, bahdanau["rnnencdec"].attention) == ("none", "none")


@pytest.mark.parametrize("path", RECIPES, ids=[_rel(p) for p in RECIPES])
def test_recipe_loads_validates_and_builds(path: Path) -> None:
    """resolve_config reads it (strict keys), the data fills vocabularies (and location's
    positions), validate() accepts it, and the model builds (shrunk, to keep the test light)."""
    config = prepare_config(resolve_config(path, {}), DATA)
    model = config.model
    if path.parent.name == "luong2015":  # §4.1
        assert (model.encoder, model.decoder, model.rnn, model.layers, model.hidden_size, model.embed_size) == \
            ("rnn", "luong", "lstm", 4, 1000, 1000)
        assert model.input_feed and model.reverse_source and model.dropout == 0.2 and model.bridge == "last"
        assert (config.train.optimizer, config.train.lr, config.train.clip_norm, config.train.epochs) == \
            ("sgd", 1.0, 5.0, 12)
        assert model.window == "global" or model.window_size == 10
    if path.parent.name == "bahdanau2015":  # App. B.2
        assert (model.rnn, model.hidden_size, model.embed_size, model.maxout_size) == ("gru", 1000, 620, 500)
        assert model.encoder == ("birnn" if model.decoder == "bahdanau" else "rnn")
        if model.decoder == "bahdanau":
            assert model.bridge == "backward"
    small = dataclasses.replace(model, hidden_size=8, embed_size=4, src_vocab_size=20, tgt_vocab_size=20,
                                maxout_size=2 if model.maxout_size else 0)
    build_model(small)


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=[_rel(p) for p in PAPER_RECIPES])
def test_recipe_command_line_gives_the_same_config(path: Path, monkeypatch, tmp_path) -> None:
    """The command in the recipe's comment, parsed by the real `nmtkit train`, equals the recipe.
    For Luong's rows these are flags alone; Bahdanau's maxout size needs --set."""
    captured: list[Config] = []
    monkeypatch.setattr(nmtkit.train, "train", lambda data, save, config, **kwargs: captured.append(config))
    flags = recipe_command(path)
    if path.parent.name == "luong2015":
        assert "--set" not in flags and "--recipe" not in flags
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--save", str(tmp_path / "run"), *flags])
    assert result.exit_code == 0, result.output
    assert captured[0].to_dict() == resolve_config(path, {}).to_dict()


def test_train_help_lists_every_component_and_flag(monkeypatch) -> None:
    """`nmtkit train --help` names every registered component and every flag the recipes use."""
    monkeypatch.setenv("COLUMNS", "250")  # fewer wrapped lines in typer's help boxes
    text = run_cli("train", "--help").stdout
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    for registry in (ENCODERS, DECODERS, ATTENTIONS, WINDOWS, BRIDGES):
        for name in registry.names():
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flat), f"{registry.kind} '{name}' not in --help"
    used = {flag for path in PAPER_RECIPES for flag in recipe_command(path) if flag.startswith("--")}
    for flag in sorted(used):
        assert flag in flat, f"{flag} not in --help"

"""Registry: names map to classes; unknown names fail with the list of valid ones."""

import pytest

import nmtkit.model  # noqa: F401  (registers components)
from nmtkit.errors import UsageError
from nmtkit.registry import ATTENTIONS, DECODERS, ENCODERS, WINDOWS, Registry


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        pass

    assert reg.get("round") is Round
    assert Round.registry_name == "round"
    assert "round" in reg and "square" not in reg


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match=r"unknown attention 'luong-cosine'; choose one of: .*luong-dot"):
        ATTENTIONS.get("luong-cosine")


def test_duplicate_registration_rejected():
    reg = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(type("B", (), {}))


def test_foundation_components_registered():
    assert {"rnn", "birnn"} <= set(ENCODERS.names())
    assert {"luong", "bahdanau", "none"} <= set(DECODERS.names())
    assert {"luong-dot", "luong-general", "luong-concat", "bahdanau", "luong-location", "none"} <= set(ATTENTIONS.names())
    assert {"global", "local-m", "local-p"} <= set(WINDOWS.names())

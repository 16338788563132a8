"""translate: one output line per input line, in order, whatever the input; streams."""

import pytest

from conftest import reverse_pairs
from nmtkit.checkpoint import LoadedModel
from nmtkit.errors import UsageError
from nmtkit.translate import DecodeOptions, translate_lines


@pytest.fixture(scope="module")
def loaded(trained_reverse):
    return LoadedModel(trained_reverse / "best.pt")


def test_empty_blank_and_long_lines_keep_count_and_order(loaded):
    pairs = reverse_pairs(30, seed=11)
    long_line = " ".join(["w1 w2 w3"] * 400)  # 1200 words: translated in pieces
    lines = ["", pairs[0][0], "   ", "\t", pairs[1][0], long_line, "", pairs[2][0], "w3"]
    out = list(translate_lines(loaded, lines, DecodeOptions(batch_size=2, max_input_len=7)))
    assert len(out) == len(lines)
    assert out[0] == "" and out[2] == "" and out[3] == "" and out[6] == ""
    alone = list(translate_lines(loaded, [pairs[0][0], pairs[1][0], pairs[2][0]], DecodeOptions()))
    assert [out[1], out[4], out[7]] == alone  # each line's own translation, in its own place
    assert sum(a == p[1] for a, p in zip(alone, pairs)) >= 2
    assert out[8].startswith("V3")  # a one-word line, shorter than any seen in training
    words = long_line.split()
    pieces = [" ".join(words[i:i + 7]) for i in range(0, len(words), 7)]  # max_input_len 7 (one token a word)
    assert out[5] == " ".join(p for p in translate_lines(loaded, pieces, DecodeOptions()) if p)
    assert len(pieces) == 172 and len(out[5].split()) >= 172 and "\n" not in out[5]


def test_order_independent_of_batching(loaded):
    lines = [s for s, _ in reverse_pairs(50, seed=12)]
    a = list(translate_lines(loaded, lines, DecodeOptions(batch_size=1)))
    b = list(translate_lines(loaded, lines, DecodeOptions(batch_size=16, buffer_size=7)))
    c = list(translate_lines(loaded, lines, DecodeOptions(batch_size=16, beam=3)))
    assert a == b
    assert sum(x == y for x, y in zip(a, c)) >= 45  # beam may differ from greedy on a few


def test_streams_before_reading_all_input(loaded):
    consumed = []

    def lines():
        for i in range(100):
            consumed.append(i)
            yield "w1 w2 w3"

    stream = translate_lines(loaded, lines(), DecodeOptions(buffer_size=4))
    assert next(stream) == "V3 V2 V1"
    assert len(consumed) <= 5


def test_bad_options():
    with pytest.raises(UsageError):
        DecodeOptions(beam=0).validate()
    with pytest.raises(UsageError):
        DecodeOptions(precision="fp8").validate()

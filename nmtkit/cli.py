"""The `nmtkit` command: each subcommand parses flags into a config and calls a library function.

stdout carries data (translations, scores, alignments); logs go to stderr. Exit codes: 0 ok,
1 runtime failure, 2 usage error. Errors are one line, never a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

# Start-up time (issue 4): importing torch creates ~180k objects, and the cyclic garbage collector
# would scan them again and again while they are created. Nothing created during import is garbage,
# so collection is paused for the imports (and, from main(), for parsing the command line); the
# command itself then starts with these objects frozen out of every later collection.
gc.disable()
import typer  # noqa: E402

from nmtkit.errors import NmtkitError, UsageError  # noqa: E402
from nmtkit.registry import ATTENTIONS, BRIDGES, DECODERS, ENCODERS, WINDOWS  # noqa: E402
import nmtkit.kernels  # noqa: E402
import nmtkit.model  # noqa: F401,E402  (registers every component, for --help)
gc.enable()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Recurrent sequence-to-sequence models with attention (Bahdanau 2015, Luong 2015).")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def friendly(command):
    """Turn NmtkitError into a one-line message and exit code; quiet on a closed stdout pipe."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if not gc.isenabled():  # paused by main() for start-up
            gc.freeze()
            gc.enable()
        try:
            return command(*args, **kwargs)
        except NmtkitError as e:
            log(f"nmtkit {command.__name__}: error: {e}")
            raise typer.Exit(e.exit_code)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
            raise typer.Exit(0)
        except KeyboardInterrupt:
            log(f"nmtkit {command.__name__}: interrupted")
            raise typer.Exit(130)
        except OSError as e:  # a file or device failed under us (disk full, permissions, ...)
            where = f"{e.filename}: " if e.filename else ""
            log(f"nmtkit {command.__name__}: error: {where}{e.strerror or e}")
            raise typer.Exit(1)

    return wrapper


def names(registry) -> str:
    return ", ".join(registry.names())


def read_text_lines(path: Optional[Path], what: str) -> Iterator[str]:
    """Lines of a file or stdin ('-' or None), lazily; invalid UTF-8 is replaced with a warning."""
    if path is not None and str(path) != "-" and not path.is_file():
        raise NmtkitError(f"{what} not found: {path}")
    use_stdin = path is None or str(path) == "-"
    name = "stdin" if use_stdin else str(path)
    with contextlib.nullcontext(sys.stdin.buffer) if use_stdin else open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                log(f"nmtkit: warning: {name}:{number}: invalid UTF-8 replaced by U+FFFD")
                line = raw.decode("utf-8", errors="replace")
            yield line.rstrip("\r\n")


def open_output(path: Optional[Path]):
    if path is None or str(path) == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise NmtkitError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- preprocess

@app.command()
@friendly
def preprocess(
    src: str = typer.Option(..., help="source language suffix, e.g. en"),
    tgt: str = typer.Option(..., help="target language suffix, e.g. de"),
    train: str = typer.Option(..., help="training prefix: reads PREFIX.SRC and PREFIX.TGT (or .gz)"),
    valid: str = typer.Option(..., help="validation prefix"),
    out: Path = typer.Option(..., help="output data directory"),
    test: Optional[str] = typer.Option(None, help="test prefix (optional)"),
    vocab_size: int = typer.Option(8000, help="sentencepiece vocabulary size (per model)"),
    joint: bool = typer.Option(True, "--joint/--separate", help="one subword model for both languages or one each"),
    model_type: str = typer.Option("unigram", help="sentencepiece model: unigram, bpe, word, char"),
    max_len: int = typer.Option(100, help="drop training/validation pairs longer than this (subwords)"),
    errors: str = typer.Option("strict", help="invalid UTF-8: strict (error) or replace"),
    force: bool = typer.Option(False, help="overwrite an existing data directory"),
) -> None:
    """Train subword models, encode, filter and binarize parallel text."""
    from nmtkit.data import PreprocessOptions, preprocess as run

    run(PreprocessOptions(src=src, tgt=tgt, train=train, valid=valid, out=out, test=test,
                          vocab_size=vocab_size, joint=joint, model_type=model_type, max_len=max_len,
                          errors=errors, force=force), log=log)


# ----------------------------------------------------------------------------- train

@app.command()
@friendly
def train(
    data: Path = typer.Argument(..., help="directory written by 'nmtkit preprocess'"),
    save: Path = typer.Option(..., help="run directory: best.pt, last.pt, metrics.jsonl"),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe (flags override it)"),
    encoder: Optional[str] = typer.Option(None, help=f"encoder: {names(ENCODERS)} (default: birnn)"),
    decoder: Optional[str] = typer.Option(None, help=f"decoder: {names(DECODERS)} (default: luong)"),
    attention: Optional[str] = typer.Option(None, help=f"attention score: {names(ATTENTIONS)} (default: luong-general)"),
    window: Optional[str] = typer.Option(None, help=f"attention window: {names(WINDOWS)} (default: global)"),
    window_size: Optional[int] = typer.Option(None, help="D, half-width of local windows (default: 10)"),
    renormalize_window: Optional[bool] = typer.Option(None, "--renormalize-window/--no-renormalize-window",
                                                      help="renormalise local-p weights (default: no, as Luong)"),
    rnn: Optional[str] = typer.Option(None, help="lstm or gru (default: lstm)"),
    layers: Optional[int] = typer.Option(None, help="stacked layers (encoder and decoder) (default: 2)"),
    hidden_size: Optional[int] = typer.Option(None, help="hidden size (default: 256)"),
    embed_size: Optional[int] = typer.Option(None, help="embedding size (default: 256)"),
    dropout: Optional[float] = typer.Option(None, help="dropout (default: 0.3)"),
    input_feed: Optional[bool] = typer.Option(None, "--input-feed/--no-input-feed", help="luong input feeding (default: on)"),
    reverse_source: Optional[bool] = typer.Option(None, "--reverse-source/--no-reverse-source",
                                                  help="read the source reversed (Luong '+reverse') (default: off)"),
    bridge: Optional[str] = typer.Option(None, help=f"decoder initial state: auto, {names(BRIDGES)} (default: auto)"),
    max_source_len: Optional[int] = typer.Option(None, help="luong-location: source positions (default: data max-len)"),
    optimizer: Optional[str] = typer.Option(None, help="adam or sgd (default: adam)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: 0.001)"),
    lr_decay: Optional[float] = typer.Option(None, help="lr factor when valid ppl does not improve (default: 0.5)"),
    lr_decay_start: Optional[int] = typer.Option(None, help="also apply --lr-decay at the end of every epoch "
                                                            "from this one on (Luong: 8) (default: 0, never)"),
    label_smoothing: Optional[float] = typer.Option(None, help="label smoothing (default: 0)"),
    clip_norm: Optional[float] = typer.Option(None, help="gradient norm clipping (default: 5)"),
    batch_tokens: Optional[int] = typer.Option(None, help="padded tokens per batch (default: 4096)"),
    batch_sents: Optional[int] = typer.Option(None, help="at most this many sentences per batch (default: 0, no cap)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (default: 10)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many updates (default: no limit)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default: 1)"),
    valid_every: Optional[int] = typer.Option(None, help="also validate every N updates (default: 0: per epoch)"),
    valid_bleu: Optional[bool] = typer.Option(None, "--valid-bleu/--no-valid-bleu", help="greedy BLEU at validation (default: on)"),
    patience: Optional[int] = typer.Option(None, help="early stopping after N bad validations (default: 0: off)"),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (default: fp32)"),
    update_freq: Optional[int] = typer.Option(None, help="accumulate gradients over N batches per process "
                                                         "per update (effective batch: nproc x N) (default: 1)"),
    keep_last: Optional[int] = typer.Option(None, help="keep the N latest step-N.pt checkpoints besides "
                                                       "last.pt and best.pt (default: 0)"),
    nproc: int = typer.Option(1, help="training processes on this machine (DDP over loopback; gloo on CPU, "
                                      "NCCL on GPU); under torchrun leave it at 1"),
    device: str = typer.Option("auto", help="auto (a GPU where CUDA sees one, else the CPU), cpu or cuda"),
    set_: List[str] = typer.Option([], "--set", help="override any value: section.key=value (repeatable)"),
    resume: bool = typer.Option(False, help="continue the run in --save from last.pt (exactly where it stopped)"),
) -> None:
    """Train a model; names of components are those of the registries listed below.

    SIGINT/SIGTERM stop at the next update after writing last.pt (exit status 130/143);
    --resume continues from there.
    """
    from nmtkit.config import apply_overrides, load_recipe, resolve_config
    from nmtkit.train import train as run

    model_flags = dict(encoder=encoder, decoder=decoder, attention=attention, window=window,
                       window_size=window_size, renormalize_window=renormalize_window, rnn=rnn,
                       layers=layers, hidden_size=hidden_size, embed_size=embed_size, dropout=dropout,
                       input_feed=input_feed, reverse_source=reverse_source, bridge=bridge,
                       max_source_len=max_source_len)
    train_flags = dict(optimizer=optimizer, lr=lr, lr_decay=lr_decay, lr_decay_start=lr_decay_start,
                       label_smoothing=label_smoothing,
                       clip_norm=clip_norm, batch_tokens=batch_tokens, batch_sents=batch_sents, epochs=epochs, max_steps=max_steps,
                       seed=seed, valid_every=valid_every, valid_bleu=valid_bleu, patience=patience,
                       precision=precision, update_freq=update_freq, keep_last=keep_last)
    config = resolve_config(recipe, {"model": model_flags, "train": train_flags}, set_)
    overrides = None
    if resume:  # the values given explicitly (recipe, flags, --set), as the checkpoint's config sees them
        given = load_recipe(recipe) if recipe else {}
        for section, values in (("model", model_flags), ("train", train_flags)):
            given.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        apply_overrides(given, set_)
        overrides = {section: {k: getattr(getattr(config, section), k) for k in (given.get(section) or {})}
                     for section in ("model", "train")}
    summary = run(data, save, config, resume=resume, log=log, nproc=nproc, overrides=overrides, device=device)
    if summary and summary.get("exit_code"):
        raise typer.Exit(summary["exit_code"])


# ----------------------------------------------------------------------------- translate

@app.command()
@friendly
def translate(
    model: Path = typer.Option(..., "-m", "--model", help="checkpoint (best.pt)"),
    input: Optional[Path] = typer.Option(None, "-i", "--input", help="raw text (default: stdin)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="translations (default: stdout)"),
    beam: int = typer.Option(1, help="beam size (1 = greedy)"),
    batch_size: int = typer.Option(32, help="sentences per batch"),
    max_len_ratio: float = typer.Option(2.0, help="output limit: ratio x source subwords + 5"),
    length_penalty: float = typer.Option(1.0, help="beam: rank by log p / length^this"),
    max_input_len: int = typer.Option(200, help="translate longer lines in pieces of this many subwords"),
    buffer_size: int = typer.Option(1024, help="lines read, sorted and translated at a time"),
    precision: str = typer.Option("fp32", help="fp32 or bf16"),
    quantize: str = typer.Option("none", help="none or int8 (dynamic int8 weights, CPU)"),
    min_len: int = typer.Option(0, hidden=True),
    max_len: int = typer.Option(0, hidden=True),
) -> None:
    """Translate raw text: exactly one output line per input line, in order."""
    from nmtkit.checkpoint import LoadedModel
    from nmtkit.translate import DecodeOptions, translate_lines

    opts = DecodeOptions(beam=beam, batch_size=batch_size, max_len_ratio=max_len_ratio,
                         length_penalty=length_penalty, max_input_len=max_input_len,
                         buffer_size=buffer_size, precision=precision, quantize=quantize,
                         min_len=min_len, max_len=max_len)
    opts.validate()
    loaded = LoadedModel(model)
    lines = read_text_lines(input, "input")
    out = open_output(output)
    written = 0
    for text in translate_lines(loaded, lines, opts):
        out.write(text + "\n")
        written += 1
        if written % opts.buffer_size == 0:
            out.flush()
    out.flush()


# ----------------------------------------------------------------------------- score

@app.command()
@friendly
def score(
    hyp: Optional[Path] = typer.Argument(None, help="detokenized hypotheses (default: stdin)"),
    ref: List[Path] = typer.Option(..., help="reference file (repeat for several references)"),
    metrics: str = typer.Option("bleu,chrf,ter", help="comma-separated: bleu, chrf, ter"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """sacreBLEU BLEU, chrF and TER with signatures."""
    from nmtkit.score import corpus_scores

    chosen = tuple(m.strip().lower() for m in metrics.split(",") if m.strip())
    unknown = [m for m in chosen if m not in ("bleu", "chrf", "ter")]
    if unknown or not chosen:
        raise UsageError(f"unknown metric(s) {unknown}; choose from bleu, chrf, ter")
    hyps = list(read_text_lines(hyp, "hypothesis file"))
    refs = [list(read_text_lines(r, "reference file")) for r in ref]
    for path, lines in zip(ref, refs):
        if len(lines) != len(hyps):
            raise NmtkitError(f"{path} has {len(lines)} lines but {hyp or 'stdin'} has {len(hyps)}")
    results = corpus_scores(hyps, refs, chosen)
    if as_json:
        print(json.dumps({r.name: r.to_dict() for r in results}))
    else:
        for r in results:
            print(f"{r.text}\t{r.signature}")


# ----------------------------------------------------------------------------- align

@app.command()
@friendly
def align(
    model: Path = typer.Option(..., "-m", "--model", help="checkpoint"),
    src: Path = typer.Option(..., help="source sentences"),
    tgt: Path = typer.Option(..., help="target sentences (forced decoding)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="alignments (default: stdout)"),
    batch_size: int = typer.Option(32, help="sentence pairs per batch"),
) -> None:
    """Word alignments from attention: one Pharaoh line (i-j, 0-based) per sentence pair."""
    from nmtkit.align import align_lines
    from nmtkit.checkpoint import LoadedModel

    src_lines = list(read_text_lines(src, "source file"))
    tgt_lines = list(read_text_lines(tgt, "target file"))
    if len(src_lines) != len(tgt_lines):
        raise NmtkitError(f"{src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}")
    loaded = LoadedModel(model)
    out = open_output(output)
    for line in align_lines(loaded, src_lines, tgt_lines, batch_size):
        out.write(line + "\n")
    out.flush()


def main() -> None:
    """The ``nmtkit`` executable: run one command, then leave without tearing the interpreter down.

    Python's shutdown deallocates every module object torch created, about half a second that
    a translation in a shell pipeline would wait for after its last line. Output is flushed and
    the atexit handlers run (logging, multiprocessing), then the process exits directly.
    """
    gc.disable()  # re-enabled by `friendly` once the command line is parsed
    nmtkit.kernels.bound_primitive_cache()  # before any oneDNN product
    try:
        app()
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):  # sys.exit("message")
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Flush stdout/stderr, run the atexit handlers and exit with ``code``, skipping finalisation."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # reader gone, or stream closed: nothing left to say
            pass
        except OSError:
            code = code or 1
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is not None:
        run_handlers()
    os._exit(code)


if __name__ == "__main__":
    main()

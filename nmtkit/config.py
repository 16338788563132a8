"""Configuration as plain dataclasses: model, training and decoding.

A recipe is a YAML file with the sections ``model:`` and ``train:``; command-line flags override
it, and ``--set section.key=value`` overrides anything. Unknown keys are errors (a typo never
passes silently). The resolved config is stored in checkpoints as plain data (``asdict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nmtkit.errors import UsageError


@dataclass
class ModelConfig:
    """Architecture: component names (see the registries) and sizes."""

    encoder: str = "birnn"
    decoder: str = "luong"
    attention: str = "luong-general"
    window: str = "global"
    window_size: int = 10  # D of Luong §3.2
    renormalize_window: bool = False  # local-p: Luong's definition does not renormalise
    rnn: str = "lstm"
    layers: int = 2
    hidden_size: int = 256
    embed_size: int = 256
    dropout: float = 0.3
    input_feed: bool = True
    reverse_source: bool = False
    bridge: str = "auto"
    maxout_size: int = 0  # bahdanau/none decoders: deep-output size l (0 = hidden_size // 2)
    max_source_len: int = 0  # luong-location: number of source positions W_a predicts (0 = from data)
    src_vocab_size: int = 0  # filled in from the data
    tgt_vocab_size: int = 0

    def resolved(self) -> "ModelConfig":
        """A copy with 'auto' values decided (bridge)."""
        bridge = self.bridge
        if bridge == "auto":
            bridge = "backward" if self.decoder == "bahdanau" and self.encoder == "birnn" else "projection"
        return dataclasses.replace(self, bridge=bridge)

    def validate(self) -> None:
        """Reject unknown names and combinations that make no sense, with a clear message."""
        from nmtkit.registry import ATTENTIONS, BRIDGES, DECODERS, ENCODERS, WINDOWS
        import nmtkit.model  # noqa: F401  (registers every component)

        for registry, name in ((ENCODERS, self.encoder), (DECODERS, self.decoder),
                               (ATTENTIONS, self.attention), (WINDOWS, self.window)):
            registry.get(name)
        if self.bridge != "auto":
            BRIDGES.get(self.bridge)
        if self.rnn not in ("lstm", "gru"):
            raise UsageError(f"unknown rnn '{self.rnn}'; choose one of: lstm, gru")
        for name in ("layers", "hidden_size", "embed_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"model.{name} must be at least 1 (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.encoder == "birnn" and self.hidden_size % 2:
            raise UsageError("encoder 'birnn' splits hidden_size over two directions: it must be even")
        if (self.decoder == "none") != (self.attention == "none"):
            raise UsageError(
                "decoder 'none' (RNNencdec) and attention 'none' go together: the decoder without "
                "attention sees only the encoder summary; use --decoder none --attention none"
            )
        if self.attention == "none" and self.window != "global":
            raise UsageError(f"window '{self.window}' needs an attention score, not attention 'none'")
        if self.renormalize_window and self.window != "local-p":
            raise UsageError(f"renormalize_window only changes window 'local-p' (the weights of window "
                             f"'{self.window}' already sum to 1); drop --renormalize-window")
        if not self.input_feed and self.decoder != "luong":
            raise UsageError(f"input feeding is an option of decoder 'luong' only; decoder '{self.decoder}' "
                             f"has none to switch off (drop --no-input-feed)")
        if self.window != "global" and self.window_size < 1:
            raise UsageError(f"window_size must be at least 1 (got {self.window_size})")
        if self.attention == "luong-location" and self.max_source_len < 1:
            raise UsageError("attention 'luong-location' needs model.max_source_len (the positions W_a predicts)")
        if self.resolved().bridge == "backward" and self.encoder != "birnn":
            raise UsageError("bridge 'backward' (s_0 = tanh(W_s ←h_1)) needs encoder 'birnn'")
        if self.decoder != "bahdanau" and self.decoder != "none" and self.maxout_size:
            raise UsageError("model.maxout_size is the deep output of decoders 'bahdanau' and 'none'")


@dataclass
class TrainConfig:
    """Optimisation, batching, validation and checkpointing."""

    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 0.5  # multiply lr by this when validation perplexity stops improving
    # ... and, from this epoch on (0 = never), at the end of every epoch whatever the perplexity:
    # Luong et al. 2015 §4.1 "after 8 epochs, we start halving the learning rate every epoch"
    lr_decay_start: int = 0
    label_smoothing: float = 0.0
    clip_norm: float = 5.0
    batch_tokens: int = 4096
    batch_sents: int = 0  # at most this many sentences per batch as well (0 = no cap)
    epochs: int = 10
    max_steps: int = 0  # 0 = no limit
    seed: int = 1
    valid_every: int = 0  # also validate every N steps (0 = only at the end of each epoch)
    valid_bleu: bool = True
    patience: int = 0  # stop after this many validations without improvement (0 = never)
    precision: str = "fp32"
    update_freq: int = 1
    keep_last: int = 0  # keep this many step checkpoints beside last.pt and best.pt (0 = none)
    log_every: int = 100

    def validate(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise UsageError(f"unknown optimizer '{self.optimizer}'; choose one of: adam, sgd")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"unknown precision '{self.precision}'; choose one of: fp32, bf16")
        if self.update_freq < 1:
            raise UsageError(f"train.update_freq (--update-freq) must be at least 1 (got {self.update_freq})")
        if self.lr <= 0 or self.batch_tokens < 1 or self.epochs < 0:
            raise UsageError("train.lr and train.batch_tokens must be positive, train.epochs not negative")
        if self.batch_sents < 0:
            raise UsageError("train.batch_sents must be 0 (no cap) or positive")
        if self.lr_decay_start < 0:
            raise UsageError("train.lr_decay_start must be 0 (never) or an epoch number")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError("train.label_smoothing must be in [0, 1)")


@dataclass
class Config:
    """Everything `nmtkit train` needs besides the data directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        unknown = set(data) - {"model", "train"}
        if unknown:
            raise UsageError(f"{source}: unknown section(s) {sorted(unknown)}; expected model, train")
        return cls(
            model=_build(ModelConfig, data.get("model") or {}, f"{source}: model"),
            train=_build(TrainConfig, data.get("train") or {}, f"{source}: train"),
        )


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(names)}")
    return cls(**{k: _coerce(names[k], v, where) for k, v in values.items()})


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check a YAML/CLI value against the field's default type (ints may stand for floats)."""
    kind = type(f.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UsageError(f"{where}.{f.name} must be {kind.__name__}, got {value!r}")
    return value


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe as a plain dict (errors name the file)."""
    import yaml  # here, not at the top: ~16 ms that `translate` and `score` never need

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"recipe not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid YAML recipe ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a mapping with sections model: and train:")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a config dict."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train"):
            raise UsageError(f"--set expects section.key=value with section model or train, got '{item}'")
        data.setdefault(section, {})[name] = yaml.safe_load(raw)
    return data


def resolve_config(recipe: str | Path | None, flags: dict[str, dict[str, Any]],
                   overrides: list[str] | None = None) -> Config:
    """Recipe, then flags that were given (not None), then ``--set`` overrides (strict keys and
    types; component names and combinations are checked later by ``Config.validate``)."""
    data: dict[str, Any] = load_recipe(recipe) if recipe else {}
    source = str(recipe) if recipe else "flags"
    for section, values in flags.items():
        for k, v in values.items():
            if v is not None:
                data.setdefault(section, {})[k] = v
    apply_overrides(data, overrides or [])
    config = Config.from_dict(data, source)
    return config

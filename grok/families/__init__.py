"""Model families, by name: how a directory of one family's release becomes a GrokConfig, the
leaves of the leaf table, a tokenizer and (for chat models) a chat template. `detect(path)`
picks the family from what the directory holds; the model code knows no family (every
difference is a GrokConfig field). A third family is a module here and an entry in FAMILIES.

- grok-1: `ckpt-0/` (the release's pickles, or safetensors `convert` wrote) + optional
  config.json, SentencePiece `tokenizer.model`, no chat template (a base model);
- grok-2: the `xai-org/grok-2` release as downloaded: `pytorch_model-*-TP-*.safetensors`,
  its config.json, tiktoken `tokenizer.tok.json`, the Grok-2 chat format.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from grok import checkpoint
from grok.checkpoint import grok2_release
from grok.config import GrokConfig
from grok.errors import CheckpointError, TokenizerError
from grok.leaves import checkpoint_entries
from grok.progress import Progress
from grok.families import grok2
from grok.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's release: how to recognise, configure, read and tokenize it."""

    name: str
    model_name: str                                   # what /v1/models calls it by default
    detect: Callable[[Path], bool]
    read_config: Callable[[Path, Any], GrokConfig]    # (path, its tokenizer or None)
    read_weights: Callable[[Path, GrokConfig, bool], dict[str, Any]]   # (path, config, progress)
    # (path, config) -> (entry, leaf) one at a time, for placing on a mesh; None: the release's
    # files are in the leaf table's layout, and grok.checkpoint.loader streams their slices
    stream_leaves: Callable[[Path, GrokConfig], Iterable[tuple[Any, Any]]] | None
    tokenizer_file: str
    open_tokenizer: Callable[[Path], Any]             # a tokenizer file -> its tokenizer
    chat: bool                                        # chat-tuned: has a chat template

    def tokenizer(self, path: Path, override: str | os.PathLike | None = None) -> Any:
        """The tokenizer `override` names, else the directory's own file, else None."""
        file = Path(override) if override is not None else path / self.tokenizer_file
        return self.open_tokenizer(file) if override is not None or file.is_file() else None


def _read_grok1(path: Path, config: GrokConfig, progress: bool) -> dict[str, Any]:
    return checkpoint.read_checkpoint(path, config, progress=progress)


def _read_grok2(path: Path, config: GrokConfig, progress: bool) -> dict[str, Any]:
    release = grok2_release.open_release(path, config)
    flat = {}
    with Progress(len(checkpoint_entries(config)), f"reading {release}", enabled=progress,
                  logger=log, unit="leaves") as bar:
        for entry, leaf in release.leaves():
            flat[entry.name] = leaf
            bar.update(1, leaf.nbytes)
    return flat


def _grok2_leaves(path: Path, config: GrokConfig) -> Iterable[tuple[Any, Any]]:
    return grok2_release.open_release(path, config).lazy_leaves()


def _is_grok1(path: Path) -> bool:
    try:
        checkpoint.checkpoint_dir(path)
    except CheckpointError:
        return False
    return True


def _grok2_config(path: Path, tokenizer: Any) -> GrokConfig:
    if tokenizer is not None and tokenizer.pad_id < 0:   # (the model masks pad positions)
        raise TokenizerError(f"{tokenizer.path}: no <|pad|> token")
    if tokenizer is None:
        log.warning("%s: no %s: end of sequence and padding unknown (id 0 taken for both)",
                    path, grok2.TOKENIZER_FILE)
    ids = dict(eos_token=tokenizer.eos_id, pad_token=tokenizer.pad_id) if tokenizer else {}
    return grok2.read_config(path, **ids)


def _tiktoken(file: Path) -> Any:
    from grok.serving.tiktoken_tokenizer import TiktokenTokenizer
    return TiktokenTokenizer(file)


def _converted(path: Path, family: str) -> bool:
    """A ckpt-0/ directory (the release's pickles or convert's safetensors) whose config.json
    names `family` (none names grok-1)."""
    return _is_grok1(path) and checkpoint.read_config(path).family == family


_read_ckpt_config = lambda path, tok: checkpoint.read_config(path)   # noqa: E731 (ids inside)

GROK2 = Family("grok-2", "grok-2", grok2.detect, _grok2_config, _read_grok2, _grok2_leaves,
               grok2.TOKENIZER_FILE, _tiktoken, chat=True)
# Grok-2 converted (python -m grok.checkpoint convert): ckpt-0/ and our config.json, which keeps
# the tokenizer's ids; the release's tokenizer and chat format.
GROK2_CONVERTED = dataclasses.replace(
    GROK2, detect=lambda path: _converted(path, "grok-2"), read_config=_read_ckpt_config,
    read_weights=_read_grok1, stream_leaves=None)
GROK1 = Family("grok-1", "grok-1", _is_grok1, _read_ckpt_config, _read_grok1, None,
               "tokenizer.model", Tokenizer, chat=False)
# Checked in this order: the first whose `detect` takes the directory is its family.
FAMILIES: tuple[Family, ...] = (GROK2, GROK2_CONVERTED, GROK1)


def detect(path: str | os.PathLike) -> Family:
    """The family whose release (or conversion) `path` holds; a CheckpointError naming what a
    model directory should hold otherwise."""
    p = Path(path)
    for family in FAMILIES:
        if family.detect(p):
            return family
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint directory (no ckpt-0/ of Grok-1, no "
                          "pytorch_model-*-TP-common.safetensors of Grok-2)")


def read_source(path: str | os.PathLike) -> tuple[Family, Any, GrokConfig]:
    """(family, tokenizer or None, config) of the checkpoint directory `path`, for `convert`,
    `verify` and `plan`: the tokenizer is opened only where the config needs its ids (Grok-2's
    release), and there it must be: ids guessed would be written into a conversion's config."""
    family = detect(path)
    if family.read_config is not _grok2_config:
        return family, None, family.read_config(Path(path), None)
    tokenizer = family.tokenizer(Path(path))
    if tokenizer is None:
        raise CheckpointError(f"{Path(path) / family.tokenizer_file}: missing (a Grok-2 "
                              "release's token ids are read from it)")
    return family, tokenizer, family.read_config(Path(path), tokenizer)


def config_file(path: str | os.PathLike) -> GrokConfig:
    """The GrokConfig of a config.json in grok's form or in a release's (Grok-2's keys; then
    without its tokenizer: token ids 0), e.g. for `plan --config`."""
    data = grok2.read_release_json(Path(path))
    if grok2.is_release_config(data):
        return grok2.config_from_release(data, str(path))
    return GrokConfig.from_json(path)

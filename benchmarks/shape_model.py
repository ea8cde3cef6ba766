"""Shape-only models: a model's architecture and tokenizer with seeded random weights, for timing.

Step throughput depends on the shapes alone when every completion runs to its fixed length (the suites pin
``min_new_tokens = max_new_tokens`` on every side), so a machine that cannot hold or fetch the real weights
(the GPU device takes at most 64 MiB of files, and has no network) still times the same work:

    python -m benchmarks.shape_model export SRC DST [--preset smollm2-1.7b]   # config + tokenizer, no weights
    python -m benchmarks.shape_model materialize DST [--into DIR] [--layers N]  # seeded random bf16 weights

``materialize`` writes into ``DST`` itself unless ``--into`` names another folder (a copy of ``DST``'s config
and tokenizer, with its weights): ``benchmarks/gpu.sh`` keeps the weights out of ``.opsd/bench``, which
travels to the GPU box under a 64 MiB limit. ``--layers N`` keeps N decoder layers (the GPU run's
rehearsal on a CPU: the larger model's widths and vocabulary, few layers).

Reports name such a model by its directory (``*-shape``); its losses and samples mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# known architectures that share a source's tokenizer: config fields replaced on export
PRESETS: dict[str, dict[str, object]] = {
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192,
                     "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"},
                     "tie_word_embeddings": True},
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
MARKER = "SHAPE_ONLY"


def export(src: Path, dst: Path, preset: str | None = None) -> Path:
    """Copy ``src``'s config and tokenizer files (never its weights) to ``dst``, with a preset's fields."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        # no weights, no weight index, no cache markers (dotfiles)
        if path.is_file() and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json")) and path.name[0] != ".":
            shutil.copy2(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    config.update(PRESETS[preset] if preset else {})
    (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (dst / MARKER).write_text(f"shape of {src.name}{' as ' + preset if preset else ''}; weights: seeded random\n")
    return dst


def materialize(dst: Path, seed: int = 0, into: Path | None = None, layers: int | None = None) -> Path:
    """Write seeded random bf16 weights into ``dst`` (or into ``into``, a copy of ``dst`` with ``layers``
    decoder layers when given) unless the folder holds weights already (idempotent). Returns that folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if into is not None and into.resolve() != dst.resolve():
        if not (into / "config.json").is_file():  # made once; after that the folder is what it holds
            into.mkdir(parents=True, exist_ok=True)
            for path in dst.iterdir():
                if path.is_file() and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
                    shutil.copy2(path, into / path.name)
        dst = into
    has_weights = any(p.name.endswith(WEIGHT_SUFFIXES) for p in dst.iterdir())
    if layers is not None:
        config = json.loads((dst / "config.json").read_text())
        if config.get("num_hidden_layers") != layers:
            if has_weights:
                raise ValueError(f"{dst} holds weights of {config.get('num_hidden_layers')} layers, not {layers}")
            config["num_hidden_layers"] = layers
            if isinstance(config.get("layer_types"), list):  # per-layer lists some configs carry
                config["layer_types"] = config["layer_types"][:layers]
            (dst / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if has_weights:
        return dst
    config = AutoConfig.from_pretrained(dst)
    torch.manual_seed(seed)
    # initialised on the GPU when there is one: a 1.7B model's normal_ draws take a while on a CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="config + tokenizer of SRC into DST, without weights")
    ex.add_argument("src", type=Path)
    ex.add_argument("dst", type=Path)
    ex.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ma = sub.add_parser("materialize", help="seeded random weights into an exported DST")
    ma.add_argument("dst", type=Path)
    ma.add_argument("--seed", type=int, default=0)
    ma.add_argument("--into", type=Path, default=None, help="write the model there (DST's files and the weights)")
    ma.add_argument("--layers", type=int, default=None, help="keep this many decoder layers")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(export(args.src, args.dst, args.preset))
    else:
        print(materialize(args.dst, args.seed, args.into, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())

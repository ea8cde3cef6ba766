"""Model sources: tiny factory, local dirs, hub ids offline, GGUF conversion, LoRA, candidates, hashing."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from opsd_core.config import LoraConfig, ModelConfig, TinyModelConfig
from opsd_core.models.lora import wrap_lora
from opsd_core.models.sources import (
    _MARKER,
    BUNDLED_SMOLLM2,
    ModelSourceError,
    _materialise,
    build_tiny_model_dir,
    load_candidate,
    load_model_and_tokenizer,
    resolve_base_dir,
    weights_hash,
)

CHATML_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
]
# Written out by hand from the ChatML format, not produced by the code under test.
CHATML_EXPECTED = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(TinyModelConfig(), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 41, 42, 300, 301, 2], [1, 7, 8, 9, 10, 11, 2]])


def test_tiny_build_is_byte_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model_dir(TinyModelConfig(), tmp_path / "again")
    assert (tiny_dir / "model.safetensors").is_file()
    assert _file_digests(again) == _file_digests(tiny_dir)
    other_seed = build_tiny_model_dir(TinyModelConfig(seed=1), tmp_path / "seed1")
    assert weights_hash(other_seed) != weights_hash(tiny_dir)


def test_tiny_loads_through_config(tmp_path: Path) -> None:
    cfg = ModelConfig(base="tiny", cache_dir="cache")
    model, tok = load_model_and_tokenizer(cfg, root=tmp_path)
    tiny = cfg.tiny
    assert not model.training
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (tiny.layers, tiny.hidden)
    assert model.config.vocab_size == len(tok) == tiny.vocab
    assert tok.padding_side == "left"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == model.config.pad_token_id == im_end
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == im_end
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    folder = Path(resolve_base_dir(cfg, root=tmp_path))
    assert folder.parent == (tmp_path / "cache").resolve() and folder.name.startswith("tiny-")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_dir(cfg, root=tmp_path) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = resolve_base_dir(ModelConfig(base="tiny", cache_dir="cache", tiny={"seed": 3}), root=tmp_path)
    assert other != str(folder)


def test_tiny_chat_template_and_digits(tiny_dir: Path) -> None:
    cfg = ModelConfig(base=str(tiny_dir))
    _, tok = load_model_and_tokenizer(cfg)
    with_prompt = tok.apply_chat_template(CHATML_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert with_prompt == CHATML_EXPECTED + "<|im_start|>assistant\n"
    without = tok.apply_chat_template(CHATML_MESSAGES, tokenize=False, add_generation_prompt=False)
    assert without == CHATML_EXPECTED
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    text = "Tom has 1234567890 apples, 3.5% of 47 + 0 = 19.08 ####  42"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(encoded) == text
    digit_tokens = [t for t in tok.convert_ids_to_tokens(encoded) if any(c.isdigit() for c in t)]
    assert all(len(t.lstrip("Ġ")) == 1 for t in digit_tokens)  # one digit per token


def test_local_dir_absolute_and_relative(tiny_dir: Path, ids: torch.Tensor) -> None:
    assert resolve_base_dir(ModelConfig(base=str(tiny_dir))) == str(tiny_dir.resolve())
    relative = ModelConfig(base=tiny_dir.name)
    assert resolve_base_dir(relative, root=tiny_dir.parent) == str(tiny_dir.resolve())
    model, _ = load_model_and_tokenizer(relative, root=tiny_dir.parent)
    again, _ = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    assert torch.equal(_logits(model, ids), _logits(again, ids))


def test_unknown_hub_id_offline_names_it() -> None:
    name = "opsd-test-org/no-such-model-xyz"
    assert resolve_base_dir(ModelConfig(base=name)) == name
    with pytest.raises(ModelSourceError, match=name) as info:
        load_model_and_tokenizer(ModelConfig(base=name))
    assert "local" in str(info.value)


def test_missing_paths_are_not_hub_ids(tmp_path: Path) -> None:
    for base in (str(tmp_path / "missing"), "./nowhere", str(tmp_path / "x.gguf"), "bundled:nope"):
        with pytest.raises(ModelSourceError, match="nowhere|missing|x.gguf|nope"):
            resolve_base_dir(ModelConfig(base=base))


def test_a_failed_build_leaves_no_cache_entry(tmp_path: Path) -> None:
    """The tiny build fails inside its temporary folder (a shape it cannot build): nothing is left in the
    cache that a later run could take for a model, and the next resolve builds it again."""
    cfg = ModelConfig(base="tiny", cache_dir="cache", tiny={"hidden": 66, "heads": 4})
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^model\.tiny\.hidden \(66\) must be a multiple of model\.tiny\.heads \(4\)$"):
            resolve_base_dir(cfg, root=tmp_path)
        assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_conversion_says_it_starts_and_how_long_it_took_once(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def build(tmp: Path) -> None:
        print("building", file=sys.stderr)
        (tmp / "done").write_text("ok")

    _materialise(tmp_path / "entry", build, "model.gguf")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("model model.gguf: preparing it once into ") and lines[1] == "building"
    assert re.fullmatch(r"model model\.gguf: ready in \d+ s", lines[2])
    _materialise(tmp_path / "entry", build, "model.gguf")  # cached: silent
    _materialise(tmp_path / "tiny", build, "tiny")  # under a second: only its own output
    assert capsys.readouterr().err.splitlines() == ["building"]


def test_materialise_holds_the_lock_while_building_and_keeps_a_racers_entry(tmp_path: Path) -> None:
    """What no public call can stage: a second process's view of the lock during a build, and a writer on
    another host completing the entry first."""
    target = tmp_path / "entry"
    lock_path = str(target) + ".lock"
    lock_held: list[bool] = []

    def build(tmp: Path) -> None:
        try:  # a second process must not get the lock while a build runs
            FileLock(lock_path, timeout=0).acquire()
            lock_held.append(False)
        except Timeout:
            lock_held.append(True)
        (tmp / "done").write_text("ok")

    assert _materialise(target, build, "t") == target and lock_held == [True]
    assert _materialise(target, build, "t") == target and lock_held == [True]  # cache hit: no build
    assert (target / "done").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []

    racer = tmp_path / "raced"

    def lose_race(tmp: Path) -> None:  # a writer on another host completes the entry meanwhile
        (tmp / "mine").write_text("x")
        racer.mkdir()
        (racer / "theirs").write_text("y")
        (racer / _MARKER).write_text("{}")

    assert _materialise(racer, lose_race, "t") == racer
    assert sorted(p.name for p in racer.iterdir() if not p.name.startswith(".")) == ["theirs"]


def test_wrap_lora_trains_only_adapter(tiny_dir: Path, ids: torch.Tensor) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    base_logits = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = wrap_lora(model, LoraConfig(r=4, alpha=8.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    # A and B matrices for 7 projections in each of the 2 layers
    assert len(trainable) == 2 * 7 * 2 and all("lora_" in n for n in trainable)
    assert torch.equal(_logits(peft_model, ids), base_logits)  # B starts at zero
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B moves on step 1, A's gradient is nonzero from step 2
        peft_model.train()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    assert not torch.equal(_logits(peft_model, ids), base_logits)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, ids), base_logits)
    base_state = peft_model.get_base_model().state_dict()
    for name, value in before.items():
        key = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_state.get(name, base_state.get(key)), value), name


def test_wrap_lora_rejects_unknown_modules(tiny_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    with pytest.raises(ValueError, match="query_key_value"):
        wrap_lora(model, LoraConfig(target_modules=["query_key_value"]))
    partial = wrap_lora(model, LoraConfig(target_modules=["q_proj", "query_key_value"]))
    assert {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in partial.named_parameters() if p.requires_grad
    } == {"q_proj"}


def test_adapter_and_full_candidates_reload(tiny_dir: Path, ids: torch.Tensor, tmp_path: Path) -> None:
    model, tok = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    peft_model = wrap_lora(model, LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    expected = _logits(peft_model, ids)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    loaded, loaded_tok = load_candidate(str(tiny_dir), adapter_dir)
    assert not loaded.training and loaded_tok.padding_side == "left"
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-6, rtol=0)

    full_dir = tmp_path / "full"
    peft_model.merge_and_unload().save_pretrained(full_dir)  # no tokenizer: falls back to the base's
    full, full_tok = load_candidate(str(tiny_dir), full_dir)
    assert full_tok.pad_token == "<|im_end|>"
    assert torch.allclose(_logits(full, ids), expected, atol=1e-5, rtol=0)


def test_weights_hash_tracks_weights_only(tiny_dir: Path, tmp_path: Path) -> None:
    reference = weights_hash(tiny_dir)
    assert reference == weights_hash(tiny_dir / "model.safetensors")
    tensors = load_file(tiny_dir / "model.safetensors")
    names = sorted(tensors)
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    # different tensor order, metadata and sharding: same content
    save_file({n: tensors[n] for n in reversed(names[:5])}, resaved / "b.safetensors", metadata={"x": "1"})
    save_file({n: tensors[n] for n in names[5:]}, resaved / "a.safetensors")
    assert weights_hash(resaved) == reference
    changed = tmp_path / "changed"
    changed.mkdir()
    bumped = dict(tensors)
    bumped[names[0]] = bumped[names[0]].clone()
    bumped[names[0]].view(-1)[0] += 1e-3
    save_file(bumped, changed / "model.safetensors")
    assert weights_hash(changed) != reference
    with pytest.raises(FileNotFoundError):
        weights_hash(tmp_path / "nothing-here")


@pytest.mark.slow
def test_bundled_gguf_converts_once(tmp_path: Path) -> None:
    cfg = ModelConfig(base=BUNDLED_SMOLLM2, cache_dir=str(tmp_path / "cache"))
    folder = Path(resolve_base_dir(cfg))
    assert folder.name.startswith("gguf-") and (folder / "model.safetensors").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    model, tok = load_model_and_tokenizer(cfg)
    assert resolve_base_dir(cfg) == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # cache hit, no rewrite
    assert getattr(model.config, "quantization_config", None) is None
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.padding_side == "left"
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template(CHATML_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(CHATML_EXPECTED + "<|im_start|>assistant\n")
    text = "The capital of France is Paris. It is a large city with many museums and old buildings."
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.logits).all()
    # A uniform guess costs ln(49152) ~ 10.8 nats per token; dequantised real weights do far better.
    assert out.loss.item() < 5.0


def test_thinking_switch_reaches_the_template_for_both_contexts_and_lm_eval(tiny_dir: Path) -> None:
    """model.thinking is passed as enable_thinking (Qwen3's switch) to the student's and the teacher's
    template alike, so a completion still scores behind either prefix; templates without it ignore it."""
    from opsd_core.algorithm.prompts import student_prompt_ids, teacher_prompt_ids
    from opsd_core.config import EvalConfig, load_params
    from opsd_core.evaluation.harness import model_args

    _, tok = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    plain = student_prompt_ids(tok, "What is 2 + 2?")
    assert student_prompt_ids(tok, "What is 2 + 2?", thinking=False) == plain  # no switch in this template
    # Qwen3's rule, written by hand: thinking off leaves an empty think block after the generation prompt
    tok.chat_template += "{% if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}" \
                         "<think>\n\n</think>\n\n{% endif %}"
    think_block = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    off = student_prompt_ids(tok, "What is 2 + 2?", thinking=False)
    assert student_prompt_ids(tok, "What is 2 + 2?") == plain and off == plain + think_block
    teacher = teacher_prompt_ids(tok, "What is 2 + 2?", "2 + 2 = 4\n#### 4", thinking=False)
    assert teacher[-len(think_block):] == think_block
    assert model_args("m", None, EvalConfig(), "cpu", thinking=False)["enable_thinking"] is False
    assert "enable_thinking" not in model_args("m", None, EvalConfig(), "cpu")
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml", "gpu").model.thinking is False


def test_a_lora_adapter_on_the_output_head_is_refused(tiny_dir: Path) -> None:
    """The chunked loss projects with the head's base weight: an adapter there would never train."""
    from opsd_core.config import ConfigError, LoraConfig

    model, _ = load_model_and_tokenizer(ModelConfig(base=str(tiny_dir)))
    with pytest.raises(ConfigError, match="lora.target_modules: lm_head is the output head"):
        wrap_lora(model, LoraConfig(target_modules=["q_proj", "lm_head"]))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_cache_entry_is_found_by_its_hashes_and_rebuilt(tmp_path: Path, damage: str) -> None:
    cfg = ModelConfig(base="tiny", cache_dir="cache")
    entry = Path(resolve_base_dir(cfg, root=tmp_path))
    weights = entry / "model.safetensors"
    reference = weights_hash(entry)
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip":
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0xFF
        weights.write_bytes(blob)
    else:
        (entry / "tokenizer.json").unlink()
    # a new process (the check is remembered per process): run the resolve in a subprocess
    import subprocess
    import sys

    code = ("from pathlib import Path; from opsd_core.config import ModelConfig; "
            "from opsd_core.models.sources import resolve_base_dir; "
            f"print(resolve_base_dir(ModelConfig(base='tiny', cache_dir='cache'), root=Path({str(tmp_path)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert Path(out.stdout.strip()) == entry
    assert "damaged" in out.stderr  # it says what it found
    assert weights_hash(entry) == reference and (entry / "tokenizer.json").is_file()
    loaded, _ = load_model_and_tokenizer(cfg, root=tmp_path)
    assert loaded is not None

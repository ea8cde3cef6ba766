"""Typed params: profiles, overrides, validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_core.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_profiles_load() -> None:
    default = load_params(ROOT / "params.yaml", "default")
    smoke = load_params(ROOT / "params.yaml", "smoke")
    gpu = load_params(ROOT / "params.yaml", "gpu")
    assert default.model.base.startswith("bundled:") and smoke.model.base == "tiny"
    # the paper's recipe (DESIGN.md section 5)
    assert (gpu.lora.r, gpu.lora.alpha, gpu.train.lr, gpu.train.grad_clip) == (64, 128, 5e-6, 0.1)
    assert (gpu.train.rollouts_per_step, gpu.opsd.sampling.max_new_tokens) == (32, 1024)
    assert (gpu.opsd.divergence, gpu.opsd.clip, gpu.opsd.clip_value, gpu.opsd.teacher) == (
        "forward_kl", "pointwise", 0.05, "fixed")
    # profiles merge deeply: keys a profile does not name keep the default
    assert smoke.opsd.sampling.temperature == default.opsd.sampling.temperature
    assert len({default.hash(), smoke.hash(), gpu.hash()}) == 3


def test_overrides_parse_yaml_values_and_nest() -> None:
    p = load_params(ROOT / "params.yaml", "smoke", ["train.lr=0.5", "opsd.sampling.top_k=3",
                                                      "lora.target_modules=[q_proj]", "eval.limit=null"])
    assert p.train.lr == 0.5 and p.opsd.sampling.top_k == 3
    assert p.lora.target_modules == ["q_proj"] and p.eval.limit is None


@pytest.mark.parametrize(("override", "needle"), [
    ("train.stepz=1", "train.stepz: unknown key"),
    ("train.steps=many", "train.steps:"),
    ("opsd.sampling.top_p=2", "opsd.sampling.top_p:"),
    ("opsd.teacher=frozen", "opsd.teacher:"),
    ("nosection.x=1", "nosection: unknown key"),
    ("train.rollouts_per_step=3", "multiple of train.micro_batch_size"),
])
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_params(ROOT / "params.yaml", None, [override])


def test_bad_files_and_profiles(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"p\.yaml"):
        load_params(bad)
    with pytest.raises(ConfigError, match="unknown profile"):
        load_params(ROOT / "params.yaml", "turbo")
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(ROOT / "params.yaml", None, ["train.lr"])


def test_hash_ignores_key_order() -> None:
    a = Params.model_validate({"train": {"lr": 0.1, "steps": 3}})
    b = Params.model_validate({"train": {"steps": 3, "lr": 0.1}})
    assert a.hash() == b.hash() != Params().hash()


def test_teacher_dtype_needs_the_fixed_teacher() -> None:
    ok = load_params(ROOT / "params.yaml", "smoke", ["opsd.teacher_dtype=bfloat16"])
    assert ok.opsd.teacher_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="fixed teacher only"):
        load_params(ROOT / "params.yaml", "smoke", ["opsd.teacher=ema", "opsd.teacher_dtype=bfloat16"])


def test_bare_yaml_on_and_off_are_read_as_the_settings(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare on/off as booleans; params.yaml's own comment writes them bare."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  packed_weights: off\n")
    assert load_params(path).train.packed_weights == "off"
    assert load_params(path, overrides=["train.packed_weights=on"]).train.packed_weights == "on"
    assert load_params(path, overrides=["train.packed_weights='auto'"]).train.packed_weights == "auto"


def test_an_invalid_choice_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml", overrides=["train.packed_weights=sometimes"])
    assert "train.packed_weights: Input should be 'auto', 'on' or 'off' (got 'sometimes')" in str(err.value)
    with pytest.raises(ConfigError, match="train.cpu_allocator: Input should be 'auto', 'tuned' or 'default'"):
        load_params(tmp_path / "params.yaml", overrides=["train.cpu_allocator=fast"])


def test_doubtful_combinations_are_advised_not_refused() -> None:
    p = load_params(ROOT / "params.yaml", "smoke", ["opsd.support=sampled", "opsd.clip=pointwise"])
    assert len(p.opsd.advice()) == 1 and "opsd.clip=pointwise" in p.opsd.advice()[0]
    assert load_params(ROOT / "params.yaml", "smoke", ["opsd.support=sampled", "opsd.clip=none"]).opsd.advice() == []
    assert load_params(ROOT / "params.yaml", "smoke").opsd.advice() == []


def test_errors_from_set_say_so_instead_of_blaming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", "smoke", ["train.stepz=1"])
    assert "train.stepz: unknown key (from --set)" in str(err.value)
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  stepz: 1\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"invalid configuration in {path}:" in str(err.value) and "(from --set)" not in str(err.value)

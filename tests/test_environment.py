"""The pinned stack (constraints.txt): the install follows it, and a run records how it compares."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from opsd_core.backends.environment import LOCK_FILE, lock_differences, versions
from opsd_core.registry.card import model_card


def test_this_environment_is_the_pinned_stack() -> None:
    """`make install` installs through constraints.txt: every pin holds here (CI installs from scratch)."""
    assert LOCK_FILE.is_file()
    assert lock_differences() == {}


def test_the_lock_pins_every_installed_distribution() -> None:
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in LOCK_FILE.read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}
    assert {"torch", "transformers", "peft", "lm-eval", "mlflow", "prefect", "dvc"} <= pinned
    missing = installed - pinned - {"opsd", "pip", "setuptools", "wheel"}
    assert missing == set(), f"installed but not pinned: {sorted(missing)}"


def test_differences_are_reported_against_any_lock(tmp_path: Path) -> None:
    torch_version = metadata.version("torch")  # e.g. 2.13.0+cpu: the local label does not count
    lock = tmp_path / "constraints.txt"
    lock.write_text(f"# comment\ntorch=={torch_version.split('+')[0]}\nnumpy==0.0.1\nno-such-package==1.0\n"
                    "pyyaml>=5  # not a pin: ignored\n")
    diff = lock_differences(lock)
    assert set(diff) == {"numpy", "no-such-package"}
    assert diff["numpy"] == ("0.0.1", metadata.version("numpy"))
    assert diff["no-such-package"] == ("1.0", None)


def test_each_run_records_the_lock_and_the_card_shows_it() -> None:
    record = versions()
    assert record["lock_sha256"] and len(record["lock_sha256"]) == 16
    assert record["lock_differences"] == "none"
    card = model_card({"content_hash": "abc"}, {"tasks": {}}, {"versions": record}, {}, {}, None, "m")
    assert f"`{record['lock_sha256']}`" in card and f"torch {record['torch']}" in card


def test_the_card_lists_nested_settings_one_per_line() -> None:
    from opsd_core.config import Params

    dump = Params().model_dump(mode="json")
    card = model_card({"content_hash": "abc"}, {"tasks": {}}, {}, dump, {}, None, "m").splitlines()
    train = card.index("- **train**")
    assert card[train + 1].startswith("  - ") and ": `" in card[train + 1]
    assert f"  - lr: `{dump['train']['lr']}`" in card
    assert "  - sampling" in card  # a nested section gets its own bullet ...
    assert f"    - temperature: `{dump['opsd']['sampling']['temperature']}`" in card  # ... and its own lines

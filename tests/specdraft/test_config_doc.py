"""docs/config.md is generated from the config dataclasses (docs/config_doc.py); stale is a failure."""

import dataclasses
import importlib.util
import typing
from pathlib import Path

from specdraft.config import Config

ROOT = Path(__file__).resolve().parents[2]


def config_doc():
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "docs" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out += leaf_keys(hints[f.name], key) if dataclasses.is_dataclass(hints[f.name]) else [key]
    return out


def test_config_doc_is_up_to_date():
    assert config_doc().render() == (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: run `make docs`"
    )


def test_config_doc_lists_every_key_with_its_default_and_comment():
    doc = (ROOT / "docs" / "config.md").read_text()
    for key in leaf_keys(Config, ""):
        assert f"| `{key}` |" in doc, key
    assert "| `drafter.max_nodes` | int | `8` | node budget per draft tree |" in doc
    assert "| `server.max_nodes` | int | `256` | cap on the node budget of any tree |" in doc
    # a comment that goes on over the next line belongs to the field it started on
    assert "| `server.workers` | int | `0` | drafting threads for drafters that draft in one call" in doc
    assert "random); 0 = on the event loop itself, the fastest for cheap ones. SpecBlock drafts" in doc

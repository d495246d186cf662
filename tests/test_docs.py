"""The documentation's examples stay true: config snippets parse, commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from replicator.config import parse_config
from tests.conftest import cli

ROOT = Path(__file__).resolve().parent.parent


def yaml_blocks(doc: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/BUDGET.md"])
def test_config_examples_are_valid(doc: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.example.invalid/x")
    monkeypatch.setenv("NODE_NAME", "gpu-node-3")
    blocks = [b for b in yaml_blocks(doc) if "sources:" in b or "targets:" in b]
    assert blocks, f"{doc} has no config example"
    for block in blocks:
        data = yaml.safe_load(block)
        data.setdefault("targets", [{"name": "t", "url": "/tmp/x"}])
        data.setdefault("sources", [{"name": "s", "url": "/tmp/y"}])
        parse_config(data, tmp_path, doc)


def test_every_documented_command_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`replicator (\w+)", readme))
    res = cli("--help")
    for command in documented:
        assert re.search(rf"\b{command}\b", res.stdout), f"README documents `replicator {command}`"


def test_every_metric_is_documented() -> None:
    from replicator.metrics import REGISTRY

    doc = (ROOT / "docs" / "METRICS.md").read_text()
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("replicator_")}
    missing = sorted(n for n in names if n not in doc and f"{n}_total" not in doc)
    assert not missing, f"undocumented metrics: {missing}"


def test_the_format_document_describes_the_manifest_version_written() -> None:
    from replicator.format.manifest import MANIFEST_VERSION, READABLE_VERSIONS

    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    assert doc.splitlines()[0].endswith(f"manifest version {MANIFEST_VERSION})")
    assert f'"version": {MANIFEST_VERSION},' in doc  # the example manifest
    assert f"Manifest version {MANIFEST_VERSION} added" in doc  # the history
    for field in ("path_b64", "name_b64"):  # names that are not UTF-8 (section 5.1)
        assert f"`{field}`" in doc
    reference = (ROOT / "tools" / "restore_reference.py").read_text()
    assert f'm.get("version") not in {READABLE_VERSIONS}' in reference


def test_the_architecture_map_names_every_module() -> None:
    """docs/ARCHITECTURE.md stays true: a module added without a place on the map fails here."""
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    package = ROOT / "replicator"
    names = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").exists()
    }
    missing = sorted(n for n in names - {"__init__", "__main__"} if not re.search(rf"\b{n}\b", text))
    assert not missing, f"docs/ARCHITECTURE.md does not mention {missing}"

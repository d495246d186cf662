"""Several instances, one checkpoint source (issue 21): node-local shards published as one set.

Each "node" is a replicator with its own source directory and state dir, all writing into one
repository; a set is published only once every node's part is in, with what the set's own
description (a safetensors index, a DCP ``.metadata``) names, and never before."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, make_target_spec, write_config
from tests.daemon_helpers import latest_manifest, set_names
from tests.helpers import config_dict, make_checkpoint, tree_digest


def _node_configs(
    tmp_path: Path, target: dict[str, Any], nodes: int, **shared: Any
) -> list[tuple[Path, Path]]:
    """(data dir, config file) per node: source ``ckpt`` with node-local shards."""
    out = []
    for i in range(nodes):
        data = tmp_path / f"node{i}" / "data"
        data.mkdir(parents=True)
        source = {
            "name": "ckpt",
            "url": str(data),
            "kind": "checkpoint",
            "complete_when": {"marker": "model.safetensors.index.json", "quiet": "1s"},
            "shared": {"instances": nodes, "instance": f"node-{i}", "heartbeat": "1s", **shared},
        }
        cfg = config_dict(tmp_path / f"node{i}", [source], [target])
        out.append((data, write_config(tmp_path / f"node{i}" / "r.yaml", cfg)))
    return out


def _spread(step_dir: Path, nodes: list[Path]) -> dict[str, str]:
    """Move a sharded checkpoint's files onto the nodes: the index and shard 0 on node 0,
    shard k on node k. Returns path -> sha256 of the whole set, and makes every file quiet."""
    want = {p: sha for p, (sha, _, _) in tree_digest(step_dir.parent).items()}
    old = time.time() - 60
    for f in sorted(step_dir.iterdir()):
        rank = int(f.name.split("-")[1]) if f.name.startswith("model-") else 0
        dest = nodes[rank] / step_dir.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(f, dest)
        os.utime(dest, (old, old))
    return want


def _index(step_dir: Path, shards: int) -> None:
    weight_map = {f"layer.{r}": f"model-{r:05d}-of-{shards:05d}.safetensors" for r in range(shards)}
    (step_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_set_is_published_once_every_nodes_part_is_in(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = make_target_spec(request, "rclone", tmp_path)
    nodes = _node_configs(tmp_path, spec.config, 3)
    made = make_checkpoint(tmp_path / "made", 1, shards=3, marker=None)
    _index(made, 3)
    want = _spread(made, [d for d, _ in nodes])

    first = cli("sync", "-c", str(nodes[0][1]), "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["sources"][0]["targets"][0]["status"] == "waiting", result
    assert "1 of 3 instances' parts are in" in result["sources"][0]["targets"][0]["error"]
    assert latest_manifest(spec.config, "ckpt") is None, "published with a part missing"

    assert cli("sync", "-c", str(nodes[1][1])).returncode == 0
    again = cli("sync", "-c", str(nodes[0][1]), "--json")
    assert json.loads(again.stdout)["sources"][0]["targets"][0]["status"] == "waiting"
    assert latest_manifest(spec.config, "ckpt") is None

    third = cli("sync", "-c", str(nodes[2][1]), "--json")
    assert json.loads(third.stdout)["sources"][0]["targets"][0]["status"] == "contributed", third.stdout
    done = cli("sync", "-c", str(nodes[0][1]), "--json")
    assert json.loads(done.stdout)["sources"][0]["targets"][0]["status"] == "published", done.stdout
    m = latest_manifest(spec.config, "ckpt")
    assert set_names(m) == ["step-000001"]
    assert m is not None and sorted(f.path for f in m.files) == sorted(want)

    out = tmp_path / "restored"
    restored = cli("restore", "-c", str(nodes[1][1]), "-s", "ckpt", str(out))
    assert restored.returncode == 0, restored.stderr
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want

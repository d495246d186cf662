"""Several instances, one checkpoint source (issue 21): node-local shards published as one set.

Each "node" is a replicator with its own source directory and state dir, all writing into one
repository; a set is published only once every node's part is in, with what the set's own
description (a safetensors index, a DCP ``.metadata``) names, and never before."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicator.config import ChunkingConfig, CompressionConfig, target_config
from replicator.errors import PermanentTargetError
from replicator.repository import Repository
from replicator.targets import open_target
from tests.conftest import cli, make_target_spec, write_config
from tests.daemon_helpers import DaemonProcess, latest_manifest, set_names, wait_until
from tests.helpers import config_dict, make_checkpoint, run_reference_reader, tree_digest
from tests.test_rpo import metric


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


def test_a_set_is_published_once_every_nodes_part_is_in(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
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
    shown = cli("parts", "-s", "ckpt", "-c", str(nodes[2][1]))
    assert shown.returncode == 0, shown.stderr
    assert "step-000001: WAITING" in shown.stdout and "in: node-0, node-1" in shown.stdout, shown.stdout
    assert "2 of 3 instances' parts are in" in shown.stdout
    assert "instance node-1: last heard" in shown.stdout
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
    repo = ["--repo", spec.config["url"], "--endpoint-url", spec.config["endpoint_url"]]
    report = json.loads(cli("parts", "-s", "ckpt", *repo, "--json").stdout)  # no config: from any host
    assert report["instances"] == 3 and sorted(report["members"]) == ["node-0", "node-1", "node-2"]
    assert [(s["name"], s["state"], s["have"]) for s in report["sets"]] == [
        ("step-000001", "complete", ["node-0", "node-1", "node-2"])
    ]

    out = tmp_path / "restored"
    restored = cli("restore", "-c", str(nodes[1][1]), "-s", "ckpt", str(out))
    assert restored.returncode == 0, restored.stderr
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want


DCP_RANKS = Path(__file__).parent / "dcp_ranks.py"


def _attached(daemon: DaemonProcess) -> bool:
    return "target.attached" in daemon.log_text()


def _dcp(*args: str) -> dict[str, Any]:
    command = [sys.executable, str(DCP_RANKS), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_three_daemons_publish_a_torch_dcp_checkpoint_when_its_last_shard_is_in(
    tmp_path: Path, request: pytest.FixtureRequest, fault_proxy: Any
) -> None:
    """Three nodes' sidecars: node 0 holds rank 0's shard and ``.metadata``, nodes 1 and 2 one
    shard each. Node 2's daemon is killed while it uploads: the set waits and the assembler
    alerts; once node 2 is back the set is published whole, restores byte-identically and
    resumes training with the same next-step loss."""
    spec = make_target_spec(request, "rclone", tmp_path)
    assert spec.server is not None
    proxy = fault_proxy(spec.server)
    made = tmp_path / "made" / "step-1"
    loss = _dcp("save", str(made), "3")["next_loss"]
    want = {p: sha for p, (sha, _, _) in tree_digest(made.parent).items()}
    names = (".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp")
    assert sorted(want) == [f"step-1/{n}" for n in names]

    dirs, configs = [], []
    for i in range(3):
        data = tmp_path / f"node{i}" / "data"
        data.mkdir(parents=True)
        # Node 2 reaches the server through the proxy, with a short request timeout: once the
        # proxy swallows its upload, it gives up on the target quickly instead of holding the
        # read (and the test) for the default 60 s.
        target = {**spec.config, "endpoint_url": proxy.endpoint, "timeout": "3s"} if i == 2 else spec.config
        source = {
            "name": "ckpt",
            "url": str(data),
            "kind": "checkpoint",
            "complete_when": {"marker": ".metadata", "quiet": "1s"},
            "rpo": "4s",
            "shared": {"instances": 3, "instance": f"node-{i}", "heartbeat": "1s", "deadline": "3s"},
        }
        cfg = config_dict(tmp_path / f"node{i}", [source], [target])
        dirs.append(data)
        configs.append((cfg, write_config(tmp_path / f"node{i}" / "r.yaml", cfg)))
    daemons = [DaemonProcess(c, tmp_path / f"node{i}.log") for i, (_, c) in enumerate(configs)]
    try:
        for d in daemons:
            wait_until(d.ready, 120, what="daemon ready")
            wait_until(partial(_attached, d), 120, what="target attached")
        for i, name in ((1, "__1_0.distcp"), (0, "__0_0.distcp"), (0, ".metadata")):
            (dirs[i] / "step-1").mkdir(exist_ok=True)
            shutil.copy2(made / name, dirs[i] / "step-1" / name)
        wait_until(lambda: "set.waiting_for_parts" in daemons[0].log_text(), 120, what="assembler waits")
        proxy.set_mode("blackhole")  # node 2's upload hangs...
        (dirs[2] / "step-1").mkdir()
        shutil.copy2(made / "__2_0.distcp", dirs[2] / "step-1" / "__2_0.distcp")
        wait_until(lambda: "candidate.ready" in daemons[2].log_text(), 180, what="node 2 read its shard")
        wait_until(lambda: proxy.stats.dropped > 0, 120, what="node 2's upload under way (swallowed)")
        daemons[2].kill9()  # ... and its node dies mid-upload
        listen = configs[0][0]["listen"]
        wait_until(lambda: "set.parts_overdue" in daemons[0].log_text(), 120, what="overdue alert")
        assert metric(listen, "replicator_sets_overdue", source="ckpt", target="t1") == 1
        wait_until(lambda: metric(listen, "replicator_rpo_breached", source="ckpt", target="t1") == 1, 60)
        assert latest_manifest(spec.config, "ckpt") is None, "published without node 2's shard"
        status = cli("status", "-c", str(configs[0][1]), "--json")
        assert "waiting for parts" in status.stdout and "2 of 3 instances" in status.stdout, status.stdout

        proxy.set_mode("pass")
        daemons[2] = DaemonProcess(configs[2][1], tmp_path / "node2-again.log")
        wait_until(lambda: set_names(latest_manifest(spec.config, "ckpt")) == ["step-1"], 180, what="publish")
        wait_until(lambda: metric(listen, "replicator_sets_waiting", source="ckpt", target="t1") == 0, 60)
        for d in daemons:
            assert not d.crashes(), d.crashes()
    finally:
        for d in daemons:
            d.stop()
    out = tmp_path / "restored"
    restored = cli("restore", "-c", str(configs[1][1]), "-s", "ckpt", str(out))
    assert restored.returncode == 0, restored.stderr
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want
    assert _dcp("load", str(out / "step-1"))["next_loss"] == loss


def test_split_instances_read_each_byte_once_and_publish_the_set_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Three instances share one directory (``split``): each reads only its share, the shares
    add up to the directory exactly (no byte read twice, none skipped), and the set is
    published once, whole, by the assembler (what bench/bench_scaleout.py measures)."""
    spec = make_target_spec(request, "rclone", tmp_path)
    data = tmp_path / "data"
    make_checkpoint(data, 1, shards=12)
    want = {p: sha for p, (sha, _, _) in tree_digest(data).items()}
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    configs = []
    for i in range(3):
        source = {
            "name": "ckpt",
            "url": str(data),
            "kind": "checkpoint",
            "complete_when": {"marker": "COMPLETE", "quiet": "0s"},
            "shared": {"instances": 3, "instance": f"replicator-{i}", "split": True},
        }
        cfg = config_dict(tmp_path / f"i{i}", [source], [spec.config])
        (tmp_path / f"i{i}").mkdir()
        configs.append(write_config(tmp_path / f"i{i}" / "r.yaml", cfg))

    read: dict[int, int] = {}
    # The assembler first (it creates the repository, then waits), and again last: every
    # part is in then, and it has nothing left to read.
    for i, status in ((0, "waiting"), (1, "contributed"), (2, "contributed"), (0, "published")):
        done = cli("sync", "-c", str(configs[i]), "--json")
        assert done.returncode == 0, done.stderr
        src = json.loads(done.stdout)["sources"][0]
        read[i] = read.get(i, 0) + src["bytes_read"]
        assert src["targets"][0]["status"] == status, done.stdout
    assert sum(read.values()) == size, read
    assert all(read.values()), f"an instance read nothing: {read}"
    again = json.loads(cli("sync", "-c", str(configs[0]), "--json").stdout)["sources"][0]
    assert again["bytes_read"] == 0 and again["targets"][0]["status"] == "unchanged", again

    m = latest_manifest(spec.config, "ckpt")
    assert m is not None and sorted(f.path for f in m.files) == sorted(want)
    out = tmp_path / "restored"
    assert cli("restore", "-c", str(configs[2]), "-s", "ckpt", str(out)).returncode == 0
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want


def test_split_instances_read_each_byte_once_and_publish_one_set(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Scale-out of one shared directory: two instances gate the whole set (the marker is
    visible to both), each reads only its share, and the set is published whole."""
    spec = make_target_spec(request, "posix", tmp_path)
    shared_dir = tmp_path / "shared"
    make_checkpoint(shared_dir, 7, shards=6)
    old = time.time() - 60
    for f in shared_dir.rglob("*"):
        os.utime(f, (old, old))
    want = {p: sha for p, (sha, _, _) in tree_digest(shared_dir).items()}
    total = sum(f.stat().st_size for f in shared_dir.rglob("*") if f.is_file())
    configs = []
    for i in range(2):
        source = {
            "name": "ckpt", "url": str(shared_dir), "kind": "checkpoint",
            "complete_when": {"marker": "COMPLETE"},
            "shared": {"instances": 2, "instance": f"replicator-{i}", "split": True},
        }  # fmt: skip
        cfg = config_dict(tmp_path / f"i{i}", [source], [spec.config])
        configs.append(write_config(tmp_path / f"i{i}.yaml", cfg))
    reads = []
    for c in [*configs, configs[0]]:  # the assembler creates the repository, and publishes last
        res = cli("sync", "-c", str(c), "--json")
        assert res.returncode == 0, res.stderr
        reads.append(json.loads(res.stdout)["sources"][0])
    assert [r["targets"][0]["status"] for r in reads] == ["waiting", "contributed", "published"]
    assert all(r["bytes_read"] > 0 for r in reads[:2]), "one instance read everything"
    assert sum(r["bytes_read"] for r in reads) == total, "a byte was read twice, or never"
    m = latest_manifest(spec.config, "ckpt")
    assert m is not None and set_names(m) == ["step-000007"]
    assert sorted(f.path for f in m.files) == sorted(want)
    out = tmp_path / "restored"
    assert cli("restore", "-c", str(configs[1]), "-s", "ckpt", str(out)).returncode == 0
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want
    assert spec.path is not None  # the reference reader (FORMAT §8) reads a version 3 repository
    ref = run_reference_reader(spec.path, "ckpt", "latest", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert {p: sha for p, (sha, _, _) in tree_digest(tmp_path / "ref").items()} == want


def test_prune_keeps_what_parts_reference_before_any_snapshot_names_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Node 1's part is in, node 0 has not contributed yet: no manifest names node 1's chunks,
    but a prune must keep them, and the set, once complete, restores."""
    spec = make_target_spec(request, "rclone", tmp_path)
    nodes = _node_configs(tmp_path, spec.config, 2)
    made = make_checkpoint(tmp_path / "made", 1, shards=2, marker=None)
    _index(made, 2)
    assert cli("sync", "-c", str(nodes[0][1])).returncode == 0  # the assembler creates the repository
    want = _spread(made, [d for d, _ in nodes])
    assert cli("sync", "-c", str(nodes[1][1])).returncode == 0
    args = ["--repo", spec.config["url"], "--endpoint-url", spec.config["endpoint_url"]]
    for _ in range(2):  # plan, then delete what is due
        pruned = cli("prune", *args, "--grace", "0", "--json")
        assert pruned.returncode == 0, pruned.stderr
        assert json.loads(pruned.stdout)[0]["deleted_objects"] == 0
    assert json.loads(pruned.stdout)[0]["live_objects"] > 0, "the part's chunks were not marked"
    done = cli("sync", "-c", str(nodes[0][1]), "--json")
    assert json.loads(done.stdout)["sources"][0]["targets"][0]["status"] == "published", done.stdout
    out = tmp_path / "restored"
    assert cli("restore", "-c", str(nodes[0][1]), "-s", "ckpt", str(out)).returncode == 0
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want
    verified = cli("verify", *args, "--read-data")
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize(
    ("shared", "kind", "message"),
    [
        ({"instances": 2, "instance": "node-a", "split": True}, "checkpoint", "must end in its number"),
        ({"instances": 2, "instance": "replicator-2", "split": True}, "checkpoint", "0..1"),
        ({"instances": 2, "instance": "node-a"}, "checkpoint", "assembler: NAME"),
        ({"instances": 2, "instance": "node-0"}, "dataset", "checkpoint only"),
        ({"instances": 2, "instance": "node 0", "assembler": "x"}, "checkpoint", "use letters"),
    ],
)
def test_config_refuses_a_shared_source_it_cannot_run(
    tmp_path: Path, shared: dict[str, Any], kind: str, message: str
) -> None:
    source = {"name": "ckpt", "url": str(tmp_path), "kind": kind, "shared": shared}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [{"name": "t", "url": "/tmp/t"}]))
    res = cli("config", "check", "-c", str(cfg))
    assert res.returncode == 2 and message in res.stderr + res.stdout, res.stderr + res.stdout


def test_a_part_hashed_under_a_replaced_config_is_not_published(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``rclone serve s3`` ignores ``If-None-Match``: N instances that start on a fresh
    repository at once (a StatefulSet) each PUT their own ``config.json`` (own id, own hash
    seed), and the last PUT wins. An instance that read its own config back before that hashes
    its chunks with a seed the repository no longer has. bench_scaleout --target rclone (N=4)
    published such a set; restoring it failed with "content does not match its id".

    Here: instance 1 contributes; then the racing creator's PUT lands (a config.json with
    another id and seed); then the assembler runs. It must not
    publish the set with instance 1's part as it is, or what it publishes must restore: parts
    name the repository config they were hashed for, and writers check config.json before
    they publish."""
    spec = make_target_spec(request, "rclone", tmp_path)
    assert spec.server is not None and spec.bucket is not None
    data = tmp_path / "data"
    make_checkpoint(data, 1, shards=6)
    want = {p: sha for p, (sha, _, _) in tree_digest(data).items()}
    configs = []
    for i in range(2):
        source = {
            "name": "ckpt", "url": str(data), "kind": "checkpoint",
            "complete_when": {"marker": "COMPLETE", "quiet": "0s"},
            "shared": {"instances": 2, "instance": f"replicator-{i}", "split": True},
        }  # fmt: skip
        (tmp_path / f"i{i}").mkdir()
        configs.append(
            write_config(
                tmp_path / f"i{i}" / "r.yaml", config_dict(tmp_path / f"i{i}", [source], [spec.config])
            )
        )
    created = cli("sync", "-c", str(configs[0]), "--json")  # the assembler creates the repository
    assert json.loads(created.stdout)["sources"][0]["targets"][0]["status"] == "waiting", created.stdout
    first = cli("sync", "-c", str(configs[1]), "--json")
    assert json.loads(first.stdout)["sources"][0]["targets"][0]["status"] == "contributed", first.stdout

    client, key = spec.server.client(), "replica/config.json"
    mine = json.loads(client.get_object(Bucket=spec.bucket, Key=key)["Body"].read())
    theirs = {
        **mine,
        "id": "0f0f0f0f-0000-4000-8000-000000000000",
        "hash": {**mine["hash"], "seed": "0123456789abcdef"},
    }
    assert mine["hash"]["algorithm"] == "xxh3-128" and mine["hash"]["seed"] != theirs["hash"]["seed"]
    client.put_object(Bucket=spec.bucket, Key=key, Body=json.dumps(theirs).encode(), IfNoneMatch="*")
    assert json.loads(client.get_object(Bucket=spec.bucket, Key=key)["Body"].read())["id"] == theirs["id"], (
        "this server honours If-None-Match: the race cannot happen on it"
    )

    done = cli("sync", "-c", str(configs[0]), "--json")
    assert done.returncode in (0, 1), done.stderr
    if json.loads(done.stdout)["sources"][0]["targets"][0]["status"] != "published":
        return  # waiting for a part made for this repository: safe
    out = tmp_path / "restored"
    restored = cli("restore", "-c", str(configs[0]), "-s", "ckpt", str(out))
    assert restored.returncode == 0, (
        f"published a set that does not restore: {restored.stdout}{restored.stderr}"
    )
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want


def _racing_config(spec: Any) -> dict[str, Any]:
    """Replace the repository's config.json the way a racing creator's late PUT does on a
    server that ignores ``If-None-Match``: a new repository (version 1) with its own id and
    hash seed. Returns the config replaced."""
    client, key = spec.server.client(), "replica/config.json"
    mine: dict[str, Any] = json.loads(client.get_object(Bucket=spec.bucket, Key=key)["Body"].read())
    theirs = {
        **mine,
        "version": 1,
        "id": "0f0f0f0f-0000-4000-8000-000000000000",
        "hash": {**mine["hash"], "seed": "0123456789abcdef"},
    }
    assert mine["hash"]["algorithm"] == "xxh3-128" and mine["hash"]["seed"] != theirs["hash"]["seed"]
    client.put_object(Bucket=spec.bucket, Key=key, Body=json.dumps(theirs).encode())
    return mine


def test_raising_the_version_never_adopts_a_config_that_replaced_ours(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A CI run published a set that did not restore ("packs/..@0: content does not match its
    id", rank 1's shard): three daemons started at once on a fresh ``rclone serve s3``
    repository, and a racing creator's PUT replaced the config.json node 1 had opened. Before
    its first part node 1 raised the repository to version 3 from the config.json *then*
    there, adopting that config's id while its chunks stayed hashed with the seed it had
    opened: its parts claimed the new config, so ``check_unchanged`` and the assembler took
    them."""
    spec = make_target_spec(request, "rclone", tmp_path)
    server, bucket = spec.server, spec.bucket
    assert server is not None and bucket is not None

    async def go() -> None:
        t = await open_target(target_config(spec.config))
        try:
            repo = await Repository.open_or_create(
                t, algorithm="xxh3-128", chunking=ChunkingConfig(), compression=CompressionConfig()
            )
            opened = repo.config.id
            _racing_config(spec)
            with pytest.raises(PermanentTargetError, match=r"config\.json changed since this process"):
                await repo.upgrade_for_parts()
            assert repo.config.id == opened, "adopted the other config's id"
            with pytest.raises(PermanentTargetError, match=r"config\.json changed since this process"):
                await repo.check_unchanged()
            got = server.client().get_object(Bucket=bucket, Key="replica/config.json")
            stored = json.loads(got["Body"].read())
            assert stored["version"] == 1, "raised the version of a config it does not hash for"
        finally:
            await t.close()

    asyncio.run(go())


def test_a_running_instance_never_contributes_under_a_config_that_replaced_its_own(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Node 1's daemon creates the repository; a racing creator's PUT replaces config.json;
    then node 1's shard arrives. It must not contribute; ``status`` must say why, and the
    daemon must not retry what only a restart fixes; once restarted it contributes under the
    config that is there, and the set publishes and restores."""
    spec = make_target_spec(request, "rclone", tmp_path)
    assert spec.server is not None and spec.bucket is not None
    nodes = _node_configs(tmp_path, spec.config, 2, assembler="node-1")
    made = make_checkpoint(tmp_path / "made", 1, shards=2, marker=None)
    _index(made, 2)
    later = tmp_path / "later"  # node 1's shard, moved in once its daemon runs
    want = _spread(made, [nodes[0][0], later])

    node1 = DaemonProcess(nodes[1][1], tmp_path / "node1.log")
    try:
        wait_until(node1.ready, 120, what="daemon ready")
        wait_until(partial(_attached, node1), 120, what="target attached")
        _racing_config(spec)
        shutil.move(later / "step-000001", nodes[1][0] / "step-000001")
        wait_until(lambda: "config.json changed" in node1.log_text(), 120, what="node 1 refuses")
        wait_until(lambda: "target.backoff" in node1.log_text().split("config.json changed", 1)[1], 60)
        backoff = next(
            json.loads(line)
            for line in node1.log_text().split("config.json changed", 1)[1].splitlines()
            if '"target.backoff"' in line
        )
        assert backoff["seconds"] >= 300, f"retries what only a restart fixes: {backoff}"
        status = cli("status", "-c", str(nodes[1][1]), "--json")
        assert "config.json changed since this process opened the repository" in status.stdout, status.stdout
        assert not node1.crashes(), node1.crashes()
    finally:
        node1.stop()
    assert latest_manifest(spec.config, "ckpt") is None

    assert cli("sync", "-c", str(nodes[0][1])).returncode == 0
    done = cli("sync", "-c", str(nodes[1][1]), "--json")  # restarted: opens the config that is there
    assert json.loads(done.stdout)["sources"][0]["targets"][0]["status"] == "published", done.stdout
    out = tmp_path / "restored"
    restored = cli("restore", "-c", str(nodes[0][1]), "-s", "ckpt", str(out))
    assert restored.returncode == 0, restored.stderr
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want


def test_only_the_assembler_creates_the_repository(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A StatefulSet's or DaemonSet's instances start at once; on a server that ignores
    ``If-None-Match`` each would create the repository with its own hash seed, and all but the
    last would have to be restarted. So an instance that is not the assembler never creates
    it: it says whom it waits for, and contributes once the assembler has created it."""
    spec = make_target_spec(request, "rclone", tmp_path)
    nodes = _node_configs(tmp_path, spec.config, 2)
    made = make_checkpoint(tmp_path / "made", 1, shards=2, marker=None)
    _index(made, 2)
    want = _spread(made, [d for d, _ in nodes])

    impatient = yaml.safe_load(nodes[1][1].read_text())
    impatient["targets"][0]["retry"] = {"command_give_up_after": "0s"}
    early = cli("sync", "-c", str(write_config(tmp_path / "impatient.yaml", impatient)), "--json")
    assert early.returncode == 1, early.stdout + early.stderr
    error = json.loads(early.stdout)["sources"][0]["targets"][0]["error"]
    assert "node-0, the assembler of source ckpt, creates it" in error, error
    assert spec.server is not None and spec.bucket is not None
    assert "Contents" not in spec.server.client().list_objects_v2(Bucket=spec.bucket), "node 1 wrote"

    # Started together (a StatefulSet): node 1 waits for the repository node 0 creates.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "replicator", "sync", "-c", str(nodes[1][1]), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = cli("sync", "-c", str(nodes[0][1]), "--json")  # creates it
    said, err = waiting.communicate(timeout=120)
    assert json.loads(said)["sources"][0]["targets"][0]["status"] == "contributed", said + err
    # Node 1's part may land before node 0 assembles (then its first sync publishes).
    if json.loads(first.stdout)["sources"][0]["targets"][0]["status"] != "published":
        done = cli("sync", "-c", str(nodes[0][1]), "--json")
        assert json.loads(done.stdout)["sources"][0]["targets"][0]["status"] == "published", done.stdout
    assert set_names(latest_manifest(spec.config, "ckpt")) == ["step-000001"]
    out = tmp_path / "restored"
    assert cli("restore", "-c", str(nodes[1][1]), "-s", "ckpt", str(out)).returncode == 0
    assert {p: sha for p, (sha, _, _) in tree_digest(out).items()} == want

"""systemd units, example configs and plain Kubernetes manifests stay true.

Units are checked by systemd-analyze itself (syntax, every directive, the timer's calendar,
the hardening score), and the command lines they run are run here. Every example config
loads through replicator's own validator. manifests/ is built with kustomize (kubectl's)
and checked like the chart's output, and against it. (The chart: tests/test_chart.py.)
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from replicator.config import Config, load_config
from replicator.config_check import SCRATCH_PREFIX
from replicator.demo import create_demo
from replicator.format.parts import part_key
from replicator.gc.protocol import DELETING, LOCK_KEY, PLANS, RECORDS, WRITERS
from replicator.repository import CONFIG_KEY, chunk_key, pack_key, ref_key, snapshot_key
from tests.conftest import cli
from tests.deploy_helpers import (
    Obj,
    check_replicator_pod,
    describe,
    env_for,
    load_objects,
    pod_spec,
    replicator_containers,
    run_invocation,
    validate_object,
)
from tests.helpers import local_setup

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
MANIFESTS = ROOT / "manifests"
INSTALLED_BINARY = "/opt/replicator/.venv/bin/replicator"  # docs/DEPLOY.md's install prefix


def unit_directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows a key more than once."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def directive(path: Path, key: str) -> list[str]:
    return [v for _, k, v in unit_directives(path) if k == key]


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: .ci/run installs it (Debian package systemd)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units as shipped, but with ExecStart's binary pointing at this checkout's
    console script: systemd-analyze verify insists that the executable exists."""
    here = shutil.which("replicator", path=str(Path(sys.executable).parent))
    assert here, "the replicator console script is not installed next to this interpreter"
    out = tmp_path / "units"
    out.mkdir()
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text()
        assert INSTALLED_BINARY in text or unit.suffix == ".timer", f"{unit.name}: not the documented prefix"
        (out / unit.name).write_text(text.replace(INSTALLED_BINARY, here))
    return out


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    units = sorted(str(p) for p in unit_dir.iterdir())
    assert {Path(u).name for u in units} == {
        "replicator.service",
        "replicator-verify.service",
        "replicator-verify.timer",
    }
    res = systemd_analyze("verify", "--man=no", *units)
    # Unknown or misspelled keys are only warnings: any output at all is a failure.
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stderr + res.stdout


def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    """The check above can fail: a misspelled key and a bad calendar are reported."""
    service = unit_dir / "replicator.service"
    service.write_text(service.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    timer = unit_dir / "replicator-verify.timer"
    timer.write_text(re.sub(r"OnCalendar=.*", "OnCalendar=nightly-ish", timer.read_text()))
    res = systemd_analyze("verify", "--man=no", str(service), str(timer))
    assert "WatchdogSecs" in res.stderr and "nightly-ish" in res.stderr


@pytest.mark.parametrize("unit", ["replicator.service", "replicator-verify.service"])
def test_services_are_hardened(unit_dir: Path, unit: str) -> None:
    path = unit_dir / unit
    # systemd's own exposure score: 0 (locked down) .. 10 (unprotected); "OK" is below 4.5.
    res = systemd_analyze("security", "--offline=yes", "--threshold=20", "--no-pager", str(path))
    assert res.returncode == 0, f"exposure above 2.0:\n{res.stdout}{res.stderr}"
    want = {
        "User": "replicator",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "EnvironmentFile": "-/etc/replicator/env",
    }
    for key, value in want.items():
        assert directive(path, key) == [value], f"{unit}: {key}={directive(path, key)}"
    assert "/var/lib/replicator" in directive(path, "ReadWritePaths")
    assert directive(path, "StateDirectory") == ["replicator"]
    # The config file and the state_dir it documents.
    (exec_start,) = directive(path, "ExecStart")
    assert "--config /etc/replicator/replicator.yaml" in exec_start


def test_daemon_unit_notify_watchdog_and_stop(unit_dir: Path) -> None:
    path = unit_dir / "replicator.service"
    assert directive(path, "Type") == ["notify"] and directive(path, "NotifyAccess") == ["main"]
    assert directive(path, "Restart") == ["on-failure"]
    (watchdog,) = directive(path, "WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) >= 10  # pinged every WatchdogSec/2
    (stop,) = directive(path, "TimeoutStopSec")
    assert int(stop) > Config().shutdown_grace, "systemd would SIGKILL before the drain ends"
    assert directive(path, "ExecReload") == ["/bin/kill -HUP $MAINPID"]


def test_timer_is_nightly_and_persistent() -> None:
    timer = UNITS / "replicator-verify.timer"
    assert directive(timer, "Unit") == ["replicator-verify.service"]
    assert directive(timer, "Persistent") == ["true"]
    (calendar,) = directive(timer, "OnCalendar")
    res = systemd_analyze("calendar", "--iterations=2", calendar)
    assert res.returncode == 0, res.stderr
    found = re.findall(r"(?:Next elapse|Iter\. #2): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", res.stdout)
    first, second = (datetime.fromisoformat(s) for s in found)
    assert second - first == timedelta(days=1), f"not once a day:\n{res.stdout}"
    service = UNITS / "replicator-verify.service"
    assert directive(service, "Type") == ["oneshot"]
    (exec_start,) = directive(service, "ExecStart")
    assert exec_start.split()[1:] == [
        "verify",
        "--config",
        "/etc/replicator/replicator.yaml",
        "--read-data",
        "5",
    ]


def test_unit_command_lines_run(tmp_path: Path) -> None:
    """ExecStart of both services, run here against a real repository: the daemon starts,
    reports ready and drains on SIGTERM; the nightly verify passes."""
    primary, _target, cfg = local_setup(tmp_path)
    (primary / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    for unit in ("replicator.service", "replicator-verify.service"):
        (exec_start,) = directive(UNITS / unit, "ExecStart")
        argv = exec_start.split()
        assert argv[0] == INSTALLED_BINARY
        out = run_invocation(argv, {"/etc/replicator/replicator.yaml": cfg}, tmp_path)
        if unit == "replicator-verify.service":
            assert ": OK:" in out and "1 read" in out, out


# -- config/ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid_and_explained(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = example.read_text()
    for name, value in env_for(text).items():
        monkeypatch.setenv(name, value)
    cfg = load_config(example)
    assert cfg.sources and cfg.targets
    assert text.startswith("# "), f"{example.name} must open with what it is for"
    for name in [s.name for s in cfg.sources] + [t.name for t in cfg.targets]:
        # Each source and target is explained where it is defined.
        block = text[text.index(f"name: {name}") :].split("\n  - name:")[0]
        assert "#" in block, f"{example.name}: {name} has no comment"


def test_example_configs_cover_the_documented_setups() -> None:
    names = {p.name for p in EXAMPLES}
    assert names == {"quickstart.yaml", "gpu-cloud-to-aws.yaml", "s3-to-nfs.yaml", "fan-out.yaml"}
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    for name in names:
        assert f"config/{name}" in deploy, f"docs/DEPLOY.md does not mention config/{name}"


def test_quickstart_carries_on_the_demo(tmp_path: Path) -> None:
    """config/quickstart.yaml is the demo's config, so `replicator run` continues its repository."""
    demo_cfg = load_config(create_demo(tmp_path / "replicator-demo", steps=1, hidden=64))
    (tmp_path / "config").mkdir()
    quickstart = tmp_path / "config" / "quickstart.yaml"
    shutil.copy(ROOT / "config" / "quickstart.yaml", quickstart)
    cfg = load_config(quickstart)
    assert cfg.state_dir == demo_cfg.state_dir
    assert [t.url for t in cfg.targets] == [t.url for t in demo_cfg.targets]
    for mine, demo in zip(cfg.sources, demo_cfg.sources, strict=True):
        assert (mine.name, mine.url, mine.kind, mine.include) == (
            demo.name,
            demo.url,
            demo.kind,
            demo.include,
        )
        assert mine.complete_when == demo.complete_when
    res = cli("sync", "-c", str(quickstart))
    assert res.returncode == 0, res.stderr
    res = cli("verify", "-c", str(quickstart), "--read-data")
    assert res.returncode == 0 and ": OK:" in res.stdout, res.stdout + res.stderr


# -- manifests/ -------------------------------------------------------------------------------


def kustomize_build(path: Path = MANIFESTS) -> list[Obj]:
    exe = shutil.which("kubectl")
    assert exe, "kubectl is missing: .ci/run installs it (Debian package kubernetes-client)"
    res = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return load_objects(res.stdout)


def test_manifests_build_into_valid_objects() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {
        f for g in kustomization["configMapGenerator"] for f in g["files"]
    }
    present = {p.name for p in MANIFESTS.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert listed == present, "every file in manifests/ is part of the kustomization"

    objects = kustomize_build()
    for obj in objects:
        validate_object(obj)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "CronJob", "CronJob", "Job", "Service", "ServiceAccount", "ServiceAccount"]
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    (cm,) = configmaps.values()
    assert cm["data"]["replicator.yaml"] == (MANIFESTS / "replicator.yaml").read_text()
    assert load_config(MANIFESTS / "replicator.yaml").listen == "0.0.0.0:9464"
    pods = [o for o in objects if pod_spec(o) is not None]
    for owner in pods:
        check_replicator_pod(owner, configmaps)  # the generated name (with its hash) resolves
    (svc,) = [o for o in objects if o["kind"] == "Service"]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # Garbage collection runs as its own account (the pruning role), everything else as the
    # sidecar's; and the daemon does not also prune on a schedule of its own.
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    runs_as = {role(o): (pod_spec(o) or {})["serviceAccountName"] for o in pods}
    assert runs_as == {"Job": "replicator", "verify": "replicator", "prune": "replicator-prune"}
    assert set(runs_as.values()) == accounts
    prune = next(o for o in pods if role(o) == "prune")
    assert prune["spec"]["concurrencyPolicy"] == "Forbid"
    ((container, _),) = replicator_containers(pod_spec(prune) or {})
    assert container["args"][0] == "prune" and "--json" in container["args"]
    assert all(t.prune is None for t in load_config(MANIFESTS / "replicator.yaml").targets)


def role(owner: Obj) -> str:
    """A pod owner by what it is for: a CronJob by its component (verify, prune), else its kind."""
    if owner["kind"] != "CronJob":
        return str(owner["kind"])
    return str(owner["metadata"]["labels"]["app.kubernetes.io/component"])


def test_manifests_are_the_charts_sidecar_example() -> None:
    """manifests/ and the chart's sidecar example must not drift apart: same containers,
    probes, security contexts and replicator volumes."""
    values = {
        "mode": "sidecar",
        "fullnameOverride": "replicator",
        "image": {"repository": "registry.example.com/ml-platform/replicator"},
        "credentials": {"existingSecret": "replicator-credentials"},
        "config": yaml.safe_load((MANIFESTS / "replicator.yaml").read_text()),
        "sidecar": {"example": {"enabled": True}},
        "prune": {"enabled": True},
    }
    for key in ("listen", "state_dir"):
        values["config"].pop(key)
    with helm.Chart.load(ROOT / "charts" / "replicator") as chart:
        rendered = chart.render(values=values, name="replicator", namespace="default")
    charted = [o for path, text in rendered.items() if path.endswith(".yaml") for o in load_objects(text)]
    plain = kustomize_build()

    def replicator_parts(objects: list[Obj], kind: str) -> tuple[list[Obj], list[Obj], Obj]:
        (owner,) = [o for o in objects if pod_spec(o) is not None and role(o) == kind]
        spec = pod_spec(owner)
        assert spec is not None
        containers = []
        for c, _ in replicator_containers(spec):
            c = dict(c)
            c.pop("image")
            c.pop("imagePullPolicy", None)
            containers.append(c)
        volumes = [
            {k: v for k, v in vol.items() if k != "configMap"}
            for vol in spec["volumes"]
            if vol["name"].startswith("replicator-")
        ]
        keys = ("securityContext", "terminationGracePeriodSeconds", "restartPolicy", "serviceAccountName")
        pod = {k: spec.get(k) for k in keys}
        if owner["kind"] == "CronJob":
            pod |= {k: owner["spec"][k] for k in ("schedule", "concurrencyPolicy")}
        return containers, volumes, pod

    for kind in ("Job", "verify", "prune"):
        assert replicator_parts(plain, kind) == replicator_parts(charted, kind), kind
    for plain_account in [o for o in plain if o["kind"] == "ServiceAccount"]:
        (charted_account,) = [o for o in charted if describe(o) == describe(plain_account)]
        assert (
            plain_account["automountServiceAccountToken"] is charted_account["automountServiceAccountToken"]
        )


NODE_MANIFESTS = MANIFESTS / "daemonset"


def test_daemonset_manifests_build_into_valid_objects() -> None:
    """manifests/daemonset/: one replicator per training node, named by its node."""
    kustomization = yaml.safe_load((NODE_MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {
        f for g in kustomization["configMapGenerator"] for f in g["files"]
    }
    assert listed == {p.name for p in NODE_MANIFESTS.iterdir()} - {"kustomization.yaml"}
    objects = kustomize_build(NODE_MANIFESTS)
    for obj in objects:
        validate_object(obj)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "DaemonSet", "Service", "ServiceAccount"]
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    (cfg,) = check_replicator_pod(ds, configmaps)  # the instance is filled by the downward API
    (source,) = cfg.sources
    assert source.shared is not None and source.shared.assembler is not None
    text = (NODE_MANIFESTS / "replicator.yaml").read_text()
    assert yaml.safe_load(text)["sources"][0]["shared"]["instance"] == "${NODE_NAME}"
    (svc,) = [o for o in objects if o["kind"] == "Service"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # Not part of the default build: manifests/ stays the sidecar example.
    assert "DaemonSet" not in {o["kind"] for o in kustomize_build()}


def test_daemonset_manifests_are_the_charts_daemonset() -> None:
    """manifests/daemonset/ and the chart's mode: daemonset must not drift apart."""
    plain = kustomize_build(NODE_MANIFESTS)
    (plain_ds,) = [o for o in plain if o["kind"] == "DaemonSet"]
    plain_spec = pod_spec(plain_ds)
    assert plain_spec is not None
    config = yaml.safe_load((NODE_MANIFESTS / "replicator.yaml").read_text())
    for key in ("listen", "state_dir"):
        config.pop(key)
    shared = config["sources"][0].pop("shared")
    shared.pop("instance")  # the chart's own: ${NODE_NAME}
    volumes = {v["name"]: v for v in plain_spec["volumes"]}
    values = {
        "mode": "daemonset",
        "fullnameOverride": "replicator-node",
        "image": {"repository": "registry.example.com/ml-platform/replicator"},
        "credentials": {"existingSecret": "replicator-credentials"},
        "config": config,
        "shared": {"enabled": True, **shared},
        "daemonset": {
            "checkpoints": {"hostPath": volumes["checkpoints"]["hostPath"]["path"]},
            "statePath": volumes["replicator-state"]["hostPath"]["path"],
            "nodeSelector": plain_spec["nodeSelector"],
            "tolerations": plain_spec["tolerations"],
        },
        "verify": {"enabled": False},
    }
    with helm.Chart.load(ROOT / "charts" / "replicator") as chart:
        rendered = chart.render(values=values, name="replicator", namespace="default")
    charted = [o for path, text in rendered.items() if path.endswith(".yaml") for o in load_objects(text)]
    (charted_ds,) = [o for o in charted if o["kind"] == "DaemonSet"]
    charted_spec = pod_spec(charted_ds)
    assert charted_spec is not None

    def parts(spec: Obj) -> Obj:
        def strip(c: Obj) -> Obj:
            return {k: v for k, v in c.items() if k not in ("image", "imagePullPolicy")}

        keep = ("securityContext", "terminationGracePeriodSeconds", "serviceAccountName", "nodeSelector")
        return {
            "containers": [strip(c) for c in spec["containers"]],
            "initContainers": [strip(c) for c in spec.get("initContainers", [])],
            "volumes": [{k: v for k, v in vol.items() if k != "configMap"} for vol in spec["volumes"]],
            "tolerations": spec.get("tolerations"),
        } | {k: spec.get(k) for k in keep}

    assert parts(plain_spec) == parts(charted_spec)
    assert plain_ds["spec"]["updateStrategy"] == charted_ds["spec"]["updateStrategy"]
    charted_cm = next(o for o in charted if o["kind"] == "ConfigMap")
    plain_cm = next(o for o in plain if o["kind"] == "ConfigMap")
    assert yaml.safe_load(charted_cm["data"]["replicator.yaml"]) == yaml.safe_load(
        plain_cm["data"]["replicator.yaml"]
    )


# -- docs/DEPLOY.md's IAM policies --------------------------------------------------------------

S3_ACTIONS = {
    "put_object": "s3:PutObject",
    "get_object": "s3:GetObject",
    "head_object": "s3:GetObject",  # HEAD is authorized as GetObject
    "list_objects_v2": "s3:ListBucket",
    "delete_object": "s3:DeleteObject",
}


def s3_calls(path: Path, client: str) -> set[str]:
    text = path.read_text()
    calls = set(re.findall(rf"{re.escape(client)}\.(\w+)\(", text))
    calls |= set(re.findall(r'get_paginator\("(\w+)"\)', text))
    calls -= {"get_paginator", "close"}  # not requests
    unknown = calls - set(S3_ACTIONS)
    assert not unknown, f"{path.name} calls {unknown}: add them to DEPLOY.md's IAM policies and S3_ACTIONS"
    return {S3_ACTIONS[c] for c in calls}


def deploy_policies() -> tuple[dict[str, Obj], dict[str, Obj]]:
    """docs/DEPLOY.md's JSON blocks: the complete policies by their Id, and every statement by
    its Sid (a Sid shown in several blocks must say the same in each)."""
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    policies: dict[str, Obj] = {}
    statements: dict[str, Obj] = {}
    for block in re.findall(r"```json\n(.*?)```", doc, flags=re.S):
        data = json.loads(block)
        if "Id" in data:
            policies[data["Id"]] = data
        for st in data.get("Statement", [data]):
            assert statements.setdefault(st["Sid"], st) == st, f"two different statements {st['Sid']}"
    return policies, statements


REPO_ARN = "arn:aws:s3:::acme-ml-replica/llm-70b/"  # the documented target's objects


def allows(policy: Obj, action: str, key: str) -> bool:
    """Whether the policy grants ``action`` on the object ``key`` of the documented target,
    by IAM's rules for what the docs use: Allow statements, wildcards * and ?, actions
    case-insensitive."""
    arn = REPO_ARN + key
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st, st
        acts = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if any(fnmatchcase(action.lower(), a.lower()) for a in acts) and any(
            fnmatchcase(arn, r) for r in resources
        ):
            return True
    return False


def test_iam_policies_grant_exactly_what_the_code_calls() -> None:
    _, statements = deploy_policies()

    def actions(*sids: str) -> set[str]:
        return {a for sid in sids for a in statements[sid]["Action"]}

    target = s3_calls(ROOT / "replicator" / "targets" / "s3.py", "self._client")
    source = s3_calls(ROOT / "replicator" / "sources" / "s3.py", "self.client")
    assert actions("ListRepository", "ReadWriteRepository") == target - {"s3:DeleteObject"}
    assert actions("PruneSnapshotManifests") == {"s3:DeleteObject"} <= target
    assert actions("ListSource", "ReadSource") == source
    assert str(statements["WriterLeases"]["Resource"]).endswith(f"/{WRITERS}*")
    pruned = {r.rsplit("/", 2)[-2] for r in statements["PruneRepository"]["Resource"]}
    assert pruned == {"chunks", "packs", "gc", "snapshots"}
    assert str(statements["PruneSnapshotManifests"]["Resource"]).endswith("/snapshots/*")
    assert "tmp/*" in (ROOT / "docs" / "DEPLOY.md").read_text()


def calls_named(attr: str) -> set[tuple[str, str, str]]:
    """(module, innermost function, call) for every call of a method or function named
    ``attr`` in replicator/, outside targets/ (where Target.delete is implemented)."""
    package = ROOT / "replicator"
    found: set[tuple[str, str, str]] = set()

    def visit(node: ast.AST, module: str, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == attr:
                found.add((module, function, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, module, function)

    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if not module.startswith("targets/"):
            visit(ast.parse(path.read_text()), module, "")
    return found


def test_only_the_collector_deletes_chunks_and_packs() -> None:
    """The claim the IAM split rests on, held against the code: outside replicator/gc/prune.py
    (run by `replicator prune` and the daemon's opt-in schedule), the only deletions are
    retention's of snapshot manifests, a writer's of its own lease under gc/writers/, and
    `config check --online`'s of its scratch object under tmp/."""
    deletes = calls_named("delete")
    outside = {c for c in deletes if c[0] != "gc/prune.py"}
    assert outside == {
        ("repository.py", "delete_snapshot", "self.target.delete(snapshot_key(source, snapshot_id))"),
        ("gc/protocol.py", "stop", "self.target.delete(self.key)"),
        ("config_check.py", "_check_target", "target.delete(key)"),
        # an instance of a shared source, of its own parts (parts/<source>/<instance>/):
        ("shared/publish.py", "_write_own", "target.delete(key)"),
        # retention's own function, which deletes through Repository.delete_snapshot:
        ("retention/apply.py", "apply", "delete(repo, cfg.name, result.drop, cache)"),
        (
            "retention/apply.py",
            "_forget_one",
            "delete(repo, cfg.name, entry.plan.drop, cache, entry.deleted)",
        ),
    }, outside
    assert {c[:2] for c in calls_named("delete_snapshot")} == {("retention/apply.py", "delete")}
    assert snapshot_key("src", "id").startswith("snapshots/")
    # Heartbeat.stop deletes its own key; outside the collector a Heartbeat is only ever the
    # writer's intent, keyed under gc/writers/.
    beats = {c for c in calls_named("Heartbeat") if c[0] != "gc/prune.py"}
    assert beats == {("gc/protocol.py", "__init__", "Heartbeat(target, self.key, 'writer', lease)")}, beats
    assert 'self.key = f"{WRITERS}{new_run_id()}"' in (ROOT / "replicator" / "gc" / "protocol.py").read_text()
    assert 'key = f"{SCRATCH_PREFIX}config-check-' in (ROOT / "replicator" / "config_check.py").read_text()
    assert SCRATCH_PREFIX == "tmp/"
    # The collector runs only where asked for: the command and the daemon's `prune:` schedule.
    importers = {
        path.relative_to(ROOT / "replicator").as_posix()
        for path in (ROOT / "replicator").rglob("*.py")
        if "replicator.gc.prune import" in path.read_text()
    }
    assert importers == {"cli/maintenance.py", "cli/render.py", "daemon.py"}, importers
    assert "TYPE_CHECKING" in (ROOT / "replicator" / "cli" / "render.py").read_text()  # types only


def test_pruning_role_split() -> None:
    """docs/DEPLOY.md's two roles: the replicating one may delete neither chunks nor packs but
    everything replication deletes; the pruning one deletes chunks and packs and writes only
    what the collector writes."""
    policies, statements = deploy_policies()
    writer, pruner = policies["replicator-replication"], policies["replicator-prune"]
    assert (
        statements["ListRepository"] in writer["Statement"]
        and statements["ListRepository"] in pruner["Statement"]
    )
    chunk, pack = chunk_key("ab" * 16), pack_key("cd" * 16)
    manifest, ref = snapshot_key("ckpt", "20261207T051000Z-0a1b2c3d"), ref_key("ckpt")
    lease = f"{WRITERS}w-1"
    part = part_key("ckpt", "gpu-node-0", "step-000001")
    delete, put, get = "s3:DeleteObject", "s3:PutObject", "s3:GetObject"

    for key in (chunk, pack):
        assert not allows(writer, delete, key), f"the replicating role may delete {key}"
        assert allows(pruner, delete, key)
        assert allows(writer, put, key) and not allows(pruner, put, key)
    for key in (manifest, lease, part):  # retention after each publish; the writer's lease; parts
        assert allows(writer, delete, key)
    assert not allows(pruner, delete, part) and not allows(pruner, put, part)
    for key in (chunk, pack, manifest, ref, CONFIG_KEY, lease):
        assert allows(writer, put, key) and allows(writer, get, key)
    for key in (manifest, ref, CONFIG_KEY):
        assert allows(pruner, get, key)
    assert not allows(pruner, put, manifest) and not allows(pruner, put, ref)
    collector_keys = [LOCK_KEY, f"{PLANS}r.json", f"{DELETING}r", f"{RECORDS}r.json", f"{RECORDS}r.probe"]
    for key in collector_keys:
        assert allows(pruner, put, key) and allows(pruner, delete, key) and allows(pruner, get, key)
        assert not allows(writer, delete, key), f"the replicating role may delete {key}"
    assert allows(pruner, put, CONFIG_KEY)  # raised once to repository version 2
    assert allows(pruner, delete, lease)  # expired intents
    assert allows(pruner, delete, manifest)  # the chart's prune.forget
    # The matcher itself: a broad grant is caught, another bucket is not matched.
    broad = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": REPO_ARN + "*"}]}
    assert allows(broad, delete, chunk)
    other = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::other/*"}]}
    assert not allows(other, delete, chunk)

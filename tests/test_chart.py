"""charts/replicator, rendered by Helm's own engine (helm-python-sdk: libhelm, no binary).

Each values file in charts/replicator/ci/ is rendered; every object is validated against
the Kubernetes schemas (and the Prometheus Operator's models); every pod that runs
replicator is checked for what docs/DEPLOY.md promises, with the config it mounts loaded by
replicator's own validator; the alert rules may only use metrics replicator exports; and the
command lines the pods run are run here against a real repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import helm_python as helm
import pytest
import yaml

import replicator
from replicator.config import parse_config
from tests.conftest import cli
from tests.daemon_helpers import latest_manifest, set_names
from tests.deploy_helpers import (
    Obj,
    check_dashboard,
    check_replicator_pod,
    check_rules,
    describe,
    env_for,
    load_objects,
    pod_spec,
    promql_metric_names,
    replicator_containers,
    run_invocation,
    validate_object,
)
from tests.helpers import local_setup, make_checkpoint
from tests.test_shared import _index as index_shards
from tests.test_shared import _spread as spread

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "replicator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DASHBOARD = CHART / "dashboards" / "replicator.json"

helm.disable_logging()  # the library logs `fail` calls to stderr; the exception says it all


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart: helm.Chart, values: dict[str, Any] | None, name: str = "rep") -> list[Obj]:
    out = chart.render(values=values, name=name, namespace="ml", is_install=True)
    return [obj for path, text in sorted(out.items()) if path.endswith(".yaml") for obj in load_objects(text)]


def values_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def by_kind(objects: list[Obj]) -> dict[str, list[Obj]]:
    out: dict[str, list[Obj]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def configmaps(objects: list[Obj]) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}


CKPT: dict[str, Any] = {"name": "ckpt", "url": "/checkpoints/run-7", "kind": "checkpoint"}
NODE_LOCAL: dict[str, Any] = {"checkpoints": {"hostPath": "/mnt/nvme/checkpoints"}}
ONLY_CKPT: dict[str, Any] = {"config": {"sources": [CKPT]}}
SPLIT: dict[str, Any] = {
    "mode": "statefulset",
    "shared": {"enabled": True, "instances": 2},
    "statefulset": {"checkpoints": {"claimName": "weka"}},
    "config": {"sources": [CKPT]},
}

MINIMAL: dict[str, Any] = {
    "image": {"repository": "registry.example.com/replicator"},
    "config": {
        "sources": [{"name": "s", "url": "s3://primary/x"}],
        "targets": [{"name": "t", "url": "s3://dr/x"}],
    },
}


def test_versions_agree_and_lint_is_clean(chart: helm.Chart) -> None:
    version = replicator.__version__
    assert chart.metadata["appVersion"] == version
    assert chart.values["image"]["tag"] == version, "values.yaml image.tag must be the appVersion"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == version
    for values in [MINIMAL, *map(values_of, CI_VALUES)]:
        report = helm.lint(CHART, values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, problems


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_render_valid_objects_and_pods(chart: helm.Chart, values_file: Path) -> None:
    values = values_of(values_file)
    objects = render(chart, values)
    kinds = by_kind(objects)
    for obj in objects:
        validate_object(obj)
    names = [describe(o) for o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"

    mode = values.get("mode", "standalone")
    assert ("Deployment" in kinds) == (mode == "standalone")
    assert ("DaemonSet" in kinds) == (mode == "daemonset")
    assert ("StatefulSet" in kinds) == (mode == "statefulset")
    example = mode == "sidecar" and values.get("sidecar", {}).get("example", {}).get("enabled", False)
    assert ("Job" in kinds) == example
    cronjobs = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in kinds.get("CronJob", [])}
    wanted_jobs = {"verify": values.get("verify", {}).get("enabled", True)}
    wanted_jobs["prune"] = values.get("prune", {}).get("enabled", False)
    assert cronjobs == {job for job, on in wanted_jobs.items() if on}

    cms = configmaps(objects)
    pods = [o for o in objects if pod_spec(o) is not None]
    configs = [cfg for owner in pods for cfg in check_replicator_pod(owner, cms)]
    # The chart's config is the values' config plus the two keys it owns.
    expected = {
        "state_dir": "/var/lib/replicator",
        "listen": f"0.0.0.0:{values.get('metrics', {}).get('port', 9464)}",
    }
    for cfg in configs:
        assert [s.name for s in cfg.sources] == [s["name"] for s in values["config"]["sources"]]
        assert [t.name for t in cfg.targets] == [t["name"] for t in values["config"]["targets"]]
        assert str(cfg.state_dir) == expected["state_dir"] and cfg.listen == expected["listen"]

    # Every pod runs as the service account the chart renders (or names), with no API token;
    # the prune CronJob as its own.
    for owner in pods:
        spec = pod_spec(owner)
        assert spec is not None
        assert spec["automountServiceAccountToken"] is False
        is_prune = pod_labels(owner).get("app.kubernetes.io/component") == "prune"
        accounts = values.get("prune", {}) if is_prune else values
        if accounts.get("serviceAccount", {}).get("create", True):
            assert {"ServiceAccount/" + spec["serviceAccountName"]} <= set(names)
        else:
            assert spec["serviceAccountName"] == accounts["serviceAccount"]["name"]

    metrics_services = [
        o for o in kinds.get("Service", []) if o["metadata"]["labels"][COMPONENT] == "metrics"
    ]
    if metrics_services:
        (svc,) = metrics_services
        selected = [p for p in pods if _selects(svc["spec"]["selector"], pod_labels(p))]
        runs_daemon = [
            p for p in pods if any(c["args"][0] == "run" for c, _ in replicator_containers(pod_spec(p) or {}))
        ]
        assert selected == runs_daemon, "the metrics Service must select exactly the pods running the daemon"
        for monitor in kinds.get("ServiceMonitor", []):
            assert _selects(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
                p["name"] for p in svc["spec"]["ports"]
            }
    for rule in kinds.get("PrometheusRule", []):
        alerts = check_rules(rule)
        assert {"ReplicatorRPOBreached", "ReplicatorTargetErrors"} <= set(alerts)
        assert ("ReplicatorDown" in alerts) == (mode == "standalone")  # a finished Job is not "down"
    dashboards = [c for c in cms.values() if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    wanted = values.get("metrics", {}).get("grafanaDashboard", {}).get("enabled", False)
    assert len(dashboards) == (1 if wanted else 0)
    for cm in dashboards:
        assert json.loads(cm["data"]["replicator.json"]) == json.loads(DASHBOARD.read_text())


def pod_labels(owner: Obj) -> dict[str, str]:
    template = (
        owner["spec"]["jobTemplate"]["spec"]["template"]
        if owner["kind"] == "CronJob"
        else owner["spec"]["template"]
    )
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_alert_rule_checks_can_fail() -> None:
    assert promql_metric_names("rate(replicator_sent_bytes_total[5m]) > 0") == {"replicator_sent_bytes_total"}

    def rule(expr: str) -> Obj:
        return {"spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": expr}]}]}}

    assert check_rules(rule("replicator_rpo_breached == 1")) == ["A"]
    with pytest.raises(AssertionError, match="replicator_lag_seconds"):
        check_rules(rule("replicator_lag_seconds > 1"))
    with pytest.raises(AssertionError, match="invalid PromQL"):
        check_rules(rule("rate(replicator_sent_bytes_total[5m]"))


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    """Every query of the shipped dashboard is valid PromQL over metrics replicator exports,
    and the dashboard shows what docs/METRICS.md says it does."""
    dashboard = json.loads(DASHBOARD.read_text())
    used = check_dashboard(dashboard)
    for needed in (
        "replicator_rpo_lag_seconds",
        "replicator_rpo_objective_seconds",
        "replicator_rpo_breached",
        "replicator_sent_bytes_total",
        "replicator_spend_usd",
        "replicator_target_errors_total",
    ):
        assert needed in used, f"the dashboard has no panel on {needed}"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    documented = (ROOT / "docs" / "METRICS.md").read_text()
    assert all(name.removesuffix("_total") in documented for name in used)


def test_dashboard_checks_can_fail() -> None:
    def dashboard(expr: str) -> dict[str, Any]:
        return {"panels": [{"title": "t", "targets": [{"refId": "A", "expr": expr}]}]}

    assert check_dashboard(dashboard('rate(replicator_sent_bytes_total{job=~"$job"}[$__rate_interval])')) == {
        "replicator_sent_bytes_total"
    }
    with pytest.raises(AssertionError, match="replicator_lag_seconds"):
        check_dashboard(dashboard("replicator_lag_seconds"))
    with pytest.raises(AssertionError, match="invalid PromQL"):
        check_dashboard(dashboard("sum(replicator_spend_usd"))
    bad_variable = {
        "templating": {"list": [{"name": "v", "type": "query", "query": "label_values(nope, job)"}]}
    }
    with pytest.raises(AssertionError, match="nope"):
        check_dashboard(bad_variable)


def test_pod_checks_can_fail(chart: helm.Chart) -> None:
    """The pod checker catches what the docs warn about."""
    values = values_of(CHART / "ci" / "sidecar-values.yaml")

    def broken(mutate: Any) -> None:
        objects = render(chart, values)
        (job,) = [o for o in objects if o["kind"] == "Job"]
        mutate(job, configmaps(objects))
        check_replicator_pod(job, configmaps(objects))

    def sidecar(job: Obj) -> Obj:
        spec = pod_spec(job)
        assert spec is not None
        c: Obj = spec["initContainers"][0]
        return c

    def writable_checkpoints(job: Obj, cms: dict[str, Obj]) -> None:
        for m in sidecar(job)["volumeMounts"]:
            if m["mountPath"] == "/checkpoints":
                m["readOnly"] = False

    def localhost(job: Obj, cms: dict[str, Obj]) -> None:
        for cm in cms.values():
            cm["data"]["replicator.yaml"] = cm["data"]["replicator.yaml"].replace("0.0.0.0:", "127.0.0.1:")

    def writable_root(job: Obj, cms: dict[str, Obj]) -> None:
        sidecar(job)["securityContext"]["readOnlyRootFilesystem"] = False

    def short_grace(job: Obj, cms: dict[str, Obj]) -> None:
        spec = pod_spec(job)
        assert spec is not None
        spec["terminationGracePeriodSeconds"] = 20

    def startup_probe(job: Obj, cms: dict[str, Obj]) -> None:
        sidecar(job)["startupProbe"] = sidecar(job)["livenessProbe"]

    for mutate, message in [
        (writable_checkpoints, "mounted writable"),
        (localhost, "unreachable from the kubelet"),
        (writable_root, "root filesystem is writable"),
        (short_grace, "before shutdown_grace"),
        (startup_probe, "delays the trainer"),
    ]:
        with pytest.raises(AssertionError, match=message):
            broken(mutate)


def test_schema_checks_can_fail(chart: helm.Chart) -> None:
    (deployment,) = [o for o in render(chart, MINIMAL) if o["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystm"] = True
    with pytest.raises(AssertionError, match="readOnlyRootFilesystm"):
        validate_object(deployment)
    values = {**MINIMAL, "metrics": {"serviceMonitor": {"enabled": True}}}
    (monitor,) = [o for o in render(chart, values) if o["kind"] == "ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["scrapeTimeOut"] = "10s"
    with pytest.raises(AssertionError, match="scrapeTimeOut"):
        validate_object(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "metrics", "interval": "30 seconds"}
    with pytest.raises(AssertionError, match="interval"):
        validate_object(monitor)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": {"repository": ""}}, "image.repository is required"),
        ({"config": {"listen": "127.0.0.1:9464"}}, "config.listen: leave it out"),
        ({"config": {"state_dir": "/data"}}, "config.state_dir: leave it out"),
        ({"config": {"sources": []}}, "config.sources is empty"),
        ({"config": {"targets": None}}, "config.targets is empty"),
        ({"mode": "cluster"}, "mode"),
        ({"verfy": {"enabled": False}}, "'verfy' not allowed"),
        ({"prune": {"enabled": True, "grance": "1h"}}, "'grance' not allowed"),
        ({"prune": {"enabled": True, "grace": "1 hour"}}, "/prune/grace"),
        (
            {"prune": {"enabled": True, "serviceAccount": {"create": False}}},
            "prune.serviceAccount.name: with prune.serviceAccount.create: false",
        ),
        (
            {
                "prune": {"enabled": True},
                "config": {"targets": [{"name": "t", "url": "s3://dr/x", "prune": {"every": "24h"}}]},
            },
            "config.targets[t].prune: the daemon would collect garbage itself",
        ),
        ({"mode": "sidecar", "state": {"persistence": {"enabled": True}}}, "existingClaim"),
        ({"sidecar": {"example": {"enabled": True}}}, "needs mode: sidecar"),
        (
            {"mode": "sidecar", "sidecar": {"native": False, "example": {"enabled": True}}},
            "never completes",
        ),
        (
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            "needs metrics.service",
        ),
        # Multi-node checkpoints.
        (
            {
                "mode": "daemonset",
                "daemonset": NODE_LOCAL,
                "shared": {"enabled": True, "instances": 4},
                **ONLY_CKPT,
            },
            "shared.assembler: in mode daemonset, name the node whose pod publishes the sets",
        ),
        (
            {
                "mode": "daemonset",
                "daemonset": NODE_LOCAL,
                "shared": {"enabled": True, "assembler": "n-0"},
                **ONLY_CKPT,
            },
            "shared.instances: how many instances contribute each set (the number of training nodes)",
        ),
        ({"mode": "daemonset"}, "daemonset.checkpoints.hostPath: give the node-local directory"),
        ({"mode": "statefulset"}, "mode: statefulset runs shared.instances pods"),
        (
            {"mode": "statefulset", "shared": {"enabled": True, "instances": 2}},
            "statefulset.checkpoints.claimName: give the ReadWriteMany claim",
        ),
        (
            {"shared": {"enabled": True, "instances": 2}},
            "shared.enabled: a standalone daemon is one instance",
        ),
        (
            {**SPLIT, "shared": {"enabled": True, "instances": 2, "instance": "${HOSTNAME}"}},
            "shared.instance: only for mode sidecar; in mode statefulset the chart sets it to ${POD_NAME}",
        ),
        (
            {**SPLIT, "config": {"sources": [{**CKPT, "shared": {"instance": "a-0"}}]}},
            "config.sources[ckpt].shared.instance: leave it out; the chart sets it",
        ),
        (
            {**SPLIT, "config": {"sources": [CKPT, {"name": "data", "url": "s3://primary/data"}]}},
            "config.sources[data]: every statefulset pod would replicate this dataset source again",
        ),
        (
            {**SPLIT, "state": {"persistence": {"existingClaim": "cache"}}},
            "state.persistence.existingClaim: one claim cannot hold the state of every statefulset pod",
        ),
        ({"shared": {"assembler": "node a"}}, "/shared/assembler"),
        ({"mode": "daemonset", "daemonset": {"checkpoints": {"hostPath": "mnt/nvme"}}}, "/daemonset"),
    ],
)
def test_bad_values_fail_with_a_clear_message(
    chart: helm.Chart, change: dict[str, Any], message: str
) -> None:
    values = _merge(MINIMAL, change)
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


IRSA = "eks.amazonaws.com/role-arn"


COMPONENT = "app.kubernetes.io/component"


def component(objects: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["labels"].get(COMPONENT) == name]
    return obj


def test_prune_cronjob_runs_under_its_own_service_account(chart: helm.Chart) -> None:
    """Garbage collection as a CronJob whose pods run as an account of their own (one that
    carries the pruning role), never the daemon's: off unless asked for."""
    assert not [o for o in render(chart, MINIMAL) if o["metadata"]["labels"].get(COMPONENT) == "prune"]
    role = "arn:aws:iam::123456789012:role/replicator-prune"
    values = _merge(
        MINIMAL,
        {
            "config": {"targets": [{"name": "t", "url": "s3://dr-bucket/x"}]},
            "credentials": {"existingSecret": "writer-keys"},
            "prune": {
                "enabled": True,
                "grace": "90m",
                "serviceAccount": {"annotations": {IRSA: role}},
                "credentials": {"existingSecret": "prune-keys"},
            },
        },
    )
    objects = render(chart, values)
    for obj in objects:
        validate_object(obj)
    cronjob = component(objects, "CronJob", "prune")
    spec, daemon = pod_spec(cronjob), pod_spec(by_kind(objects)["Deployment"][0])
    assert spec is not None and daemon is not None
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["schedule"] == "0 5 * * *"  # daily
    # One attempt: the Job's failure is the pod's exit status (prune's), not retried away.
    assert spec["restartPolicy"] == "Never" and cronjob["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    ((container, _),) = replicator_containers(spec)  # no forget step unless asked for
    config = "/etc/replicator/replicator.yaml"
    assert container["args"] == ["prune", "--config", config, "--grace", "90m", "--json"]
    check_replicator_pod(cronjob, configmaps(objects))
    config_volume = {v["name"]: v for v in spec["volumes"]}["replicator-config"]
    assert config_volume == {v["name"]: v for v in daemon["volumes"]}["replicator-config"]

    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    assert spec["serviceAccountName"] != daemon["serviceAccountName"]
    assert accounts[spec["serviceAccountName"]]["metadata"]["annotations"] == {IRSA: role}
    assert "annotations" not in accounts[daemon["serviceAccountName"]]["metadata"]
    verify = pod_spec(component(objects, "CronJob", "verify"))
    assert verify is not None and verify["serviceAccountName"] == daemon["serviceAccountName"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["prune-keys"]
    (daemon_container,) = daemon["containers"]
    assert [e["secretRef"]["name"] for e in daemon_container["envFrom"]] == ["writer-keys"]

    # forget: true runs retention first, as an init container (prune runs only if it succeeds).
    values["prune"] |= {"forget": True, "credentials": {"existingSecret": ""}}
    spec = pod_spec(component(render(chart, values), "CronJob", "prune"))
    assert spec is not None
    (forget, first), (prune, last) = replicator_containers(spec)
    assert (first, last) == (True, False) and "restartPolicy" not in forget
    assert forget["args"] == ["forget", "--config", config, "--json"] and prune["args"][0] == "prune"
    for c in (forget, prune):
        assert [e["secretRef"]["name"] for e in c["envFrom"]] == ["writer-keys"]  # the default
        assert c["volumeMounts"] == prune["volumeMounts"]


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


@pytest.mark.parametrize("native", [True, False], ids=["native-sidecar-job", "ordinary-sidecar-deployment"])
def test_sidecar_templates_from_a_parent_chart(tmp_path: Path, native: bool) -> None:
    """The documented way to add the sidecar to your own training pods: a chart that depends
    on this one includes its named templates (a native sidecar in a Job, or an ordinary
    container in a long-running Deployment)."""
    parent = tmp_path / "train"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "replicator")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: train\nversion: 1.0.0\n"
        "dependencies:\n  - name: replicator\n    version: 0.1.0\n"
    )
    values = {
        "replicator": {
            "mode": "sidecar",
            "image": {"repository": "registry.example.com/replicator"},
            "verify": {"enabled": False},
            "sidecar": {"native": native, "checkpoints": {"volume": "ckpt", "mountPath": "/data/ckpt"}},
            "config": {
                "sources": [{"name": "ckpt", "url": "/data/ckpt/run-7", "kind": "checkpoint"}],
                "targets": [{"name": "dr", "url": "s3://dr-bucket/ckpt"}],
            },
        }
    }
    (parent / "values.yaml").write_text(yaml.safe_dump(values))
    ctx = '(dict "Values" .Values.replicator "Release" .Release)'
    sidecar = f'{{{{- include "replicator.sidecarContainer" {ctx} | nindent 8 }}}}'
    trainer = """
        - name: trainer
          image: registry.example.com/trainer:1
          volumeMounts: [{name: ckpt, mountPath: /data/ckpt}]"""
    if native:
        head = "apiVersion: batch/v1\nkind: Job"
        init = f"      restartPolicy: Never\n      initContainers:\n        {sidecar}\n"
        containers = f"{init}      containers:{trainer}"
        selector = ""
    else:
        head = "apiVersion: apps/v1\nkind: Deployment"
        containers = f"      containers:{trainer}\n        {sidecar}"
        selector = "  selector: {matchLabels: {app: train}}\n"
    (parent / "templates" / "train.yaml").write_text(f"""\
{head}
metadata:
  name: {{{{ .Release.Name }}}}-train
spec:
{selector}  template:
    metadata:
      labels:
        app: train
        {{{{- include "replicator.sidecarPodLabels" {ctx} | nindent 8 }}}}
    spec:
      terminationGracePeriodSeconds: 90
{containers}
      volumes:
        - name: ckpt
          persistentVolumeClaim: {{claimName: training-checkpoints}}
        {{{{- include "replicator.sidecarVolumes" {ctx} | nindent 8 }}}}
""")
    with helm.Chart.load(parent) as c:
        objects = render(c, None, name="exp7")
    for obj in objects:
        validate_object(obj)
    kinds = by_kind(objects)
    (trainer_pod,) = kinds["Job" if native else "Deployment"]
    assert ("Job" in kinds) == native and ("Deployment" in kinds) != native
    (cfg,) = check_replicator_pod(trainer_pod, configmaps(objects))
    assert cfg.sources[0].url == "/data/ckpt/run-7"
    spec = pod_spec(trainer_pod)
    assert spec is not None
    (container, is_init) = next(replicator_containers(spec))
    assert is_init == native
    assert ("startupProbe" in container) != native, "a startup probe, except on a native sidecar"
    (svc,) = kinds["Service"]
    assert _selects(svc["spec"]["selector"], pod_labels(trainer_pod)), "the Service must select the trainer"


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synced local repository and its config, for running the artifacts' command lines."""
    tmp = tmp_path_factory.mktemp("invocations")
    primary, _target, cfg = local_setup(tmp)
    (primary / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return cfg


def test_pod_command_lines_run(chart: helm.Chart, replicated: Path, tmp_path: Path) -> None:
    """What the pods would run, run here: the daemon starts and drains; verify and the
    restore drill pass on a real repository."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    paths = {
        "/etc/replicator/replicator.yaml": replicated,
        "/etc/replicator/maintenance.yaml": replicated,
        "/scratch": scratch,
    }
    seen: set[tuple[str, ...]] = set()
    for values_file in CI_VALUES:
        for obj in render(chart, values_of(values_file)):
            spec = pod_spec(obj)
            for c, _ in replicator_containers(spec) if spec else ():
                argv = (*c["command"], *c["args"])
                if argv not in seen:
                    seen.add(argv)
                    run_invocation(list(argv), paths, tmp_path)
    subcommands = {(a[1], "--restore-drill" in a) for a in seen}
    assert subcommands == {
        ("run", False),
        ("verify", False),
        ("verify", True),
        ("prune", False),
        ("forget", False),
    }, seen


def test_dockerfile_matches_the_chart(chart: helm.Chart) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, flags=re.M)
    assert user, "the image must name a numeric non-root user (runAsNonRoot needs it)"
    sc = chart.values["securityContext"]
    assert (int(user[1]), int(user[2])) == (sc["runAsUser"], sc["runAsGroup"])
    base = re.search(r"^FROM python:(\d+)\.(\d+)", dockerfile, flags=re.M)
    assert base, "the image must start from an official Python image"
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert (int(base[1]), int(base[2])) >= tuple(map(int, required.removeprefix(">=").split(".")))
    assert re.search(r'^ENTRYPOINT \["replicator"\]', dockerfile, flags=re.M)


# -- multi-node checkpoints (docs/DEPLOY.md, "Multi-node checkpoints") --------------------------


def daemon_pod(objects: list[Obj], kind: str) -> tuple[Obj, Obj, Obj]:
    """(owner, pod spec, replicator container) of the daemon's pods."""
    (owner,) = by_kind(objects)[kind]
    spec = pod_spec(owner)
    assert spec is not None
    ((container, _),) = replicator_containers(spec)
    return owner, spec, container


def daemon_config(objects: list[Obj], key: str = "replicator.yaml") -> Obj:
    (cm,) = [c for c in configmaps(objects).values() if key in c["data"]]
    data: Obj = yaml.safe_load(cm["data"][key])
    return data


def downward(container: Obj) -> dict[str, str]:
    return {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "fieldRef" in e.get("valueFrom", {})
    }


def test_daemonset_runs_one_instance_per_node_named_by_its_node() -> None:
    """mode: daemonset: a pod on every training node, named after its node (the downward API's
    spec.nodeName), reading the node-local directory read-only, its cache on the node; the
    node named as assembler publishes."""
    values = values_of(CHART / "ci" / "daemonset-values.yaml")
    with helm.Chart.load(CHART) as c:
        objects = render(c, values)
    ds, spec, container = daemon_pod(objects, "DaemonSet")
    assert downward(container)["NODE_NAME"] == "spec.nodeName"
    (source,) = daemon_config(objects)["sources"]
    assert source["shared"] == {
        "instance": "${NODE_NAME}",
        "instances": 4,
        "assembler": "gpu-node-0",
        "deadline": "15m",
    }
    assert "shared" not in daemon_config(objects, "maintenance.yaml")["sources"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["hostPath"] == {"path": "/mnt/nvme/checkpoints", "type": "Directory"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True}
    state = volumes["replicator-state"]["hostPath"]
    assert state == {"path": "/var/lib/replicator/ml-rep-replicator", "type": "DirectoryOrCreate"}
    # The kubelet creates that directory as root: one step hands it to the daemon's user.
    (chown,) = spec["initContainers"]
    assert chown["command"] == ["chown", "-R", "65532:65532", "/var/lib/replicator"]
    assert chown["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # Placement: the training nodes, with their taints; the CronJobs are not pinned there.
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == values["daemonset"]["tolerations"]
    for cronjob in by_kind(objects)["CronJob"]:
        cron_spec = pod_spec(cronjob)
        assert cron_spec is not None and "nodeSelector" not in cron_spec and "tolerations" not in cron_spec
        for cron_container, _ in replicator_containers(cron_spec):
            assert cron_container["args"][2] == "/etc/replicator/maintenance.yaml"
    # Metrics per pod: the Service selects the DaemonSet's pods.
    (svc,) = by_kind(objects)["Service"]
    assert _selects(svc["spec"]["selector"], ds["spec"]["template"]["metadata"]["labels"])

    # Without the state step (a directory prepared on the node) there is no root container.
    values["daemonset"] |= {"chownState": False, "statePath": "/nvme/replicator-state"}
    with helm.Chart.load(CHART) as c:
        _, spec, _ = daemon_pod(render(c, values), "DaemonSet")
    assert "initContainers" not in spec
    state = {v["name"]: v for v in spec["volumes"]}["replicator-state"]["hostPath"]
    assert state["path"] == "/nvme/replicator-state"


def test_statefulset_pods_split_one_shared_directory(chart: helm.Chart) -> None:
    """mode: statefulset: shared.instances is both the replica count and the config's
    instances; each pod is named by the downward API's metadata.name (<name>-0..N-1, the
    number split uses), -0 publishes, and each pod's cache is a claim of its own."""
    values = values_of(CHART / "ci" / "statefulset-values.yaml")
    objects = render(chart, values)
    sts, spec, container = daemon_pod(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert downward(container)["POD_NAME"] == "metadata.name"
    (source,) = daemon_config(objects)["sources"]
    assert source["shared"] == {"instance": "${POD_NAME}", "instances": 3, "split": True, "heartbeat": "15s"}
    # The governing Service exists and is headless; the metrics Service is another.
    services = {o["metadata"]["name"]: o for o in by_kind(objects)["Service"]}
    governing = services[sts["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["metadata"]["labels"][COMPONENT] != "metrics"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "replicator-state"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "replicator-state" not in volumes, "the claim template is the state volume"
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {
        "claimName": "weka-checkpoints",
        "readOnly": True,
    }

    # Which pod is which, as replicator sees it with each pod's name in POD_NAME.
    text = configmaps(objects)[sts["metadata"]["name"]]["data"]["replicator.yaml"]
    roles = []
    for ordinal in range(3):
        env = env_for(text) | {"POD_NAME": f"{sts['metadata']['name']}-{ordinal}"}
        with mock.patch.dict(os.environ, env):
            shared = parse_config(yaml.safe_load(text), Path("/"), "test").sources[0].shared
        assert shared is not None and shared.index == ordinal
        roles.append(shared.is_assembler)
    assert roles == [True, False, False]

    # One value: more pods means more instances.
    objects = render(chart, _merge(values, {"shared": {"instances": 5}}))
    assert by_kind(objects)["StatefulSet"][0]["spec"]["replicas"] == 5
    assert daemon_config(objects)["sources"][0]["shared"]["instances"] == 5


def test_prometheus_rule_alerts_on_waiting_sets_and_silent_instances(chart: helm.Chart) -> None:
    objects = render(chart, values_of(CHART / "ci" / "daemonset-values.yaml"))
    (rule,) = by_kind(objects)["PrometheusRule"]
    check_rules(rule)
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert promql_metric_names(exprs["ReplicatorSetsOverdue"]) == {"replicator_sets_overdue"}
    assert promql_metric_names(exprs["ReplicatorInstancesSilent"]) == {"replicator_instances_silent"}
    assert exprs["ReplicatorSetsOverdue"].endswith("> 0")
    assert exprs["ReplicatorInstancesSilent"].endswith("> 0")


def test_sidecars_of_an_indexed_job_are_instances_by_completion_index(tmp_path: Path) -> None:
    """One sidecar per training pod: in an Indexed Job (a JobSet's, a PyTorchJob's workers),
    shared.instance: trainer-${JOB_COMPLETION_INDEX}, which Kubernetes sets in every container
    of the pod; trainer-0 publishes. The sidecar also has POD_NAME and NODE_NAME from the
    downward API."""
    parent = tmp_path / "train"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "replicator")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: train\nversion: 1.0.0\n"
        "dependencies:\n  - name: replicator\n    version: 0.1.0\n"
    )
    values = {
        "replicator": {
            "mode": "sidecar",
            "image": {"repository": "registry.example.com/replicator"},
            "shared": {"enabled": True, "instances": 4, "instance": "trainer-${JOB_COMPLETION_INDEX}"},
            "config": {
                "sources": [{"name": "ckpt", "url": "/checkpoints/run-7", "kind": "checkpoint"}],
                "targets": [{"name": "dr", "url": "s3://dr-bucket/ckpt"}],
            },
        }
    }
    (parent / "values.yaml").write_text(yaml.safe_dump(values))
    ctx = '(dict "Values" .Values.replicator "Release" .Release)'
    (parent / "templates" / "train.yaml").write_text(f"""\
apiVersion: batch/v1
kind: Job
metadata:
  name: {{{{ .Release.Name }}}}-train
spec:
  completionMode: Indexed
  completions: 4
  parallelism: 4
  template:
    metadata:
      labels:
        {{{{- include "replicator.sidecarPodLabels" {ctx} | nindent 8 }}}}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 90
      initContainers:
        {{{{- include "replicator.sidecarContainer" {ctx} | nindent 8 }}}}
      containers:
        - name: trainer
          image: registry.example.com/trainer:1
          volumeMounts: [{{name: checkpoints, mountPath: /checkpoints}}]
      volumes:
        - name: checkpoints
          emptyDir: {{}}
        {{{{- include "replicator.sidecarVolumes" {ctx} | nindent 8 }}}}
""")
    with helm.Chart.load(parent) as c:
        objects = render(c, None, name="exp7")
    for obj in objects:
        validate_object(obj)
    job, _, container = daemon_pod(objects, "Job")
    assert downward(container) == {"POD_NAME": "metadata.name", "NODE_NAME": "spec.nodeName"}
    (cfg,) = check_replicator_pod(job, configmaps(objects))  # loads with JOB_COMPLETION_INDEX=0
    assert cfg.sources[0].shared is not None and cfg.sources[0].shared.is_assembler
    (source,) = daemon_config(objects)["sources"]
    assert source["shared"] == {"instance": "trainer-${JOB_COMPLETION_INDEX}", "instances": 4}

    # The same pod template in a Job that is not Indexed has no completion index to name it by.
    job["spec"].pop("completionMode")
    with pytest.raises(AssertionError, match="uses JOB_COMPLETION_INDEX, which the pod does not set"):
        check_replicator_pod(job, configmaps(objects))


def test_identity_checks_can_fail(chart: helm.Chart) -> None:
    """The pod checker catches a daemon whose instance name is not filled by its pod, one that
    every pod shares, and a CronJob that would load a shared: block."""
    objects = render(chart, values_of(CHART / "ci" / "daemonset-values.yaml"))
    ds, _, container = daemon_pod(objects, "DaemonSet")
    cms = configmaps(objects)
    check_replicator_pod(ds, cms)
    container["env"] = [e for e in container["env"] if e["name"] != "NODE_NAME"]
    with pytest.raises(AssertionError, match="uses NODE_NAME, which the pod does not set"):
        check_replicator_pod(ds, cms)

    objects = render(chart, values_of(CHART / "ci" / "daemonset-values.yaml"))
    ds, cms = by_kind(objects)["DaemonSet"][0], configmaps(objects)
    (cm,) = cms.values()
    cm["data"]["replicator.yaml"] = cm["data"]["replicator.yaml"].replace("${NODE_NAME}", "node-1")
    with pytest.raises(AssertionError, match="is the same in every pod"):
        check_replicator_pod(ds, cms)

    cm["data"]["maintenance.yaml"] = cm["data"]["replicator.yaml"]
    verify = component(objects, "CronJob", "verify")
    with pytest.raises(AssertionError, match="verify loads shared: for"):
        check_replicator_pod(verify, cms)


def test_rendered_daemonset_configs_assemble_a_set_for_real(chart: helm.Chart, tmp_path: Path) -> None:
    """The DaemonSet's config, as rendered, run by two "nodes" with NODE_NAME as the downward
    API sets it (paths mapped to local ones): a set is published by the assembler's node only
    once the other node's part is in; verify, with the CronJobs' config and no NODE_NAME,
    passes on the result."""
    values = _merge(
        MINIMAL,
        {
            "mode": "daemonset",
            "daemonset": NODE_LOCAL,
            "shared": {"enabled": True, "instances": 2, "assembler": "node-a", "heartbeat": "1s"},
            "extraVolumes": [{"name": "replica", "nfs": {"server": "nfs.example", "path": "/dr"}}],
            "extraVolumeMounts": [{"name": "replica", "mountPath": "/replica"}],
            "config": {
                "sources": [
                    {
                        "name": "ckpt",
                        "url": "/checkpoints/run-7",
                        "kind": "checkpoint",
                        "complete_when": {"marker": "model.safetensors.index.json", "quiet": "1s"},
                    }
                ],
                "targets": [{"name": "dr", "url": "/replica/run-7"}],
            },
        },
    )
    objects = render(chart, values)
    ds, _, _ = daemon_pod(objects, "DaemonSet")
    check_replicator_pod(ds, configmaps(objects))
    (cm,) = configmaps(objects).values()
    replica = tmp_path / "replica"
    (replica / "run-7").mkdir(parents=True)  # the NFS share's directory

    def local(key: str, node: str) -> Path:
        text = cm["data"][key]
        for pod_path, here in [
            ("/checkpoints", tmp_path / node / "checkpoints"),
            ("/var/lib/replicator", tmp_path / node / "state"),
            ("/replica", replica),
        ]:
            here.mkdir(parents=True, exist_ok=True)
            text = text.replace(pod_path, str(here))
        out = tmp_path / node / key
        out.write_text(text)
        return out

    configs = {node: local("replicator.yaml", node) for node in ("node-a", "node-b")}
    made = make_checkpoint(tmp_path / "made", 1, shards=2, marker=None)
    index_shards(made, 2)
    want = spread(made, [tmp_path / n / "checkpoints" / "run-7" for n in configs])

    def sync(node: str) -> str:
        res = cli("sync", "-c", str(configs[node]), "--json", env={"NODE_NAME": node})
        assert res.returncode == 0, res.stderr
        status: str = json.loads(res.stdout)["sources"][0]["targets"][0]["status"]
        return status

    target = {"name": "dr", "url": str(replica / "run-7")}
    assert sync("node-a") == "waiting"
    assert latest_manifest(target, "ckpt") is None, "published with node-b's part missing"
    assert sync("node-b") == "contributed"
    assert sync("node-a") == "published"
    m = latest_manifest(target, "ckpt")
    assert set_names(m) == ["step-000001"]
    assert m is not None and sorted(f.path for f in m.files) == sorted(want)

    maintenance = local("maintenance.yaml", "cron")
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    res = subprocess.run(
        [sys.executable, "-m", "replicator", "verify", "-c", str(maintenance)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0 and ": OK:" in res.stdout, res.stdout + res.stderr

"""charts/replicator, rendered by Helm's own engine (helm-python-sdk: libhelm, no binary).

Each values file in charts/replicator/ci/ is rendered; every object is validated against
the Kubernetes schemas (and the Prometheus Operator's models); every pod that runs
replicator is checked for what docs/DEPLOY.md promises, with the config it mounts loaded by
replicator's own validator; the alert rules may only use metrics replicator exports; and the
command lines the pods run are run here against a real repository.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

import replicator
from tests.conftest import cli
from tests.deploy_helpers import (
    Obj,
    check_dashboard,
    check_replicator_pod,
    check_rules,
    describe,
    load_objects,
    pod_spec,
    promql_metric_names,
    replicator_containers,
    run_invocation,
    validate_object,
)
from tests.helpers import local_setup

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

    if "Service" in kinds:
        (svc,) = kinds["Service"]
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
        ({"mode": "daemonset"}, "mode"),
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
    paths = {"/etc/replicator/replicator.yaml": replicated, "/scratch": scratch}
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

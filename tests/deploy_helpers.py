"""Checks shared by the Helm chart and plain-manifest tests.

Every object is validated against a schema: the Kubernetes OpenAPI schemas that
kubernetes-validate bundles (strict: unknown fields fail), and for the Prometheus Operator's
ServiceMonitor and PrometheusRule, whose schemas it lacks, cloudcoil's typed models of those
CRDs plus a round trip that catches unknown fields. Then each pod that runs replicator is
checked for what the deployment docs promise, against the config it actually mounts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import promql_parser
import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1 as prom_v1
from kubernetes_validate import utils as kv_utils

from replicator.config import Config, parse_config

KUBE_VERSIONS = ("1.29", kv_utils.latest_version())
"""The oldest version the chart supports (native sidecars) and the newest schemas shipped."""

CONFIG_KEY = "replicator.yaml"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Obj = dict[str, Any]


def load_objects(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# -- schemas ----------------------------------------------------------------------------------


def validate_object(obj: Obj) -> None:
    """Raise AssertionError naming the object, field and problem if ``obj`` is invalid."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        _validate_prometheus_operator(obj)
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise AssertionError(
                f"{describe(obj)}: no Kubernetes {version} schema for {obj['apiVersion']}"
            ) from None
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{describe(obj)} is not valid for Kubernetes {version}: {where}: {exc.message}"
            ) from None
    spec = pod_spec(obj)
    if spec is not None:
        for volume in spec.get("volumes", []):
            # The schema cannot say "exactly one source"; the API server does.
            sources = sorted(k for k in volume if k != "name")
            assert len(sources) == 1, f"{describe(obj)}: volume {volume['name']} has sources {sources}"


_PROM_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "ServiceMonitor": prom_v1.ServiceMonitor,
    "PrometheusRule": prom_v1.PrometheusRule,
}


def _validate_prometheus_operator(obj: Obj) -> None:
    model = _PROM_MODELS.get(obj["kind"])
    assert model is not None, f"{describe(obj)}: no model for this Prometheus Operator kind"
    try:
        parsed = model.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise AssertionError(f"{describe(obj)} is not a valid {obj['kind']}: {exc}") from None
    # The models ignore unknown fields; the operator's CRD schemas prune them silently, which
    # is worse. Whatever did not survive the round trip is a field the CRD does not have.
    unknown = _lost_keys(obj, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert not unknown, f"{describe(obj)}: fields unknown to {obj['kind']}: {unknown}"


def _lost_keys(original: Any, dumped: Any, path: str = "") -> list[str]:
    if isinstance(original, dict) and isinstance(dumped, dict):
        lost = [f"{path}.{k}" for k in original if k not in dumped]
        for k in original:
            if k in dumped:
                lost += _lost_keys(original[k], dumped[k], f"{path}.{k}")
        return lost
    if isinstance(original, list) and isinstance(dumped, list):
        return [
            p
            for i, (a, b) in enumerate(zip(original, dumped, strict=False))
            for p in _lost_keys(a, b, f"{path}[{i}]")
        ]
    return []


# -- PromQL -----------------------------------------------------------------------------------


def exported_series_names() -> set[str]:
    """Every series name replicator's /metrics can contain (replicator/metrics.py)."""
    from replicator.metrics import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "info": ["_info"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count", ""],
        }.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; ValueError if it is not valid PromQL."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def check_rules(rule: Obj) -> list[str]:
    """Check every alert of a PrometheusRule; returns the alert names."""
    exported = exported_series_names()
    alerts = []
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            try:
                used = promql_metric_names(r["expr"])
            except ValueError as exc:
                raise AssertionError(f"alert {r.get('alert')}: invalid PromQL: {exc}\n{r['expr']}") from None
            unknown = sorted(used - exported)
            assert not unknown, f"alert {r.get('alert')} uses metrics replicator does not export: {unknown}"
            assert used, f"alert {r.get('alert')} selects no metric"
            if "for" in r:
                promql_parser.parse_duration(r["for"])
            alerts.append(r["alert"])
    return alerts


# Grafana's variables, as a query would see them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def grafana_queries(dashboard: Obj) -> dict[str, str]:
    """Every PromQL query of a Grafana dashboard (panels, rows' panels, query variables), by
    where it is, with Grafana's variables substituted."""
    found: dict[str, str] = {}

    def panels(items: list[Obj]) -> None:
        for p in items:
            panels(p.get("panels", []))
            for t in p.get("targets", []):
                found[f"panel {p['title']!r} {t['refId']}"] = t["expr"]

    panels(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert m, f"variable {v['name']}: not a label_values() query: {query}"
            found[f"variable {v['name']}"] = m.group(1)
    out = {}
    for where, expr in found.items():
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        out[where] = re.sub(r"\$\{?\w+\}?", ".*", expr)  # $job, ${source}: regex matchers
    return out


def check_dashboard(dashboard: Obj) -> set[str]:
    """Check every query of a Grafana dashboard; returns the metric names it uses."""
    exported = exported_series_names()
    used: set[str] = set()
    for where, expr in grafana_queries(dashboard).items():
        try:
            names = promql_metric_names(expr)
        except ValueError as exc:
            raise AssertionError(f"{where}: invalid PromQL: {exc}\n{expr}") from None
        unknown = sorted(names - exported)
        assert not unknown, f"{where} uses metrics replicator does not export: {unknown}"
        assert names, f"{where} selects no metric"
        used |= names
    return used


# -- pods -------------------------------------------------------------------------------------


def pod_spec(obj: Obj) -> Obj | None:
    kind = obj["kind"]
    template: Obj | None = None
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        template = obj["spec"]["template"]
    elif kind == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
    return None if template is None else template["spec"]


def replicator_containers(spec: Obj) -> Iterator[tuple[Obj, bool]]:
    """(container, is_init_container) for each container that runs replicator."""
    for c in spec.get("initContainers", []):
        if c.get("command", [None])[0] == "replicator":
            yield c, True
    for c in spec.get("containers", []):
        if c.get("command", [None])[0] == "replicator":
            yield c, False


def env_for(*texts: str) -> dict[str, str]:
    """A value for every ${VAR} the texts use, as the pod's Secret would provide."""
    return {name: f"https://{name.lower()}.example" for t in texts for name in ENV_REF.findall(t)}


DOWNWARD_API = {"metadata.name": "replicator-0", "spec.nodeName": "gpu-node-7"}
"""What the kubelet puts in an env var with a fieldRef: the pod's name (the first of a
StatefulSet's), the node's."""
SET_BY_KUBERNETES = {"JOB_COMPLETION_INDEX": "0"}
"""Variables the Job controller adds to every container of an Indexed Job's pods."""


def identity_env(container: Obj) -> dict[str, str]:
    """The container's variables that the downward API fills, with plausible values."""
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ref is not None:
            assert ref in DOWNWARD_API, f"{container['name']}: env {e['name']} from {ref}"
            out[e["name"]] = DOWNWARD_API[ref]
    return out


def mounted_config_text(spec: Obj, container: Obj, configmaps: Mapping[str, Obj]) -> tuple[str, str]:
    """The text of the config file the container loads, and where it is named."""
    args = container["args"]
    assert "--config" in args, f"{container['name']}: no --config in {args}"
    path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container["volumeMounts"]:
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            key = path[len(m["mountPath"].rstrip("/")) + 1 :]
            source = volumes[m["name"]]
            assert "configMap" in source, f"{container['name']}: {path} is not from a ConfigMap"
            assert m.get("readOnly") is True, f"{container['name']}: the config mount is writable"
            cm = configmaps.get(source["configMap"]["name"])
            assert cm is not None, (
                f"{container['name']}: ConfigMap {source['configMap']['name']} is not rendered"
            )
            assert key in cm["data"], f"ConfigMap {describe(cm)} has no key {key}"
            return cm["data"][key], f"{describe(cm)}[{key}]"
    raise AssertionError(f"{container['name']}: nothing is mounted at {path}")


def mounted_config(spec: Obj, container: Obj, configmaps: Mapping[str, Obj]) -> tuple[Config, str]:
    """The Config the container loads (through replicator's own validator), and where it is."""
    text, where = mounted_config_text(spec, container, configmaps)
    env = env_for(text) | SET_BY_KUBERNETES | identity_env(container)
    with mock.patch.dict(os.environ, env):
        return parse_config(yaml.safe_load(text), Path("/"), where), where


def check_identity(owner: Obj, container: Obj, text: str) -> list[str]:
    """Every shared: block of a daemon's config names its instance by variables that the pod
    fills: the downward API (the pod's or node's name), or the Job controller's completion
    index in an Indexed Job. Returns the instance expressions."""
    where = f"{describe(owner)} container {container['name']}"
    filled = identity_env(container)
    found = []
    for src in yaml.safe_load(text).get("sources", []):
        shared = src.get("shared")
        if shared is None:
            continue
        instance = str(shared["instance"])
        names = ENV_REF.findall(instance)
        assert names, f"{where}: source {src['name']}: instance {instance!r} is the same in every pod"
        for name in names:
            indexed = owner["kind"] == "Job" and owner["spec"].get("completionMode") == "Indexed"
            assert name in filled or (name in SET_BY_KUBERNETES and indexed), (
                f"{where}: source {src['name']}: instance {instance!r} uses {name}, "
                "which the pod does not set"
            )
        found.append(instance)
    return found


def check_replicator_pod(owner: Obj, configmaps: Mapping[str, Obj]) -> list[Config]:
    """What docs/DEPLOY.md promises of every pod that runs replicator. Returns the configs."""
    spec = pod_spec(owner)
    assert spec is not None
    where = describe(owner)
    volumes = {v["name"] for v in spec.get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
    others = [c for c in spec.get("containers", []) if c.get("command", [None])[0] != "replicator"]
    configs = []
    found = list(replicator_containers(spec))
    assert found, f"{where}: no replicator container"
    for c, is_init in found:
        name = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{name}: may run as root"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: root filesystem is writable"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation allowed"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: capabilities not dropped"
        assert "resources" in c and c["resources"].get("requests"), f"{name}: no resource requests"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{name}: mounts {m['name']}, which the pod does not have"
        if c["args"][0] == "run":
            check_identity(owner, c, mounted_config_text(spec, c, configmaps)[0])
        cfg, _ = mounted_config(spec, c, configmaps)
        configs.append(cfg)
        assert "/tmp" in mounts, f"{name}: no writable /tmp on a read-only root"
        assert str(cfg.state_dir) in mounts, f"{name}: state_dir {cfg.state_dir} is not a volume"
        assert not mounts[str(cfg.state_dir)].get("readOnly"), f"{name}: state_dir is read-only"
        subcommand = c["args"][0]
        for tgt in cfg.targets:
            if "://" not in tgt.url:
                mount = _mount_of(c, tgt.url)
                assert mount is not None, f"{name}: target {tgt.name} ({tgt.url}) is not on a volume"
                writable = subcommand in ("run", "prune", "forget")  # forget and prune delete
                assert not (writable and mount.get("readOnly")), f"{name}: target {tgt.url} is read-only"
        if subcommand in ("verify", "prune", "forget"):
            assert owner["kind"] == "CronJob", f"{name}: {subcommand} outside a CronJob"
            # They act as no instance of a shared source: a shared: block would name another
            # pod's identity (and a split one would not even load there).
            instance_of = [s.name for s in cfg.sources if s.shared is not None]
            assert not instance_of, f"{name}: {subcommand} loads shared: for {instance_of}"
            continue
        assert subcommand == "run", f"{name}: unexpected subcommand {subcommand}"
        # Probes come from the kubelet, on the pod's IP: listen must not be localhost.
        assert cfg.listen is not None, f"{name}: listen is off, probes cannot work"
        host, port = cfg.listen.rsplit(":", 1)
        assert host == "0.0.0.0", f"{name}: listen {cfg.listen} is unreachable from the kubelet"
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert int(port) in ports.values(), f"{name}: listen port {port} is not a container port"
        probes = {k: c.get(k) for k in ("livenessProbe", "readinessProbe", "startupProbe")}
        assert probes["livenessProbe"] and probes["readinessProbe"], f"{name}: missing probes"
        for kind, probe in probes.items():
            if probe is None:
                continue
            get = probe["httpGet"]
            want = "/readyz" if kind == "readinessProbe" else "/healthz"
            assert get["path"] == want, f"{name}: {kind} on {get['path']}, expected {want}"
            assert ports.get(get["port"], get["port"]) == int(port), f"{name}: {kind} port is not listen's"
        if is_init:
            # A native sidecar: it must keep running, and a startup probe would hold the
            # trainer back until it passed.
            assert c.get("restartPolicy") == "Always", f"{name}: an init container that is not a sidecar"
            assert probes["startupProbe"] is None, f"{name}: a startup probe delays the trainer"
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > cfg.shutdown_grace, f"{name}: SIGKILL after {grace}s, before shutdown_grace"
        shared = {m["name"] for o in others for m in o.get("volumeMounts", [])}
        for src in cfg.sources:
            if "://" in src.url:
                continue
            mount = _mount_of(c, src.url)
            assert mount is not None, f"{name}: source {src.name} ({src.url}) is not on a volume"
            if others:
                # A sidecar reads the trainer's volume, read-only.
                assert mount.get("readOnly") is True, f"{name}: source {src.url} is mounted writable"
                assert mount["name"] in shared, f"{name}: source {src.url} is not shared with the trainer"
    return configs


def _mount_of(container: Obj, path: str) -> Obj | None:
    best = None
    for m in container["volumeMounts"]:
        root = m["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"].rstrip("/"))
        ):
            best = m
    return best


# -- running the command lines the artifacts contain ----------------------------------------


def run_invocation(
    argv: list[str], paths: Mapping[str, Path], workdir: Path, env: Mapping[str, str] | None = None
) -> str:
    """Run a ``replicator ...`` command line from a unit file or a pod spec, with its absolute
    paths mapped to local ones. ``run`` must start, become ready, and drain to exit 0 on
    SIGTERM; anything else must exit 0. Returns the output."""
    assert argv[0] == "replicator" or argv[0].endswith("/bin/replicator"), argv
    args = [str(paths.get(a, a)) for a in argv[1:]]
    unmapped = [a for a in args if a.startswith("/") and not Path(a).exists()]
    assert not unmapped, f"map these paths to local ones: {unmapped}"
    cmd = [sys.executable, "-m", "replicator", *args]
    full_env = {**os.environ, **(env or {})}
    if args[0] != "run":
        res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120)
        assert res.returncode == 0, f"{argv} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        return res.stdout
    log = workdir / f"run-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        try:
            deadline = time.monotonic() + 60
            while "daemon.ready" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, f"{argv} not ready after 60 s:\n{log.read_text()}"
                time.sleep(0.1)
            assert proc.poll() is None, f"{argv} exited {proc.returncode}:\n{log.read_text()}"
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            assert code == 0, f"{argv} exited {code} on SIGTERM:\n{log.read_text()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log.read_text()

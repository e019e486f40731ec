"""The Helm chart, rendered by Helm's own engine: variants, lint, Kubernetes schemas, and
the rendered gateway.yaml and rules loaded by the gateway's own loaders."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_config
from gateway.routing import load_rules
from tests.chart.conftest import KUBE_VERSIONS, Engine
from tests.support.pki import Pki

pytestmark = pytest.mark.unit

PASSWORD = {"auth": {"passwordSecret": "lastmile-passwd"}}
JWT = {"auth": {"jwt": {"jwksUrl": "https://auth.example.com/jwks.json",
                        "issuer": "https://auth.example.com", "audience": "lastmile"}}}
TLS = {"tls": {"secretName": "lastmile-tls"}}
MTLS = {"tls": {"secretName": "lastmile-tls", "requireClientCert": True}}
MONITORING = {"metrics": {"serviceMonitor": {"enabled": True},
                          "prometheusRule": {"enabled": True}},
              "dashboards": {"enabled": True}}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        _merge(out, copy.deepcopy(part))
    return out


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# Every case renders, passes `helm lint --strict` and validates for KUBE_VERSIONS.
GOOD: dict[str, dict[str, Any]] = {
    "default": PASSWORD,  # the defaults need one way in; this is the smallest
    "tls": merged(PASSWORD, TLS),
    "mtls-only": MTLS,
    "spool-off": merged(PASSWORD, {"spool": {"enabled": False}}),
    "workers-1": merged(PASSWORD, {"workers": 1}),
    "workers-4": merged(PASSWORD, {"workers": 4}),
    "jwt": JWT,
    "spool-1.5Ti": merged(PASSWORD, {"workers": 3, "spool": {"size": "1.5Ti"}}),
    "spool-500M": merged(PASSWORD, {"workers": 1, "spool": {"size": "500M"}}),
    "anonymous": {"auth": {"allowAnonymous": True}},
    "everything": merged(PASSWORD, JWT, MTLS, MONITORING, {
        "replicas": 3, "workers": 3, "spool": {"size": "50Gi", "storageClass": "fast"},
        "config": {"limits": {"max_connections": 50000}, "spool": {"mode": "write-ahead"},
                   "kafka": {"clusters": {"default": {"linger_ms": 10},
                                          "audit": {"bootstrap_servers": "audit:9092"}}}},
        "service": {"externalTrafficPolicy": "Local", "annotations": {"a": "b"}},
        "extraEnv": [{"name": "LASTMILE_LOG__LEVEL", "value": "debug"}],
        "podDisruptionBudget": {"minAvailable": 2},
        "tmp": {"medium": "Memory"},
    }),
}
# Each must fail to render, with this text in the error.
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "no-way-in": ({}, "no client could ever get in"),
    "misspelt-key": (merged(PASSWORD, {"replica": 5}), "replica"),
    "misspelt-nested": (merged(PASSWORD, {"spool": {"sise": "1Gi"}}), "sise"),
    "misspelt-config-section": (merged(PASSWORD, {"config": {"limit": {}}}), "limit"),
    "embedded-broker": (merged(PASSWORD, {"kafka": {"bootstrapServers": "embedded"}}),
                        "bootstrapServers"),
    "rules-file-not-yaml": (merged(PASSWORD, {"rules": {"10-a.yml": "rules: []"}}), "10-a.yml"),
    "workers-0": (merged(PASSWORD, {"workers": 0}), "workers"),
    "spool-too-small": (merged(PASSWORD, {"workers": 4, "spool": {"size": "32Mi"}}),
                        "too small"),
    "spool-fixed-too-big": (merged(PASSWORD, {"spool": {"maxBytesPerWorker": 6 << 30}}),
                            "does not fit"),
    "grace-shorter-than-drain": (merged(PASSWORD, {"config": {"shutdown_timeout_s": 60}}),
                                 "terminationGracePeriodSeconds"),
    "size-as-a-number": (merged(PASSWORD, {"spool": {"size": 10737418240}}), "size"),
    "client-cert-without-secret": ({"tls": {"requireClientCert": True}},
                                   "tls.requireClientCert needs tls.secretName"),
}


@pytest.fixture(scope="module")
def rendered(helm: Engine) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {
        name: {"values": values, "lint": True} for name, values in GOOD.items()}
    cases.update({f"bad:{name}": {"values": values} for name, (values, _) in BAD.items()})
    cases["config-changed"] = {"values": merged(PASSWORD, {"config": {"limits": {
        "max_connections": 7}}})}
    cases["rules-changed"] = {"values": merged(PASSWORD, {"rules": {
        "10-other.yaml": "rules:\n  - {name: o, match: 'o/#', kafka: {topic: o}}\n"}})}
    return helm(cases)


def docs(case: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object for every manifest of a rendered case."""
    assert case["error"] is None, case["error"]
    found = {}
    for template, text in case["manifests"].items():
        if not template.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def pod_spec(case: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = docs(case)[("StatefulSet", "lastmile")]["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("name", sorted(GOOD))
def test_renders_lints_and_validates(rendered: dict[str, dict[str, Any]], name: str) -> None:
    case = rendered[name]
    assert case["error"] is None, case["error"]
    assert case["invalid"] == [], "\n".join(case["invalid"])
    for version in KUBE_VERSIONS:
        report = case["lint"][version]
        assert report["errors"] == [], report
        # Severity 2 and up are warnings and errors (--strict fails on them); 1 is info.
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_values_fail_with_a_reason(rendered: dict[str, dict[str, Any]], name: str) -> None:
    error = rendered[f"bad:{name}"]["error"]
    assert error is not None, f"{name} rendered"
    assert BAD[name][1] in error


def test_pod_is_locked_down(rendered: dict[str, dict[str, Any]]) -> None:
    spec = pod_spec(rendered["default"])
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    assert pod["runAsGroup"] == 10001 and pod["fsGroup"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The only writable places: /tmp (metrics files, session sockets) and the spool.
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert mounts["/var/lib/lastmile/spool"] == "spool"
    assert not any("subPath" in m for m in container["volumeMounts"])  # subPath never updates
    probes = {k: container[k]["httpGet"]["path"]
              for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                      "readinessProbe": "/readyz"}


def test_services_labels_and_disruption_budget(rendered: dict[str, dict[str, Any]]) -> None:
    found = docs(rendered["default"])
    sts = found[("StatefulSet", "lastmile")]
    headless = found[("Service", "lastmile-headless")]["spec"]
    public = found[("Service", "lastmile")]["spec"]
    assert sts["spec"]["serviceName"] == "lastmile-headless"
    assert headless["clusterIP"] == "None" and public["type"] == "LoadBalancer"
    selector = sts["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "lastmile",
                        "app.kubernetes.io/instance": "lastmile"}
    for (kind, name), obj in found.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm", (kind, name)
        assert labels["app.kubernetes.io/version"] == "0.1.0", (kind, name)
    assert headless["selector"] == public["selector"] == selector
    assert found[("PodDisruptionBudget", "lastmile")]["spec"]["selector"]["matchLabels"] \
        == selector


def test_monitoring_objects_select_the_metrics_port(rendered: dict[str, dict[str, Any]]) -> None:
    found = docs(rendered["everything"])
    monitor = found[("ServiceMonitor", "lastmile")]["spec"]
    headless = found[("Service", "lastmile-headless")]
    labels = headless["metadata"]["labels"]
    assert all(labels[k] == v for k, v in monitor["selector"]["matchLabels"].items())
    public = found[("Service", "lastmile")]["metadata"]["labels"]
    assert not all(public.get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in headless["spec"]["ports"]}
    rules = found[("PrometheusRule", "lastmile")]["spec"]["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert {"LastmileLostAfterAck", "LastmileSpoolFilling", "LastmileSpoolOldestRecord",
            "LastmileDeadLetters", "LastmileAuthFailures"} <= alerts
    board = found[("ConfigMap", "lastmile-dashboards")]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"panels"' in board["data"]["lastmile.json"]
    # Off by default.
    kinds = {kind for kind, _ in docs(rendered["default"])}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}


def test_config_changes_roll_the_pods_rules_do_not(rendered: dict[str, dict[str, Any]]) -> None:
    def checksum(name: str) -> str:
        sts = docs(rendered[name])[("StatefulSet", "lastmile")]
        value: str = sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum("config-changed") != checksum("default")
    assert checksum("rules-changed") == checksum("default")


def gateway_yaml(case: dict[str, Any]) -> str:
    text: str = docs(case)[("ConfigMap", "lastmile-config")]["data"]["gateway.yaml"]
    return text


def pod_env(case: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes gives it: the image's ENV under the
    chart's env (the chart sets every LASTMILE_* the image does)."""
    image_env = {"LASTMILE_SPOOL_DIR": "/var/lib/lastmile/spool",
                 "LASTMILE_RULES__DIR": "/etc/lastmile/rules",
                 "LASTMILE_AUTH__ALLOW_ANONYMOUS": "false",
                 "LASTMILE_LISTENERS__METRICS__HOST": "0.0.0.0"}
    (container,) = pod_spec(case)["containers"]
    chart_env = {e["name"]: e["value"] for e in container["env"]}
    assert set(image_env) <= set(chart_env)
    return {**image_env, **chart_env}


def load_rendered(case: dict[str, Any], tmp_path: Path, extra_env: dict[str, str] | None = None
                  ) -> Any:
    """gateway.yaml with the pod's paths pointed into tmp_path, loaded as the pod would."""
    pki = Pki(tmp_path / "tls")
    pki.issue("tls", "lastmile.example.com", server=True)
    (tmp_path / "passwd").write_text("")
    text = gateway_yaml(case).replace("/etc/lastmile/tls", str(tmp_path / "tls")).replace(
        "/etc/lastmile/auth/passwd", str(tmp_path / "passwd"))
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(path, env={**pod_env(case), **(extra_env or {})})


@pytest.mark.parametrize("name", sorted(GOOD))
def test_rendered_config_loads_in_the_gateway(rendered: dict[str, dict[str, Any]], name: str,
                                              tmp_path: Path) -> None:
    config = load_rendered(rendered[name], tmp_path)
    values = GOOD[name]
    assert config.workers == values.get("workers", 2)
    assert config.kafka.clusters["default"].bootstrap_servers == "kafka-0.kafka:9092"
    assert config.listeners.metrics.host == "0.0.0.0" and config.listeners.metrics.port == 9100
    assert config.log.format == "json"
    tls = "tls" in values
    assert config.listeners.mqtts.enabled is tls and config.listeners.https.enabled is tls
    assert config.spool.enabled is values.get("spool", {}).get("enabled", True)
    # The rules ConfigMap loads too, against the config's clusters.
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    for file, body in docs(rendered[name])[("ConfigMap", "lastmile-rules")]["data"].items():
        (rules_dir / file).write_text(body)
    assert load_rules(rules_dir, set(config.kafka.clusters)).rules >= 1


@pytest.mark.parametrize(("name", "workers", "size"),
                         [("workers-1", 1, 10 << 30), ("default", 2, 10 << 30),
                          ("workers-4", 4, 10 << 30), ("everything", 3, 50 << 30),
                          ("spool-1.5Ti", 3, 3 << 39), ("spool-500M", 1, 500_000_000)])
def test_spool_max_bytes_follows_volume_and_workers(rendered: dict[str, dict[str, Any]],
                                                    name: str, workers: int, size: int,
                                                    tmp_path: Path) -> None:
    config = load_rendered(rendered[name], tmp_path)
    mib = 1 << 20
    assert config.spool.max_bytes == math.floor(size * 0.85 / workers) // mib * mib
    assert config.spool.max_bytes * workers <= size


def test_service_links_would_crash_the_gateway(rendered: dict[str, dict[str, Any]],
                                               tmp_path: Path) -> None:
    """Why enableServiceLinks is off: a Service named lastmile-mqtt in the namespace makes
    Kubernetes inject LASTMILE_MQTT_PORT=tcp://..., a config override the gateway refuses."""
    assert pod_spec(rendered["default"])["enableServiceLinks"] is False
    with pytest.raises(ConfigError, match="LASTMILE_MQTT_PORT"):
        load_rendered(rendered["default"], tmp_path,
                      {"LASTMILE_MQTT_PORT": "tcp://10.0.0.7:1883"})


def test_notes_tell_the_operator_what_was_installed(rendered: dict[str, dict[str, Any]]) -> None:
    notes = rendered["default"]["manifests"]["lastmile/templates/NOTES.txt"]
    assert "2 pod(s) x 2 worker(s)" in notes
    assert "spool.max_bytes 4563402752 bytes per worker (4352 MiB)" in notes
    assert "WARNING" not in notes and "MQTTS" not in notes
    assert "WARNING: auth.allowAnonymous" in rendered["anonymous"]["manifests"][
        "lastmile/templates/NOTES.txt"]
    assert "MQTTS" in rendered["tls"]["manifests"]["lastmile/templates/NOTES.txt"]
    spool_off = rendered["spool-off"]["manifests"]["lastmile/templates/NOTES.txt"]
    assert "Spool:     off" in spool_off

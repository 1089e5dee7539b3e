"""The Dockerfile and the Kubernetes manifests: linted and validated (no Docker engine or cluster here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this environment (pip install '.[test]')")
    return str(path)


def test_dockerfile_lints_clean() -> None:
    proc = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_keeps_its_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/ready" in text
    assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.13.0" in text
    assert "rmserve build-default" in text and "RMSERVE_MODEL=/models" in text  # default baked in; own model mounted


def test_kubernetes_manifests_validate() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    kinds = {}
    for f in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            kv.validate(doc, version, strict=True)
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"]


def test_autoscaling_on_queue_depth() -> None:
    """The HPA scales on the Pods metric that prometheus-adapter's rule serves, and that metric is the
    queue-depth gauge the service really exports."""
    import re

    docs = {}
    for f in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[doc["kind"]] = doc
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert len(pods) == 1 and pods[0]["target"]["type"] == "AverageValue"
    name = pods[0]["metric"]["name"]
    rules = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if r["name"]["as"] == name)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series = re.match(r"(\w+)\{", rule["seriesQuery"])
    assert series and series.group(1) == name
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    # one value per pod whatever the series count (the adapter's grouping), and queue depth alone: no CPU
    assert re.fullmatch(r"sum\(.*<<\.Series>>\{<<\.LabelMatchers>>\}.*\) by \(<<\.GroupBy>>\)", rule["metricsQuery"])
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    from service.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported, sorted(exported)

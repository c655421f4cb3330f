"""The Kubernetes manifests carry a sidecar for every controller call the driver
advertises, and the classes that use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def _documents() -> list[dict[str, Any]]:
    listed = yaml.safe_load((ROOT / "kustomization.yaml").read_text())["resources"]
    found = []
    for name in listed:
        found += [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]
    return found


def test_every_advertised_controller_call_has_its_sidecar() -> None:
    documents = _documents()
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert {"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"} <= set(
        containers)
    assert "--feature-gates=VolumeAttributesClass=true" in containers["csi-resizer"]["args"]
    assert "--feature-gates=CSIVolumeGroupSnapshot=true" in containers["csi-snapshotter"]["args"]
    bound = {b["roleRef"]["name"] for b in documents if b["kind"] == "ClusterRoleBinding"}
    assert {"cargohold-csi-resizer", "cargohold-csi-snapshotter"} <= bound

    [storage] = [d for d in documents if d["kind"] == "StorageClass"]
    assert storage["allowVolumeExpansion"] is True  # online expansion needs csi-resizer
    [snapshots] = [d for d in documents if d["kind"] == "VolumeSnapshotClass"]
    assert snapshots["driver"] == "cargohold.io" and snapshots["parameters"] == {
        "freeze": "true"}
    [attributes] = [d for d in documents if d["kind"] == "VolumeAttributesClass"]
    assert attributes["driverName"] == "cargohold.io"
    assert set(attributes["parameters"]) == {"replicas"}  # the one mutable parameter

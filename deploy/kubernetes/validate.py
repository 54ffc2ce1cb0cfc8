"""Offline check of the Kubernetes manifests: renders each overlay as kustomize would for the
features used here (resources, namespace, labels, strategic-merge patches of named list items)
and validates every object against the Kubernetes schemas bundled in kubernetes-validate.

    pip install kubernetes-validate pyyaml && python3 deploy/kubernetes/validate.py
"""

import copy
import pathlib
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"
ROOT = pathlib.Path(__file__).parent


def merge(base, patch):
    """Strategic merge as used here: maps merge by key, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(x, dict) and "name" in x for x in base + patch
    ):
        out = [dict(x) for x in base]
        for item in patch:
            match = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if match is None:
                out.append(item)
            else:
                out[match] = merge(out[match], item)
        return out
    return patch


def render(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for entry in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeSelectors"):
                spec = obj.get("spec", {})
                for selector in (spec.get("selector", {}),):
                    if obj["kind"] == "Service":
                        spec.setdefault("selector", {}).update(entry["pairs"])
                    elif "matchLabels" in selector:
                        selector["matchLabels"].update(entry["pairs"])
                template = spec.get("template", {}).get("metadata")
                if template is not None:
                    template.setdefault("labels", {}).update(entry["pairs"])
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [
            i for i, o in enumerate(objects)
            if o["kind"] == change["kind"] and o["metadata"]["name"] == change["metadata"]["name"]
        ]
        assert targets, f"{directory}: patch {patch['path']} matches no resource"
        for i in targets:
            objects[i] = merge(objects[i], change)
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return copy.deepcopy(objects)


def check(overlay, objects):
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), f"{overlay}: selector does not match the pods"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    region = next(e["value"] for e in container["env"] if e["name"] == "BROKER__REGION")
    assert region == overlay.name, f"{overlay}: BROKER__REGION is {region}"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["broker.toml"]
    drain = int(config.split("drain_deadline_secs = ")[1].split()[0])
    assert grace > pause + drain, f"{overlay}: the grace period ends before the drain"
    for env in container["env"]:
        assert "value" not in env or "KEY" not in env["name"], f"{overlay}: a secret value inline"


overlays = sorted(p for p in (ROOT / "overlays").iterdir() if p.is_dir())
assert overlays, "no overlays"
for overlay in overlays:
    objects = render(overlay)
    check(overlay, objects)
    print(f"{overlay.relative_to(ROOT)}: {len(objects)} objects valid for Kubernetes {KUBERNETES_VERSION}")
sys.exit(0)

#!/usr/bin/env python3
"""Validates custom resources against their CustomResourceDefinition's OpenAPI schema, strictly.

kubernetes-validate knows only built-in kinds, so the prometheus-operator's PodMonitor is checked
here against the CRD the operator ships (tests/k8s/monitoring.coreos.com_podmonitors.yaml, from
prometheus-operator v0.93.0, Apache-2.0). A cluster prunes unknown fields silently; this check
refuses them instead, so a misspelt field fails CI rather than doing nothing in a cluster.

usage: validate_crd.py CRD.yaml RENDERED.yaml
"""
import sys

import jsonschema
import yaml


def strict(schema):
    """The schema with unknown fields refused wherever it lists its fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def main():
    crd_path, rendered_path = sys.argv[1], sys.argv[2]
    with open(crd_path) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    schemas = {
        f"{group}/{v['name']}": strict(v["schema"]["openAPIV3Schema"])
        for v in crd["spec"]["versions"]
        if v.get("served")
    }
    with open(rendered_path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == kind]
    if not docs:
        sys.exit(f"error: no {kind} in {rendered_path}")
    for doc in docs:
        schema = schemas.get(doc.get("apiVersion"))
        if schema is None:
            sys.exit(f"error: {kind} {doc['metadata'].get('name')}: apiVersion {doc.get('apiVersion')} is not served by the CRD")
        # metadata is the API server's (ObjectMeta), not the CRD's to describe.
        body = {k: v for k, v in doc.items() if k != "metadata"}
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path)
        )
        for e in errors:
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            print(f"error: {kind} {doc['metadata'].get('name')}: {path}: {e.message}")
        if errors:
            sys.exit(1)
        print(f"{kind} {doc['metadata'].get('name')}: valid against {crd['metadata']['name']} (strict)")


if __name__ == "__main__":
    main()

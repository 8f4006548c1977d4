"""Strict schema validation of every manifest under deploy/ (run it through
.ci/validate-manifests, which installs the pinned schemas first).

Each entry point is built with `kubectl kustomize` (install.yaml is read as
is) and every object is validated against the strict OpenAPI schema
(unknown fields rejected) of each Kubernetes version that entry point
supports. Custom resources have no schema there: they are validated against
the strict schemas of .ci/crd_schemas.py (the fields our manifests may use).
Any other object without a schema fails. The expressions of the optional
ValidatingAdmissionPolicy (deploy/label-guard) are evaluated with cel-python
on sample updates, and those of the native admission policy
(deploy/native-policy) on the corpus the webhook is tested on
(.ci/native_policy.py).

Usage: validate_manifests.py SCHEMA_ROOT
"""

import json
import os
import re
import subprocess
import sys

import jsonschema
import referencing
import referencing.jsonschema
import yaml

import crd_schemas
import native_policy


def minors(first, last):
    """["1.21", "1.22", ..., "1.37"] for minors(21, 37)."""
    return ["1.%d" % m for m in range(first, last + 1)]


# The supported range (docs/install.md "Kubernetes versions"): the base install on
# 1.21 to 1.37 (the newest the pinned schemas know); deploy/overlays/legacy
# on 1.16 to 1.20. Every minor version in a range is checked, not only its ends.
SUPPORTED = minors(21, 37)
LEGACY = minors(16, 20)
# ValidatingAdmissionPolicy is GA (admissionregistration.k8s.io/v1) from 1.30.
POLICIES = minors(30, 37)
# MutatingAdmissionPolicy is GA (v1) from 1.36; v1beta1 (behind a feature gate)
# is served from 1.34, and `canary-injector policy --api-version v1beta1` writes it.
NATIVE = minors(36, 37)
NATIVE_BETA = minors(34, 37)

# Every kustomization under deploy/ must be listed here, with the versions
# it is checked against.
ENTRY_POINTS = {
    "deploy": SUPPORTED,
    "deploy/install.yaml": SUPPORTED,
    "deploy/base": SUPPORTED,
    "deploy/overlays/cert-manager": SUPPORTED,
    "deploy/overlays/legacy": LEGACY,
    # Add-ons applied next to either install.
    "deploy/network-policy": LEGACY + SUPPORTED,
    "deploy/monitoring": LEGACY + SUPPORTED,
    "deploy/examples": LEGACY + SUPPORTED,
    "deploy/label-guard": POLICIES,
    "deploy/native-policy": NATIVE,
    # Files outside any kustomization (Istio objects: custom resources only).
    "deploy/examples/generated/routes.yaml": LEGACY + SUPPORTED,
    "deploy/examples/generated/routes-weighted.yaml": LEGACY + SUPPORTED,
    "deploy/examples/generated/gateway-routes.yaml": SUPPORTED,
    "deploy/examples/weighted-gray-stage.yaml": LEGACY + SUPPORTED,
    "deploy/examples/manual/destinationrule.yaml": LEGACY + SUPPORTED,
    "deploy/examples/manual/virtualservice.yaml": LEGACY + SUPPORTED,
}

# Custom resources: their CRDs come with the products that own them, so the
# Kubernetes schemas do not know them; .ci/crd_schemas.py has strict ones.
CUSTOM_KINDS = crd_schemas.SCHEMAS


def schema_dirs(root):
    """Maps "1.21" to the strict schema directory of Kubernetes 1.21, taken
    from the newest kubernetes-validate release that ships it."""
    found = {}
    for release in sorted(os.listdir(root)):
        base = os.path.join(root, release, "kubernetes_validate", "kubernetes-json-schema")
        if not release.startswith("kubernetes-validate-") or not os.path.isdir(base):
            continue
        for name in os.listdir(base):
            m = re.fullmatch(r"v(\d+\.\d+)\.0-local-strict", name)
            if m:
                found[m.group(1)] = os.path.join(base, name)
    return found


def schema_file(directory, doc):
    # rbac.authorization.k8s.io/v1 -> rbac-v1; v1 -> v1 (kubernetes-validate's naming)
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    return os.path.join(directory, "%s-%s.json" % (doc["kind"].lower(), api))


def objects(entry):
    if entry.endswith(".yaml"):
        with open(entry) as f:
            text = f.read()
    else:
        out = subprocess.run(["kubectl", "kustomize", entry], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit("kubectl kustomize %s failed:\n%s" % (entry, out.stderr))
        text = out.stdout
    return [d for d in yaml.safe_load_all(text) if d is not None]


_loaded = {}


def load(path):
    if path not in _loaded:
        with open(path) as f:
            _loaded[path] = json.load(f)
    return _loaded[path]


def validator(directory, schema):
    """A validator for `schema` whose references resolve to the files of
    `directory`. kubernetes-validate has two layouts: up to its 1.2x
    releases, draft-04 style schemas refer to "_definitions.json#/definitions/.."
    relative to the file; newer ones are draft 2020-12 with "$id"s under
    https://kubernetes.io/api/ and refer to "/api/_definitions.json#/$defs/..".
    """
    definitions = load(os.path.join(directory, "_definitions.json"))
    if "$defs" in definitions:
        registry = referencing.Registry().with_resources([
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
        ])
        return jsonschema.Draft202012Validator(schema, registry=registry)
    draft4 = referencing.jsonschema.DRAFT4
    registry = referencing.Registry().with_resources([
        ("_definitions.json", draft4.create_resource(definitions)),
    ])
    return jsonschema.Draft4Validator(schema, registry=registry)


def validate(doc, directory):
    """Returns the list of errors (empty when valid) of one object."""
    path = schema_file(directory, doc)
    if not os.path.exists(path):
        return ["no schema for %s %s in this version" % (doc["apiVersion"], doc["kind"])]
    schema = load(path)
    errors = []
    for e in sorted(validator(directory, schema).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        errors.append("%s: %s" % (where, e.message))
    return errors


def validate_custom(doc):
    """Errors of a custom resource against its strict schema (any version)."""
    schema = CUSTOM_KINDS[(doc.get("apiVersion"), doc.get("kind"))]
    errors = []
    for e in sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc),
                    key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        errors.append("%s: %s" % (where, e.message))
    return errors


# Sample updates by canary-injector's ServiceAccount, and whether the label
# guard lets each through (its validations must all hold for "allowed").
POD = {
    "metadata": {"name": "web-1", "labels": {"app": "web"}, "annotations": {"a": "1"},
                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                      "name": "web", "uid": "u", "controller": True}]},
    "spec": {"containers": [{"name": "web", "image": "web:1"}]},
}


def changed(**edits):
    import copy
    new = copy.deepcopy(POD)
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        node = new
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return new


LABEL_GUARD_CASES = [
    ("the backfill adds stage", changed(metadata__labels={"app": "web", "stage": "normal"}), True),
    ("the backfill adds stage and canarytag",
     changed(metadata__labels={"app": "web", "stage": "gray", "canarytag": "v2"}), True),
    ("labels added to an object without any", None, True),
    ("nothing changed", POD, True),
    ("an image changed", changed(spec={"containers": [{"name": "web", "image": "evil:1"}]}), False),
    ("an existing label changed", changed(metadata__labels={"app": "other"}), False),
    ("an existing label removed", changed(metadata__labels={"stage": "normal"}), False),
    ("another label added", changed(metadata__labels={"app": "web", "team": "x"}), False),
    ("an annotation added", changed(metadata__annotations={"a": "1", "b": "2"}), False),
    ("annotations removed", changed(metadata__annotations=None), False),
    ("the owner removed", changed(metadata__ownerReferences=None), False),
    ("a finalizer added", changed(metadata__finalizers=["x"]), False),
]


SERVICE = {
    "metadata": {"name": "web--beta", "namespace": "shop",
                 "labels": {"app.kubernetes.io/managed-by": "canary-injector",
                            "canary-injector.io/route-of": "web"}},
    "spec": {"selector": {"app": "web", "stage": "gray", "canarytag": "beta"}},
}
USER_SERVICE = {"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"selector": {"app": "web"}}}
RELABELLED = {"metadata": {"name": "web", "namespace": "shop",
                           "labels": SERVICE["metadata"]["labels"]},
              "spec": {"selector": {}}}

# (case, operation, old, new, allowed) for the Services policy.
SERVICE_GUARD_CASES = [
    ("a version Service created", "CREATE", None, SERVICE, True),
    ("a version Service changed", "UPDATE", SERVICE, SERVICE, True),
    ("a version Service deleted", "DELETE", SERVICE, None, True),
    ("a Service without our labels created", "CREATE", None, USER_SERVICE, False),
    ("a user's Service changed", "UPDATE", USER_SERVICE, USER_SERVICE, False),
    ("a user's Service taken over by adding our labels", "UPDATE", USER_SERVICE, RELABELLED, False),
    ("our labels removed from a version Service", "UPDATE", SERVICE, USER_SERVICE, False),
    ("a user's Service deleted", "DELETE", USER_SERVICE, None, False),
]


def check_label_guard():
    """Evaluates the label guard's validations on LABEL_GUARD_CASES (pods and
    ReplicaSets) and SERVICE_GUARD_CASES; returns the number of cases that
    came out wrong."""
    import celpy
    policies = {d["metadata"]["name"]: d["spec"] for d in objects("deploy/label-guard")
                if d["kind"] == "ValidatingAdmissionPolicy"}
    if sorted(policies) != ["canary-injector-labels-only", "canary-injector-own-services"]:
        print("FAIL deploy/label-guard: expected the policies canary-injector-labels-only and "
              "canary-injector-own-services, found %s" % sorted(policies))
        return 1
    env = celpy.Environment()
    ours = {"userInfo": {"username": "system:serviceaccount:canary-injector:canary-injector"}}
    others = {"userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"}}
    programs = {}
    for name, spec in policies.items():
        condition = env.program(env.compile(spec["matchConditions"][0]["expression"]))
        if not condition.evaluate({"request": celpy.json_to_cel(ours)}) or \
                condition.evaluate({"request": celpy.json_to_cel(others)}):
            print("FAIL deploy/label-guard: %s: the match condition must select canary-injector "
                  "only" % name)
            return 1
        programs[name] = [(v["message"], env.program(env.compile(v["expression"])))
                          for v in spec["validations"]]

    def refused_by(name, request, old, new):
        activation = {"request": celpy.json_to_cel(dict(ours, **request)),
                      "oldObject": celpy.json_to_cel(old), "object": celpy.json_to_cel(new)}
        out = []
        for msg, program in programs[name]:
            result = program.evaluate(activation)
            # An evaluation error is a refusal, as failurePolicy: Fail makes it.
            if isinstance(result, celpy.evaluation.CELEvalError) or not result:
                out.append(msg)
        return out

    wrong = 0
    cases = 0
    for name, new, allowed in LABEL_GUARD_CASES:
        old = POD
        if new is None:  # no labels before
            old = changed(metadata__labels=None)
            new = changed(metadata__labels={"stage": "normal"})
        refused = refused_by("canary-injector-labels-only", {"operation": "UPDATE"}, old, new)
        cases += 1
        if (not refused) != allowed:
            print("FAIL deploy/label-guard: %s: %s" % (name, "refused (%s)" % "; ".join(refused) if refused else "allowed"))
            wrong += 1
    for name, operation, old, new, allowed in SERVICE_GUARD_CASES:
        refused = refused_by("canary-injector-own-services", {"operation": operation}, old, new)
        cases += 1
        if (not refused) != allowed:
            print("FAIL deploy/label-guard: %s: %s" % (name, "refused (%s)" % "; ".join(refused) if refused else "allowed"))
            wrong += 1
    print("%s deploy/label-guard: %d sample writes evaluated" % ("FAIL" if wrong else "ok  ", cases))
    return wrong


def check_native_policy(schemas):
    """The native policy: what `policy --api-version v1beta1` prints (the
    same objects in v1beta1) against the 1.34-1.37 schemas, and its CEL on
    the shared corpus. Returns the number of failures."""
    built = objects("deploy/native-policy")
    failures = 0
    beta = [dict(o, apiVersion="admissionregistration.k8s.io/v1beta1") for o in built
            if o["kind"] in ("MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")]
    if len(beta) != 2:
        print("FAIL deploy/native-policy: expected a MutatingAdmissionPolicy and its binding")
        return 1
    for doc in beta:
        for version in NATIVE_BETA:
            for e in validate(doc, schemas[version]):
                print("FAIL deploy/native-policy %s v1beta1 (Kubernetes %s): %s" % (doc["kind"], version, e))
                failures += 1
    print("%s deploy/native-policy: the mutating policy and binding as v1beta1 checked against "
          "Kubernetes %s to %s (strict)" % ("FAIL" if failures else "ok  ", NATIVE_BETA[0], NATIVE_BETA[-1]))
    return failures + native_policy.check(built)


def listed_kustomizations():
    missing = []
    for dirpath, _, files in os.walk("deploy"):
        if "kustomization.yaml" in files and dirpath not in ENTRY_POINTS:
            missing.append(dirpath)
    return missing


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    schemas = schema_dirs(os.path.abspath(sys.argv[1]))
    failures = 0
    unlisted = listed_kustomizations()
    for d in unlisted:
        print("FAIL %s: kustomization not listed in .ci/validate_manifests.py ENTRY_POINTS" % d)
        failures += 1
    # The check must be able to fail: an unknown field is refused in every
    # version used (else the schemas are not the strict ones).
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}, "unknownField": 1}
    for version in sorted({v for vs in ENTRY_POINTS.values() for v in vs} | set(NATIVE_BETA)):
        if version not in schemas:
            raise SystemExit("no schemas for Kubernetes %s; installed: %s"
                             % (version, ", ".join(sorted(schemas))))
        if not validate(probe, schemas[version]):
            raise SystemExit("the Kubernetes %s schemas accept an unknown field: not strict" % version)
    custom_probe = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                    "metadata": {"name": "probe"},
                    "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expresion": "up"}]}]}}
    if not validate_custom(custom_probe):
        raise SystemExit("the custom resource schemas accept an unknown field: not strict")
    for entry, versions in ENTRY_POINTS.items():
        docs = objects(entry)
        if not docs:
            print("FAIL %s: no objects" % entry)
            failures += 1
        checked = []
        before = failures
        for doc in docs:
            name = "%s %s/%s" % (entry, doc.get("kind"), doc.get("metadata", {}).get("name"))
            checked.append(doc)
            if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
                errors = validate_custom(doc)
                for e in errors:
                    print("FAIL %s (custom resource schema): %s" % (name, e))
                failures += 1 if errors else 0
                continue
            for version in versions:
                errors = validate(doc, schemas[version])
                for e in errors:
                    print("FAIL %s (Kubernetes %s): %s" % (name, version, e))
                failures += 1 if errors else 0
        print("%s %s: %d objects checked against Kubernetes %s to %s (strict)"
              % ("FAIL" if failures > before else "ok  ", entry, len(checked), versions[0], versions[-1]))
    failures += check_label_guard()
    failures += check_native_policy(schemas)
    if failures:
        print("manifests: %d failed" % failures)
        sys.exit(1)
    print("manifests: all valid")


if __name__ == "__main__":
    main()

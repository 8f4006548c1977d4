"""The native admission policy (deploy/native-policy) against the webhook,
case by case, on the shared corpus tests/fixtures/native-policy/corpus.json
(.ci/validate_manifests.py calls check(); tests/native_policy.rs checks the
same corpus against the webhook itself).

Each case is admitted as the apiserver would with the native install:
  1. the MutatingAdmissionPolicy, when its matchConstraints (rules, namespace
     and object selectors) and matchConditions select the request: its
     variables (lazily, as the apiserver does) and its JSONPatch mutation,
     evaluated with cel-python, the patch applied; then, the object having
     changed, the policy once more (reinvocation), which must patch nothing;
  2. the mutating webhooks of deploy/native-policy's webhook configuration
     whose rules, selectors and matchConditions select the result: the one
     that labels what the policy left must get only objects the policy did
     not change, and then gives the webhook's own answer (the corpus's
     expectation, which the Rust test checks against the webhook);
  3. the ValidatingAdmissionPolicy: its validations, and the message of the
     first that fails.
The outcome must be the corpus's: the same object, or the same refusal.

cel-python knows standard CEL; the Kubernetes additions the policy uses are
provided here with their Kubernetes meaning: find and findAll (the regex
library, RE2 as in Go), join (the strings extension) and the JSONPatch type
(a map of its fields). What cel-python cannot tell: the apiserver's typed
objects and cost limits; both are about failing, not about results.
"""

import copy
import json

import celpy
import re2
from celpy import celtypes

CORPUS = "tests/fixtures/native-policy/corpus.json"


# === the Kubernetes CEL functions the policy uses ===

def _find(text, pattern):
    match = re2.search(pattern, text)
    return celtypes.StringType(match.group(0) if match else "")


def _find_all(text, pattern, limit=None):
    found = [celtypes.StringType(m.group(0)) for m in re2.finditer(pattern, text)]
    if limit is not None and limit >= 0:
        found = found[:limit]
    return celtypes.ListType(found)


def _join(items, separator=celtypes.StringType("")):
    return celtypes.StringType(separator.join(items))


FUNCTIONS = {"find": _find, "findAll": _find_all, "join": _join}


def _json_patch(fields):
    return celtypes.MapType(fields)


class CelError(Exception):
    pass


_ENV = celpy.Environment()
_PROGRAMS = {}


def evaluate(expression, activation):
    """Evaluates one expression; an evaluation error raises (the apiserver
    would apply the failurePolicy, which the corpus never expects)."""
    if expression not in _PROGRAMS:
        _PROGRAMS[expression] = _ENV.program(_ENV.compile(expression), functions=FUNCTIONS)
    value = _PROGRAMS[expression].evaluate(activation)
    if isinstance(value, celpy.evaluation.CELEvalError):
        raise CelError("%s\n  in: %s" % (value, expression))
    return value


class Variables(celtypes.MapType):
    """`variables`: each evaluated on first use and kept, as the apiserver
    does (so a variable is never evaluated for a kind it does not concern)."""

    def __init__(self, declared, activation):
        super().__init__({})
        self._declared = {v["name"]: v["expression"] for v in declared}
        self._activation = activation

    def __getitem__(self, name):
        if not super().__contains__(name):
            if name not in self._declared:
                raise KeyError(name)
            self[celtypes.StringType(name)] = evaluate(self._declared[name], self._activation)
        return super().__getitem__(name)


def to_json(value):
    """A CEL result as JSON (cel-python returns some results, such as a
    concatenation, as plain Python lists and strings)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, bool) or isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if value is None:
        return None
    raise TypeError("unexpected CEL value %r" % (value,))


# === the apiserver's side: matching and patching ===

def selects(selector, labels):
    """A label selector (absent selects everything)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions") or []:
        value, values = labels.get(e["key"]), e.get("values") or []
        ok = {
            "In": value is not None and value in values,
            "NotIn": value is None or value not in values,
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[e["operator"]]
        if not ok:
            return False
    return True


def ruled(rules, request):
    def has(values, item):
        return item in values or "*" in values
    return any(has(r["operations"], request["operation"])
               and has(r["apiGroups"], request["resource"]["group"])
               and has(r["apiVersions"], request["resource"]["version"])
               and has(r["resources"], request["resource"]["resource"])
               for r in rules)


def selected(rules, namespace_selector, object_selector, request, namespace):
    objects = [o for o in (request["object"], request.get("oldObject")) if o]
    return (ruled(rules, request)
            and selects(namespace_selector, namespace["metadata"]["labels"])
            and any(selects(object_selector, (o.get("metadata") or {}).get("labels") or {})
                    for o in objects))


def activation(request, namespace, variables=()):
    act = {
        "object": celpy.json_to_cel(request["object"]),
        "oldObject": celpy.json_to_cel(request.get("oldObject")),
        "request": celpy.json_to_cel({k: v for k, v in request.items()
                                      if k not in ("object", "oldObject")}),
        "namespaceObject": celpy.json_to_cel(namespace),
        "JSONPatch": _json_patch,
    }
    act["variables"] = Variables(variables, act)
    return act


def conditions_hold(conditions, act):
    return all(bool(evaluate(c["expression"], act)) for c in conditions or [])


def _pointer(path):
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def apply_patch(obj, ops):
    """RFC 6902 add and replace (all the policy writes), on a copy."""
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = obj
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "replace":
            if last not in node:
                raise CelError("replace of a missing member %s" % op["path"])
            node[last] = op["value"]
        else:
            raise CelError("unexpected patch operation %r" % op)
    return obj


# === the corpus ===

GVR = {
    ("v1", "Pod"): ("", "v1", "pods"),
    ("apps/v1", "ReplicaSet"): ("apps", "v1", "replicasets"),
    ("apps/v1", "Deployment"): ("apps", "v1", "deployments"),
    ("apps/v1", "StatefulSet"): ("apps", "v1", "statefulsets"),
    ("apps/v1", "DaemonSet"): ("apps", "v1", "daemonsets"),
    ("batch/v1", "Job"): ("batch", "v1", "jobs"),
    ("batch/v1", "CronJob"): ("batch", "v1", "cronjobs"),
}


def request_of(case):
    obj = case["object"]
    group, version, resource = GVR[(obj["apiVersion"], obj["kind"])]
    request = {
        "uid": "b3f1e0a2-0000-4000-8000-00000000c0de",
        "kind": {"group": group, "version": version, "kind": obj["kind"]},
        "resource": {"group": group, "version": version, "resource": resource},
        "name": obj["metadata"].get("name", ""),
        "namespace": case["namespace"],
        "operation": case["operation"],
        "userInfo": {"username": "alice@example.com"},
        "dryRun": False,
        "object": obj,
    }
    if case.get("oldObject"):
        request["oldObject"] = case["oldObject"]
    return request


def namespace_of(corpus, name):
    labels = dict(corpus["namespaces"][name])
    labels["kubernetes.io/metadata.name"] = name
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def mutate(policy, request, namespace):
    """The mutating policy's patch for `request`, or None when it does not
    select it."""
    spec = policy["spec"]
    mc = spec["matchConstraints"]
    if not selected(mc["resourceRules"], mc.get("namespaceSelector"), mc.get("objectSelector"),
                    request, namespace):
        return None
    act = activation(request, namespace, spec.get("variables") or [])
    if not conditions_hold(spec.get("matchConditions"), act):
        return None
    ops = []
    for m in spec["mutations"]:
        if m["patchType"] != "JSONPatch":
            raise CelError("only JSONPatch mutations are evaluated here")
        ops += to_json(evaluate(m["jsonPatch"]["expression"], act))
    return ops


def webhooks_called(configuration, request, namespace):
    act = activation(request, namespace)
    return [w["name"] for w in configuration["webhooks"]
            if selected(w["rules"], w.get("namespaceSelector"), w.get("objectSelector"),
                        request, namespace)
            and conditions_hold(w.get("matchConditions"), act)]


def validate(policy, request, namespace):
    """The refusal message of the validating policy, or None."""
    spec = policy["spec"]
    mc = spec["matchConstraints"]
    if not selected(mc["resourceRules"], mc.get("namespaceSelector"), mc.get("objectSelector"),
                    request, namespace):
        return None
    act = activation(request, namespace, spec.get("variables") or [])
    if not conditions_hold(spec.get("matchConditions"), act):
        return None
    for v in spec["validations"]:
        if not evaluate(v["expression"], act):
            if "messageExpression" in v:
                return str(evaluate(v["messageExpression"], act))
            return v.get("message", "failed expression: " + v["expression"])
    return None


def admit(case, corpus, objects, fallback):
    """What the native install does with one case: ("object", obj) or
    ("refused", message), and who decided ("policy", "webhook", "nobody")."""
    kinds = {o["kind"]: o for o in objects}
    namespace = namespace_of(corpus, case["namespace"])
    request = request_of(case)
    ops = mutate(kinds["MutatingAdmissionPolicy"], request, namespace)
    obj = request["object"]
    if ops:
        obj = apply_patch(obj, ops)
        again = mutate(kinds["MutatingAdmissionPolicy"], dict(request, object=obj), namespace)
        if again:
            raise CelError("reinvoked on its own result, the policy patches again: %s" % again)
    after = dict(request, object=obj)
    called = webhooks_called(kinds["MutatingWebhookConfiguration"], after, namespace)
    if fallback in called:
        if obj != request["object"]:
            raise CelError("the webhook gets an object the policy changed: the two would share it")
        expect = case["expect"]
        if "refused" in expect:
            return ("refused", expect["refused"]), "webhook"
        obj = apply_patch(request["object"], expect["patch"])
        after = dict(request, object=obj)
        decider = "webhook"
    else:
        decider = "policy" if ops is not None else "nobody"
    message = validate(kinds["ValidatingAdmissionPolicy"], after, namespace)
    if message is not None:
        return ("refused", message), "policy"
    return ("object", obj), decider


def check(objects, fallback="labels.canary-injector.io"):
    """Runs the corpus against `objects` (the build of deploy/native-policy);
    prints the verdict and returns the number of cases that disagree."""
    with open(CORPUS) as f:
        corpus = json.load(f)
    wrong, by = 0, {"policy": 0, "webhook": 0, "nobody": 0}
    for case in corpus["cases"]:
        expect = case["expect"]
        wanted = (("refused", expect["refused"]) if "refused" in expect
                  else ("object", apply_patch(case["object"], expect["patch"])))
        try:
            got, decider = admit(case, corpus, objects, fallback)
        except (CelError, KeyError, TypeError) as e:
            print("FAIL native-policy: %s: %s" % (case["name"], e))
            wrong += 1
            continue
        if got != wanted:
            print("FAIL native-policy: %s:\n  the policy: %s\n  the webhook: %s"
                  % (case["name"], json.dumps(got[1], ensure_ascii=False),
                     json.dumps(wanted[1], ensure_ascii=False)))
            wrong += 1
            continue
        by[decider] += 1
    print("%s native-policy: %d corpus cases, the policy and the webhook agree on %d "
          "(%d decided by the policy, %d handed to the webhook, %d acted on by neither)"
          % ("FAIL" if wrong else "ok  ", len(corpus["cases"]), len(corpus["cases"]) - wrong,
             by["policy"], by["webhook"], by["nobody"]))
    return wrong

"""Strict JSON schemas for the custom resources deploy/ ships (their CRDs come
with the products that own them, so the Kubernetes schemas do not know them).

Each schema lists the fields of the product's API that our manifests may use,
with their types, taken from the products' API references (Prometheus Operator
monitoring.coreos.com/v1, cert-manager.io/v1, Istio networking.istio.io
v1beta1/v1, the Gateway API's gateway.networking.k8s.io/v1 standard channel). Anything else fails, like an unknown field under kubectl's strict
validation: a typo (`expresion:`) or a field the product does not have. To use
a field that is not listed, check it in the product's reference and add it.
"""

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
STR_LIST = {"type": "array", "items": STR}


def obj(required=(), **properties):
    """A strict object: only `properties`, the `required` ones present."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def listed(item):
    return {"type": "array", "items": item}


OWNER_REFERENCE = obj(
    ("apiVersion", "kind", "name", "uid"),
    apiVersion=STR, kind=STR, name=STR, uid=STR, controller=BOOL, blockOwnerDeletion=BOOL,
)
METADATA = obj(
    ("name",),
    name=STR, namespace=STR, labels=STR_MAP, annotations=STR_MAP,
    ownerReferences=listed(OWNER_REFERENCE),
)
LABEL_SELECTOR = obj(
    matchLabels=STR_MAP,
    matchExpressions=listed(obj(("key", "operator"), key=STR, operator=STR, values=STR_LIST)),
)


def resource(api_versions, kind, spec):
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **obj(
            ("apiVersion", "kind", "metadata", "spec"),
            apiVersion={"enum": list(api_versions)},
            kind={"const": kind},
            metadata=METADATA,
            spec=spec,
        ),
    }


# --- Prometheus Operator (monitoring.coreos.com/v1) ---
RULE = obj(
    ("expr",),
    alert=STR, record=STR, expr={"type": ["string", "integer"]}, labels=STR_MAP,
    annotations=STR_MAP, keep_firing_for=STR,
    # `for` is a Python keyword
    **{"for": STR},
)
PROMETHEUS_RULE = obj(
    ("groups",),
    groups=listed(obj(("name", "rules"), name=STR, interval=STR, limit=INT, rules=listed(RULE))),
)
ENDPOINT = obj(
    port=STR, targetPort={"type": ["string", "integer"]}, path=STR, scheme={"enum": ["http", "https"]},
    interval=STR, scrapeTimeout=STR, honorLabels=BOOL,
)
SERVICE_MONITOR = obj(
    ("selector", "endpoints"),
    selector=LABEL_SELECTOR, jobLabel=STR, endpoints=listed(ENDPOINT),
    namespaceSelector=obj(any=BOOL, matchNames=STR_LIST),
)

# --- cert-manager (cert-manager.io/v1) ---
ISSUER = obj(selfSigned=obj(crlDistributionPoints=STR_LIST), ca=obj(("secretName",), secretName=STR))
CERTIFICATE = obj(
    ("secretName", "issuerRef"),
    secretName=STR, commonName=STR, dnsNames=STR_LIST, duration=STR, renewBefore=STR,
    isCA=BOOL, usages=STR_LIST,
    privateKey=obj(
        algorithm={"enum": ["RSA", "ECDSA", "Ed25519"]}, size=INT,
        rotationPolicy={"enum": ["Never", "Always"]}, encoding={"enum": ["PKCS1", "PKCS8"]},
    ),
    issuerRef=obj(("name",), name=STR, kind=STR, group=STR),
    secretTemplate=obj(labels=STR_MAP, annotations=STR_MAP),
)

# --- Istio (networking.istio.io v1beta1 and v1: the same fields) ---
PORT = obj(("number",), number=INT)
DESTINATION_RULE = obj(
    ("host",),
    host=STR, exportTo=STR_LIST,
    subsets=listed(obj(("name",), name=STR, labels=STR_MAP)),
)
STRING_MATCH = obj(exact=STR, prefix=STR, regex=STR)
VIRTUAL_SERVICE = obj(
    ("hosts",),
    hosts=STR_LIST, gateways=STR_LIST, exportTo=STR_LIST,
    http=listed(obj(
        name=STR,
        match=listed(obj(
            name=STR, headers={"type": "object", "additionalProperties": STRING_MATCH},
            uri=STRING_MATCH, port=INT,
        )),
        route=listed(obj(
            ("destination",),
            destination=obj(("host",), host=STR, subset=STR, port=PORT),
            weight=INT,
        )),
        # Istio's Duration fields are strings ("5s", "0.5s").
        timeout=STR,
        retries=obj(attempts=INT, perTryTimeout=STR, retryOn=STR),
    )),
)

# --- Gateway API (gateway.networking.k8s.io/v1, standard channel, v1.2+) ---
# HTTPRoute: the fields of the standard channel that routes on a Service
# parent (GAMMA) can use. No `retry` (experimental channel) and no filters:
# canary-injector writes neither.
PARENT_REF = obj(
    ("name",),
    group=STR, kind=STR, namespace=STR, name=STR, sectionName=STR, port=INT,
)
BACKEND_REF = obj(
    ("name",),
    group=STR, kind=STR, namespace=STR, name=STR, port=INT,
    weight={"type": "integer", "minimum": 0, "maximum": 1000000},
)
HTTP_ROUTE = obj(
    parentRefs=listed(PARENT_REF),
    hostnames=STR_LIST,
    rules=listed(obj(
        matches=listed(obj(
            path=obj(type={"enum": ["Exact", "PathPrefix", "RegularExpression"]}, value=STR),
            headers=listed(obj(
                ("name", "value"),
                type={"enum": ["Exact", "RegularExpression"]}, name=STR, value=STR,
            )),
            method=STR,
        )),
        backendRefs=listed(BACKEND_REF),
        # GEP-2257 durations: "5s", "1h30m", "500ms".
        timeouts=obj(
            request={"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
            backendRequest={"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
        ),
    )),
)

ISTIO = ("networking.istio.io/v1beta1", "networking.istio.io/v1")
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): resource(["monitoring.coreos.com/v1"], "ServiceMonitor", SERVICE_MONITOR),
    ("monitoring.coreos.com/v1", "PrometheusRule"): resource(["monitoring.coreos.com/v1"], "PrometheusRule", PROMETHEUS_RULE),
    ("cert-manager.io/v1", "Issuer"): resource(["cert-manager.io/v1"], "Issuer", ISSUER),
    ("cert-manager.io/v1", "Certificate"): resource(["cert-manager.io/v1"], "Certificate", CERTIFICATE),
}
SCHEMAS[("gateway.networking.k8s.io/v1", "HTTPRoute")] = resource(
    ["gateway.networking.k8s.io/v1"], "HTTPRoute", HTTP_ROUTE)
for _v in ISTIO:
    SCHEMAS[(_v, "DestinationRule")] = resource(ISTIO, "DestinationRule", DESTINATION_RULE)
    SCHEMAS[(_v, "VirtualService")] = resource(ISTIO, "VirtualService", VIRTUAL_SERVICE)

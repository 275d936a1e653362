#!/usr/bin/env python3
"""Checks kiln's Kubernetes manifests (deploy/*.yaml).

1. Schema: each built-in resource against Kubernetes' own OpenAPI schema
   (kubernetes-validate, strict: unknown fields are errors), each
   InferencePool against deploy/schemas/inferencepool-v1.schema.json; a
   kind with no schema is an error, not a skip.
2. Consistency with kiln: the probes ask /health (liveness) and
   /health/ready (readiness) on the container's port; kiln listens on every
   interface; the Service and the InferencePool select the Deployment's pods
   and reach its port; terminationGracePeriodSeconds covers the preStop
   sleep plus kiln's --grace-period plus a spare few seconds.

    check.py DIR               check the manifests; exit 1 listing every problem
    check.py --self-test DIR   break copies of them in known ways and check
                               that each break is refused (exit 1 if not)
"""

import copy
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes version whose schemas the built-in kinds are checked
# against (the preStop `sleep` action needs 1.30 or later).
K8S_VERSION = "1.33"
# Schemas for the custom resources, relative to the manifests' folder.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "schemas/inferencepool-v1.schema.json",
}
# kiln's defaults (crates/kiln/src/serve.rs).
KILN_DEFAULT_PORT = 8080
KILN_DEFAULT_GRACE = 30
# Seconds after kiln's grace period for its last lines and exit.
DRAIN_SPARE = 5


def load(folder):
    """[(file name, resource)] of every YAML document in the folder."""
    docs = []
    for path in sorted(pathlib.Path(folder).glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path.name, doc))
    if not docs:
        raise SystemExit(f"check.py: no manifests in {folder}")
    return docs


def name_of(doc):
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    return f"{kind}/{name}"


def schema_errors(folder, docs):
    errors = []
    for file, doc in docs:
        where = f"{file}: {name_of(doc)}"
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"{where}: not a Kubernetes resource (no apiVersion/kind)")
            continue
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            with open(pathlib.Path(folder) / crd, encoding="utf-8") as f:
                schema = json.load(f)
            validator = jsonschema.Draft202012Validator(schema)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{where}: {path}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{where}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: no schema: {e.message}")
    return errors


def flag(args, name, default):
    """The value of `--name V` or `--name=V` in a container's args."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def port_number(port, container):
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def consistency_errors(docs):
    errors = []
    deployments = [d for _, d in docs if isinstance(d, dict) and d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        return [f"expected one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    where = name_of(dep)
    try:
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        spec = pod["spec"]
        kiln = next(c for c in spec["containers"] if "serve" in c.get("args", []))
    except (KeyError, TypeError, StopIteration):
        return [f"{where}: no container running `kiln serve` with pod labels"]
    args = [str(a) for a in kiln.get("args", [])]
    try:
        port = int(flag(args, "--port", KILN_DEFAULT_PORT))
        grace = int(flag(args, "--grace-period", KILN_DEFAULT_GRACE))
    except ValueError:
        return [f"{where}: --port and --grace-period must be whole numbers: {args}"]
    if flag(args, "--host", "127.0.0.1") not in ("0.0.0.0", "::"):
        errors.append(f"{where}: kiln must listen on every interface (--host 0.0.0.0), or probes and traffic cannot reach it")
    if port not in [p.get("containerPort") for p in kiln.get("ports", [])]:
        errors.append(f"{where}: kiln listens on {port} but the container declares no such port")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/health/ready")):
        get = (kiln.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path:
            errors.append(f"{where}: {probe} must ask GET {path}, not {get.get('path')}")
        if port_number(get.get("port"), kiln) != port:
            errors.append(f"{where}: {probe} must ask kiln's port {port}")
    pre_stop = ((kiln.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    sleep = pre_stop.get("seconds")
    if not isinstance(sleep, int) or sleep < 1:
        errors.append(f"{where}: a preStop sleep must keep kiln serving while endpoints are removed")
        sleep = 0
    need = sleep + grace + DRAIN_SPARE
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(tgps, int) or tgps < need:
        errors.append(
            f"{where}: terminationGracePeriodSeconds {tgps} is less than preStop {sleep} s "
            f"+ kiln's --grace-period {grace} s + {DRAIN_SPARE} s = {need} s: "
            "the kubelet would kill kiln while it drains"
        )
    for _, d in docs:
        if not isinstance(d, dict):
            continue
        if d.get("kind") == "Service":
            sel = (d.get("spec") or {}).get("selector") or {}
            if not selects(sel, labels):
                errors.append(f"{name_of(d)}: its selector {sel} does not select the pods ({labels})")
            for p in (d.get("spec") or {}).get("ports") or []:
                if port_number(p.get("targetPort", p.get("port")), kiln) != port:
                    errors.append(f"{name_of(d)}: port {p.get('name')} does not lead to kiln's port {port}")
        if d.get("kind") == "InferencePool":
            s = d.get("spec") or {}
            sel = (s.get("selector") or {}).get("matchLabels") or {}
            if not selects(sel, labels):
                errors.append(f"{name_of(d)}: its selector {sel} does not select the pods ({labels})")
            numbers = [p.get("number") for p in s.get("targetPorts") or []]
            if numbers != [port]:
                errors.append(f"{name_of(d)}: targetPorts {numbers} must be kiln's port [{port}]")
    return errors


def check(folder, docs):
    return schema_errors(folder, docs) + consistency_errors(docs)


def find(docs, kind):
    return next(d for _, d in docs if d.get("kind") == kind)


def kiln_container(docs):
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def set_flag(docs, name, value):
    """Sets `name value` in kiln's args, in place when it is there."""
    args = kiln_container(docs)["args"]
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args.extend([name, value])


# (what is broken, how, a phrase the refusal must contain)
BREAKS = [
    ("a misspelt container field", lambda d: kiln_container(d).update(readinesProbe={}), "readinesProbe"),
    ("replicas as a word", lambda d: find(d, "Deployment")["spec"].update(replicas="two"), "replicas"),
    ("a Service port as a word", lambda d: find(d, "Service")["spec"]["ports"][0].update(port="eighty"), "eighty"),
    ("two InferencePool target ports", lambda d: find(d, "InferencePool")["spec"]["targetPorts"].append({"number": 8081}), "targetPorts"),
    ("an endpoint picker Service without a port", lambda d: find(d, "InferencePool")["spec"]["endpointPickerRef"].pop("port"), "port"),
    ("an unknown InferencePool field", lambda d: find(d, "InferencePool")["spec"].update(targetPortNumber=8080), "targetPortNumber"),
    ("a kind with no schema", lambda d: d.append(("extra.yaml", {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})), "no schema"),
    ("readiness on /ping", lambda d: kiln_container(d)["readinessProbe"]["httpGet"].update(path="/ping"), "/health/ready"),
    ("no liveness probe", lambda d: kiln_container(d).pop("livenessProbe"), "livenessProbe"),
    ("a termination grace shorter than the drain", lambda d: find(d, "Deployment")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30), "terminationGracePeriodSeconds"),
    ("a longer kiln grace period alone", lambda d: set_flag(d, "--grace-period", "120"), "terminationGracePeriodSeconds"),
    ("no preStop sleep", lambda d: kiln_container(d).pop("lifecycle"), "preStop"),
    ("kiln on loopback only", lambda d: set_flag(d, "--host", "127.0.0.1"), "every interface"),
    ("a Service selecting other pods", lambda d: find(d, "Service")["spec"].update(selector={"app": "other"}), "does not select"),
    ("an InferencePool on another port", lambda d: find(d, "InferencePool")["spec"].update(targetPorts=[{"number": 9000}]), "9000"),
]


def self_test(folder, docs):
    """Each break of BREAKS must be refused, naming what is wrong."""
    failures = []
    base = check(folder, docs)
    if base:
        failures.append("the manifests themselves do not pass: " + "; ".join(base))
    for what, breaks, phrase in BREAKS:
        broken = copy.deepcopy(docs)
        breaks(broken)
        errors = check(folder, broken)
        if not any(phrase in e for e in errors):
            failures.append(f"{what}: not refused (wanted an error naming {phrase!r}; got {errors})")
    for f in failures:
        print(f"FAIL self-test: {f}")
    print(f"deploy self-test: {len(BREAKS) - len(failures)} of {len(BREAKS)} breaks refused")
    return 1 if failures else 0


def main(argv):
    args = [a for a in argv if a != "--self-test"]
    folder = args[0] if args else "deploy"
    docs = load(folder)
    if "--self-test" in argv:
        return self_test(folder, docs)
    errors = check(folder, docs)
    for e in errors:
        print(f"ERROR {e}")
    if errors:
        print(f"deploy: {len(errors)} problem(s) in {folder}")
        return 1
    print(f"deploy: {len(docs)} resources in {folder} pass (Kubernetes {K8S_VERSION} schemas, kiln's drain and probes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

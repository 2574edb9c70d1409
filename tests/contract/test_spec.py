"""The contract itself: valid OpenAPI, in step with the published reference, fully documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared/reference/billing-api-reference.txt"
NINE = {"200", "400", "401", "402", "403", "404", "409", "429", "500"}
METHODS = {"get", "post", "patch", "put", "delete"}


def load_spec() -> dict:
    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


def parse_reference(text: str) -> dict[tuple[str, str], dict]:
    """(METHOD, path) -> {"params": {(name, in, type, required)}, "statuses": {...}}."""
    ops: dict[tuple[str, str], dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        head = re.fullmatch(r"(GET|POST|PATCH|PUT|DELETE) (/\S+)", line)
        if head:
            current = ops.setdefault((head[1], head[2]), {"params": set(), "statuses": set()})
            continue
        if current is None:
            continue
        param = re.fullmatch(
            r"([A-Za-z]+?)(path|query|header)(string|integer|number|boolean)"
            r"(Yes|No)---",
            line,
        )
        if param:
            current["params"].add((param[1], param[2], param[3], param[4] == "Yes"))
        status = re.fullmatch(r"([1-5]\d\d)[A-Z].*", line)
        if status:
            current["statuses"].add(status[1])
    return ops


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        target = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def spec_operations(spec: dict, include_extensions: bool = False):
    for path, item in spec["paths"].items():
        shared = item.get("parameters", [])
        for method, op in item.items():
            if method not in METHODS:
                continue
            if "service" in op.get("tags", []) and not include_extensions:
                continue
            yield method.upper(), path, op, shared


def test_spec_is_valid_openapi():
    validate(load_spec())


def test_reference_parses():
    ops = parse_reference(REFERENCE.read_text())
    assert len(ops) == 13
    assert all(op["statuses"] == NINE for op in ops.values())


def test_spec_matches_the_published_reference():
    spec = load_spec()
    reference = parse_reference(REFERENCE.read_text())
    ours = {}
    for method, path, op, shared in spec_operations(spec):
        params = set()
        for raw in shared + op.get("parameters", []):
            p = _resolve(spec, raw)
            if p["in"] not in ("path", "query"):
                continue  # headers (Idempotency-Key) extend the reference
            schema = _resolve(spec, p["schema"])
            params.add((p["name"], p["in"], schema["type"], bool(p.get("required"))))
        ours[(method, path)] = {"params": params, "statuses": set(op["responses"])}
    assert set(ours) == set(reference), "paths or methods drifted"
    for key, expected in reference.items():
        assert ours[key] == expected, key


def test_extensions_are_tagged_and_under_their_own_prefix():
    for _method, path, op, _ in spec_operations(load_spec(), include_extensions=True):
        if "service" in op.get("tags", []):
            assert path.startswith("/v1/service/")
            assert op["security"] == [{"serviceAuth": []}]
            assert "Extension beyond the published reference" in op["description"]


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(op, id=f"{m} {p}")
        for m, p, op, _ in spec_operations(load_spec(), include_extensions=True)
    ],
)
def test_every_operation_is_documented(op):
    spec = load_spec()
    assert op.get("operationId") and op.get("summary") and op.get("description")
    assert set(op["responses"]) >= NINE
    ok = _resolve(spec, op["responses"]["200"])
    media = ok["content"]["application/json"]
    assert (
        "example" in media or "examples" in media or "example" in _resolve(spec, media["schema"])
    ), f"{op['operationId']}: 200 has no example"
    for status in NINE - {"200"}:
        problem = _resolve(spec, op["responses"][status])
        assert "application/problem+json" in problem["content"]
    if "requestBody" in op:
        body = op["requestBody"]["content"]["application/json"]
        assert "example" in body or "examples" in body


def test_operation_ids_are_unique():
    ids = [op["operationId"] for *_, op, _ in spec_operations(load_spec(), True)]
    assert len(ids) == len(set(ids))

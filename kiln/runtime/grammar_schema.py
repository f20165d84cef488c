"""Which JSON-schema keywords the grammar enforces: check_schema refuses the others.

xgrammar (checked on 0.2.9) compiles a schema node by the first of these keywords it holds
and ignores the rest of the node beside it: $ref, const, enum, anyOf, oneOf, allOf, then
`type` (without one, properties make an object and items an array; with neither, any
JSON). It does not enforce the keywords of _NEVER, nor some combinations (a pattern with
lengths, multipleOf past its limits, allOf of several schemas, a oneOf it cannot prove
exclusive, ...), and logs at most a warning. check_schema refuses them all before the
schema is compiled, naming the keyword and its JSON path (as vLLM refuses what xgrammar
cannot do), so that an answer that completes always validates against its schema.
tests/test_structured_output.py checks that what passes is enforced.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import re
from typing import Any

from kiln.errors import RequestError

_APPLICATORS = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")
_NEVER = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains",
          "maxContains", "dependentRequired", "dependentSchemas", "dependencies",
          "$dynamicRef", "$recursiveRef")
_NUMBER = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STRING = ("minLength", "maxLength", "pattern", "format")
_ARRAY = ("items", "prefixItems", "unevaluatedItems", "minItems", "maxItems")
_OBJECT = ("properties", "required", "additionalProperties", "patternProperties",
           "propertyNames", "unevaluatedProperties", "minProperties", "maxProperties")
_CONSTRAINTS = ("type", *_APPLICATORS, *_NUMBER, *_STRING, *_ARRAY, *_OBJECT)
FORMATS = ("date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6",
           "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
           "relative-json-pointer")  # enforced; other standard formats are refused:
_UNENFORCED_FORMATS = ("idn-email", "idn-hostname", "iri", "iri-reference", "regex")
_MULTIPLE_OF_MAX, _MULTIPLE_OF_RANGE_MAX = 1024, 10000  # xgrammar's limits for integers


def check_schema(schema: Any) -> None:
    """RequestError naming the first keyword of `schema` (and its JSON path) that the
    grammar would not enforce; malformed schemas are left to the compiler's message."""
    try:
        _SchemaCheck(schema).node(schema, "$")
    except RecursionError:
        raise RequestError("json_schema: the schema is nested too deeply") from None


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_$][\w$-]*", key) else \
        f"{path}[{json.dumps(key)}]"


def _present(node: dict[str, Any], keyword: str) -> bool:
    """`keyword` constrains the node (a format no standard defines is an annotation)."""
    if keyword not in node:
        return False
    if keyword == "uniqueItems":
        return node[keyword] is not False
    if keyword == "format":
        return node[keyword] in FORMATS or node[keyword] in _UNENFORCED_FORMATS
    return True


class _SchemaCheck:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.seen_refs = {"#"}

    @staticmethod
    def refuse(keyword: str, path: str, why: str) -> None:
        raise RequestError(f"json_schema: {keyword} at {path} {why}")

    def node(self, node: Any, path: str, default_type: str | None = None) -> None:
        if not isinstance(node, dict):
            return  # true/false, or malformed: the compiler's business
        for keyword in _NEVER:
            if _present(node, keyword):
                self.refuse(keyword, path, "is not supported: the grammar cannot enforce it")
        head = next((k for k in _APPLICATORS if k in node), None)
        if head is not None:
            return self.applicator(node, head, path)
        types = node.get("type", default_type)
        if types is None or types == []:
            if any(k in node for k in ("properties", "additionalProperties",
                                       "unevaluatedProperties")):
                types = "object"
            elif any(k in node for k in ("items", "prefixItems", "unevaluatedItems")):
                types = "array"
            else:
                for keyword in (*_NUMBER, *_STRING, *_ARRAY, *_OBJECT):
                    if _present(node, keyword):
                        self.refuse(keyword, path, 'is not enforced without a "type" (add '
                                    "one)")
                return
        kinds = [types] if isinstance(types, str) else types if isinstance(types, list) else []
        for kind in kinds:  # (a malformed type is the compiler's business)
            if kind in ("integer", "number", "string", "array", "object"):
                getattr(self, f"_{kind}")(node, path)

    def applicator(self, node: dict[str, Any], head: str, path: str) -> None:
        ignored = [k for k in _CONSTRAINTS if k != head and _present(node, k)]
        if head in ("const", "enum"):
            values = [node["const"]] if head == "const" else node["enum"]
            if "type" in ignored and isinstance(values, list):
                types = node["type"] if isinstance(node["type"], list) else [node["type"]]
                wrong = [v for v in values if not any(_is_type(v, t) for t in types)]
                if wrong:
                    self.refuse("type", path, f"is ignored beside {head}, and {head} holds "
                                f"{json.dumps(wrong[0])}, not of that type")
                ignored.remove("type")
        for keyword in ignored:
            self.refuse(keyword, path, f"is ignored beside {head} (" + (
                "move it into the referenced schema)" if head == "$ref" else
                "move it into each branch)" if head.endswith("Of") else
                f"only the {head} values are enforced)"))
        if head == "$ref":
            return self.ref(node["$ref"], path)
        branches = node[head]
        if not head.endswith("Of") or not isinstance(branches, list):
            return
        if head == "allOf" and len(branches) > 1:
            self.refuse("allOf", path, "is not supported with more than one schema (merge "
                        "them into one)")
        for i, branch in enumerate(branches):
            self.node(branch, _at(_at(path, head), i))
        if head == "oneOf" and not all(self.disjoint(a, b) for i, a in enumerate(branches)
                                       for b in branches[i + 1:]):
            self.refuse("oneOf", path, "is not supported where its branches may overlap (the "
                        "grammar would let a value match several): give each branch its own "
                        "type, or a required property of distinct const values, or use anyOf")

    def ref(self, ref: Any, path: str) -> None:
        if not isinstance(ref, str):
            return
        if ref != "#" and not ref.startswith("#/"):
            self.refuse("$ref", path, f"{ref!r} is not supported: only references into the "
                        "schema itself (#/...) are")
        if ref in self.seen_refs:
            return
        self.seen_refs.add(ref)
        target, target_path = self.root, "$"
        for part in filter(None, ref[2:].split("/")):
            child = _child(target, part, _MISSING)
            if child is _MISSING:
                return  # the compiler says it cannot find it
            key = int(part) if isinstance(target, list) else part
            target, target_path = child, _at(target_path, key)
        self.node(target, target_path)

    def _integer(self, node: dict[str, Any], path: str) -> None:
        step = node.get("multipleOf")
        if not _is_type(step, "number") or not 0 < step < math.inf:
            return
        lows = [v + 1 if k.startswith("ex") else v for k, v in node.items()
                if k in ("minimum", "exclusiveMinimum") and _is_type(v, "number")]
        highs = [v - 1 if k.startswith("ex") else v for k, v in node.items()
                 if k in ("maximum", "exclusiveMaximum") and _is_type(v, "number")]
        if _xgrammar_version() < (0, 2, 4):
            why = "needs xgrammar 0.2.4 or later (pip install -U xgrammar)"
        elif step != int(step) or step > _MULTIPLE_OF_MAX:
            why = f"must be a whole number from 1 to {_MULTIPLE_OF_MAX}"
        elif bool(lows) != bool(highs):
            why = "needs both a lower and an upper bound, or neither"
        elif lows and min(highs) - max(lows) >= _MULTIPLE_OF_RANGE_MAX:
            why = f"needs at most {_MULTIPLE_OF_RANGE_MAX} integers between the bounds"
        else:
            return
        self.refuse("multipleOf", path, f"is not enforced here: on an integer it {why}")

    def _number(self, node: dict[str, Any], path: str) -> None:
        if "multipleOf" in node:
            self.refuse("multipleOf", path, 'is not enforced on a "number" (only on an '
                        '"integer")')

    def _string(self, node: dict[str, Any], path: str) -> None:
        fmt = node.get("format")
        if fmt in _UNENFORCED_FORMATS:
            self.refuse("format", path, f"{fmt!r} is not supported (supported formats: "
                        f"{', '.join(FORMATS)})")
        lead = "format" if fmt in FORMATS else "pattern" if "pattern" in node else None
        for keyword in ("pattern", "minLength", "maxLength"):
            if lead is not None and keyword != lead and keyword in node:
                self.refuse(keyword, path, f"is ignored beside {lead} (only the {lead} is "
                            "enforced)")

    def _array(self, node: dict[str, Any], path: str) -> None:
        key = "items" if "items" in node else "unevaluatedItems"  # the one it uses
        self.node(node.get(key), _at(path, key))
        if isinstance(node.get("prefixItems"), list):
            for i, item in enumerate(node["prefixItems"]):
                self.node(item, _at(_at(path, "prefixItems"), i))

    def _object(self, node: dict[str, Any], path: str) -> None:
        properties = node.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = node.get("required")
        for name in required if isinstance(required, list) else []:
            if isinstance(name, str) and name not in properties:
                self.refuse("required", path, f"names {name!r}, which is not in properties: "
                            "the grammar cannot make it appear (add it to properties)")
        for name, sub in properties.items():
            self.node(sub, _at(_at(path, "properties"), name))
        patterns = node.get("patternProperties")
        for pattern, sub in (patterns.items() if isinstance(patterns, dict) else ()):
            self.node(sub, _at(_at(path, "patternProperties"), pattern))
        key = "additionalProperties" if "additionalProperties" in node else \
            "unevaluatedProperties"
        self.node(node.get(key), _at(path, key))
        self.node(node.get("propertyNames"), _at(path, "propertyNames"), "string")

    # -- oneOf: branches no value can match two of (then anyOf, which xgrammar falls back
    # -- to where it cannot prove that itself, gives the same answers)
    def resolve(self, node: Any) -> Any:
        for _ in range(32):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
                return node
            ref, node = node["$ref"], self.root
            for part in filter(None, ref[2:].split("/")) if ref.startswith("#") else [None]:
                node = _child(node, part) if part is not None else None
        return None

    def facts(self, node: Any) -> tuple[list | None, set[str] | None, dict[str, list]]:
        """(its values if it lists them, its types if it names them, the values of each
        required property that lists them where it is an object)."""
        node = self.resolve(node)
        if not isinstance(node, dict) or any(k in node for k in ("anyOf", "oneOf", "allOf")):
            return None, None, {}
        if "const" in node or isinstance(node.get("enum"), list):
            return ([node["const"]] if "const" in node else node["enum"]), None, {}
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) \
            if isinstance(types, list) and all(isinstance(t, str) for t in types) else None
        keys: dict[str, list] = {}
        properties, required = node.get("properties"), node.get("required")
        if types == {"object"} and isinstance(properties, dict) and isinstance(required, list):
            for name in required:
                values = self.facts(properties.get(name))[0] if isinstance(name, str) else None
                if values is not None:
                    keys[name] = values
        return None, types, keys

    def disjoint(self, a: Any, b: Any) -> bool:
        if a is False or b is False:
            return True
        (values_a, types_a, keys_a), (values_b, types_b, keys_b) = self.facts(a), self.facts(b)
        numeric = {"integer", "number"}
        if types_a is not None and types_b is not None:
            if not (types_a & types_b or types_a & numeric and types_b & numeric):
                return True
        for values, types in ((values_a, types_b), (values_b, types_a)):
            if values is not None and types is not None:
                return not any(_is_type(v, t) for v in values for t in types)
        if values_a is not None and values_b is not None:
            return not any(_same(x, y) for x in values_a for y in values_b)
        return any(not any(_same(x, y) for x in keys_a[k] for y in keys_b[k])
                   for k in keys_a.keys() & keys_b.keys())


_MISSING = object()


def _child(node: Any, part: str, default: Any = None) -> Any:
    """A reference's step: an object's member, or an array's item by its index (as in a
    tool's parameters, "#/anyOf/1/properties/arguments/...": tool_call_schema)."""
    if isinstance(node, dict):
        return node.get(part, default)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return default


@functools.cache
def _xgrammar_version() -> tuple[int, ...]:
    """The installed xgrammar's (major, minor, patch); the checks above were made on
    0.2.9 (earlier versions enforce less: integer multipleOf came in 0.2.4)."""
    try:
        version = importlib.metadata.version("xgrammar")
    except importlib.metadata.PackageNotFoundError:
        return (1 << 30,)  # (compiling says it is missing)
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _is_type(value: Any, kind: str) -> bool:
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return kind == "number" or isinstance(value, int) or value.is_integer()
    kinds = {"null": type(None), "boolean": bool, "string": str, "array": list,
             "object": dict}
    return isinstance(kind, str) and kind in kinds and isinstance(value, kinds[kind])


def _same(a: Any, b: Any) -> bool:
    """JSON equality (true is not 1; 1 is 1.0)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b or _is_type(a, "number") and _is_type(b, "number") \
        and a == b

"""Cut OpenAI's OpenAPI document down to what the gateway serves: POST /chat/completions and POST /completions,
with every component they reference (transitively), nothing else. Usage:
    python data/openai/trim_spec.py FULL_openapi.yaml data/openai/openapi-chat-completions.yaml"""
import sys

import yaml

KEEP = {"/chat/completions": ["post"], "/completions": ["post"]}


def refs(node, out: set) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/components/"):
                out.add(tuple(v[2:].split("/")[1:3]))
            else:
                refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def trim(spec: dict) -> dict:
    paths = {p: {m: spec["paths"][p][m] for m in ms} for p, ms in KEEP.items()}
    for op in (o for p in paths.values() for o in p.values()):
        op.pop("x-oaiMeta", None)  # documentation examples, not contract
    need, todo = set(), set()
    refs(paths, todo)
    while todo:
        kind, name = todo.pop()
        if (kind, name) in need:
            continue
        need.add((kind, name))
        refs(spec["components"][kind][name], todo)
    components: dict = {}
    for kind, name in sorted(need):
        components.setdefault(kind, {})[name] = spec["components"][kind][name]
    if "securitySchemes" in spec.get("components", {}):
        components["securitySchemes"] = spec["components"]["securitySchemes"]
    return {"openapi": spec["openapi"], "info": spec["info"], "servers": spec.get("servers", []),
            "security": spec.get("security", []), "paths": paths, "components": components}


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    with open(src) as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    with open(dst, "w") as f:
        yaml.safe_dump(trim(spec), f, sort_keys=False, allow_unicode=True, width=120)

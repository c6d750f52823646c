"""What a client is told when its request does not validate: pydantic's errors as one message
naming the field (OpenAI's `param`), in the client's terms rather than pydantic's."""
from __future__ import annotations

from pydantic import ValidationError

from qwen2vl.server.requests import CONTENT_PART_TYPES


def describe_validation_error(error: ValidationError, tags: tuple[str, ...] | None = None) -> tuple[str, str | None]:
    """(message, param) for the most specific problem pydantic found.

    pydantic reports one error per union branch; the deepest location is the one the client
    meant (a list of content parts with a bad part, rather than "not a string").
    """
    tags = tags or CONTENT_PART_TYPES  # the content part types (discriminator tags) of the request's protocol
    errors = error.errors(include_url=False)
    depth = max(len(err["loc"]) for err in errors)
    deepest = [err for err in errors if len(err["loc"]) == depth]
    # a union branch whose type matched but whose value did not is the one the client meant
    # (`"prompt": ""` is a string that is too short, rather than "not a list")
    meant = [err for err in deepest if not err["type"].endswith("_type")] or deepest
    param = _param(meant[0]["loc"], tags)
    text = " or ".join(dict.fromkeys(_describe(err) for err in meant if _param(err["loc"], tags) == param))
    return (f"{param}: {text}" if param else text), param or None


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', err['msg'])})"
    if kind == "union_tag_invalid":
        what = "content part" if "content" in err["loc"] else "item"
        return f"unknown {what} type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "a content part needs a 'type'"
    if kind == "extra_forbidden":
        return "unknown field (not part of the API, or not supported by this server)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if not err["loc"]:
            return f"the request body must be a JSON object, not {_json_kind(err.get('input'))}"
        if err["loc"][-1] in ("image_url", "video_url") and isinstance(err.get("input"), str):
            return 'expected an object {"url": ...}, not a bare string'
        return "expected an object"
    if err["loc"][-1] == "[key]":
        return f"{err['input']!r} is not a token id (keys are token ids written as strings, such as \"50256\")"
    return err["msg"]


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {list: "an array", str: "a string"}.get(type(value), "a number")


def _param(loc: tuple, tags: tuple[str, ...]) -> str:
    """`('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')` ->
    `messages[0].content[1].image_url.url`: drops pydantic's union branch labels and the
    discriminator tag (one of `tags`) it inserts after a list index."""
    if loc[-1:] == ("[key]",):  # a bad key of a mapping: the mapping is the param
        loc = loc[:-2]
    out = ""
    previous = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item[:1].isupper() or item in ("str", "int", "float", "bool") or item.startswith("constrained-"):
            pass  # a union branch label
        elif isinstance(previous, int) and item in tags and "content" in loc:
            pass  # the discriminator tag
        else:
            out += f".{item}" if out else item
        previous = item
    return out

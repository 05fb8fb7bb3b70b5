"""A request body as JSON that the rest of the server can handle: an object, nested at most
`MAX_JSON_DEPTH` levels, and every string valid Unicode.

Both limits exist because what breaks otherwise is a 500 far from the cause: a deeply nested body
makes json.loads, pydantic or the chat template recurse past Python's limit, and a lone UTF-16
surrogate (JSON "\\ud800", which json.loads accepts) fails in the tokenizer, on the gRPC wire to an
instance, or when an error message that quotes it is encoded.
"""
from __future__ import annotations

import json
from itertools import chain

from serving.api.errors import ApiError

# OpenAI request bodies nest about 5 levels (body > messages > message > content > part); tool
# schemas, when sent, rarely 20
MAX_JSON_DEPTH = 64
_NUMBERS = frozenset({int, float, bool, type(None)})


def load_json_object(body: bytes) -> dict:
    """The parsed body; ApiError(400) saying what is wrong with it otherwise."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    check_json_value(data)
    return data


def check_json_value(value) -> None:
    """ApiError(400) if `value` (parsed JSON) nests deeper than MAX_JSON_DEPTH or holds a string
    with a lone surrogate; the error names the field (dotted path, as validation errors do).

    Walks one nesting level at a time with list comprehensions and checks a level's strings joined
    into one, so that checking a 4 MiB body costs a small multiple of parsing it, not a Python call per
    value. The depth is checked all the way down first: the search for the bad string recurses."""
    level, depth, is_unicode = [value], 1, True
    while level:
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        dicts = [node for node in level if type(node) is dict]
        # lists of numbers (token ids) hold nothing to check: skipped whole
        lists = [node for node in level if type(node) is list and not _NUMBERS.issuperset(map(type, node))]
        children = list(chain(chain.from_iterable(d.values() for d in dicts), chain.from_iterable(lists)))
        texts = "".join(chain(chain.from_iterable(dicts), (c for c in children if type(c) is str)))
        is_unicode = is_unicode and _is_unicode(texts)
        level = [c for c in children if type(c) is dict or type(c) is list]
        depth += 1
    if not is_unicode:
        _raise_surrogate_error(value)


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raise_surrogate_error(value, path: tuple = ()) -> None:
    """Find the first string with a lone surrogate, depth first, and raise the 400 naming it."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    where = ".".join(str(p) for p in path)
    for key, child in items:
        if isinstance(key, str) and not _is_unicode(key):
            raise _surrogate_error(f"a key of {where}" if where else "a key of the body", key, where)
        if isinstance(child, str) and not _is_unicode(child):
            field = ".".join(str(p) for p in (*path, key))
            raise _surrogate_error(field, child, field)
        if isinstance(child, (dict, list)):
            _raise_surrogate_error(child, (*path, key))


def _surrogate_error(field: str, text: str, param: str) -> ApiError:
    position = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
    return ApiError(400, f"{field} contains a lone UTF-16 surrogate (U+{ord(text[position]):04X} at "
                         f"character {position}), which is not valid Unicode; send the text as valid "
                         "UTF-8 (a surrogate escape must be half of a pair)", param=param or None)


def _too_deep() -> ApiError:
    return ApiError(400, f"The request body is nested too deeply: at most {MAX_JSON_DEPTH} levels of "
                         "arrays and objects are accepted.")

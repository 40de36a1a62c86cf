"""The YAML of feature_spec.yaml, the 2023 original's description of a data directory.

PyYAML, which the 2023 original reads and writes it with, is no dependency here: parse_yaml
reads the subset of YAML that NVIDIA's tools write and its templates hold, and refuses anything
else naming its line; yaml_text writes it. dataloading.py reads the layout it describes;
convert.py writes it.
"""
import json
import math
import re

import cli


class YamlError(cli.UserError):
    """Text outside the YAML that parse_yaml reads: `line` (from 1) and `problem` say where
    and what; callers name the file."""

    def __init__(self, line, problem):
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


def parse_yaml(text):
    """The value of a YAML document written in the subset feature specs use.

    PyYAML, which the 2023 original reads them with, is no dependency here, so this reads what
    NVIDIA's tools write (yaml.dump) and its templates hold: block mappings and sequences (a
    sequence may sit at its key's indentation, a mapping may begin on its item's dash line),
    plain, quoted and empty scalars, `[a, b]` lists, `{}`, comments. Plain scalars resolve as
    PyYAML's YAML 1.1 resolves them: null, booleans, integers, floats, else text. Anchors, tags,
    block text and flow mappings raise YamlError, naming the line.
    """
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        content = _without_comment(raw).rstrip()
        stripped = content.lstrip(" ")
        if content in ("---", "...") and lines:
            raise YamlError(number, "a second document")
        if not stripped or content == "---":
            continue
        if stripped.startswith("\t"):
            raise YamlError(number, "a tab in the indentation")
        lines.append([number, len(content) - len(stripped), stripped])
    if not lines:
        return None
    value, end = _yaml_block(lines, 0)
    if end < len(lines):
        raise YamlError(lines[end][0], "a line that does not fit the structure above it (check "
                                       "its indentation)")
    return value


def read_mapping_file(path, error, advice):
    """The YAML mapping in the file at `path`; a problem with the file or its text raises
    `error` naming the file (and line), then `advice`."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = parse_yaml(handle.read())
    except YamlError as problem:
        raise error(f"{path}: line {problem.line}: {problem.problem}; {advice}") from None
    except (OSError, UnicodeDecodeError) as problem:
        reason = problem.strerror if isinstance(problem, OSError) else "not UTF-8 text"
        raise error(f"{path}: cannot be read ({reason}); {advice}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a YAML mapping; {advice}")
    return value


def _without_comment(line):
    """line without its `# comment`: a # at its start or after a blank, outside quotes."""
    quote = None
    position = 0
    while position < len(line):
        char = line[position]
        if quote:
            if char == "\\" and quote == '"':
                position += 1
            elif char == quote:
                quote = None
        elif char in "'\"" and (position == 0 or line[position - 1] in " [,"):
            quote = char
        elif char == "#" and (position == 0 or line[position - 1] in " \t"):
            return line[:position]
        position += 1
    return line


def _is_item(text):
    return text == "-" or text.startswith("- ")


def _yaml_block(lines, index):
    """(value, index of the line after it) of the node that starts at lines[index]."""
    number, _, text = lines[index]
    if _is_item(text):
        return _yaml_sequence(lines, index)
    if _key_and_rest(text, number) is not None:
        return _yaml_mapping(lines, index)
    return _yaml_scalar(text, number), index + 1


def _yaml_sequence(lines, index):
    indent = lines[index][1]
    items = []
    while index < len(lines) and lines[index][1] == indent and _is_item(lines[index][2]):
        number, _, text = lines[index]
        rest = text[1:].lstrip(" ")
        if rest:
            # the item begins on the dash's line: read it as a line of its own, indented to
            # where it begins, so that a mapping's next keys line up with its first
            lines[index] = [number, indent + len(text) - len(rest), rest]
            value, index = _yaml_block(lines, index)
        elif index + 1 < len(lines) and lines[index + 1][1] > indent:
            value, index = _yaml_block(lines, index + 1)
        else:
            value, index = None, index + 1
        items.append(value)
    return items, index


def _yaml_mapping(lines, index):
    indent = lines[index][1]
    mapping = {}
    while index < len(lines) and lines[index][1] == indent:
        number, _, text = lines[index]
        split = _key_and_rest(text, number)
        if split is None:
            raise YamlError(number, "expected `key: value`")
        key, rest = split
        if key in mapping:
            raise YamlError(number, f"the key {key!r} a second time")
        index += 1
        if rest:
            value = _yaml_scalar(rest, number)
        elif index < len(lines) and (lines[index][1] > indent or (
                lines[index][1] == indent and _is_item(lines[index][2]))):
            value, index = _yaml_block(lines, index)
        else:
            value = None
        mapping[key] = value
    return mapping, index


def _key_and_rest(text, number):
    """(key, the text after `key:`) when text is a mapping entry, else None."""
    if text[0] in "'\"":
        key, end = _quoted(text, number)
        after = text[end:]
        if after == ":" or after.startswith(": "):
            return key, after[1:].strip(" ")
        return None
    if text[0] in "[{":
        return None
    position = text.find(": ")
    if position < 0 and text.endswith(":"):
        position = len(text) - 1
    if position < 0:
        return None
    if not text[:position].strip(" "):
        raise YamlError(number, "a mapping entry without a key")
    return _yaml_scalar(text[:position].rstrip(" "), number), text[position + 1:].strip(" ")


def _quoted(text, number):
    """(the string, the index after its closing quote) of the quoted scalar text starts with."""
    if text[0] == "'":
        parts, position = [], 1
        while True:
            end = text.find("'", position)
            if end < 0:
                raise YamlError(number, "a quote that does not close on its line")
            parts.append(text[position:end])
            if text[end + 1:end + 2] != "'":
                return "".join(parts), end + 1
            parts.append("'")
            position = end + 2
    match = re.match(r'"(?:[^"\\]|\\.)*"', text)
    if match is None:
        raise YamlError(number, "a quote that does not close on its line")
    try:
        # YAML's double-quoted escapes include JSON's; the others are refused
        return json.loads(match.group()), match.end()
    except ValueError:
        raise YamlError(number, "an escape in double quotes that JSON lacks") from None


# an item of a flow collection: quoted strings and other text up to a comma or the end
_FLOW_ITEM = re.compile(r"""\s*((?:'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^,\[\]{}'"])+?)\s*(?:,|$)""")
_YAML_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_YAML_BASED = {re.compile(r"[-+]?0b[01_]+"): 2, re.compile(r"[-+]?0x[0-9a-fA-F_]+"): 16,
               re.compile(r"[-+]?0[0-7_]+"): 8}
_YAML_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?")
_YAML_WORDS = {**dict.fromkeys(("~", "null", "Null", "NULL"), None),
               **dict.fromkeys(("true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"),
                               True),
               **dict.fromkeys(("false", "False", "FALSE", "no", "No", "NO", "off", "Off",
                                "OFF"), False),
               **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"),
                               float("inf")),
               **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), float("-inf")),
               **dict.fromkeys((".nan", ".NaN", ".NAN"), float("nan"))}


def _flow_collection(text, number):
    """A one-line `[a, b]` list or `{key: value, ...}` mapping of scalars, as yaml.dump writes
    the innermost collections with default_flow_style=None."""
    closing = "]" if text[0] == "[" else "}"
    if not text.endswith(closing):
        raise YamlError(number, f"a {text[0]} that does not close on its line")
    inner, items, position = text[1:-1], [], 0
    while inner.strip(" ") and position < len(inner):
        match = _FLOW_ITEM.match(inner, position)
        if match is None:
            raise YamlError(number, f"an item of {text[0]} {closing} that is not a scalar")
        items.append(match.group(1))
        position = match.end()
    if closing == "]":
        return [_yaml_scalar(item, number) for item in items]
    mapping = {}
    for item in items:
        key, rest = _key_and_rest(item, number) or (_yaml_scalar(item, number), "")
        mapping[key] = _yaml_scalar(rest, number) if rest else None
    return mapping


def _yaml_scalar(text, number):
    """The value of one scalar, or of a `[a, b]` list of them."""
    if text[0] in "'\"":
        value, end = _quoted(text, number)
        if text[end:].strip(" "):
            raise YamlError(number, "text after a closing quote")
        return value
    if text[0] in "[{":
        return _flow_collection(text, number)
    if text[0] in "&*!|>%@`?" or ": " in text:
        raise YamlError(number, f"{text[:20]!r}: anchors, aliases, tags, block text and "
                                f"nested entries are outside the YAML read here")
    if text in _YAML_WORDS:
        return _YAML_WORDS[text]
    digits = text.replace("_", "")
    if _YAML_INT.fullmatch(text):
        return int(digits)
    for pattern, base in _YAML_BASED.items():
        if pattern.fullmatch(text):
            sign = -1 if digits[0] == "-" else 1
            return sign * int(digits.lstrip("+-")[1 + (base != 8):] or "0", base)
    if _YAML_FLOAT.fullmatch(text) and text.strip("+-") != ".":
        return float(digits)
    return text


def yaml_text(value):
    """Block-style YAML of nested dicts, lists and scalars, which PyYAML (the 2023 original's
    reader) and parse_yaml read alike."""
    return "".join(line + "\n" for line in _yaml_lines(value, 0))


def _yaml_lines(value, indent):
    pad = " " * indent
    for key, item in value.items() if isinstance(value, dict) else ((None, item)
                                                                     for item in value):
        head = f"{pad}- " if key is None else f"{pad}{_scalar_text(key)}:"
        if isinstance(item, (dict, list)) and item:
            lines = list(_yaml_lines(item, indent + 2))
            if key is None:
                # a list's item begins on its dash line
                yield head + lines[0][indent + 2:]
                yield from lines[1:]
            else:
                yield head
                yield from lines
        else:
            yield f"{head}{'' if key is None else ' '}{_scalar_text(item)}"


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def _scalar_text(value):
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
        # YAML 1.1 (PyYAML) takes 1e+20 for text: its floats have a point
        return re.sub(r"^([-0-9]+)(e|$)", r"\1.0\2", repr(value))
    text = str(value)
    # plain only where it reads back as the same text, not as yes (true) or null
    if _PLAIN.fullmatch(text) and parse_yaml(text) == text:
        return text
    return json.dumps(text)

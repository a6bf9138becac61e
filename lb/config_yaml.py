"""The configuration file as text: YAML read strictly, and ``${VAR}`` references expanded."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from typing import Any

import yaml
from yaml.constructor import ConstructorError

# `$${` is a literal `${`; `${NAME}` or `${NAME:-default}` is a reference; any other `${`
# is malformed.
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def expand(text: str) -> str:
    """``text`` with its references replaced by the environment's values; raises
    ``ValueError`` for an unset variable without a default or a malformed reference."""

    def replace(match: re.Match[str]) -> str:
        whole, name, default = match.group(0), match.group(1), match.group(2)
        if whole == "$${":
            return "${"
        if name is None:
            raise ValueError("malformed ${...} reference (write $${ for a literal ${)")
        value = os.environ.get(name)
        if default is not None:
            return value or default  # like the shell's ${VAR:-default}: unset or empty
        if value is None:
            raise ValueError(
                f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
            )
        return value

    return _REFERENCE.sub(replace, text)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. Merge keys
    (``<<: *defaults``) work as in YAML 1.1: a key written out overrides a merged one."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # mappings whose own keys were checked

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Flattening rewrites a node's pairs, merged ones included: its own keys are checked
        # once, as written, before the first flattening (which may come from a mapping that
        # merges it).
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._check_unique(node)
        super().flatten_mapping(node)

    def _check_unique(self, node: yaml.MappingNode) -> None:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # flattened by SafeConstructor, explicit keys winning
            key = self.construct_object(key_node)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable; SafeConstructor reports it below
                continue
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)


# A reference as it stands in the file, before any YAML parsing.
_RAW_REFERENCE = re.compile(r"(?<!\$)\$\{[^}\n]*\}")


def read_yaml(text: str) -> Any:
    """The YAML tree of ``text``. A ``${VAR}`` in a flow mapping (``{port: ${PORT}}``) reads
    as YAML's own braces: if the file does not parse, it is read again with every reference
    held in a plain token, then given back, so expansion still runs on the parsed values."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as error:
        prefix = f"lbref{secrets.token_hex(4)}x"
        references: dict[str, str] = {}

        def hold(match: re.Match[str]) -> str:
            token = f"{prefix}{len(references)}x"
            references[token] = match.group(0)
            return token

        shielded = _RAW_REFERENCE.sub(hold, text)
        if not references:
            raise
        try:
            data = yaml.load(shielded, Loader=_UniqueKeyLoader)
        except yaml.YAMLError:
            raise error from None
        token = re.compile(re.escape(prefix) + r"\d+x")
        return _restore(data, lambda s: token.sub(lambda m: references[m.group(0)], s))


def _restore(node: Any, fix: Callable[[str], str]) -> Any:
    if isinstance(node, str):
        return fix(node)
    if isinstance(node, dict):
        return {_restore(k, fix): _restore(v, fix) for k, v in node.items()}
    if isinstance(node, list):
        return [_restore(v, fix) for v in node]
    return node

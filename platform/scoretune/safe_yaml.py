"""The one YAML loader for every file scoretune reads (configs, spaces, cluster configs, ``--set`` values).

PyYAML's safe loader builds no objects, but left alone it reads a file of any size, expands a
"billion laughs" of nested aliases into a structure that validation then walks for minutes and GiBs,
and lets a key written twice silently win. :class:`BoundedLoader` refuses all three: a file over
``SCORETUNE_YAML_MAX_BYTES`` (1 MB) is not read, a document over ``SCORETUNE_YAML_MAX_NODES`` (20,000; a config has about 50)
nodes counting every alias at its expanded size or nested deeper than 100 stops as soon as it gets
there, and a duplicate key is an error naming both lines. Each problem is one :class:`YamlError` line
naming the source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import UserError

MAX_BYTES = 1_000_000
"""Default cap on a YAML file's size (``SCORETUNE_YAML_MAX_BYTES`` overrides it)."""
MAX_NODES = 20_000
"""Default cap on a document's nodes, aliases counted at their expanded size (``SCORETUNE_YAML_MAX_NODES``)."""
MAX_DEPTH = 100
"""Nesting deeper than this is refused (PyYAML's composer recurses once per level)."""


class YamlError(UserError, ValueError):
    """A YAML file or value that cannot be read: one line naming the source and the fix."""


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise YamlError(f"{env}={raw!r}: expects a positive integer") from None
    if value <= 0:
        raise YamlError(f"{env}={raw!r}: expects a positive integer")
    return value


def max_bytes() -> int:
    return _limit("SCORETUNE_YAML_MAX_BYTES", MAX_BYTES)


def max_nodes() -> int:
    return _limit("SCORETUNE_YAML_MAX_NODES", MAX_NODES)


class _Limit(yaml.MarkedYAMLError):
    """A cap reached while composing (the message carries the fix)."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with a node cap (aliases at their expanded size), a depth cap and no duplicate keys."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._max_nodes = max_nodes()
        self._nodes = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, for every finished node

    def _count(self, n: int, mark: Any) -> None:
        self._nodes += n
        if self._nodes > self._max_nodes:
            raise _Limit(None, None, f"more than {self._max_nodes:,} nodes once aliases are expanded (a YAML bomb?); "
                         "write the values out, or raise SCORETUNE_YAML_MAX_NODES", mark)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:  # an alias to a node still being composed: a cycle
                raise _Limit(None, None, "an alias refers to its own enclosing node (a recursive structure); "
                             "remove the alias", mark)
            self._count(size, mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Limit(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        before = self._nodes
        self._count(1, self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._nodes - before
        return node

    def compose_document(self) -> Node:
        node = super().compose_document()
        self._sizes = {}
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or isinstance(key_node, (MappingNode, SequenceNode)):
                    continue  # merge keys may be overridden (YAML's rule); unhashable keys fail in PyYAML itself
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is written twice (first at line {first.line + 1}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return f"{where}: {problem}"


def load(text: str, source: str) -> Any:
    """The one document in ``text`` (safe tags only), under the node, depth and duplicate-key rules;
    a one-line :class:`YamlError` naming ``source`` otherwise."""
    loader = None
    try:
        loader = BoundedLoader(text)  # the reader checks the characters here already
        return loader.get_single_data()
    except _Limit as e:
        raise YamlError(" ".join(f"{source}: YAML refused{_problem(e)}".split())) from None
    except yaml.YAMLError as e:
        raise YamlError(" ".join(f"{source}: malformed YAML{_problem(e)}".split())) from None
    except RecursionError:
        raise YamlError(f"{source}: malformed YAML: nested too deeply") from None
    except ValueError as e:  # e.g. a date such as 2020-13-45
        raise YamlError(" ".join(f"{source}: malformed YAML: {e}".split())) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: str | os.PathLike) -> str:
    """The text of ``path``, refused before reading when it is over :func:`max_bytes` (a pipe or device
    is read only up to the cap), or not UTF-8."""
    p = Path(path)
    cap = max_bytes()
    try:
        if p.stat().st_size > cap:
            raise YamlError(f"{p}: {p.stat().st_size:,} bytes, over the {cap:,}-byte limit for a YAML file "
                            "(raise SCORETUNE_YAML_MAX_BYTES if it is meant to be this big)")
        with open(p, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise YamlError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(data) > cap:
        raise YamlError(f"{p}: over the {cap:,}-byte limit for a YAML file "
                        "(raise SCORETUNE_YAML_MAX_BYTES if it is meant to be this big)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlError(f"{p}: not a UTF-8 text file (byte {e.start}); pass a YAML file") from None


def read(path: str | os.PathLike) -> Any:
    """:func:`load` of the file ``path`` after :func:`read_text`'s size check."""
    return load(read_text(path), str(path))

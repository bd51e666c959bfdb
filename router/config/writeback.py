"""The management API's changes written back to the operator's config file: the edited data
merged into the file's round-trip YAML, so comments, key order and layout stay wherever the
data did not change; staged (written and fsynced beside it) before the change is applied,
renamed into place with the previous file kept as `<file>.prev`, and put back if the change
is then refused."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from router.appendfile import replace_with_staged, restore_previous, write_staged


def write_back(path: Path, data: dict[str, Any]) -> bool:
    """The edited config written over its file, before the change is applied: staged (see
    stage_write_back), then renamed into place, the previous file kept as `<file>.prev`. A
    failure (a full disk, a file that cannot be renamed over, such as one a container mounts
    on its own) raises with the file as it was and no temp file left. Whether there was a
    previous file, for `undo_write_back` if the change is then refused. A config file that is
    a symbolic link is written where it points (the file the operator edits), the link kept."""
    path = path.resolve()
    staged = stage_write_back(path, data)
    try:
        return replace_with_staged(path, staged, keep_previous=True)
    finally:
        staged.unlink(missing_ok=True)  # gone once renamed; left only by a failure


def undo_write_back(path: Path, existed: bool) -> None:
    """Put back the config file `write_back` replaced, for a change refused as it was
    applied (the `.prev` of the change before goes: it is the file again)."""
    restore_previous(path.resolve(), existed)


def stage_write_back(path: Path, data: dict[str, Any]) -> Path:
    """The edited config, to be written over its file, keeping the operator's comments, key
    order and layout wherever the data did not change (round-trip YAML): written (and
    fsynced) to a temp file beside it, the part of a write-back that a full disk fails, done
    before the change is applied, so a change that cannot be written is not applied either.
    Returns the temp file; write_back puts it in place."""
    # Imported by the first change written back: the round-trip library costs a megabyte in a
    # daemon whose config nobody edits through the API.
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    round_trip = YAML()  # the round-trip loader and dumper: comments are part of the data
    round_trip.preserve_quotes = True
    round_trip.width = 100
    round_trip.indent(mapping=2, sequence=4, offset=2)  # `  - id:`, as config/router.yaml
    try:
        document = round_trip.load(path.read_text(encoding="utf-8"))
    except (OSError, YAMLError):
        document = None
    if not isinstance(document, CommentedMap):
        document = CommentedMap()
    out = io.StringIO()
    round_trip.dump(_merge(document, data, _shared_nodes(document)), out)
    return write_staged(path, out.getvalue().encode())


def _merge(old: Any, new: Any, shared: frozenset[int] = frozenset()) -> Any:
    """`new`, built on the nodes of `old` where they hold the same place, so the comments
    attached to them stay. Lists of objects are matched by `id` (or `name`), others by
    position. A node that `old` holds in several places (`shared`: an anchor and its aliases)
    is changed in a copy of its own, so a change at one place changes no other."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq  # imported by stage_write_back

    def merged(node: Any, value: Any) -> Any:
        if id(node) in shared:
            node = copy.deepcopy(node)
        return _merge(node, value, shared)

    if isinstance(new, dict) and isinstance(old, CommentedMap):
        for key in [k for k in old if k not in new]:
            del old[key]
        for position, (key, value) in enumerate(new.items()):
            if key not in old:
                # At its place, not after the map's last key: a comment trailing the map
                # (before the next section) belongs to the last key and must stay last.
                old.insert(min(position, len(old)), key, value)
            elif old[key] != value:
                old[key] = merged(old[key], value)
        return old
    if isinstance(new, list) and isinstance(old, CommentedSeq):
        wanted = [_item_key(item, i) for i, item in enumerate(new)]
        for i in reversed(range(len(old))):
            if _item_key(old[i], i) not in wanted:
                del old[i]
        for i, item in enumerate(new):
            if i < len(old) and _item_key(old[i], i) == wanted[i]:
                old[i] = merged(old[i], item) if old[i] != item else old[i]
            else:
                old.insert(i, item)
        del old[len(new) :]
        return old
    return new


def _shared_nodes(document: Any) -> frozenset[int]:
    """The mappings and lists a round-trip document holds in more than one place (what YAML
    aliases repeat), by id."""
    seen: set[int] = set()
    shared: set[int] = set()

    def walk(node: Any) -> None:
        if not isinstance(node, dict | list):
            return
        if id(node) in seen:
            shared.add(id(node))
            return
        seen.add(id(node))
        for child in node.values() if isinstance(node, dict) else node:
            walk(child)

    walk(document)
    return frozenset(shared)


def _item_key(item: Any, index: int) -> Any:
    if isinstance(item, dict) and ("id" in item or "name" in item):
        return ("key", str(item.get("id", item.get("name"))))
    return ("index", index)

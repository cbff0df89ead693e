"""Tables with a bound: anyone on a network may make us remember things, so every
table that grows with what peers send forgets its oldest entries past a size."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(table: OrderedDict[K, V], key: K, value: V, bound: int) -> None:
    """Set ``table[key]``, the newest last; past ``bound`` entries the oldest goes."""
    table[key] = value
    table.move_to_end(key)
    if len(table) > bound:
        table.popitem(last=False)


def seen(remembered: set[K], item: K, bound: int) -> bool:
    """Note ``item`` in ``remembered`` (forgotten all at once past ``bound``); True if it
    was there already."""
    if item in remembered:
        return True
    if len(remembered) >= bound:
        remembered.clear()
    remembered.add(item)
    return False

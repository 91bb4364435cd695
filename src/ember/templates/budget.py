"""Budgets for rendering untrusted templates.

A chat template comes with a model file or a Modelfile: a program someone
else wrote, run for every request. Counting its steps does not bound it,
because one step can join a list of a million strings or square a number with
a million digits. Each render therefore gets a :class:`Budget` of

- work: one unit per loop iteration, comparison or piece of output,
  ``CALL_UNITS`` per call, one per item or character an operation visits in
  Python, and one per ``CHARS_PER_UNIT`` characters it copies or scans in C;
- size: no value, and not the output, larger than ``MAX_CHARS`` cells (a
  character is a cell, a list or dict entry ``ITEM_CELLS``). Operations
  that can multiply sizes (joins, repeats, splits, padding, replacement,
  format widths, printing nested data) are checked *before* they allocate,
  against an upper bound computed from their inputs;
- memory: all the cells one render creates, together, at most
  ``MAX_MEMORY``;
- integers: at most ``MAX_INT_BITS`` bits, so arithmetic stays cheap.

Going past any of them raises :class:`BudgetExceeded`; the template engines
turn it into a TemplateError naming the template and line. The real chat
templates use about a hundred units of work per message.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

MAX_CHARS = 1 << 25
MAX_MEMORY = 1 << 26
# About a second of CPU at most: a unit is roughly a quarter of a
# microsecond, what one iteration of an empty loop costs.
MAX_WORK = 2_000_000
MAX_INT_BITS = 1 << 14
CHARS_PER_UNIT = 64
CALL_UNITS = 8  # a call into a filter, method, operator or function
ITEM_CELLS = 32  # an entry of a list or dict: a pointer and often an object of its own
# The most characters one character or item of nested data can print as:
# repr() writes "\U000e0001" for some characters, JSON "\ud83d\ude00".
PRINT_FACTOR = 12


class BudgetExceeded(Exception):
    """A render went past its budget; the message says which bound."""


class Size(NamedTuple):
    """The size of a value and everything it holds."""

    chars: int  # characters of strings, digits of numbers
    items: int  # list, tuple and dict entries
    depth: int  # deepest nesting of containers

    @property
    def cells(self) -> int:
        return self.chars + ITEM_CELLS * self.items


class Budget:
    """What one render may still do (see the module docstring)."""

    __slots__ = ("work", "memory")

    def __init__(self) -> None:
        self.work = 0
        self.memory = 0

    def spend(self, units: int = 1) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise BudgetExceeded(f"more than {MAX_WORK} units of work")

    def scan(self, chars: int) -> None:
        """Charge for copying or scanning ``chars`` characters at C speed."""
        self.spend(1 + chars // CHARS_PER_UNIT)

    def allow(self, cells: int, what: str) -> None:
        """Refuse, before it is built, a value that could be larger than MAX_CHARS cells."""
        if cells > MAX_CHARS:
            raise BudgetExceeded(f"{what} could grow past {MAX_CHARS} characters")

    def allocate(self, value: Any, what: str = "a value") -> Any:
        """Charge for ``value``, just built (one level deep); returns it."""
        cells = shallow_cells(value)
        self.allow(cells, what)
        self.memory += cells
        if self.memory > MAX_MEMORY:
            raise BudgetExceeded(f"more than {MAX_MEMORY} characters allocated in all")
        self.scan(cells)
        return value

    def read(self, value: Any) -> int:
        """Charge for reading ``value`` one level deep in C (a string's
        characters, a list's items); its size in cells."""
        if isinstance(value, (str, list, tuple, dict, set, frozenset, range)):
            self.scan(len(value))
            return shallow_cells(value)
        self.spend()
        return number_chars(value)

    def measure(self, value: Any, expand: Callable[[Any], Any] | None = None) -> Size:
        """The size of ``value`` with everything it holds, charged as a
        Python walk over its items that reads its characters. Past MAX_CHARS
        cells it stops and reports more than MAX_CHARS characters. ``expand``
        maps objects of other types to data to measure instead (None: 16
        characters)."""
        chars = items = depth = 0
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack and chars + ITEM_CELLS * items <= MAX_CHARS:
            v, level = stack.pop()
            if isinstance(v, str):
                chars += len(v)
            elif isinstance(v, (list, tuple, set, frozenset, Mapping)):
                n = len(v)
                self.spend(1 + n)
                items += n
                depth = max(depth, level + 1)
                if chars + ITEM_CELLS * items <= MAX_CHARS:
                    children = (x for kv in v.items() for x in kv) if isinstance(v, Mapping) else v
                    stack.extend((x, level + 1) for x in children)
            elif v is None or isinstance(v, (bool, int, float)):
                chars += number_chars(v)
            else:
                inner = expand(v) if expand is not None else None
                if inner is None:
                    chars += 16
                else:
                    stack.append((inner, level))
        self.scan(chars)
        if stack:
            chars = MAX_CHARS + 1
        return Size(chars, items, depth)

    def text_bound(self, value: Any, expand: Callable[[Any], Any] | None = None) -> int:
        """The longest ``str(value)`` can be: each character printed as up to
        PRINT_FACTOR, each entry with up to 8 of punctuation around it."""
        if isinstance(value, str):
            return len(value)
        if value is None or isinstance(value, (bool, int, float)):
            return number_chars(value)
        size = self.measure(value, expand)
        return PRINT_FACTOR * size.chars + 8 * (size.items + 1)

    def check_int(self, value: Any) -> Any:
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"an integer grew past {MAX_INT_BITS} bits")
        return value


def shallow_cells(value: Any) -> int:
    """The cells of ``value`` itself: its characters, or its entries (0 for
    anything else)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset, range)):
        return ITEM_CELLS * len(value)
    return 0


def number_chars(value: Any) -> int:
    """The longest text a number (or None) prints as."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() * 3 // 10 + 2
    return 24


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("ember_template_budget", default=None)


def current() -> Budget:
    """The budget of the render in progress (a fresh one outside any render,
    so a helper called on its own is still bounded)."""
    return _current.get() or Budget()


@contextlib.contextmanager
def using(budget: Budget) -> Iterator[Budget]:
    """Make ``budget`` the current one for the code in the ``with`` block."""
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)

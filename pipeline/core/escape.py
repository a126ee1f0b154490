"""Escaping user text for every sink: the one place that knows what each output format treats as markup.

User text is anything the project did not write itself: captions and prompts, words of a caption, run names,
dataset and checkpoint file names, config strings (schedule names, swept values, extractor names), MLflow tags
read back into a table. It is data in every output, never markup:

- matplotlib (:func:`mpl_text`, :func:`mpl_label`): ``$`` is escaped so mathtext never parses user text (a caption
  ``$\\frac{a}{$`` made ``savefig`` raise), control characters are shown as ``\\xNN`` escapes and very long text is
  cut, so a title can never grow a figure past Agg's 2**16-pixel limit. The project's own labels may still use
  mathtext: escape the user part only, and never put user text inside a ``$…$`` of the project's (there it would
  be math again). Convention: matplotlib's own — a ``\\$`` outside math renders as ``$`` and an even number of
  unescaped ``$`` is math (``matplotlib.cbook.is_math_text``). This holds with ``text.usetex`` off, matplotlib's
  default, which the project never changes: with usetex on, every string is TeX and no escaping here would do.
- CSV (:func:`csv_cell`, :func:`csv_uncell`): spreadsheet formula injection neutralised as OWASP recommends
  (https://owasp.org/www-community/attacks/CSV_Injection): a text cell that starts with ``=``, ``+``, ``-``,
  ``@``, tab or carriage return gets a leading single quote ``'``, so a spreadsheet reads it as text. Numbers
  (int, float, numpy scalars) are written as they are, and so is a text cell that is just a number (``-0.5``,
  ``+1e-3``, ``-inf``): a spreadsheet reads those as numbers, not formulas. One extension makes the quote
  reversible: a text that already starts with quotes followed by one of those characters (``'=x``) gets one more
  quote too, so :func:`csv_uncell` (used by ``report.html`` to show the text as the user wrote it) removes exactly
  the one quote :func:`csv_cell` added. Quoting of commas, quotes and newlines is left to the ``csv`` module.
- HTML (:func:`html_text`): ``html.escape`` with ``quote=True`` (``& < > " '``), valid in element text and in
  quoted attribute values.
- A terminal (:func:`terminal_text`): control characters (ANSI escape sequences, carriage returns, newlines) shown
  as ``\\xNN`` escapes, so a printed table cannot be overwritten or recoloured by a run name.

Standard library only: importable from anywhere, matplotlib is never imported here.
"""

from __future__ import annotations

import html
import numbers
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "FORMULA_PREFIXES",
    "MPL_MAX_CHARS",
    "csv_cell",
    "csv_row",
    "csv_uncell",
    "html_text",
    "mpl_label",
    "mpl_text",
    "shorten",
    "terminal_text",
]

MPL_MAX_CHARS = 200  # a longer user text is cut (with "…") before it reaches a figure
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list of cell starts a spreadsheet may evaluate

# a text cell that is only a number (what csv writes for a float, too): left as is
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
# quotes (maybe none) then a formula start: what csv_cell quotes, and (with one quote or more) what csv_uncell undoes
_QUOTED_FORMULA = re.compile("'*[" + re.escape("".join(FORMULA_PREFIXES)) + "]")


def shorten(text: str, max_chars: int | None) -> str:
    """``text`` cut to ``max_chars`` characters, the last one ``…`` where it was cut (None: never cut)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[: max(max_chars - 1, 0)] + "…"


def _controls_visible(text: str, keep: str = "") -> str:
    """Control characters (Unicode category Cc) but those in ``keep`` as their Python escapes (``\\x1b``, ``\\t``)."""
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) == "Cc" and ch not in keep else ch for ch in text)


def mpl_text(value: Any, max_chars: int | None = MPL_MAX_CHARS) -> str:
    """``value`` as text matplotlib draws literally (``Text``, titles, axis and tick labels, annotations, legend
    entries): cut to ``max_chars`` characters, control characters but newline made visible, every ``$`` escaped
    as ``\\$`` so no part of it is ever mathtext. Escape only the user's part of a label, never a whole label that
    holds the project's own mathtext."""
    text = shorten("" if value is None else str(value), max_chars)
    # cut before escaping, so a cut never splits a "\$" pair
    return _controls_visible(text, keep="\n").replace("$", r"\$")


def mpl_label(value: Any, max_chars: int | None = MPL_MAX_CHARS) -> str:
    """:func:`mpl_text` for a legend entry (``label=``): a label that starts with ``_`` is one matplotlib's legend
    silently leaves out (its convention for hidden artists), so such a label gets a leading space."""
    text = mpl_text(value, max_chars)
    return " " + text if text.startswith("_") else text


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet cannot evaluate (OWASP CSV injection, see the module docstring).

    None, bools and numbers are returned unchanged (the ``csv`` module writes them as before). Anything else is
    text (``str(value)`` for other objects, what ``csv`` would write): returned with a leading ``'`` where it
    starts with ``=``, ``+``, ``-``, ``@``, tab or CR and is not just a number, or starts with quotes followed by
    one of those; else returned unchanged."""
    if value is None or isinstance(value, (bool, numbers.Number)):
        return value
    text = value if isinstance(value, str) else str(value)
    if _QUOTED_FORMULA.match(text) and not _NUMBER.fullmatch(text):
        return "'" + text
    return value


def csv_uncell(text: str) -> str:
    """The text :func:`csv_cell` was given, from the cell it wrote (one leading quote removed where it added one)."""
    return text[1:] if text.startswith("'") and _QUOTED_FORMULA.match(text) else text


def csv_row(row: Mapping[str, Any], fields: Iterable[str]) -> list[Any]:
    """The cells of ``row`` in ``fields`` order (missing: empty), each through :func:`csv_cell`."""
    return [csv_cell(row.get(f)) for f in fields]


def html_text(value: Any) -> str:
    """``value`` as HTML text (None: empty), safe in element content and in double- or single-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def terminal_text(value: Any) -> str:
    """``value`` as one line for a terminal: every control character (newline, CR, ESC of ANSI sequences)
    shown as its escape."""
    return _controls_visible("" if value is None else str(value))

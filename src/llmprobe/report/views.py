"""What the templates render: plain view objects built from result folders, and the cell
formatting and escaping rules shared by the HTML and Markdown outputs.

The templates only loop and print; every number is formatted here, once, so the HTML table,
the Markdown table and the findings show the same digits.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Rows of a table written into the HTML (sortable and filterable there) and into the Markdown.
HTML_MAX_ROWS = 2000
MD_MAX_ROWS = 15

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def format_number(value: Any, integral: bool = False) -> str:
    """Four significant digits (exponent form only for very large or small values)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 100_000 else str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return ""
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if integral and number.is_integer():
        return format_number(int(number))
    if 1e4 <= abs(number) < 1e9:  # 171,734 reads better than 1.717e+05
        return f"{number:,.0f}"
    if number != 0 and (abs(number) >= 1e9 or abs(number) < 1e-3):
        return f"{number:.3e}"
    return f"{number:.4g}"


@dataclass
class Cell:
    text: str
    sort: str  # numeric sort key for the browser; "" for text cells
    numeric: bool


@dataclass
class TableView:
    id: str
    name: str
    caption: str
    columns: list[str]
    rows: list[list[Cell]]
    total_rows: int
    source: str  # path of the CSV relative to the report files
    note: str = ""
    md_max_rows: int | None = MD_MAX_ROWS  # None: every row goes into the Markdown too

    @property
    def md_rows(self) -> list[list[Cell]]:
        return self.rows if self.md_max_rows is None else self.rows[:self.md_max_rows]

    @property
    def shown_rows(self) -> int:
        return len(self.rows)

    @property
    def numeric_columns(self) -> list[bool]:
        """Per column: every non-blank cell is a number (right-aligned)."""
        flags = []
        for i in range(len(self.columns)):
            cells = [row[i] for row in self.rows if row[i].text != ""]
            flags.append(bool(cells) and all(c.numeric for c in cells))
        return flags


def table_view(frame: pd.DataFrame, *, table_id: str, name: str, caption: str, source: str,
               columns: list[str] | None = None, sort_by: str | None = None, descending: bool = True,
               by_abs: bool = False, note: str = "") -> TableView:
    """A table ready to print: chosen columns, sorted by the key column, cells formatted."""
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    if sort_by and sort_by in frame.columns:
        key = pd.to_numeric(frame[sort_by], errors="coerce")
        if key.notna().any():
            frame = frame.assign(_key=key.abs() if by_abs else key)
            frame = frame.sort_values("_key", ascending=not descending, na_position="last", kind="stable")
            frame = frame.drop(columns="_key")
    total = len(frame)
    frame = frame.head(HTML_MAX_ROWS)
    integral = {c: _integral_column(frame[c]) for c in frame.columns}
    rows = []
    for record in frame.itertuples(index=False, name=None):
        rows.append([_cell(v, integral[c]) for c, v in zip(frame.columns, record)])
    if total > HTML_MAX_ROWS:
        note = (note + " " if note else "") + f"First {HTML_MAX_ROWS} of {total} rows; the CSV holds all."
    return TableView(table_id, name, caption, [str(c) for c in frame.columns], rows, total, source, note)


def _integral_column(series: pd.Series) -> bool:
    values = pd.to_numeric(series, errors="coerce").dropna()
    if values.empty or len(values) < series.notna().sum():
        return False
    return bool(((values % 1) == 0).all())


def _cell(value: Any, integral: bool) -> Cell:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell("", "", False)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        sort = repr(number) if math.isfinite(number) else ("1e308" if number > 0 else "-1e308")
        return Cell(format_number(value, integral), sort, True)
    return Cell(str(value), "", False)


@dataclass
class FigureView:
    caption: str
    path: Path  # the figure file itself
    md_name: str  # file name under the Markdown figure folder

    def data_uri(self) -> str:
        mime = _MIME.get(self.path.suffix.lower(), "application/octet-stream")
        return f"data:{mime};base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


@dataclass
class Fact:
    label: str
    value: str


@dataclass
class Finding:
    """One line at the top of the report: a measured number and where it comes from."""

    topic: str
    headline: str  # the sentence, with its number
    value: str  # the number alone, shown large
    anchor: str  # section id it links to
    details: list[str] = field(default_factory=list)


@dataclass
class NotMeasured:
    topic: str
    reason: str


@dataclass
class Section:
    id: str
    title: str
    command: str
    folder: str
    status: str
    what: str
    error: str = ""
    notes: list[str] = field(default_factory=list)
    figures: list[FigureView] = field(default_factory=list)
    extra_figures: list[FigureView] = field(default_factory=list)
    unembedded_figures: list[str] = field(default_factory=list)
    tables: list[TableView] = field(default_factory=list)
    other_tables: list[str] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def md_text(value: Any) -> str:
    """Escape text for Markdown prose and table cells: no markup, no line breaks, no pipes."""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    # inline markup: emphasis, code, links, raw HTML, table cells, strike-through. (Values are
    # never placed at the start of a line, so block markup such as '#' or '-' needs no escape.)
    text = re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)
    if text.strip() == "" and text:
        text = text.replace(" ", "\u2423")  # a cell of spaces would look empty: show them
    return text


def md_url(path: Any) -> str:
    """A relative path as a Markdown link target (spaces and parentheses percent-encoded)."""
    from urllib.parse import quote

    return quote(str(path), safe="/._-~")


def md_code(value: Any) -> str:
    """Inline code that survives any backticks inside."""
    text = str(value).replace("\n", " ")
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"

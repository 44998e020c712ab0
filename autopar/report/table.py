"""The report's table as data: a title, a header and rows of strings, with a note where rows are
missing or approximate. :mod:`autopar.report.tables` builds them; the HTML page and the terminal
rendering print them; a plan file stores the sharding table with :meth:`Table.to_dict`."""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.core.errors import ReportError


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"title": self.title, "header": self.header, "rows": self.rows, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        if not isinstance(d, dict) or not isinstance(d.get("rows", []), list):
            raise ReportError("plan field search.report_inputs.sharding must be an object with rows")
        return cls(
            str(d.get("title", "")),
            list(d.get("header", [])),
            [list(map(str, r)) for r in d.get("rows", [])],
            str(d.get("note", "")),
        )

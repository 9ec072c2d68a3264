"""Reports: result folders -> one self-contained HTML page and the same content as Markdown.

``build_report(dirs, out_dir)`` writes ``report.html`` / ``report.md``;
``diff_reports(a, b, out_dir)`` writes ``diff.html`` / ``diff.md`` comparing two runs.
"""

from .build import BuiltReport, build_report
from .diff import BuiltDiff, diff_reports

__all__ = ["build_report", "diff_reports", "BuiltReport", "BuiltDiff"]

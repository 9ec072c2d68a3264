"""The job adapters of ``report build`` and ``report diff`` (declared in llmprobe.catalog.report).

They write their pages themselves (``report.html``/``diff.html`` and figures), not a result
folder: a report is built *from* result folders, often into one.
"""

from __future__ import annotations


def build_job(job):
    from ..session import Result
    from .build import build_report

    o = job.options
    built = build_report([str(d) for d in o.dirs], o.into, title=o.title, max_extra_figures=o.max_extra_figures)
    return Result(data={"built": built})


def diff_job(job):
    from ..session import Result
    from .diff import diff_reports

    o = job.options
    labels = tuple(o.labels.split(",")) if o.labels else None
    built = diff_reports(o.a, o.b, o.into, labels=labels, title=o.title)
    return Result(data={"built": built})


def print_built(result, options, console) -> None:
    for line in result.data["built"].summary():
        console.print(line, soft_wrap=True, markup=False, highlight=False)

"""The docs' option tables, generated from the registry: ``python -m llmprobe.cli.docs > docs/options.md``.

A test checks that docs/options.md is what this prints, so the tables never drift from the
declarations.
"""

from __future__ import annotations

from .. import registry
from ..options import fields_in_panels, is_argument


def constraint_text(field) -> str:
    extra = field.json_schema_extra or {}
    parts = []
    low = extra.get("minimum", extra.get("exclusiveMinimum"))
    high = extra.get("maximum", extra.get("exclusiveMaximum"))
    if low is not None or high is not None:
        from ..core.specs import interval

        parts.append(interval(low, high, "exclusiveMinimum" in extra, "exclusiveMaximum" in extra))
    if "enum" in extra:
        parts.append(" \\| ".join(map(str, extra["enum"])))
    if extra.get("check") == "regex":
        parts.append("regex")
    if extra.get("check") in ("layers", "layers_or_all"):
        parts.append("layer list" + (" or all" if extra["check"] == "layers_or_all" else ""))
    return "; ".join(parts)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def options_markdown() -> str:
    lines = ["# Every command's options", "",
             "Generated from the declarations (`python -m llmprobe.cli.docs > docs/options.md`); the group pages",
             "explain what each analysis computes and what its columns mean.", ""]
    groups = registry.groups()
    for group in groups.values():
        lines += [f"## {group.name}", "", group.help, ""]
        for analysis in registry.analyses().values():
            if analysis.group != group.name:
                continue
            lines += [f"### `llmprobe {group.name} {analysis.command}`", "", analysis.help, "",
                      f"Python: `llmprobe.run(\"{analysis.name}\", ...)`", "",
                      "| option | Python name | default | allowed | panel | meaning |",
                      "|---|---|---|---|---|---|"]
            for name, field in fields_in_panels(analysis.options):
                extra = field.json_schema_extra
                if extra.get("hidden"):
                    continue
                flags = ", ".join(f"`{f}`" for f in extra["flags"])
                default = "required" if field.is_required() else f"`{field.default!r}`"
                panel = "argument" if is_argument(field) else extra["panel"]
                lines.append(f"| {flags} | `{name}` | {_cell(default)} | {_cell(constraint_text(field))} | {panel} "
                             f"| {_cell(field.description)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(options_markdown(), end="")

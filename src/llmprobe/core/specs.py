"""Small user-typed specifications parsed without torch: regexes, layer lists, ranges.

They are checked while a command's options are validated, before any model is loaded or any
output folder is touched, and they give the one wording every command uses.
"""

from __future__ import annotations

import re

from .errors import LLMProbeError


def compile_regex(regex: str | None, flag: str = "--filter") -> re.Pattern | None:
    """A user's pattern, or a one-line LLMProbeError naming what is wrong with it."""
    if regex is None or regex == "":
        return None
    try:
        return re.compile(regex)
    except re.error as exc:
        raise LLMProbeError(f"bad regex '{regex}' for {flag}: {exc}") from None


def parse_layers(spec: str | None, flag: str = "--layers") -> list[int] | None:
    """'0,5,10' / '0-3' / '0-3,8' -> sorted unique layer indices; None for no spec.

    A reversed range ('5-1'), a negative index or a stray word is refused: silently analysing
    every layer, or none, would be a misleading success.
    """
    if spec is None or spec.strip() == "":
        return None
    out: set[int] = set()
    usage = f"{flag} '{spec}' is not a list of layer indices like '0,5,10' or '0-3'"
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not match:
            raise LLMProbeError(usage)
        if match.group(3) is not None:
            out.add(int(match.group(3)))
            continue
        low, high = int(match.group(1)), int(match.group(2))
        if high < low:
            raise LLMProbeError(f"{flag} range '{part}' is reversed; write it low-high, e.g. '{high}-{low}'")
        out.update(range(low, high + 1))
    return sorted(out)


def check_layers_exist(layers: list[int] | None, num_layers: int, flag: str = "--layers") -> None:
    """Refuse indices the model does not have (it has layers 0 .. num_layers-1)."""
    if layers is None:
        return
    missing = [i for i in layers if i >= num_layers]
    if missing:
        raise LLMProbeError(f"{flag}: this model has layers 0-{num_layers - 1}; no layer {missing[0]}")


def interval(low=None, high=None, low_open=False, high_open=False) -> str:
    lo = "(-inf" if low is None else ("(" if low_open else "[") + str(low)
    hi = "inf)" if high is None else str(high) + (")" if high_open else "]")
    return f"{lo}, {hi}"


def check_range(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    """One wording for every out-of-range option: '--nsamples must be in [1, inf); got 0'."""
    if value is None:
        return
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        raise LLMProbeError(f"{name} must be in {interval(low, high, low_open, high_open)}; got {value}")


# The one name of the one kurtosis estimator used everywhere (weights and activations):
# m4 / m2² − 3 with population (biased) moments = scipy.stats.kurtosis(fisher=True, bias=True).
KURTOSIS_ESTIMATOR = "excess_fisher_biased"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(nm, flag: str = "--nm") -> tuple[int, int]:
    """'2:4' -> (2, 4): N of every M consecutive weights pruned; needs 0 < N < M."""
    if isinstance(nm, tuple):
        n, m = nm
    else:
        match = _NM.match(str(nm))
        if match is None:
            raise LLMProbeError(f"{flag} must look like N:M (e.g. 2:4); got {nm!r}")
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise LLMProbeError(f"{flag} {n}:{m}: need 0 < N < M (N of every M weights are pruned)")
    return n, m

from dataclasses import dataclass
@dataclass
class BuiltDiff: pass
def diff_reports(*a, **k): raise NotImplementedError

"""What a batch inference did, case by case, and the summary a person reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import CobotMedError


class CaseFailed(ValueError):
    """One case cannot be processed; the message is the reason reported (the run goes on)."""


@dataclasses.dataclass
class CaseOutcome:
    case_id: str
    image: str
    status: str  # "done", "skipped" (done before, by the same model) or "failed"
    reason: str = ""
    seconds: float = 0.0
    slices_sent: int = 0
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # organ -> why (drop_unusable_organs)
    note: str = ""  # an output asked for that this case cannot have (a DICOM-SEG of a NIfTI input)


@dataclasses.dataclass
class InferenceReport:
    output_dir: Path
    cases: list[CaseOutcome]
    ignored: list[tuple[str, str]]
    model: dict[str, Any]
    seconds: float = 0.0

    def _with(self, status: str) -> list[CaseOutcome]:
        return [c for c in self.cases if c.status == status]

    @property
    def done(self) -> list[CaseOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[CaseOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseOutcome]:
        return self._with("failed")

    @property
    def dropped(self) -> dict[str, dict[str, str]]:
        """Organs left out of the cases they were asked for (``drop_unusable_organs``), with the reasons."""
        return {c.case_id: dict(c.dropped) for c in self.cases if c.dropped}

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        lines = [f"cobot-med infer: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                 f"{len(self.failed)} failed, of {len(self.cases)} cases in {self.seconds:.1f} s -> {self.output_dir}"]
        if self.failed:
            lines.append("failed:")
            lines += [f"  {c.case_id}: {c.reason}" for c in self.failed]
        dropped = [c for c in self.cases if c.dropped]
        if dropped:
            count = sum(len(c.dropped) for c in dropped)
            lines.append(f"dropped (--drop_unusable_organs): {count} organ(s) in {len(dropped)} case(s), not segmented:")
            lines += [f"  {c.case_id}: {organ}: {why}" for c in dropped for organ, why in c.dropped.items()]
        noted = [c for c in self.cases if c.note]
        if noted:
            lines.append("notes:")
            lines += [f"  {c.case_id}: {c.note}" for c in noted]
        if self.ignored:
            lines.append("not cases (left alone):")
            lines += [f"  {name}: {why}" for name, why in self.ignored]
        return "\n".join(lines)


class InferenceFailed(CobotMedError, RuntimeError):
    """Raised after the whole run when any case failed (the summary, naming each, is already printed)."""

    exit_code = 1

    def __init__(self, report: InferenceReport) -> None:
        names = ", ".join(c.case_id for c in report.failed[:5]) + (" ..." if len(report.failed) > 5 else "")
        super().__init__(f"{len(report.failed)} of {len(report.cases)} cases failed ({names}); "
                         f"see {report.output_dir / 'summary.json'}")
        self.report = report

"""Judge each series (usable for classification or not, and why): split it into stacks
(:mod:`ctcovid.dicom.stacks`), choose the one to classify, and find the one series of a folder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.uid import UID

from ctcovid.config import IngestConfig
from ctcovid.dicom.scan import ScanReport, iter_files, scan_files
from ctcovid.dicom.stacks import (
    TOO_FEW_SLICES,
    choose_stack,
    judge_stack,
    order_slices,
    rule_key,
    slice_normal,
    split_stacks,
)
from ctcovid.dicom.syntaxes import LOSSY_TRANSFER_SYNTAXES
from ctcovid.dicom.types import CT_STORAGE_CLASSES, Instance, Series
from ctcovid.errors import InvalidInputError

__all__ = [
    "TOO_FEW_SLICES",
    "assess",
    "convertible",
    "load_series",
    "scan",
    "select_series",
    "slice_normal",
]

logger = logging.getLogger(__name__)


def _listed(items: Sequence[str], limit: int = 10) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _series_reason(series: Series) -> str:
    """Why the series as a whole cannot be classified, before it is split (``""`` if it may)."""
    if series.modality != "CT":
        return f"modality {series.modality or 'missing'} is not CT"
    classes = {inst.sop_class_uid for inst in series.instances}
    if not classes <= set(CT_STORAGE_CLASSES):
        return f"SOP class {', '.join(sorted(classes))} is not CT or Enhanced CT Image Storage"
    return ""


def assess(series: Series, config: IngestConfig) -> Series:
    """Split ``series`` into stacks, judge them, choose one and set the series' verdict, in place.

    ``series.slices`` are the chosen stack's slices in order; ``series.reason`` is ``""`` when it
    can be classified, else why not (naming the attribute). Localizers are dropped with a
    warning; stacks set aside and instances dropped for cause are named in the warnings.
    """
    uid = series.series_instance_uid
    name = f"Series {uid}"
    if series.duplicates:
        series.warnings.append(
            f"{name}: {series.duplicates} duplicate instance(s) (same SOPInstanceUID) counted once"
        )
    series.reason = _series_reason(series)
    if series.reason:
        if all(i.number_of_frames <= config.max_frames for i in series.instances):
            series.slices, series.ordering, _ = order_slices(series.instances, name)
        series.usable = False
        return series
    localizers = [i for i in series.instances if "LOCALIZER" in i.image_type]
    images = [i for i in series.instances if "LOCALIZER" not in i.image_type]
    if not images:
        series.reason = "ImageType is LOCALIZER (scout image)"
        series.usable = False
        return series
    if localizers:
        series.warnings.append(
            f"{name}: {len(localizers)} LOCALIZER image(s) dropped: "
            + _listed([i.sop_instance_uid for i in localizers])
        )
    series.stacks = [judge_stack(st, name, config) for st in split_stacks(images, config)]
    chosen = choose_stack(series.stacks, config)
    if chosen is None:  # nothing to classify: report the stack the rule would have taken
        best = min(series.stacks, key=lambda st: rule_key(st, config))
        series.stack, series.slices, series.ordering = best, best.slices, best.ordering
        if len(series.stacks) == 1:
            series.reason = best.reason
        else:
            series.reason = f"none of {len(series.stacks)} stacks is usable: " + "; ".join(
                f"({st.describe()}) {st.reason}" for st in series.stacks[:3]
            )
        series.usable = False
        return series
    series.stack, series.slices, series.ordering = chosen, chosen.slices, chosen.ordering
    series.reason = chosen.reason
    series.usable = not series.reason
    series.warnings.extend(chosen.warnings)
    lossy = sorted({i.transfer_syntax_uid for i in chosen.instances} & LOSSY_TRANSFER_SYNTAXES)
    if lossy:
        n_lossy = sum(i.transfer_syntax_uid in LOSSY_TRANSFER_SYNTAXES for i in chosen.instances)
        series.warnings.append(
            f"{name}: {n_lossy} of {len(chosen.instances)} instance(s) arrived in a lossy "
            f"transfer syntax ({', '.join(UID(u).name for u in lossy)}): the pixels may differ "
            "from the scanner's"
        )
    if chosen.dropped:
        series.warnings.append(
            f"{name}: {len(chosen.dropped)} instance(s) ({chosen.n_slices_dropped} slice(s)) "
            "dropped for cause: " + _listed(chosen.dropped)
        )
    others = [st for st in series.stacks if st is not chosen]
    if others:
        series.warnings.append(
            f"{name}: {len(series.stacks)} stacks; classified ({chosen.describe()}), "
            f"chosen by stack_rule {config.stack_rule!r}"
        )
        for st in others:
            why = st.reason or f"not chosen by stack_rule {config.stack_rule!r}"
            series.warnings.append(f"{name}: stack set aside ({st.describe()}): {why}")
    return series


def scan(
    source: Path | str | Sequence[Path],
    config: IngestConfig | None = None,
    *,
    on_instance: Callable[[Instance], None] | None = None,
    judge: bool = True,
) -> ScanReport:
    """Scan a file, a folder tree or a list of files: every series found, assessed (unless not
    ``judge``), and the skipped files.

    ``on_instance`` sees each instance as soon as its header is read (see :func:`scan_files`).
    """
    config = config or IngestConfig()
    if isinstance(source, str | Path):
        root = Path(source)
        if not root.exists():
            raise InvalidInputError(f"{root}: no such file or folder")
        source = list(iter_files(root))
    report = scan_files(list(source), on_instance)
    for series in report.series if judge else ():
        assess(series, config)
    return report


def convertible(series: Series) -> bool:
    """True when a series can be turned into slices (usable, or short of slices only)."""
    return series.usable or series.reason.startswith(TOO_FEW_SLICES)


def select_series(
    report: ScanReport, source: Path | str, *, for_classification: bool = True
) -> Series:
    """The one CT series of a folder to work on; an ``InvalidInputError`` naming the candidates.

    With ``for_classification=False`` a short CT series is accepted (preprocessing converts it).
    """
    accept = (lambda s: s.usable) if for_classification else convertible
    candidates = [s for s in report.series if accept(s)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        if not report.series:
            detail = f"{len(report.bad_files)} file(s) skipped" if report.bad_files else "empty"
            raise InvalidInputError(f"{source}: no DICOM series found ({detail})")
        reasons = "; ".join(
            f"{s.series_instance_uid} ({s.modality}, {s.n_instances} instances): {s.reason}"
            for s in report.series
        )
        raise InvalidInputError(f"{source}: no usable CT series. Found: {reasons}")
    names = ", ".join(
        f"{s.series_instance_uid} ({s.n_slices} slices, {s.series_description or 'no description'})"
        for s in candidates
    )
    raise InvalidInputError(
        f"{source}: {len(candidates)} usable CT series, pass one series folder: {names}"
    )


def load_series(
    source: Path | str | Sequence[Path],
    config: IngestConfig | None = None,
    *,
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    known_duplicates: int = 0,
    for_classification: bool = True,
    on_instance: Callable[[Instance], None] | None = None,
) -> Series:
    """Find one series and judge it: the one finder of classify, the node, batch and training.

    ``source`` is a file or folder tree, or a list of files. With ``series_instance_uid`` the
    series of that UID is returned, usable or not (and only if its StudyInstanceUID is
    ``study_instance_uid``, when given); without it, the one usable CT series (see
    :func:`select_series`). Files that could not be read are named in the series' warnings;
    ``known_duplicates`` adds duplicates left out before the files were listed (batch re-reads
    only the unique files it indexed). ``on_instance`` as in :func:`scan`.

    Raises
    ------
    InvalidInputError
        When ``source`` does not exist, the series asked for is not among its files, or (with
        no UID) there is not exactly one usable CT series.
    """
    config = config or IngestConfig()
    report = scan(source, config, on_instance=on_instance, judge=series_instance_uid is None)
    if series_instance_uid is None:
        where = source if isinstance(source, str | Path) else f"{report.n_files} file(s)"
        series = select_series(report, where, for_classification=for_classification)
    else:
        found = [
            s
            for s in report.series
            if s.series_instance_uid == series_instance_uid
            and study_instance_uid in (None, s.study_instance_uid)
        ]
        if not found:
            unreadable = "".join(f"; skipped {b.path}: {b.reason}" for b in report.bad_files[:3])
            raise InvalidInputError(
                f"Series {series_instance_uid}: none of the {report.n_files} file(s) read belong "
                f"to it{unreadable}"
            )
        series = found[0]
        series.duplicates += known_duplicates
        assess(series, config)
    for bad in report.bad_files:
        series.warnings.append(f"skipped {bad.path}: {bad.reason}")
    return series

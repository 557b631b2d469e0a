"""``ctcovid evaluate DATA_DIR --model MODEL``: scan-level F1, confusion matrix, ROC AUC."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import (
    RUNTIME_HELP,
    ModelOption,
    Runtime,
    console,
    fail,
    handle_errors,
    print_json,
    quiet_keras,
    setup_logging,
    stdout,
)
from ctcovid.cli.train import Layout


class EvalSplit(StrEnum):
    auto = "auto"
    all = "all"
    train = "train"
    val = "val"
    test = "test"


@handle_errors
def evaluate(
    data_dir: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Labelled (or test) scans.")
    ],
    model: ModelOption = None,
    layout: Annotated[
        Layout, typer.Option(help="Data layout (auto: JPG slices -> cov19-ct-db, else dicom).")
    ] = Layout.auto,
    split: Annotated[
        EvalSplit,
        typer.Option(
            help="Which folder of a train/val/test layout (auto: val, or test with "
            "--predict-only; all scans when the data has no such folders)."
        ),
    ] = EvalSplit.auto,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Write scan,label,probability_covid,predicted per scan to this CSV."),
    ] = None,
    predict_only: Annotated[
        bool, typer.Option(help="Unlabelled scans: predict only (no metrics); see --out-dir.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(help="With --predict-only: write covid.csv and non-covid.csv here."),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Slice cache folder. Default: $XDG_CACHE_HOME/ctcovid/slices."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per model batch.")] = 32,
    runtime: Annotated[
        Runtime,
        typer.Option(help=RUNTIME_HELP),
    ] = Runtime.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary only.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Evaluate a model at scan level: F1 per class, macro F1, confusion matrix, ROC AUC.

    A scan's probability is the mean of its slice probabilities; the model's stored threshold
    decides its label. With --predict-only, unlabelled scans (the COV19-CT-DB test folder) are
    scored and, with --out-dir, listed in covid.csv / non-covid.csv.

    Examples:

      ctcovid evaluate COV19-CT-DB/ --model models/resdense --predictions val_predictions.csv

      ctcovid evaluate labelled_dicom/ --model models/site --split all --json

      ctcovid evaluate COV19-CT-DB/test --model models/resdense --predict-only --out-dir submission/
    """
    setup_logging(verbose)
    quiet_keras()
    from ctcovid.errors import ModelError
    from ctcovid.model.artifact import default_model_path, missing_model_message
    from ctcovid.training.evaluate import Evaluation
    from ctcovid.training.evaluate import evaluate as run_evaluation
    from ctcovid.training.progress import NullProgress, Progress, console_progress

    if out_dir is not None and not predict_only:
        raise fail("--out-dir writes the challenge files and needs --predict-only")
    model_path = model or default_model_path()
    if not model_path.exists():
        raise ModelError(missing_model_message(model_path))

    from ctcovid.inference import Classifier

    classifier = Classifier.from_file(model_path, batch_size=batch_size, runtime=runtime.value)

    def run(progress: Progress) -> Evaluation:
        return run_evaluation(
            data_dir,
            model_path,
            classifier=classifier,
            layout=layout.value,
            split=split.value,
            predict_only=predict_only,
            cache_dir=cache,
            batch_size=batch_size,
            progress=progress,
        )

    if json_out:
        result = run(NullProgress())
    else:
        with console_progress(console) as progress:
            result = run(progress)
    summary = result.summary()
    if predictions is not None:
        result.write_predictions(predictions)
        summary["predictions"] = str(predictions)
    if out_dir is not None:
        summary["challenge_files"] = {
            k: str(v) for k, v in result.write_challenge_files(out_dir).items()
        }
    if json_out:
        print_json(summary)
        return
    _print_human(summary)


def _print_human(s: dict) -> None:
    stdout.print(
        f"{s['data']} ({s['layout']}, split {s['split']}): {s['n_scans']} scans, "
        f"model {s['model']['name']} {s['model']['version']}, threshold {s['threshold']:.3f}",
        highlight=False,
    )
    if "macro_f1" in s:
        auc = f"{s['roc_auc']:.4f}" if s["roc_auc"] is not None else "n/a (one class)"
        (tn, fp), (fn, tp) = s["confusion"]
        stdout.print(
            f"  F1 covid      {s['f1_covid'] * 100:6.2f}\n"
            f"  F1 non-covid  {s['f1_non_covid'] * 100:6.2f}\n"
            f"  macro F1      {s['macro_f1'] * 100:6.2f}\n"
            f"  ROC AUC       {auc}\n"
            f"  confusion (rows true, columns predicted: non-covid, covid)\n"
            f"    non-covid   {tn:5d} {fp:5d}\n"
            f"    covid       {fn:5d} {tp:5d}",
            highlight=False,
        )
    else:
        stdout.print(
            f"  predicted covid {s['n_predicted_covid']}, non-covid {s['n_predicted_non_covid']}",
            highlight=False,
        )
    for key in ("predictions",):
        if key in s:
            stdout.print(f"predictions written to {s[key]}", highlight=False)
    for cls, path in s.get("challenge_files", {}).items():
        stdout.print(f"{cls} scans listed in {path}", highlight=False)
    if s["skipped"]:
        stdout.print(f"{len(s['skipped'])} scan(s) skipped:", highlight=False)
        for item in s["skipped"]:
            stdout.print(f"  {item['scan']}: {item['reason']}", highlight=False)
    if s["scan_warnings"]:
        stdout.print(f"{len(s['scan_warnings'])} scan(s) with warnings:", highlight=False)
        for scan, warnings in s["scan_warnings"].items():
            stdout.print(f"  {scan}: {'; '.join(warnings)}", highlight=False)

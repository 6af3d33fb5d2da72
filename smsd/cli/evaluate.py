"""``smsd evaluate``: a fine-tuned model scored on a labeled folder, with the metrics
clinicians ask for (docs/evaluate.md)."""

from __future__ import annotations

import argparse
import sys

from ..errors import SmsdError
from .common import (
    add_command,
    add_loader_arg,
    add_progress_arg,
    check_output_dir,
    check_output_file,
)

__all__ = ["add_evaluate"]


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "evaluate", help="score a fine-tuned model on a labeled folder: "
                    "per-class precision/recall, balanced accuracy, confusion matrix, and "
                    "for two classes sensitivity, specificity and ROC-AUC", examples="""
  smsd evaluate --model model.safetensors --data test/
  smsd evaluate --model model.safetensors --data test/ --json eval.json --plots eval-plots
  smsd evaluate --model model.safetensors --data test/ --positive malignant --json - | jq""")
    p.add_argument("--model", required=True, help="classifier file from smsd finetune")
    p.add_argument("--data", required=True, help="labeled image folder (ROOT/<class>/<image>); "
                   "a class of the model may be missing, an unknown class is an error")
    p.add_argument("--positive", metavar="CLASS", default=None,
                   help="two-class models: the class that sensitivity, PPV and ROC-AUC look "
                   "for (default: the second class in sorted order)")
    # dests with an underscore: the error printer turns a dest followed by ": " into its
    # flag, and "json" would match inside a file name such as eval.json.
    p.add_argument("--json", metavar="FILE", default=None, dest="json_file",
                   help="also write every number as JSON to FILE (replaced atomically); "
                   "'-': JSON on stdout, the table on stderr")
    p.add_argument("--plots", metavar="DIR", default=None, dest="plots_dir",
                   help="write confusion_matrix.png and, for two classes, roc_curve.png "
                   "into DIR (created; needs matplotlib)")
    p.add_argument("--knn", metavar="DIR", default=None, dest="knn_dir",
                   help="also probe the model's body on frozen CLS features: DINO's weighted "
                   "k-NN (cosine, k = 20, T = 0.07) with the labeled folder DIR (e.g. the "
                   "client's training images) as the reference set, scored on --data")
    p.add_argument("--linear", action="store_true",
                   help="with --knn: also a linear probe (logistic regression) trained on DIR")
    add_loader_arg(p)
    add_progress_arg(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..extras import require

    # Everything that can fail without reading an image fails first.
    require("data", "sklearn", purpose="smsd evaluate")
    if args.plots_dir is not None:
        require("data", "matplotlib", purpose="--plots")
        check_output_dir(args.plots_dir, "--plots")
    if args.linear and args.knn_dir is None:
        raise SmsdError("--linear needs --knn DIR (the images the probe trains on)")
    if args.knn_dir is not None:
        from ..data.source import ImageSource

        ImageSource.from_folder(args.knn_dir)  # a bad folder fails before any work
    json_to_stdout = args.json_file == "-"
    if args.json_file is not None and not json_to_stdout:
        check_output_file(args.json_file, "--json", force=True)  # cheap to redo: replaced

    from ..protocol.clinical_report import (
        ROC_PNG,
        format_report,
        json_text,
        write_json,
        write_plots,
    )
    from ..protocol.evaluate import evaluate_model_file

    result = evaluate_model_file(args.model, args.data, loader=args.loader,
                                 positive=args.positive, progress=not args.no_progress)
    report = sys.stderr if json_to_stdout else sys.stdout
    print(format_report(result, title=f"{args.model} on {args.data}: {result.images} images, "
                        f"{len(result.classes)} classes"), file=report)
    context = {"model": str(args.model), "data": str(args.data)}
    if args.knn_dir is not None:
        from ..protocol.evaluate import probe_model_file

        probes = probe_model_file(args.model, args.knn_dir, args.data, linear=args.linear,
                                  loader=args.loader, progress=not args.no_progress)
        context["probes"] = {"reference": str(args.knn_dir), **probes}
        line = (f"\nbody probes (frozen CLS features, reference {args.knn_dir}: "
                f"{probes['reference_images']} images): k-NN {probes['knn']['accuracy']:.2f} %")
        if "linear" in probes:
            line += f", linear {probes['linear']['accuracy']:.2f} %"
        print(line, file=report)
    written = []
    if json_to_stdout:
        sys.stdout.write(json_text(result, **context))
    elif args.json_file is not None:
        written.append(write_json(args.json_file, result, **context))
    if args.plots_dir is not None:
        written += write_plots(result, args.plots_dir)
        if result.binary is not None and result.binary.roc is None:
            print(f"\nno {ROC_PNG}: {result.binary.note}", file=report)
    if written:
        print(f"\nwrote {', '.join(map(str, written))}", file=report)
    return 0

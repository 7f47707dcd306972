"""The `ltk` command's front end: it parses the command line without importing torch (so `ltk --help` and
`ltk --version` answer at once), then hands the parsed command to ltkernels.models.cli, which does the work.
The commands and their options are declared here, once."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = "`ltk`: the command line of ltkernels' detectors."


def _add_trust(p):
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling (one written by an older version of "
                        "ltkernels, or by another tool): this can run code from the file, so use it only for "
                        "files whose origin you trust")


def _add_train(sub):
    p = sub.add_parser("train", help="train a detector (single process or under torchrun)")
    p.add_argument("--config", default="two_stage_softmax",
                   help="a named config (see `ltk configs`) or a JSON file with the same layout")
    p.add_argument("--ann", required=True, help="training annotations (LVIS v0.5/v1 JSON)")
    p.add_argument("--images", required=True, help="image root of the training annotations")
    p.add_argument("--val-ann", help="validation annotations: evaluated at the end")
    p.add_argument("--val-images", help="image root of the validation set (default: --images)")
    p.add_argument("--out", required=True, help="the run folder (checkpoints, config.json, train.log, "
                                                "metrics.jsonl, tb/; see the README)")
    p.add_argument("--base", help="checkpoint of a trained baseline (the BAGS / SimCal second stage)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="resume exactly: from CKPT, or without a path from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run (its "
                                                                 "checkpoints and logs are deleted)")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--batch-size", type=int, help="images per process and iteration")
    p.add_argument("--lr", type=float)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    p.add_argument("--pretrained-backbone", help="path to an ImageNet resnet50 state_dict")
    _add_trust(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.efl_scale=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltk", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ltk {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train and evaluate softmax, BAGS, SimCal, focal and EFL on synthetic data")
    p.add_argument("--out", default="ltk_demo")
    p.add_argument("--quick", action="store_true", help="a short schedule (about 3 minutes on 2 CPU cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write the synthetic long-tail set in LVIS v1 format")
    s.add_argument("--out", required=True)
    s.add_argument("--num-classes", type=int, default=40)
    s.add_argument("--train-images", type=int, default=900)
    s.add_argument("--val-images", type=int, default=200)
    s.add_argument("--image-size", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    _add_train(sub)
    e = sub.add_parser("eval", help="evaluate a checkpoint with the LVIS API (or faster-coco-eval)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--ann", required=True)
    e.add_argument("--images", required=True)
    e.add_argument("--out")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--eval-backend", default="lvis", choices=["lvis", "faster-coco-eval"],
                   help="the official lvis evaluator, or faster-coco-eval's LVIS mode (same metrics, ~3x faster)")
    _add_trust(e)
    sub.add_parser("bench", help="kernel benchmarks (arguments are forwarded: ltk bench --help)")
    sub.add_parser("configs", help="list the named configs")
    st = sub.add_parser("study", help="measured comparisons over seeds").add_subparsers(dest="study", required=True)
    for name, text, methods in (
            ("efl", "focal loss vs EFL and QFL vs EQFL on the improved one-stage baseline (ATSS)",
             ["focal", "efl", "qfl", "eqfl"]),
            ("losses", "the softmax two-stage baseline vs Seesaw, EQL v2 and the federated loss (Faster R-CNN)",
             ["softmax", "seesaw", "eqlv2", "federated"])):
        se = st.add_parser(name, help=f"{text}, on the synthetic long-tail set, mean +- std over seeds")
        se.add_argument("--out", default="ltk_study")
        se.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        se.add_argument("--max-iter", type=int, help="iterations per run (default 1200)")
        se.add_argument("--methods", nargs="+", choices=methods)
        se.add_argument("--quick", action="store_true", help="a smoke run (a few iterations, a small val set)")
        se.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        se.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
        se.add_argument("--reuse", action="store_true",
                        help="keep the runs in --out that finished with the same config (add seeds, finish a study)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # forwarded untouched to the benchmark suite
        from ltkernels.models.cli import bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)  # --help, --version and usage errors end here, before torch loads
    from ltkernels.models.cli import run

    return run(args)


def _version() -> str:
    """The installed distribution's version, without importing torch (`ltk --version` answers at once)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ltkernels")
    except PackageNotFoundError:
        return "unknown (not installed)"

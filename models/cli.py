"""`ltk`: the command line of ltkernels' detectors.

  ltk demo [--out DIR] [--quick] [--device auto|cpu|cuda]       the main job (synthetic long-tail benchmark)
  ltk data synth --out DIR [--num-classes N] [--seed S] ...       write the synthetic LVIS-format set
  ltk train --config NAME|FILE.json --ann TRAIN.json --images DIR [--val-ann VAL.json] --out DIR
            [--base CKPT] [--resume CKPT] [--max-iter N] [--batch-size B] [--lr LR] [--set key=value ...]
  ltk eval --checkpoint CKPT --ann VAL.json --images DIR [--out DIR]
  ltk bench [...]                                                 the kernel benchmarks
  ltk configs                                                     list the named configs
  ltk study efl [--out DIR] [--seeds 0 1 2] [--max-iter N]        focal vs EFL, QFL vs EQFL on ATSS, over seeds

`ltk train` runs under torchrun as well: `torchrun --nproc_per_node=8 -m ltkernels.models.cli train ...`."""
from __future__ import annotations

import argparse
import json
import sys


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


def cmd_train(args) -> int:
    from .configs import get_config, set_value
    from .engine import distributed as du
    from .engine.trainer import train

    cfg = get_config(args.config)
    for flag, key in (("max_iter", "solver.max_iter"), ("batch_size", "solver.batch_size"), ("lr", "solver.lr"),
                      ("ckpt_every", "train.ckpt_every"), ("seed", "train.seed"), ("workers", "train.workers"),
                      ("pretrained_backbone", "model.pretrained_backbone")):
        value = getattr(args, flag)
        if value is not None:
            set_value(cfg, key, json.dumps(value))
    for item in args.set:
        key, _, value = item.partition("=")
        set_value(cfg, key, value)
    if args.no_eval:
        cfg["train"]["eval"] = False
    res = train(cfg, args.ann, args.images, args.out, val_ann=args.val_ann, val_images=args.val_images,
                resume=args.resume, base=args.base, device=args.device, trust_checkpoint=args.trust_checkpoint,
                overwrite=args.overwrite)
    if du.is_main():
        print(f"checkpoint: {res['checkpoint']}  ({res['train_time']:.0f}s training)")
        if res["metrics"]:
            _print_metrics(res["metrics"])
    du.cleanup()
    return 0


def cmd_eval(args) -> int:
    import torch

    from .engine.checkpoint import check_keys, load_checkpoint
    from .engine.trainer import build_from_checkpoint, evaluate

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    ckpt = check_keys(load_checkpoint(args.checkpoint, trust=args.trust_checkpoint), args.checkpoint, "model")
    model = build_from_checkpoint(ckpt, device, source=args.checkpoint)
    metrics = evaluate(model, args.ann, args.images, ckpt["config"]["data"], device, out_dir=args.out,
                       batch_size=args.batch_size, backend=args.eval_backend,
                       category_ids=ckpt["meta"].get("category_ids"))
    _print_metrics(metrics)
    return 0


def cmd_demo(args) -> int:
    from .engine.demo import run_demo

    run_demo(args.out, quick=args.quick, device=args.device, threads=args.threads)
    return 0


def cmd_study(args) -> int:
    from .engine.study import run_study

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_study(args.out, seeds=args.seeds, quick=args.quick, max_iter=args.max_iter, methods=args.methods,
              device=args.device)
    return 0


def cmd_data(args) -> int:
    from .data.synthetic import write_synthetic_lvis

    info = write_synthetic_lvis(args.out, num_classes=args.num_classes, num_train_images=args.train_images,
                                num_val_images=args.val_images, image_size=(args.image_size, args.image_size),
                                seed=args.seed)
    print(json.dumps({k: v for k, v in info.items()}, indent=1, default=str))
    return 0


def cmd_configs(args) -> int:
    from .configs import CONFIGS

    for name in sorted(CONFIGS):
        c = CONFIGS[name]
        print(f"{name:<32} {c['model'].get('type', 'two_stage'):<10} {c['model']['backbone']:<9} "
              f"cls_loss={c['model'].get('cls_loss')} stage={c['train']['stage']} max_iter={c['solver']['max_iter']}")
    return 0


def _print_metrics(m: dict) -> None:
    from .engine.trainer import format_metrics

    print(format_metrics(m))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # forwarded untouched to the benchmark suite
        try:
            from .benchmarking import main as bench_main
        except ImportError:  # development tooling: not in the wheel
            print("ltk bench: the benchmarks run from a checkout of the ltkernels repository (they are not part of "
                  "the installed package): `pip install --no-build-isolation -e <checkout>` and run it there",
                  file=sys.stderr)
            return 2
        return bench_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="ltk", description=__doc__.split("\n\n")[0])
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
    se = st.add_parser("efl", help="focal loss vs EFL and QFL vs EQFL on the improved one-stage baseline (ATSS), "
                                   "on the synthetic long-tail set, mean +- std over seeds")
    se.add_argument("--out", default="ltk_study")
    se.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    se.add_argument("--max-iter", type=int, help="iterations per run (default 1200)")
    se.add_argument("--methods", nargs="+", choices=["focal", "efl", "qfl", "eqfl"])
    se.add_argument("--quick", action="store_true", help="a smoke run (a few iterations, a small val set)")
    se.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    se.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    handler = {"demo": cmd_demo, "data": cmd_data, "train": cmd_train, "eval": cmd_eval, "configs": cmd_configs,
               "study": cmd_study}
    try:
        return handler[args.command](args)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] not in _MODELS_EXTRA:
            raise
        print(f"ltk {args.command}: error: this command needs the Python package '{err.name.split('.')[0]}' "
              "of the `models` extra: pip install 'ltkernels[models]' (or the package alone)", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"ltk {args.command}: error: {err}", file=sys.stderr)
        return 2


# The import names of the `models` extra (pyproject.toml): the detectors, data, evaluation and training need them.
_MODELS_EXTRA = {"torchvision", "tqdm", "lvis", "pycocotools", "faster_coco_eval", "matplotlib", "PIL", "tensorboard"}


def _is_user_error(err: Exception) -> bool:
    """Errors in what the user gave (files, values): one line and exit status 2 instead of a traceback."""
    from .configs import ConfigError
    from .data.lvis import LVISFormatError
    from .engine.checkpoint import CheckpointError
    from .engine.run import RunFolderError
    from .engine.trainer import DatasetError

    return isinstance(err, (CheckpointError, ConfigError, LVISFormatError, RunFolderError, DatasetError))


def _version() -> str:
    """The installed distribution's version, without importing torch (`ltk --version` answers at once)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ltkernels")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())

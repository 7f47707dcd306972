"""`ltk`: the command line of ltkernels' detectors.

  ltk demo [--out DIR] [--quick] [--device auto|cpu|cuda]       the main job (synthetic long-tail benchmark)
  ltk data synth --out DIR [--num-classes N] [--seed S] ...       write the synthetic LVIS-format set
  ltk train --config NAME|FILE.json --ann TRAIN.json --images DIR [--val-ann VAL.json] --out DIR
            [--base CKPT] [--resume CKPT] [--max-iter N] [--batch-size B] [--lr LR] [--set key=value ...]
  ltk eval --checkpoint CKPT --ann VAL.json --images DIR [--out DIR]
  ltk bench [...]                                                 the kernel benchmarks
  ltk configs                                                     list the named configs
  ltk study efl [--out DIR] [--seeds 0 1 2] [--max-iter N]        focal vs EFL, QFL vs EQFL on ATSS, over seeds
  ltk study losses [--out DIR] [--seeds 0 1 2] [--max-iter N]     softmax vs Seesaw, EQL v2, federated (two-stage)

`ltk train` runs under torchrun as well: `torchrun --nproc_per_node=8 -m ltkernels.models.cli train ...`."""
from __future__ import annotations

import json
import sys


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
              device=args.device, study=args.study, reuse=args.reuse)
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


def bench(argv) -> int:
    """`ltk bench ARGS`: the benchmark suite of a checkout."""
    try:
        from .benchmarking import main as bench_main
    except ImportError:  # development tooling: not in the wheel
        print("ltk bench: the benchmarks run from a checkout of the ltkernels repository (they are not part of "
              "the installed package): `pip install --no-build-isolation -e <checkout>` and run it there",
              file=sys.stderr)
        return 2
    return bench_main(argv) or 0


def run(args) -> int:
    """Runs a command parsed by ltkernels_cli.build_parser(); user errors end in one line and exit status 2."""
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


def main(argv=None) -> int:
    """`python -m ltkernels.models.cli ...` (torchrun uses it): the same command line as `ltk`."""
    from ltkernels_cli import main as front_end

    return front_end(argv)


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


if __name__ == "__main__":
    sys.exit(main())

"""The training module's command line: `python -m training <command> ...`.

    train           train a model on N workers (DDP or parameter averaging) -> checkpoint
    compress        distill / prune / quantize a checkpoint, with before/after measurements
    publish         the next version in the model repository, behind an accuracy gate
    evaluate        accuracy of a checkpoint, or of a version folder as Triton runs it
    pipeline-check  the MLP split across two processes against the unsplit model
    bench-workers   training samples/s of 1 vs 2 workers, written to training/results/

Exit status: 0 done, 1 failed, 2 bad arguments, 3 refused by the accuracy gate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

from training.specs import MODELS, UsageError, seed_refusal

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS = Path("runs")
SPLIT_SEED_HELP = "the data split to measure on (default: the one the checkpoint was trained on; another is refused)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse puts the option's name before the refusal, as `check_seed` does: one line either way."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(seed_refusal(text)) from None
    refusal = seed_refusal(value)
    if refusal is not None:
        raise argparse.ArgumentTypeError(refusal)
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _sparsity(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _margin(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"margin is a share of accuracy in [0, 1] (0.01 = 1 point), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    models = sorted(MODELS)

    def add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--model", required=required, choices=models, default=None if required else "digits_cnn")

    p = sub.add_parser("train", help="train a model on N workers", description=_doc("training.distributed"))
    add_model(p)
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1); under torchrun leave it out")
    p.add_argument("--mode", choices=["ddp", "average"], default="ddp", help="gradient all-reduce (ddp) or parameter averaging")
    p.add_argument("--average-every", type=_positive_int, metavar="K", help="steps between parameter averages (--mode average; default 8)")
    p.add_argument("--epochs", type=_positive_int, help="default: the model's recipe")
    p.add_argument("--batch-size", type=_positive_int, help="global batch, split across workers; default: recipe")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many steps")
    p.add_argument("--seed", type=_seed, default=0, help="data split, initial weights and batch order (default 0)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads per worker (default 1: fastest here)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA (NCCL) when there is a GPU for each worker, else CPU (gloo)")
    p.add_argument("--channels", help="digits_cnn: conv channels, e.g. 8,16 (default 16,32)")
    p.add_argument("--hidden", type=_positive_int, help="hidden units (default: the served model's)")
    p.add_argument("--out", type=Path, help="checkpoint path (default runs/<model>-<time>.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("compress", help="distill, prune and/or quantize a checkpoint", description=_doc("training.compress"))
    add_model(p)
    p.add_argument("--from", dest="source", type=Path, required=True, help="a checkpoint (train's --out, or a version's model.pt)")
    p.add_argument("--prune", type=_sparsity, metavar="SPARSITY", help="share of Conv/Linear weights set to zero, in [0, 1)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune with the pruning masks in place (default 0)")
    p.add_argument("--quantize", nargs="?", const="dynamic", choices=["dynamic", "weight-only"], help="int8: dynamic (Linear layers, default) or weight-only (all layers)")
    p.add_argument("--distill", action="store_true", help="train a smaller student from this checkpoint as teacher")
    p.add_argument("--student-channels", help="digits_cnn student's conv channels (default 4,8)")
    p.add_argument("--student-hidden", type=_positive_int, help="student's hidden units (default 16 for digits_cnn, 8 for breast_cancer_mlp)")
    p.add_argument("--temperature", type=float, help="distillation temperature (default 2)")
    p.add_argument("--alpha", type=float, help="weight of the soft-target loss (default 0.9)")
    p.add_argument("--distill-epochs", type=_positive_int, help="default: the model's recipe")
    p.add_argument("--no-baseline", action="store_true", help="skip training the student without the teacher")
    p.add_argument("--student-seed", type=_seed, help="the student's initial weights and batch order (default: the split's seed)")
    p.add_argument("--seed", type=_seed, help=SPLIT_SEED_HELP)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1: fastest for these models)")
    p.add_argument("--out", type=Path, help="default: next to --from, named after the steps")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("publish", help="publish a checkpoint as the next version", description=_doc("training.publish"))
    add_model(p)
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--margin", type=_margin, default=0.01, help="largest accuracy drop vs the stable version (default 0.01 = 1 point)")
    p.add_argument("--force", action="store_true", help="publish even if the accuracy gate refuses")
    p.add_argument("--canary-config", type=Path, help="rollout config (TOML) to write a canary entry into")
    p.add_argument("--canary-share", type=_share, help="share of requests for the canary (default 0.1)")
    p.add_argument("--seed", type=_seed, help=SPLIT_SEED_HELP)

    p = sub.add_parser("evaluate", help="test accuracy of a checkpoint or of a published version")
    add_model(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="source", type=Path)
    g.add_argument("--version", type=_positive_int, help="a version folder, run through its own model.py")
    p.add_argument("--repository", type=Path, help="where --version's folder is (default: this project's model_repository)")
    p.add_argument("--seed", type=_seed, help=SPLIT_SEED_HELP)

    p = sub.add_parser("pipeline-check", help="the MLP split across two processes vs the whole", description=_doc("training.pipeline"))
    p.add_argument("--from", dest="source", type=Path, help="breast_cancer_mlp checkpoint (default: the served version 1)")
    p.add_argument("--micro-batch", type=_positive_int, default=16)
    p.add_argument("--train-steps", type=_positive_int, default=5)

    p = sub.add_parser("bench-workers", help="samples/s of 1 vs 2 workers", description=_doc("training.bench"))
    add_model(p, required=False)
    p.add_argument("--epochs", type=_positive_int, default=5)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--average-every", type=_positive_int, default=8)
    p.add_argument("--batch-size", type=_positive_int, help="global batch (default: the recipe's)")
    p.add_argument("--out", type=Path, help="default training/results/<date>-workers-<model>[-b<batch>].md")
    return parser


def _doc(module: str) -> str:
    import importlib

    return importlib.import_module(module).__doc__ or ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    command = {"train": cmd_train, "compress": cmd_compress, "publish": cmd_publish, "evaluate": cmd_evaluate,
               "pipeline-check": cmd_pipeline_check, "bench-workers": cmd_bench}[args.command]  # fmt: skip
    from training.publish import GateRefused

    try:
        return command(args)
    except UsageError as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GateRefused as exc:
        print(f"python -m training publish: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_train(args: argparse.Namespace) -> int:
    from training.distributed import TrainConfig, launched_by_torchrun, save, train
    from training.progress import table
    from training.specs import MODELS, check_output_file, parse_ints

    if args.average_every is not None and args.mode != "average":
        raise UsageError(f"--average-every applies to --mode average only (--mode is {args.mode})")
    arch = dict(MODELS[args.model].default_config)
    if args.channels:
        if args.model != "digits_cnn":
            raise UsageError("--channels applies to digits_cnn only")
        arch["channels"] = parse_ints(args.channels, "--channels", 2)
    if args.hidden:
        arch["hidden"] = args.hidden
    cfg = TrainConfig(
        args.model, workers=args.workers, mode=args.mode, average_every=args.average_every or 8, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, max_steps=args.max_steps,
        threads=args.threads, device=args.device, arch_config=arch, progress=not args.quiet,
    )  # fmt: skip
    out = args.out or RUNS / f"{args.model}-{_stamp()}.pt"
    check_output_file(out)  # before training, not after it
    result = train(cfg)
    if result is None:  # a torchrun worker other than rank 0
        return 0
    save(result, out)
    c, m = result.config, result.metrics
    workers = str(c.workers)
    if c.workers > 1:
        workers += f" ({c.mode}{f', every {c.average_every}' if c.mode == 'average' else ''})"
    backend = "nccl" if c.use_cuda() else "gloo"
    print(table(
        ["model", "workers", "backend", "epochs", "steps", "batch", "samples/s", "train s", "val acc", "test acc", "checkpoint"],
        [[c.model, workers, backend if c.workers > 1 or launched_by_torchrun() else ("cuda" if c.use_cuda() else "cpu"),
          int(m["epochs"]), int(m["steps"]), c.batch_size, f"{m['samples_per_s']:,.0f}", f"{m['train_seconds']:.1f}",
          f"{m['val_accuracy']:.4f}", f"{m['test_accuracy']:.4f}", str(out)]],
    ))  # fmt: skip
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from training.compress import STAGE_HEADERS, DistillConfig, compress, save, stage_rows
    from training.progress import table
    from training.specs import MODELS, check_output_file, parse_ints

    torch.set_num_threads(args.threads)

    distill = None
    distill_only = [name for name, given in (
        ("--student-channels", args.student_channels is not None), ("--student-hidden", args.student_hidden is not None),
        ("--student-seed", args.student_seed is not None), ("--temperature", args.temperature is not None),
        ("--alpha", args.alpha is not None), ("--distill-epochs", args.distill_epochs is not None),
        ("--no-baseline", args.no_baseline)) if given]  # fmt: skip
    if distill_only and not args.distill:
        raise UsageError(f"{', '.join(distill_only)} {'needs' if len(distill_only) == 1 else 'need'} --distill")
    if args.distill:
        student = dict(MODELS[args.model].default_config)
        if args.model == "digits_cnn":
            student["channels"] = parse_ints(args.student_channels or "4,8", "--student-channels", 2)
            student["hidden"] = args.student_hidden or 16
        else:
            if args.student_channels:
                raise UsageError("--student-channels applies to digits_cnn only")
            student["hidden"] = args.student_hidden or 8
        distill = DistillConfig(student, temperature=2.0 if args.temperature is None else args.temperature,
                                alpha=0.9 if args.alpha is None else args.alpha, epochs=args.distill_epochs,
                                compare_baseline=not args.no_baseline, seed=args.student_seed)  # fmt: skip
    if args.finetune_epochs is not None and args.prune is None:
        raise UsageError("--finetune-epochs needs --prune")
    args.finetune_epochs = args.finetune_epochs or 0
    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs must not be negative, got {args.finetune_epochs}")
    steps = [s for s, on in (("distilled", distill), (f"pruned{args.prune}", args.prune is not None),
                             (f"int8-{args.quantize}", args.quantize)) if on]  # fmt: skip
    out = args.out or args.source.with_name(f"{args.source.stem}-{'-'.join(steps) or 'copy'}.pt")
    check_output_file(out)  # before compressing, not after it
    result = compress(args.model, args.source, prune_amount=args.prune, prune_finetune_epochs=args.finetune_epochs,
                      quantize_scheme=args.quantize, distill=distill, seed=args.seed, progress=not args.quiet)  # fmt: skip
    save(result, out)
    print(table(STAGE_HEADERS, stage_rows(result.stages)))
    print(f"\nlatency: median of one forward pass on one CPU thread, 1 and 64 rows; zlib: the file compressed.\nwrote {out}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from training.progress import table
    from training.publish import publish

    r = publish(args.model, args.source, args.repository, margin=args.margin, force=args.force,
                canary_config=args.canary_config, canary_share=args.canary_share, seed=args.seed)  # fmt: skip
    m = r.metrics
    delta = f"{(m.test_accuracy - r.stable_accuracy) * 100:+.2f}" if r.stable_accuracy is not None else "-"
    print(table(
        ["model", "version", "test acc", "stable", "stable acc", "Δ pts", "params", "non-zero", "file KiB", "ms b=1", "forced"],
        [[r.model, r.version, f"{m.test_accuracy:.4f}", r.stable_version or "-",
          f"{r.stable_accuracy:.4f}" if r.stable_accuracy is not None else "-", delta, m.params, m.nonzero_params,
          f"{m.file_bytes / 1024:.1f}", f"{m.latency_ms_b1:.3f}", "yes" if r.forced else "no"]],
    ))  # fmt: skip
    print(
        f"\nPublished as {r.path}. The gateway, when it drives loading ([repository] path), loads it on every\n"
        f"instance within its scan interval and routes it once warmed up everywhere; Triton in poll mode loads\n"
        f"it within its poll interval. Requests that name no version then go to the newest version (or the\n"
        f"rollout's choice). Watch it through the gateway:\n"
        f"  curl -s localhost:8000/v2/models/{r.model}/versions/{r.version}/ready -o /dev/null -w '%{{http_code}}\\n'\n"
        f"  curl -s localhost:8000/v2/models/{r.model}/versions/{r.version}   # metadata of the new version"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.harness import served_version
    from training.measure import accuracy, param_counts
    from training.progress import table
    from training.quantize import model_from_payload, read_source, split_seed
    from training.specs import spec

    # No default in the parser: a --repository given with --from would be dropped without a word.
    if args.source is not None and args.repository is not None:
        raise UsageError("--repository applies to --version only, not --from")
    if args.source is not None:
        payload = read_source(args.source, args.model)
        net, what = model_from_payload(payload), str(args.source)
    else:
        folder = (args.repository or REPO_ROOT / "model_repository") / args.model / str(args.version)
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a version folder")
        net, payload = served_version(folder.parent, args.version, args.model)
        what = str(folder)
    splits = spec(args.model).splits(split_seed(payload, what, args.seed))
    params, nonzero = param_counts(net)
    print(table(["model", "what", "val acc", "test acc", "params", "non-zero"],
                [[args.model, what, f"{accuracy(net, splits.x_val, splits.y_val):.4f}",
                  f"{accuracy(net, splits.x_test, splits.y_test):.4f}", params, nonzero]]))  # fmt: skip
    return 0


def cmd_pipeline_check(args: argparse.Namespace) -> int:
    from training.pipeline import compare, reference, run_split
    from training.progress import table
    from training.quantize import model_from_payload, read_source, split_seed
    from training.specs import spec

    source = args.source or REPO_ROOT / "model_repository" / "breast_cancer_mlp" / "1" / "model.pt"
    if args.source is None and not Path(source).is_file():
        raise UsageError(f"{source}: no such file (train one with `python -m training train --model breast_cancer_mlp`)")
    payload = read_source(source, "breast_cancer_mlp")  # a UsageError for anything that does not load
    if payload.get("quantization"):
        raise UsageError(f"--from {source} is not a float breast_cancer_mlp checkpoint (it is {payload['quantization']})")
    model = model_from_payload(payload)
    splits = spec("breast_cancer_mlp").splits(split_seed(payload, source, None))
    kw = dict(train_steps=args.train_steps)
    split_run = run_split(model, payload["config"], splits.x_test, splits.x_train, splits.y_train, micro_batch=args.micro_batch, **kw)
    ref = reference(model, splits.x_test, splits.x_train, splits.y_train, **kw)
    diffs = compare(split_run, ref)
    acc_split = float((split_run["logits"].argmax(1).numpy() == splits.y_test).mean())
    acc_ref = float((ref["logits"].argmax(1).numpy() == splits.y_test).mean())
    print(table(
        ["check", "split over 2 ranks", "unsplit", "max |diff|"],
        [["test logits", f"acc {acc_split:.4f}", f"acc {acc_ref:.4f}", f"{diffs['logits_max_abs_diff']:.2e}"],
         [f"{args.train_steps} SGD steps: losses", "", "", f"{diffs['loss_max_abs_diff']:.2e}"],
         [f"{args.train_steps} SGD steps: parameters", "", "", f"{diffs['params_max_abs_diff_after_training']:.2e}"]],
    ))  # fmt: skip
    ok = diffs["logits_max_abs_diff"] <= 1e-5 and diffs["params_max_abs_diff_after_training"] <= 1e-5
    print("\nthe split model " + ("equals" if ok else "DIFFERS FROM") + " the unsplit one")
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from training.bench import RESULTS, run
    from training.specs import check_output_file

    suffix = f"-b{args.batch_size}" if args.batch_size else ""
    out = args.out or RESULTS / f"{dt.date.today().isoformat()}-workers-{args.model}{suffix}.md"
    check_output_file(out)  # before the benchmark runs, not after it
    command = "python -m training " + " ".join(shlex.quote(a) for a in args.argv)
    report = run(args.model, args.epochs, args.repeats, args.average_every, out, command, args.batch_size)
    print(report)
    print(f"wrote {out}")
    return 0

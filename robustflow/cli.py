"""``robustflow``: the command line, a thin layer over the public functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from certify import parse_epsilons
from robustflow.console import line_buffered_output
from robustflow.errors import UserError
from robustflow.losses import LOSSES


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _epsilons(text: str) -> list[tuple[str, float]]:
    try:
        return parse_epsilons(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _add_model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="robustflow checkpoint (default: the bundled 1-Lipschitz model)")
    p.add_argument("--data-root", help="folder containing cifar-10-batches-py/ "
                   "(default: the bundled 1,000-image test sample)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=_positive_int, help="first N images only")
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustflow", description=(
        "Certified robustness with networks that are discretised dynamical systems: "
        "train 1-Lipschitz networks, certify them, attack them."))
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier on CIFAR-10 (checkpoint every epoch)")
    defaults = _train_defaults()
    from robustflow.networks import PRESETS

    t.add_argument("--preset", default=defaults.preset,
                   help=f"{', '.join(PRESETS)} (default {defaults.preset})")
    t.add_argument("--kind", default=defaults.kind, choices=("lipschitz", "euler"))
    t.add_argument("--data-root", help="folder containing cifar-10-batches-py/ (default $ROBUSTFLOW_DATA)")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root")
    t.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    t.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    t.add_argument("--optimizer", choices=("sgd", "adam"), default=defaults.optimizer)
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--momentum", type=float, default=defaults.momentum)
    t.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    t.add_argument("--schedule", choices=("cosine", "step", "constant"), default=defaults.schedule)
    t.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                   help="cce: certified cross-entropy; cce-pairwise: the same with the head's "
                        "row distances; hinge: the paper's multi-class hinge")
    t.add_argument("--margin", type=float, default=defaults.margin, help="hinge margin m")
    t.add_argument("--train-eps", type=_one_eps, default=defaults.train_eps,
                   help="cce, cce-pairwise: ε whose certificate the loss aims for")
    t.add_argument("--temperature", type=float, default=defaults.temperature)
    t.add_argument("--ema", type=float, default=defaults.ema, metavar="DECAY",
                   help="evaluate and save an exponential moving average of the weights with this "
                        "decay (e.g. 0.999; default 0: the last weights)")
    t.add_argument("--eps", type=_one_eps, default=defaults.cert_eps, dest="cert_eps",
                   help="ε of the certified accuracy printed after each epoch (default 36/255)")
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--device", default=defaults.device)
    t.add_argument("--limit", type=_positive_int, help="train on the first N images only")
    t.add_argument("--val-size", type=int, default=defaults.val_size,
                   help="held-out test images evaluated after each epoch")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment,
                   help="random crop (pad 4) and flip; off by default: it slows learning in short "
                        "runs, turn it on for long ones (the paper's 100 epochs)")
    t.add_argument("--out", default=defaults.out, help="checkpoint file")
    t.add_argument("--resume", action="store_true", help="continue from --out")
    t.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same --preset/--kind) with a fresh "
                        "optimiser and schedule, e.g. to fine-tune a finished run")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=_train)

    c = sub.add_parser("certify", help="certified accuracy and radii of a model")
    _add_model_data(c)
    c.add_argument("--eps", type=_epsilons, default=_epsilons("36/255,0.3"),
                   help="comma-separated ε values, decimals or fractions (default 36/255,0.3)")
    c.add_argument("--precision", choices=("float32", "float64"), default="float32",
                   help="arithmetic of the logits: float32 (default; the accuracies at each ε "
                        "are float64's, radii are lowered by the proven float32 rounding bound) "
                        "or float64 (every radius tight, several times slower)")
    c.add_argument("--json", help="write the report here")
    c.add_argument("--per-sample", help="write per-sample certificates (CSV) here")
    c.set_defaults(run=_certify)

    a = sub.add_parser("attack", help="robust accuracy under AutoAttack, PGD or a foolbox attack")
    _add_model_data(a)
    a.add_argument("--attack", default="pgd-l2",
                   help="pgd-l2, pgd-linf, autoattack (APGD-CE, APGD-T, FAB-T, Square), "
                        "autoattack-fast (APGD-CE, APGD-T), apgd-ce, apgd-dlr, apgd-t, fab-t, "
                        "square or foolbox:NAME")
    a.add_argument("--norm", choices=("l2", "linf"),
                   help="norm of AutoAttack and its parts (default l2); PGD and foolbox "
                        "attacks have their own")
    a.add_argument("--eps", type=_epsilons, default=_epsilons("36/255,0.3"))
    a.add_argument("--steps", type=_positive_int,
                   help="iterations: PGD 10, APGD and FAB 100 (the paper's) by default")
    a.add_argument("--queries", type=_positive_int, help="Square's queries per point (default 5000)")
    a.add_argument("--restarts", type=_positive_int, default=1)
    a.add_argument("--target", help="targeted attack towards this class (index or name)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--attack-certified", action="store_true",
                   help="attack the points certified at ε too, and count those that fall: a "
                        "check of the certificates (none may fall; exit status 1 if any does)")
    a.add_argument("--json", help="write the report here")
    a.add_argument("--save-adv", help="write adversarial images (.npz) here")
    a.set_defaults(run=_attack)

    p = sub.add_parser("plot", help="pictures: plane-cat or curves")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser, required=True)
    pc = kinds.add_parser("plane-cat",
                          help="an airplane the baseline calls cat; the 1-Lipschitz model does not")
    pc.add_argument("--checkpoint", help="1-Lipschitz model (default: bundled)")
    pc.add_argument("--baseline", help="unconstrained model (default: bundled baseline)")
    pc.add_argument("--data-root", help="folder containing cifar-10-batches-py/ (default: bundled sample)")
    pc.add_argument("--eps", type=_one_eps, default=0.3)
    pc.add_argument("--index", type=int, help="use this image (an airplane)")
    pc.add_argument("--pick", choices=("first", "random"), default="first")
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("--steps", type=_positive_int, default=100)
    pc.add_argument("--out", default="plane-cat.png", help="output .png, .pdf or .svg")
    pc.add_argument("--device", default="auto")
    pc.set_defaults(run=_plot_plane_cat)
    cu = kinds.add_parser("curves", help="certified and robust accuracy against ε, from JSON reports")
    cu.add_argument("--certify-report", help="JSON written by robustflow certify --json")
    cu.add_argument("--attack-report", action="append", default=[],
                    help="JSON written by robustflow attack --json (repeatable)")
    cu.add_argument("--distances-report",
                    help="JSON with per-image min_distances for the radius scatter (the demo's "
                         "distances-lipschitz.json; default: the first attack report that has them)")
    cu.add_argument("--out", default="curves.png", help="output .png, .pdf or .svg")
    cu.set_defaults(run=_plot_curves)

    d = sub.add_parser("demo", help="the main job: certify, attack and draw, on the bundled models")
    d.add_argument("--out", default="robustflow-demo", help="output folder")
    d.add_argument("--limit", type=_positive_int, help="first N images of the bundled sample")
    d.add_argument("--steps", type=_positive_int, default=10, help="PGD steps")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_demo)
    return parser


def _one_eps(text: str) -> float:
    return _epsilons(text)[0][1]


def _version() -> str:
    from robustflow import __version__

    return f"robustflow {__version__}"


def _train_defaults():
    from robustflow.train import TrainConfig

    return TrainConfig()


# ----------------------------------------------------------------- sub-commands


def _train(args: argparse.Namespace) -> int:
    from robustflow.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    cfg = TrainConfig(**values, progress=not args.no_progress)
    _, record = train(cfg, data_root=args.data_root, download=args.download)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 saves and reports
        return 0
    print(f"saved {cfg.out} after epoch {record['epoch']}"
          + (f" (stopped: {record['stopped']})" if record.get("stopped") else ""))
    return 0


def _load(args: argparse.Namespace):
    from robustflow.data import load_cifar10
    from robustflow.pretrained import load_model, load_sample_set
    from robustflow.train import resolve_device

    device = resolve_device(args.device)
    name = args.checkpoint or "lipschitz"
    model = load_model(name, device)
    if args.data_root:
        data = load_cifar10(args.data_root, args.split == "train", limit=args.limit)
        source = f"CIFAR-10 {args.split} split"
    else:
        data = load_sample_set()
        data = data.subset(slice(0, args.limit)) if args.limit else data
        source = "bundled test sample"
    label = Path(name).name if args.checkpoint else "bundled lipschitz"
    return model, data, device, label, source


def bound_deviation(bound: float) -> str:
    """``"1 + 6.3e-05"``: the proven bound against 1, so that rounding shows as rounding."""
    if bound == 1.0:
        return "exactly 1"
    return f"1 {'+' if bound > 1 else '−'} {abs(bound - 1.0):.2g}"


def _certify(args: argparse.Namespace) -> int:
    from certify import NotCertifiable
    from robustflow.evaluation import certify_dataset

    model, data, device, label, source = _load(args)
    try:
        report = certify_dataset(model, data, args.eps, batch_size=args.batch_size, device=device,
                                 progress=not args.no_progress, name=label,
                                 precision=args.precision)
    except NotCertifiable as err:
        raise UserError(f"{label} cannot be certified: {err}") from None
    arithmetic = report.arithmetic
    print(f"{label} on {report.n} images ({source}); proven Lipschitz bound "
          f"{report.lipschitz_bound:.6f} ({bound_deviation(report.lipschitz_bound)}), "
          f"{report.method} certificates")
    error, measured = arithmetic["logit_error_bound"], arithmetic["measured_logit_error_bound"]
    wide = arithmetic["float64_parts"]
    print(f"arithmetic: {arithmetic['dtype']}" + (f" ({len(wide)} parts in float64)" if wide else "")
          + f", logits within {error['const']:.2g} + {error['slope']:.2g}·‖x‖ of exact arithmetic "
          f"(proven a priori in {arithmetic['dtype']}); measured on the pass, median "
          f"{measured['median']:.2g}, at most {measured['max']:.2g} (subtracted from each margin); "
          f"{arithmetic['rechecked_in_float64']} decisions near an ε re-checked in float64")
    rows = [(eps, report.clean_accuracy, acc) for eps, acc in report.certified_accuracy.items()]
    _table(("eps", "clean", "certified"), rows)
    print("certified radius quantiles: " + ", ".join(
        f"q{k}={v:.3f}" for k, v in report.radius_quantiles.items()))
    if args.json:
        _write(args.json, lambda p: p.write_text(json.dumps(
            {**report.to_dict(), "labels": report.labels.tolist(), "radii": report.radii.tolist()},
            indent=2)))
    if args.per_sample:
        _write(args.per_sample, lambda p: report.to_csv(p))
    return 0


def _attack(args: argparse.Namespace) -> int:
    from attacks import SPECS, get_attack
    from robustflow.data import CLASSES
    from robustflow.evaluation import attack_dataset, attack_options

    target = _class_index(args.target, CLASSES) if args.target is not None else None
    if not (args.attack in SPECS or args.attack.startswith("foolbox:")):
        raise UserError(f"unknown attack {args.attack!r}; use one of "
                        f"{', '.join(SPECS[:-1])} or foolbox:NAME (e.g. foolbox:DDNAttack)")
    options = dict(steps=args.steps, restarts=args.restarts, seed=args.seed, norm=args.norm,
                   queries=args.queries)
    try:  # bad combinations (a norm the attack does not have, ...) fail before any loading
        get_attack(args.attack, **attack_options(args.attack, **options))
        if target is not None and args.attack.startswith("autoattack"):
            raise ValueError("AutoAttack is untargeted; for a targeted attack use apgd-t, fab-t "
                             "or square")
    except (TypeError, ValueError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    model, data, device, label, source = _load(args)
    try:
        report = attack_dataset(model, data, args.attack, args.eps, target=target,
                                batch_size=args.batch_size, device=device,
                                progress=not args.no_progress, keep_adversarials=bool(args.save_adv),
                                attack_certified=args.attack_certified, name=label, **options)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    budget = [f"{report.steps} steps"] if report.steps is not None else []
    budget += [f"{report.queries} queries"] if report.queries is not None else []
    budget += [] if args.attack.startswith("autoattack") else [f"{args.restarts} restart(s)"]
    print(f"{label} on {report.n} images ({source}); {', '.join([args.attack, *budget])}, "
          f"{report.norm}" + (f", target {CLASSES[target]}" if target is not None else ""))
    cert = report.certified_accuracy or {}
    stages = list(report.per_attack or {})
    if stages:
        print(f"robust accuracy after each attack in turn ({' → '.join(stages)}); a point is "
              "robust only if it survives all")
    rows = [(eps, report.clean_accuracy, cert.get(eps),
             *(report.per_attack[stage][eps] for stage in stages), acc)
            for eps, acc in report.robust_accuracy.items()]
    _table(("eps", "clean", "certified", *stages, "robust"), rows)
    attacked = ", ".join(f"{n} at {eps}" for eps, n in report.attacked_points.items())
    not_attacked = ("misclassified points are not attacked: they have fallen"
                    if report.certified_broken is not None else "misclassified points and points "
                    "certified at ε are not attacked: they cannot fall")
    print(f"attacked {attacked} of {report.n} images in {report.seconds:.1f} s ({not_attacked})")
    if report.certified_broken is not None:
        counts = ", ".join(f"{report.certified_broken[eps]} of {report.certified_attacked[eps]} at "
                           f"{eps}" for eps in report.certified_broken)
        print(f"certified points the attack broke: {counts}")
    if args.json:
        _write(args.json, lambda p: report.to_json(p))
    if args.save_adv:
        _write(args.save_adv, lambda p: np.savez_compressed(
            p, **{f"eps_{i}": v for i, v in enumerate(report.adversarials.values())},
            epsilons=np.array(list(report.adversarials))))
    if report.certified_broken is not None and any(report.certified_broken.values()):
        print("robustflow: error: the attack broke certified points, so a certificate is "
              "unsound (a bound registered with certify that does not hold?); see the counts "
              "above", file=sys.stderr)
        return 1
    return 0


def _plot_plane_cat(args: argparse.Namespace) -> int:
    from robustflow.data import CLASSES, load_cifar10
    from robustflow.plots import draw_plane_cat, find_plane_cat, save_figure
    from robustflow.pretrained import load_model, load_sample_set, sample_plane_cat
    from robustflow.train import resolve_device

    device = resolve_device(args.device)
    index = args.index
    if index is None and not args.data_root and args.pick == "first":
        index = sample_plane_cat()  # the bundled sample's own plane-versus-cat image
    lipschitz = load_model(args.checkpoint or "lipschitz", device)
    baseline = load_model(args.baseline or "baseline", device)
    data = load_cifar10(args.data_root, False) if args.data_root else load_sample_set()
    images, labels = data.floats()
    example = find_plane_cat(baseline, lipschitz, images, labels, eps=args.eps, pick=args.pick,
                             index=index, seed=args.seed, steps=args.steps)
    if example.note:
        print(example.note)
    b, lip = example.baseline, example.lipschitz
    print(f"image {example.index}: baseline {CLASSES[b.clean_prediction]} -> "
          f"{CLASSES[b.adversarial_prediction]} (‖δ‖={b.delta_norm:.3f}); 1-Lipschitz "
          f"{CLASSES[lip.clean_prediction]} -> {CLASSES[lip.adversarial_prediction]} "
          f"(‖δ‖={lip.delta_norm:.3f}, certified radius {example.radius:.3f})")
    print(f"wrote {save_figure(draw_plane_cat(example, CLASSES), args.out)}")
    return 0


def _plot_curves(args: argparse.Namespace) -> int:
    from robustflow.plots import curves_from_reports, save_figure

    if not args.certify_report and not args.attack_report:
        raise UserError("plot curves needs --certify-report and/or --attack-report JSON files "
                        "(write them with robustflow certify/attack --json)")
    certify_report = _read_json(args.certify_report) if args.certify_report else None
    attack_reports = [_read_json(p) for p in args.attack_report]
    distances = _read_json(args.distances_report) if args.distances_report else None
    figure = curves_from_reports(certify_report, attack_reports, distances)
    pairs = getattr(figure, "radius_against_distance", None)
    if pairs is not None:
        print(f"radius against distance: {pairs['above']} of {pairs['images']} images with an "
              f"adversarial have a certified radius above it (0 if sound); median radius / "
              f"distance {pairs['median_ratio']:.3f}")
    print(f"wrote {save_figure(figure, args.out)}")
    return 0


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"report not found: {path}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a JSON report: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON report (an object was expected)")
    return data


def _demo(args: argparse.Namespace) -> int:
    from robustflow.demo import run_demo

    result = run_demo(args.out, limit=args.limit, steps=args.steps, progress=not args.no_progress)
    print(f"\nrobustflow demo: {result.rows[0]['eps']} and {result.rows[-1]['eps']} on the bundled "
          f"sample ({result.seconds:.0f} s)")
    _table(("eps", "model", "clean", "certified", "PGD-L2"),
           [(r["eps"], r["model"], r["clean"], r["certified"], r["pgd"]) for r in result.rows])
    if result.autoattack:
        aa = result.autoattack
        print(f"AutoAttack (fast version at a reduced budget: {aa['steps']} steps, {aa['targets']} "
              f"target classes) on {aa['n']} of the images, 1-Lipschitz model, robust / "
              "certified: " + ", ".join(f"{eps} {100 * acc:.0f}% / {100 * aa['certified'][eps]:.0f}%"
                                        for eps, acc in aa["robust"].items()))
    for path in result.files:
        print(f"wrote {path}")
    return 0


def _class_index(text: str, classes: Sequence[str]) -> int:
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    if text in classes:
        return classes.index(text)
    raise UserError(f"unknown target class {text!r}; use 0-{len(classes) - 1} or one of "
                    f"{', '.join(classes)}")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> None:
    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if isinstance(v, float) else str(v)

    cells = [list(header)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _write(path: str, writer) -> None:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        writer(target)
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    print(f"wrote {target}")


def main(argv: Sequence[str] | None = None) -> int:
    line_buffered_output()  # progress and epoch lines reach a log file as they are printed
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except UserError as err:
        print(f"robustflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

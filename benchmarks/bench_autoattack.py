"""Our AutoAttack against torchattacks' ``AutoAttack`` on the bundled models: robust accuracy
and time, per model and ε, on the same test images.

Both run the standard version (APGD-CE, APGD-T, FAB-T, Square; worst case per point) on the
exported model, batch by batch, seed 0, at the same budget: torchattacks' ``AutoAttack`` builds
its APGD, APGD-T and FAB with 10 iterations and 9 target classes, and ours runs with the same
by default (``--steps 100`` gives the paper's budget, stronger and slower). ``--queries`` sets
Square's budget for both (default: the paper's 5,000). Ours skips the points that ``certify``
proves robust at ε (only L2 certificates exist, so L∞ points are all attacked);
``--no-skip-too`` also times ours without that, to measure what the skipping saves. Every L2
row counts the certified points that torchattacks (which attacks every point) and ours without
skipping broke: a sound certificate keeps both counts at 0. Every row also counts the images
each side sent through the model, with and without a gradient: where the two evaluate about as
many images, only a faster evaluation of the same model could make one faster.

    python benchmarks/bench_autoattack.py --n 1000
    python benchmarks/bench_autoattack.py --n 100 --queries 1000 --models lipschitz --eps l2:0.3

The full comparison takes hours, so it can be measured one cell per call, each appending its
row (with the SHA-256 of the bundled model it measured) to one ``--json`` file;
``python benchmarks/run_all.py --only 6 --aa-cells FILE`` then publishes section 6 from it.
A cell too long for one sitting can be split in two calls, ``--skip-torchattacks`` and
``--skip-ours``, whose half-rows (each with the indices of its robust points) are joined there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attacks import AutoAttack
from robustflow.console import line_buffered_output

#: ``norm:ε`` pairs of the issue: L2 at 36/255 and 0.3, L∞ at 8/255.
DEFAULT_EPS = "l2:36/255,l2:0.3,linf:8/255"


def parse_eps(text: str) -> list[tuple[str, str, float]]:
    """``"l2:36/255,linf:8/255"`` → ``[("l2", "36/255", 0.141…), ("linf", "8/255", 0.031…)]``."""
    from certify import parse_epsilon

    out = []
    for item in text.split(","):
        norm, _, label = item.partition(":")
        if norm not in ("l2", "linf") or not label:
            raise SystemExit(f"--eps items look like l2:0.3 or linf:8/255, got {item!r}")
        out.append((norm, label, parse_epsilon(label)))
    return out


def _clock(work: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``work(*args, **kwargs)``, the wall-clock seconds it took and the CPU seconds this
    process spent on it (on a shared machine the CPU time is the steadier measure: other
    jobs stretch the wall clock, not the work done)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def asset_fingerprint(name: str) -> str:
    """SHA-256 of the bundled model ``name``'s file: which model a row was measured on."""
    from robustflow.pretrained import model_path

    return hashlib.sha256(model_path(name).read_bytes()).hexdigest()


def bundled_plain(name: str) -> nn.Module:
    """The bundled model ``name``, exported to plain weights, in eval mode, without gradients."""
    from robustflow.export import export_plain
    from robustflow.pretrained import load_model

    model = export_plain(load_model(name)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class CountingModel(nn.Module):
    """``model`` unchanged, counting the images it evaluates: ``gradient`` those whose input
    requires a gradient (a forward and, as a rule, a backward pass), ``forward`` the others."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_images = 0
        self.gradient_images = 0

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradient_images += len(x)
        else:
            self.forward_images += len(x)
        return self.model(x)

    def counts(self) -> dict[str, int]:
        return {"forward": self.forward_images, "gradient": self.gradient_images}


def _counted(work: Callable[..., Any], model: nn.Module, *args: Any, **kwargs: Any
             ) -> tuple[Any, float, float, dict[str, int]]:
    """:func:`_clock` of ``work(counting model, *args, **kwargs)`` and the images it evaluated."""
    counting = CountingModel(model).eval()
    result, seconds, cpu = _clock(work, counting, *args, **kwargs)
    return result, seconds, cpu, counting.counts()


def certified_radii(model: nn.Module, images: Tensor, labels: Tensor, batch: int,
                    epsilons: list[float]) -> Tensor:
    """robustflow's proven L2 radii (0 for misclassified points), with the decisions at
    ``epsilons`` computed exactly (a float64 re-check where float32 rounding could flip them)."""
    from certify import Certifier

    certifier = Certifier(model, tuple(images.shape[1:]))
    return torch.cat([certifier(images[i:i + batch], labels[i:i + batch], epsilons).radius.cpu()
                      for i in range(0, len(images), batch)])


def ours(model: nn.Module, images: Tensor, labels: Tensor, norm: str, eps: float, skip: Tensor,
         *, version: str, steps: int, queries: int, batch: int) -> tuple[Tensor, dict]:
    """Robust mask (N,) of our AutoAttack and per-attack counts of points broken."""
    attack = AutoAttack(norm=norm, version=version, steps=steps, queries=queries, seed=0)
    robust, broken = [], dict.fromkeys(attack.names, 0)
    for i in range(0, len(images), batch):
        result = attack.evaluate(model, images[i:i + batch], labels[i:i + batch], epsilons=[eps],
                                 skip=skip[i:i + batch])
        robust.append(~result.success[0])
        for j, name in enumerate(attack.names):
            broken[name] += int((result.broken_by[0] == j).sum())
    return torch.cat(robust), broken


def theirs(model: nn.Module, images: Tensor, labels: Tensor, norm: str, eps: float, *,
           queries: int, batch: int) -> Tensor:
    """Robust mask (N,) of torchattacks' AutoAttack (standard, its defaults, Square's queries)."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps,
                                     version="standard", n_classes=10, seed=0)
    attack._autoattack.attacks[3].n_queries = queries
    robust = []
    for i in range(0, len(images), batch):
        x, y = images[i:i + batch], labels[i:i + batch]
        adversarial = attack(x, y)
        inside = (adversarial - x).flatten(1).norm(p=2 if norm == "l2" else float("inf"), dim=1)
        with torch.no_grad():
            correct = model(adversarial).argmax(dim=1) == y
        robust.append(correct | (inside > eps * (1 + 1e-5)))  # outside the ball: no success
    return torch.cat(robust)


def _evaluations(counts: dict[str, int]) -> str:
    return f"{counts['forward']:,} images evaluated, {counts['gradient']:,} with a gradient"


def robust_points(robust: Tensor) -> list[int]:
    """Indices of the robust points: what lets two half-rows of a cell be joined."""
    return torch.nonzero(robust).flatten().tolist()


def compare(models: list[str], images: Tensor, labels: Tensor, eps_items: list[tuple[str, str, float]],
            *, version: str = "standard", steps: int = 10, queries: int = 5000, batch: int = 250,
            no_skip_too: bool = False, with_torchattacks: bool = True, with_ours: bool = True,
            json_path: str | None = None) -> list[dict]:
    """One row per (bundled model, norm, ε): clean and certified accuracy, our AutoAttack's
    robust accuracy and seconds (certification included where it skips points), optionally
    ours without skipping, and torchattacks' AutoAttack on the same images; printed as it goes.
    ``with_ours=False`` or ``with_torchattacks=False`` writes half a row (joined by run_all)."""
    if not (with_ours or with_torchattacks):
        raise ValueError("nothing to measure: neither ours nor torchattacks")
    rows = []
    for name in models:
        model = bundled_plain(name)
        with torch.no_grad():
            correct = torch.cat([model(images[i:i + 500]).argmax(1) == labels[i:i + 500]
                                 for i in range(0, len(images), 500)])
        l2 = [eps for norm, _, eps in eps_items if norm == "l2"]
        radii, certify_s, certify_cpu = _clock(certified_radii, model, images, labels, batch, l2)
        fingerprint = asset_fingerprint(name)
        for norm, label, eps in eps_items:
            skip = correct & (radii > eps) if norm == "l2" else torch.zeros_like(correct)
            row = {"model": name, "asset_sha256": fingerprint, "norm": norm,
                   "eps": label, "n": len(images),
                   "clean": correct.float().mean().item(), "certified": skip.float().mean().item(),
                   "version": version, "steps": steps, "queries": queries}
            budget = {"version": version, "steps": steps, "queries": queries, "batch": batch}
            line = (f"{name:9s} {norm:4s} {label:7s} clean {row['clean']:.1%} certified "
                    f"{row['certified']:.1%}")
            if with_ours:
                (robust, broken), seconds, cpu, evals = _counted(ours, model, images, labels,
                                                                 norm, eps, skip, **budget)
                paid = (certify_s, certify_cpu) if skip.any() else (0.0, 0.0)  # where it skips
                row |= {"ours": robust.float().mean().item(), "ours_s": seconds + paid[0],
                        "ours_cpu_s": cpu + paid[1], "certify_s": paid[0], "ours_broken_by": broken,
                        "ours_robust_points": robust_points(robust), "ours_evaluations": evals}
                line += (f" | ours {row['ours']:.1%} in {row['ours_cpu_s']:.0f} CPU s "
                         f"({row['ours_s']:.0f} s wall; certification {paid[1]:.1f} CPU s "
                         f"included; broken by {broken}; {_evaluations(evals)})")
            if with_ours and no_skip_too and skip.any():
                (again, _), plain_s, plain_cpu = _clock(ours, model, images, labels, norm, eps,
                                                        torch.zeros_like(skip), **budget)
                row |= {"ours_no_skip": again.float().mean().item(), "ours_no_skip_s": plain_s,
                        "ours_no_skip_cpu_s": plain_cpu,
                        "certified_broken_by_ours": int((skip & ~again).sum())}
                line += (f" | without skipping {row['ours_no_skip']:.1%} in {plain_cpu:.0f} CPU s "
                         f"({plain_s:.0f} s wall; certified points broken: "
                         f"{row['certified_broken_by_ours']})")
            if with_torchattacks:
                their, their_s, their_cpu, their_evals = _counted(
                    theirs, model, images, labels, norm, eps, queries=queries, batch=batch)
                row |= {"torchattacks": their.float().mean().item(), "torchattacks_s": their_s,
                        "torchattacks_cpu_s": their_cpu,
                        "torchattacks_robust_points": robust_points(their),
                        "certified_broken_by_torchattacks": int((skip & ~their).sum()),
                        "torchattacks_evaluations": their_evals}
                line += (f" | torchattacks {row['torchattacks']:.1%} in {their_cpu:.0f} CPU s "
                         f"({their_s:.0f} s wall; certified points broken: "
                         f"{row['certified_broken_by_torchattacks']}; {_evaluations(their_evals)})")
            if with_ours and with_torchattacks:
                row |= {"both_robust": (robust & their).float().mean().item(),
                        "speedup_cpu": their_cpu / row["ours_cpu_s"]}
                line += (f": ours {row['speedup_cpu']:.2f}x faster in CPU time "
                         f"({their_s / row['ours_s']:.2f}x wall), "
                         f"{100 * (row['ours'] - row['torchattacks']):+.1f} points")
            print(line, flush=True)
            rows.append(row)
            if json_path:
                with open(json_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="first N bundled test images")
    parser.add_argument("--models", default="lipschitz,baseline")
    parser.add_argument("--eps", default=DEFAULT_EPS, help=f"norm:ε items (default {DEFAULT_EPS})")
    parser.add_argument("--version", default="standard", choices=("standard", "fast"),
                        help="our version (torchattacks always runs standard)")
    parser.add_argument("--steps", type=int, default=10,
                        help="our APGD / FAB iterations (default: torchattacks' 10)")
    parser.add_argument("--queries", type=int, default=5000, help="Square queries (both)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--no-skip-too", action="store_true",
                        help="also time ours without skipping certified points")
    halves = parser.add_mutually_exclusive_group()
    halves.add_argument("--skip-torchattacks", action="store_true",
                        help="measure only ours (half a row)")
    halves.add_argument("--skip-ours", action="store_true",
                        help="measure only torchattacks (half a row)")
    parser.add_argument("--json", help="append one JSON line per result here")
    args = parser.parse_args(argv)
    line_buffered_output()

    from robustflow.pretrained import load_test_sample

    images, labels = load_test_sample()
    images, labels = images[: args.n], labels[: args.n]
    print(f"{len(images)} bundled test images; ours: AutoAttack {args.version}, {args.steps} steps, "
          f"{args.queries} queries; torchattacks {__import__('torchattacks').__version__} "
          f"AutoAttack standard (its APGD/APGD-T/FAB: 10 steps), {args.queries} queries; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor()}",
          flush=True)
    return compare(args.models.split(","), images, labels, parse_eps(args.eps),
                   version=args.version, steps=args.steps, queries=args.queries,
                   batch=args.batch_size, no_skip_too=args.no_skip_too,
                   with_torchattacks=not args.skip_torchattacks, with_ours=not args.skip_ours,
                   json_path=args.json)


if __name__ == "__main__":
    main()

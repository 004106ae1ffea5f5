"""The plane-versus-cat picture as a proof: every CIFAR-10 test airplane that the 1-Lipschitz
model certifies beyond ε and that the baseline's targeted L2 PGD turns into "cat" at ‖δ‖₂ = ε.

    python benchmarks/plane_cat_search.py --data-root $DATA
    python benchmarks/plane_cat_search.py --data-root $DATA \\
        --write-sample robustflow/assets/cifar10_sample.npz

Prints how many of the 1,000 test airplanes both models classify correctly, how many the
1-Lipschitz model certifies beyond ε, how many of those the baseline's attack flips (the
proofs), and the best candidates (:func:`robustflow.plots.rank_plane_cat`). With
``--write-sample`` the best one joins the bundled sample (100 test images per class) as the
default image of ``robustflow plot plane-cat`` and of the demo.
"""

from __future__ import annotations

import argparse
import json

from certify import parse_epsilon
from robustflow.console import line_buffered_output
from robustflow.data import CLASSES, load_cifar10
from robustflow.plots import rank_plane_cat
from robustflow.pretrained import load_model, write_sample


def main(argv: list[str] | None = None) -> list:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder containing cifar-10-batches-py/")
    parser.add_argument("--checkpoint", default="lipschitz", help="1-Lipschitz model (default: bundled)")
    parser.add_argument("--baseline", default="baseline", help="baseline (default: bundled)")
    parser.add_argument("--eps", type=parse_epsilon, default=0.3)
    parser.add_argument("--steps", type=int, default=100, help="targeted PGD steps")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--top", type=int, default=10, help="candidates to print")
    parser.add_argument("--write-sample", help="write the bundled sample with the best one here")
    parser.add_argument("--json", help="write every candidate here")
    args = parser.parse_args(argv)

    test_set = load_cifar10(args.data_root, train=False)
    images, labels = test_set.floats()
    lipschitz, baseline = load_model(args.checkpoint), load_model(args.baseline)
    source, target = CLASSES.index("airplane"), CLASSES.index("cat")
    ranked = rank_plane_cat(baseline, lipschitz, images, labels, eps=args.eps, source=source,
                            target=target, steps=args.steps, restarts=args.restarts)
    airplanes = int((labels == source).sum())
    beyond = [c for c in ranked if c.radius > args.eps]
    proofs = [c for c in ranked if c.proof(args.eps)]
    print(f"{airplanes} test airplanes; {len(ranked)} classified correctly by both models; "
          f"{len(beyond)} certified beyond ε = {args.eps:.4g}; baseline turned "
          f"{sum(c.flipped for c in beyond)} of those into cat with {args.steps}-step targeted "
          f"PGD ({args.restarts} start(s)): {len(proofs)} proofs")
    if not proofs:
        print("no airplane is both certified beyond ε and flipped by the baseline; the closest "
              "candidates follow")
    print("test index  certified radius  baseline flipped  baseline P(cat)")
    for c in ranked[: args.top]:
        print(f"{c.index:10d}  {c.radius:16.4f}  {str(c.flipped):>16s}  {c.target_probability:15.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"eps": args.eps, "steps": args.steps, "restarts": args.restarts,
                       "airplanes": airplanes, "candidates": [vars(c) for c in ranked]},
                      handle, indent=1)
    if args.write_sample and ranked:
        best = ranked[0]
        path = write_sample(test_set, args.write_sample, plane_cat=best.index)
        print(f"wrote {path}: test image {best.index} (certified radius {best.radius:.4f}, "
              f"{'a proof' if best.proof(args.eps) else 'the closest, not a proof'}) is its "
              "plane-versus-cat image")
    return ranked


if __name__ == "__main__":
    main()

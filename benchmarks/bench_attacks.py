"""Time our L2 PGD against foolbox ``L2PGD`` and torchattacks ``PGDL2`` (if installed).

All three run ``steps`` iterations with step ``rel_stepsize·ε`` (ours' default, 2.5 / steps)
from a random start, with ``restarts`` random restarts; robust accuracy is the fraction of
points that are clean-correct and not broken by any restart.

    python benchmarks/bench_attacks.py --n 500 --eps 0.3 --steps 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import foolbox as fb
import torch
from torch import Tensor, nn

from attacks import PGD
from robustflow.console import line_buffered_output


def _timed(name: str, attack: Callable[[], Tensor]) -> dict:
    """Run ``attack`` (returning a bool "broken" mask (N,)) and time it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    broken = attack()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"attack": name, "seconds": time.perf_counter() - start,
            "robust_accuracy": 1.0 - broken.float().mean().item()}


def run(model: nn.Module, inputs: Tensor, labels: Tensor, eps: float = 0.3, steps: int = 10,
        restarts: int = 1) -> list[dict]:
    """One ``{"attack", "seconds", "robust_accuracy"}`` per implementation, ours first."""
    ours = PGD(norm="l2", steps=steps, restarts=restarts, seed=0)
    with torch.no_grad():
        wrong = model(inputs).argmax(dim=1) != labels

    def foolbox_pgd() -> Tensor:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=inputs.device)
        attack = fb.attacks.L2PGD(steps=steps, rel_stepsize=ours.rel_stepsize, random_start=True)
        _, _, success = attack.repeat(restarts)(fmodel, inputs, fb.criteria.Misclassification(
            labels), epsilons=[eps])
        return success[0] | wrong

    results = [_timed("robustflow PGD", lambda: ours(model, inputs, labels, epsilons=[eps])[2][0]),
               _timed("foolbox L2PGD", foolbox_pgd)]
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed (pip install robustflow[bench]): skipping PGDL2")
        return results

    def torchattacks_pgd() -> Tensor:
        attack = torchattacks.PGDL2(model, eps=eps, alpha=ours.rel_stepsize * eps, steps=steps,
                                    random_start=True)
        broken = wrong.clone()
        for _ in range(restarts):
            adversarial = attack(inputs, labels)
            with torch.no_grad():
                broken |= model(adversarial).argmax(dim=1) != labels
        return broken

    return results + [_timed("torchattacks PGDL2", torchattacks_pgd)]


def main() -> None:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="number of test images")
    parser.add_argument("--eps", type=float, default=0.3, help="L2 radius")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations")
    args = parser.parse_args()

    from robustflow.pretrained import load_model, load_test_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model("lipschitz").to(device)
    images, labels = load_test_sample()
    images, labels = images[: args.n].to(device), labels[: args.n].to(device)
    results = run(model, images, labels, eps=args.eps, steps=args.steps)
    for r in results:
        print(f"{r['attack']:20s} {r['seconds']:8.2f} s   robust accuracy {r['robust_accuracy']:.3f}")
    print(f"speed-up of ours over foolbox: {results[1]['seconds'] / results[0]['seconds']:.2f}x")


if __name__ == "__main__":
    main()

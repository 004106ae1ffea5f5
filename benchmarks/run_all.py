"""Side-by-side benchmarks against orthogonium (SLL), deel-torchlip, foolbox and torchattacks.

    python benchmarks/run_all.py --data-root DIR --quick      # a few minutes
    python benchmarks/run_all.py --data-root DIR              # the real figures (about 1.5 h)

Sections (``--only 1,3`` runs a subset; results of earlier runs in ``--out-dir`` are kept):

1. certified training at equal budget: robustflow's default preset, an orthogonium SLL
   network and a deel-torchlip network of similar parameter count, each trained for
   ``--budget`` seconds with the same recipe, then certified (each library's own certificate
   and robustflow's ``certify``) and attacked (PGD-L2 at 0.3); ``--seed`` trains all three
   from another seed (with ``--out-dir``, a second sample of the run-to-run spread);
2. attack speed and strength: our PGD vs foolbox ``L2PGD`` vs torchattacks ``PGDL2``;
3. certification cost: certify time over plain inference time;
4. certificate tightness: certified radius over the smallest adversarial distance that
   DDN / FMN find;
5. scaling: training step time and autograd memory against depth and width;
6. AutoAttack: ours against torchattacks' ``AutoAttack`` (standard, same budget) on the bundled
   models, L2 at 36/255 and 0.3, L∞ at 8/255 (hours at the full 1,000 images and 5,000 Square
   queries, so only ``--only 6`` runs it).

A full run writes the published ``benchmarks/RESULTS.md`` and ``benchmarks/results.json``;
a ``--quick`` run writes them into ``runs/benchmarks-quick/`` (not tracked by git), so one
try of the script does not replace the published figures. ``--out-dir`` chooses another
folder for either. Trained models go to ``--models-dir`` (``runs/bench-models``; quick:
``runs/benchmarks-quick/models``), so later ``--only`` runs of the same kind reuse them and
a quick run never replaces the models a full run measures. Everything runs on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` folder importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from attacks import minimal_adversarial_distance  # noqa: E402
from benchmarks import bench_attacks, bench_autoattack, bench_certify  # noqa: E402
from benchmarks.peers import (  # noqa: E402
    BUILDERS,
    PEERS,
    build_peer,
    count_parameters,
    export_peer,
    own_radius,
    stage_counts,
    train_budgeted,
)
from certify import Certifier  # noqa: E402
from robustflow.checkpoint import model_from_checkpoint  # noqa: E402
from robustflow.console import line_buffered_output  # noqa: E402
from robustflow.data import ImageSet, load_cifar10  # noqa: E402
from robustflow.evaluation import attack_dataset, batches, certify_dataset  # noqa: E402
from robustflow.export import export_plain  # noqa: E402
from robustflow.losses import make_loss  # noqa: E402
from robustflow.networks import build_model, preset  # noqa: E402
from robustflow.train import TrainConfig, train  # noqa: E402

MODELS = ("robustflow", *PEERS)
LABELS = {"robustflow": "robustflow (default preset)", "sll": "SLL (orthogonium)",
          "torchlip": "deel-torchlip (spectral)"}
EPSILONS = [("36/255", 36 / 255), ("0.3", 0.3)]
#: Where a full run publishes its figures, and where quick runs and their models go.
PUBLISHED_DIR = Path(__file__).resolve().parent
QUICK_DIR = PUBLISHED_DIR.parent / "runs" / "benchmarks-quick"
SECTIONS = {1: "Certified training at equal budget", 2: "Attack speed and strength",
            3: "Certification cost", 4: "Certificate tightness", 5: "Scaling with depth and width",
            6: "AutoAttack against torchattacks"}
#: Sections that only ``--only`` runs (hours of CPU).
LONG_SECTIONS = {6}
#: "Equal strength": our robust accuracy at most this much above foolbox's.
STRENGTH_TOLERANCE = 0.005

FULL = {"budget": 900.0, "test_n": None, "attack_n": None, "bench_attack_n": 1000, "cost_n": None,
        "repeats": 3, "tight_n": 300, "tight_steps": 100, "scale_depths": "2,4,8",
        "scale_widths": "1,2,4", "scale_batch": 128, "aa_n": 1000, "aa_queries": 5000}
QUICK = {"budget": 60.0, "test_n": 1000, "attack_n": 200, "bench_attack_n": 200, "cost_n": 1000,
         "repeats": 1, "tight_n": 30, "tight_steps": 30, "scale_depths": "2,4",
         "scale_widths": "1,2", "scale_batch": 32, "aa_n": 40, "aa_queries": 100}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder containing cifar-10-batches-py/")
    parser.add_argument("--quick", action="store_true", help="a few minutes instead of the full run")
    parser.add_argument("--budget", type=float, help="training seconds per model (900; quick 60)")
    parser.add_argument("--seed", type=int, default=0,
                        help="section 1: the training seed of all three models (default 0)")
    parser.add_argument("--out-dir", help="folder for RESULTS.md and results.json (default: "
                        "benchmarks/, the published figures; quick: runs/benchmarks-quick/)")
    parser.add_argument("--models-dir", help="trained models (default runs/bench-models; "
                        "quick: runs/benchmarks-quick/models)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite RESULTS.md from the existing results.json")
    parser.add_argument("--only", help="comma-separated sections to run, e.g. 1,3 (default all)")
    parser.add_argument("--reuse", default="",
                        help="section 1: comma-separated models (e.g. sll,torchlip) to take from "
                             "--models-dir instead of retraining; they must have been trained "
                             "with the same budget and layout")
    parser.add_argument("--test-n", type=int, help="test images to certify (all; quick 1000)")
    parser.add_argument("--attack-n", type=int, help="test images for PGD in section 1 (all; quick 200)")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD iterations")
    parser.add_argument("--bench-attack-n", type=int, help="images for section 2 (1000; quick 200)")
    parser.add_argument("--cost-n", type=int, help="images for section 3 (all; quick 1000)")
    parser.add_argument("--repeats", type=int, help="best-of repeats for timings (3; quick 1)")
    parser.add_argument("--tight-n", type=int, help="images for section 4 (300; quick 30)")
    parser.add_argument("--tight-steps", type=int, help="DDN/FMN steps (100; quick 30)")
    parser.add_argument("--scale-depths", help="residual steps per stage (2,4,8; quick 2,4)")
    parser.add_argument("--scale-widths", help="width multipliers (1,2,4; quick 1,2)")
    parser.add_argument("--scale-batch", type=int, help="batch size for section 5 (128; quick 32)")
    parser.add_argument("--aa-n", type=int, help="bundled test images for section 6 (1000; quick 40)")
    parser.add_argument("--aa-queries", type=int, help="Square queries in section 6 (5000; quick 100)")
    parser.add_argument("--aa-cells", help="section 6: take the rows from this JSON-lines file "
                        "(bench_autoattack.py --json, one cell per call) instead of running them")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = str(QUICK_DIR if args.quick else PUBLISHED_DIR)
    if args.models_dir is None:
        args.models_dir = str(QUICK_DIR / "models") if args.quick else "runs/bench-models"
    args.reuse = [name.strip() for name in args.reuse.split(",") if name.strip()]
    unknown = sorted(set(args.reuse) - set(MODELS))
    if unknown:
        parser.error(f"--reuse takes model names among {', '.join(MODELS)}, got {', '.join(unknown)}")
    args.sections = (sorted(set(SECTIONS) - LONG_SECTIONS) if not args.only
                     else sorted({int(s) for s in args.only.split(",") if s.strip()}))
    if not set(args.sections) <= set(SECTIONS):
        parser.error(f"--only takes section numbers among {sorted(SECTIONS)}")
    return args


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere platform's answer stands
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else cpu
    versions = {}
    for package in ("torch", "orthogonium", "deel-torchlip", "foolbox", "torchattacks"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------ models


@dataclass
class Context:
    args: argparse.Namespace
    command: str
    train_set: ImageSet | None = None
    test_set: ImageSet | None = None
    models: dict[str, nn.Module] = field(default_factory=dict)
    infos: dict[str, dict] = field(default_factory=dict)

    def test(self, n: int | None) -> ImageSet:
        if self.test_set is None:
            self.test_set = load_cifar10(self.args.data_root, False)
        return self.test_set if n is None else self.test_set.subset(slice(0, n))

    def train(self) -> ImageSet:
        if self.train_set is None:
            self.train_set = load_cifar10(self.args.data_root, True)
        return self.train_set

    def plain(self, name: str) -> nn.Module:
        """The trained model ``name`` as plain modules, eval mode (same outputs)."""
        model = self.model(name)
        return export_plain(model) if name == "robustflow" else export_peer(model)

    def model(self, name: str) -> nn.Module:
        if name not in self.models:
            path = Path(self.args.models_dir) / f"{name}.pt"
            if path.is_file():
                self.models[name], self.infos[name] = load_trained(name, path)
            else:
                print(f"no trained {name} model in {self.args.models_dir}: training one "
                      f"({self.args.budget:.0f} s)", flush=True)
                self.train_model(name)
        return self.models[name]

    def reuse_model(self, name: str) -> dict:
        """Load ``name`` from ``--models-dir`` after checking that it is what a retrain would
        give: the same budget and, for a peer, the same width/depth/stem/target (from the
        current default preset). Raises ``SystemExit`` with the mismatch otherwise."""
        path = Path(self.args.models_dir) / f"{name}.pt"
        if not path.is_file():
            raise SystemExit(f"--reuse {name}: no trained model at {path}; run section 1 without --reuse")
        model, info = load_trained(name, path)
        expected: dict[str, Any] = {"budget": self.args.budget, "recipe": _recipe(self.args.seed)}
        if name == "robustflow":
            expected["preset"] = TrainConfig().preset
        else:
            _, spec = build_peer(name)
            expected.update({k: spec[k] for k in ("width", "depth", "stem", "target")})
        wrong = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k} {got!r} (now {want!r})" for k, (got, want) in wrong.items())
            raise SystemExit(f"--reuse {name}: {path} was trained differently: {detail}; retrain it")
        info["reused_from"] = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(
            timespec="minutes")
        self.models[name], self.infos[name] = model.eval(), info
        return info

    def train_model(self, name: str) -> dict:
        """Train ``name`` for the budget, keep it and save it under ``--models-dir``."""
        out = Path(self.args.models_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(epochs=1000, time_budget=self.args.budget, val_size=0, progress=False,
                          device="cpu", seed=self.args.seed, out=str(out / f"{name}.pt"))
        if name == "robustflow":
            model, record = train(cfg, train_set=self.train(), log=lambda *_: None)
            metrics = record["metrics"]
            info = {"parameters": count_parameters(model), "preset": cfg.preset,
                    "epochs": record["epoch"], "seconds": metrics["seconds"],
                    "images_per_second": metrics["images_per_second"]}
        else:
            torch.manual_seed(cfg.seed)
            model, info = build_peer(name)
            info.update(train_budgeted(model, self.train(), self.args.budget, cfg),
                        budget=self.args.budget, recipe=_recipe(cfg.seed))
            torch.save({"info": info, "state_dict": model.state_dict()}, cfg.out)
        info["budget"] = self.args.budget
        self.models[name], self.infos[name] = model.eval(), info
        return info


def load_trained(name: str, path: Path) -> tuple[nn.Module, dict]:
    """A model saved by :meth:`Context.train_model`."""
    if name == "robustflow":
        model, record = model_from_checkpoint(path)
        metrics = record.get("metrics", {})
        recipe = {k: record["train"].get(k) for k in _recipe()}
        return model, {"parameters": count_parameters(model), "preset": record["train"]["preset"],
                       "epochs": record["epoch"], "seconds": metrics.get("seconds"),
                       "images_per_second": metrics.get("images_per_second"),
                       "budget": record["train"]["time_budget"], "recipe": recipe}
    payload = torch.load(path, map_location="cpu", weights_only=True)
    info = payload["info"]
    model = BUILDERS[name](info["width"], info["depth"], stem=info.get("stem", "lift"))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), info


def logits_of(model: nn.Module, data: ImageSet, batch_size: int = 500) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in batches(data, batch_size)])


def quartiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    q1, q2, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"q1": float(q1), "median": float(q2), "q3": float(q3), "n": int(len(values))}


# ------------------------------------------------------------------ section 1


def explain(name: str, bound: float, ratio: dict | None) -> str:
    """Why robustflow's certificate of a peer differs from the library's own (or that it doesn't)."""
    if name == "robustflow":
        return "robustflow's own certificate."
    parts = [f"robustflow proves L ≤ {bound:.6g} for the exported network, the library assumes L = 1."]
    if bound < 1 - 1e-4:
        why = {"torchlip": "deel-torchlip scales every k×k kernel by 1/k after spectral "
                           "normalisation and Björck (a worst-case factor that real kernels rarely "
                           "need) and the product of per-layer guarantees is not attained",
               "sll": "the per-layer guarantees of orthogonium are not attained together"}[name]
        parts.append(f"The exact spectra of the exported layers are below the library's per-layer "
                     f"guarantee ({why}), so robustflow's radii are about {1 / bound:.3g}× larger.")
    elif bound > 1 + 1e-4:
        parts.append("Power iteration and Björck orthogonalisation left some layers' norms "
                     "slightly above 1, so the library's own certificate (L = 1) is not proven; "
                     f"robustflow's radii are {1 / bound:.4g}× the library's.")
    else:
        parts.append("They agree to within float rounding: the orthogonalised layers have norm 1 "
                     "to about 1e-6 (robustflow adds a 1e-6 safety factor per layer) and SLL blocks "
                     "are exactly 1-Lipschitz because the AOL rescaling gives ‖K‖ ≤ 1.")
    if ratio is not None:
        parts.append(f"Radius ratio robustflow / own: median {ratio['median']:.4g} "
                     f"(quartiles {ratio['q1']:.4g}–{ratio['q3']:.4g}); robustflow also lowers "
                     "each margin by a rounding slack of 1e-4·(1 + max|f|) and uses the pairwise "
                     "head certificate.")
    return " ".join(parts)


def section_training(ctx: Context) -> dict:
    args = ctx.args
    rows = {}
    test = ctx.test(args.test_n)
    attack_set = ctx.test(args.attack_n)
    for name in MODELS:
        if name in args.reuse:
            print(f"[1] reusing {name} from {args.models_dir}", flush=True)
            ctx.reuse_model(name)
        else:
            print(f"[1] training {name} for {args.budget:.0f} s", flush=True)
            ctx.train_model(name)
        plain = ctx.plain(name)
        report = certify_dataset(plain, test, EPSILONS, progress=False, name=name)
        row: dict[str, Any] = {**ctx.infos[name], "label": LABELS[name], "n": report.n,
                               "clean_accuracy": report.clean_accuracy,
                               "lipschitz_bound": report.lipschitz_bound,
                               "certify_method": report.method,
                               "certified_accuracy": report.certified_accuracy}
        ratio = None
        if name == "robustflow":
            row["own_certified_accuracy"] = report.certified_accuracy
            row["own_certificate"] = "robustflow certify"
        else:
            radius, how = own_radius(name, ctx.model(name), logits_of(plain, test), test.labels)
            own = radius.numpy()
            ours = report.radii
            row["own_certificate"] = how
            row["own_certified_accuracy"] = {label: float((own > eps).mean()) for label, eps in EPSILONS}
            row["agreement"] = {
                label: {"both": int(((own > eps) & (ours > eps)).sum()),
                        "own_only": int(((own > eps) & ~(ours > eps)).sum()),
                        "robustflow_only": int((~(own > eps) & (ours > eps)).sum())}
                for label, eps in EPSILONS}
            positive = own > 0
            ratio = quartiles(ours[positive] / own[positive])
            row["radius_ratio_robustflow_over_own"] = ratio
        row["explanation"] = explain(name, report.lipschitz_bound, ratio)
        print(f"[1] attacking {name} (PGD-L2 0.3, {len(attack_set)} images)", flush=True)
        attack = attack_dataset(plain, attack_set, "pgd-l2", [("0.3", 0.3)], steps=args.attack_steps,
                                progress=False, name=name)
        row["pgd"] = {"n": attack.n, "steps": args.attack_steps, "clean_accuracy": attack.clean_accuracy,
                      "robust_accuracy": attack.robust_accuracy["0.3"],
                      "certified_accuracy": (attack.certified_accuracy or {}).get("0.3")}
        rows[name] = row
    aims = []
    ours = rows["robustflow"]["certified_accuracy"]
    for peer in PEERS:
        for label, _ in EPSILONS:
            theirs = max(rows[peer]["certified_accuracy"][label],
                         rows[peer]["own_certified_accuracy"][label])
            aims.append({"aim": f"certified accuracy at {label} ahead of {LABELS[peer]}",
                         "met": ours[label] > theirs,
                         "detail": f"robustflow {100 * ours[label]:.2f}% vs {100 * theirs:.2f}% "
                                   "(the peer's better of its own and robustflow's certificate)"})
    return {"models": rows, "aims": aims,
            "settings": {"budget": args.budget, "test_n": len(test), "attack_n": len(attack_set),
                         "attack_steps": args.attack_steps, "recipe": _recipe(args.seed)}}


def _recipe(seed: int = 0) -> dict:
    cfg = TrainConfig(seed=seed)
    return {k: getattr(cfg, k) for k in ("preset", "batch_size", "optimizer", "lr", "schedule",
                                         "loss", "train_eps", "temperature", "augment", "seed")}


# ------------------------------------------------------------------ sections 2-4


def section_attacks(ctx: Context) -> dict:
    args = ctx.args
    x, y = ctx.test(args.bench_attack_n).floats()
    model = ctx.plain("robustflow")
    print(f"[2] PGD implementations on {len(y)} images", flush=True)
    results = bench_attacks.run(model, x, y, eps=0.3, steps=args.attack_steps, restarts=1)
    by_name = {r["attack"]: r for r in results}
    ours = by_name["robustflow PGD"]
    aims = []
    for other in ("foolbox L2PGD", "torchattacks PGDL2"):
        if other in by_name:
            by_name[other]["speedup_of_ours"] = by_name[other]["seconds"] / ours["seconds"]
    fool = by_name["foolbox L2PGD"]
    strong = ours["robust_accuracy"] <= fool["robust_accuracy"] + STRENGTH_TOLERANCE
    aims.append({"aim": "at least 1.5× foolbox's attack speed at equal strength",
                 "met": fool["speedup_of_ours"] >= 1.5 and strong,
                 "detail": f"{fool['speedup_of_ours']:.2f}× faster; robust accuracy ours "
                           f"{100 * ours['robust_accuracy']:.2f}% vs foolbox "
                           f"{100 * fool['robust_accuracy']:.2f}% (equal strength: ours ≤ foolbox + "
                           f"{100 * STRENGTH_TOLERANCE:g} points)"})
    return {"results": results, "aims": aims,
            "settings": {"n": len(y), "eps": 0.3, "steps": args.attack_steps, "restarts": 1,
                         "model": "robustflow (section 1), exported"}}


def section_cost(ctx: Context) -> dict:
    args = ctx.args
    data = ctx.test(args.cost_n)
    rows = {}
    for name in MODELS:
        print(f"[3] certification cost of {name} on {len(data)} images", flush=True)
        model = ctx.model(name) if name == "robustflow" else ctx.plain(name)
        rows[name] = bench_certify.measure(model, data, repeats=args.repeats)
    ratio = rows["robustflow"]["ratio"]
    # a sound certificate lowers each margin by a proven rounding bound and recomputes in
    # float64 the images whose decision that bound could flip (a few percent, each float64
    # convolution 2.5-6x a float32 one here): 1.5x leaves room for that re-check
    aims = [{"aim": "certification within 1.5× of inference, rounding proven", "met": ratio <= 1.5,
             "detail": f"robustflow {ratio:.3f}× on {len(data)} images (the bound is a fixed "
                       "cost: small subsets overstate the ratio)"}]
    return {"models": rows, "aims": aims, "settings": {"n": len(data), "repeats": args.repeats,
                                                       "batch_size": 500}}


def section_tightness(ctx: Context) -> dict:
    args = ctx.args
    data = ctx.test(args.tight_n)
    x, y = data.floats()
    rows = {}
    for name in MODELS:
        plain = ctx.plain(name)
        print(f"[4] DDN and FMN on {name} ({len(y)} images, {args.tight_steps} steps)", flush=True)
        certified = Certifier(plain, tuple(x.shape[1:]))(x, y)
        distances = {}
        for attack in ("DDNAttack", "L2FMNAttack"):
            distances[attack] = minimal_adversarial_distance(plain, x, y, attack,
                                                             steps=args.tight_steps).numpy()
        smallest = np.minimum(distances["DDNAttack"], distances["L2FMNAttack"])
        correct = certified.correct.numpy()
        usable = correct & np.isfinite(smallest) & (smallest > 0)
        # float64 arithmetic makes the proven rounding bound negligible: this row is the
        # certificate of the same weights without float32's rounding (robustflow certify's
        # float32 radii are lowered by a normwise error bound; see RESULTS.md section 4)
        exact64 = Certifier(copy.deepcopy(plain).double(), tuple(x.shape[1:]))(x.double(), y)
        radii = {"robustflow certify": certified.radius.numpy(),
                 "robustflow certify, float64": exact64.radius.numpy()}
        if name != "robustflow":
            own, _ = own_radius(name, ctx.model(name), logits_of(plain, data), y)
            radii["own certificate"] = own.numpy()
        rows[name] = {
            "n": len(y), "correct": int(correct.sum()), "usable": int(usable.sum()),
            "no_adversarial_found": int((correct & ~np.isfinite(smallest)).sum()),
            "distance": quartiles(smallest[usable]),
            "ratios": {key: {**(quartiles(r[usable] / smallest[usable]) or {}),
                             "above_distance": int((r[usable] > smallest[usable]).sum())}
                       for key, r in radii.items()},
        }
    return {"models": rows, "settings": {"n": len(y), "steps": args.tight_steps,
                                         "attacks": ["DDNAttack", "L2FMNAttack"]}}


# ------------------------------------------------------------------ section 5


def step_cost(model: nn.Module, batch: int, repeats: int) -> dict:
    """Median seconds of one training step (forward, backward, Adam) and the bytes autograd
    saves for backward (distinct storages other than the parameters)."""
    cfg = TrainConfig()
    loss_fn = make_loss(cfg.loss, margin=cfg.margin, eps=cfg.train_eps, temperature=cfg.temperature,
                        model=model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    model.train()

    def step() -> None:  # as in training: each parametrised weight computed once per step
        optimizer.zero_grad(set_to_none=True)
        with parametrize.cached():
            logits = model(x)
        loss_fn(logits, y).backward()
        optimizer.step()

    own = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # also the warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"parameters": count_parameters(model), "step_seconds": seconds,
            "images_per_second": batch / seconds, "saved_bytes": sum(storages.values())}


def section_scaling(ctx: Context) -> dict:
    args = ctx.args
    depths = [int(d) for d in str(args.scale_depths).split(",")]
    widths = [int(w) for w in str(args.scale_widths).split(",")]
    base = preset(TrainConfig().preset)
    peer_widths = {name: build_peer(name, depth=base.steps_per_stage)[1]["width"] for name in PEERS}
    stages = len(base.channels)
    configs = sorted({(d, 1) for d in depths} | {(base.steps_per_stage, w) for w in widths},
                     key=lambda c: (stage_counts(c[0], stages), c[1]))
    rows = []
    for name in MODELS:
        for depth, mult in configs:
            torch.manual_seed(0)
            if name == "robustflow":
                if any(n % 2 for n in stage_counts(depth, stages)):
                    continue
                channels = tuple(c * mult for c in base.channels)
                model = build_model(preset(TrainConfig().preset, steps_per_stage=depth,
                                           channels=channels))
            else:
                width = peer_widths[name] * mult
                channels = tuple(width * 2 ** min(i, 2) for i in range(3))
                model = BUILDERS[name](width, depth, stem=base.stem)
            print(f"[5] {name} depth {depth} width ×{mult}", flush=True)
            rows.append({"model": name, "depth": depth, "width_multiplier": mult,
                         "channels": list(channels),
                         **step_cost(model, args.scale_batch, max(args.repeats, 2))})
    return {"rows": rows, "settings": {"batch": args.scale_batch, "depths": depths, "widths": widths,
                                       "repeats": max(args.repeats, 2),
                                       "depth_means": "residual steps per stage (robustflow: "
                                       "expansive + contractive steps; SLL: blocks; torchlip: "
                                       "3×3 convolutions)"}}


def section_autoattack(ctx: Context) -> dict:
    args = ctx.args
    from robustflow.pretrained import load_test_sample

    images, labels = load_test_sample()
    images, labels = images[: args.aa_n], labels[: args.aa_n]
    eps_items = bench_autoattack.parse_eps(bench_autoattack.DEFAULT_EPS)
    if args.aa_cells:
        print(f"[6] AutoAttack rows from {args.aa_cells}", flush=True)
        rows = cells_from_file(Path(args.aa_cells), ["lipschitz", "baseline"], eps_items,
                               n=len(images), queries=args.aa_queries)
    else:
        print(f"[6] AutoAttack, ours and torchattacks', on {len(images)} bundled test images",
              flush=True)
        rows = bench_autoattack.compare(["lipschitz", "baseline"], images, labels, eps_items,
                                        queries=args.aa_queries, no_skip_too=True)
    broken = _certified_broken_by_torchattacks(rows, images, labels)
    # the robust-point indices only serve to join half-rows and the check above; results.json
    # keeps the figures
    rows = [{k: v for k, v in r.items() if not k.endswith("_robust_points")} for r in rows]
    worst = max(r["ours"] - r["torchattacks"] for r in rows)
    slowest = min(rows, key=lambda r: r["speedup_cpu"])
    cells = "; ".join(f"{r['model']} {r['norm']} {r['eps']} {r['speedup_cpu']:.2f}×" for r in rows)
    aims = [{"aim": "AutoAttack as strong as torchattacks' (robust accuracy at most "
                    f"{100 * STRENGTH_TOLERANCE:g} points above) in every cell",
             "met": worst <= STRENGTH_TOLERANCE,
             "detail": f"largest difference ours − torchattacks {100 * worst:+.1f} points"},
            {"aim": "AutoAttack at least 1.5× faster than torchattacks' (CPU time) in every cell",
             "met": slowest["speedup_cpu"] >= 1.5, "detail": cells},
            {"aim": "no point that robustflow certifies falls to torchattacks' AutoAttack, which "
                    "attacks every point",
             "met": bool(broken) and all(b["broken"] == 0 for b in broken),
             "detail": "; ".join(f"{b['model']} {b['norm']} {b['eps']}: {b['broken']} of "
                                 f"{b['certified']} certified points broken" for b in broken)
                       or "no row keeps torchattacks' robust points of a certified point"}]
    return {"rows": rows, "aims": aims,
            "settings": {"n": len(images), "queries": args.aa_queries, "steps": 10, "targets": 9,
                         "batch_size": 250, "models": "bundled lipschitz.pt and baseline.pt",
                         "cells_from": args.aa_cells}}


def _certified_broken_by_torchattacks(rows: list[dict], images: Tensor, labels: Tensor
                                      ) -> list[dict]:
    """For each L2 row that keeps torchattacks' robust points: how many of the points that
    robustflow's ``certify`` proves robust at ε (recomputed here, on the same bundled model and
    images) torchattacks' AutoAttack broke (rows with no certified point are left out). A sound
    certificate keeps every count at 0."""
    radii: dict[str, Tensor] = {}
    out = []
    for row in rows:
        if row["norm"] != "l2" or "torchattacks_robust_points" not in row:
            continue
        if row["model"] not in radii:
            l2 = [e for n, _, e in bench_autoattack.parse_eps(bench_autoattack.DEFAULT_EPS)
                  if n == "l2"]
            radii[row["model"]] = bench_autoattack.certified_radii(
                bench_autoattack.bundled_plain(row["model"]), images, labels, 250, l2)
        eps = bench_autoattack.parse_eps(f"l2:{row['eps']}")[0][2]
        certified = set((radii[row["model"]] > eps).nonzero().squeeze(1).tolist())
        broken = certified - set(row["torchattacks_robust_points"])
        if certified:
                out.append({"model": row["model"], "norm": "l2", "eps": row["eps"],
                        "certified": len(certified), "broken": len(broken)})
    return out


def cells_from_file(path: Path, models: list[str], eps_items: list[tuple[str, str, float]], *,
                    n: int, queries: int) -> list[dict]:
    """Section 6's rows from a ``bench_autoattack.py --json`` file, measured one cell per call
    (the full comparison takes longer than one sitting). Each (model, norm, ε) cell must be
    there, measured on today's bundled model (same SHA-256), ``n`` images, ``queries`` Square
    queries, the standard version at torchattacks' 10 steps. A cell is a full row or two
    half-rows (``--skip-torchattacks`` and ``--skip-ours``), joined here; the last measurement of
    each half counts. Raises ``SystemExit`` naming what is missing or does not match."""
    if not path.is_file():
        raise SystemExit(f"--aa-cells: no file {path}")
    fingerprints = {m: bench_autoattack.asset_fingerprint(m) for m in models}
    halves: dict[tuple[str, str, str], dict[str, dict]] = {}
    rejected = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (row["model"], row["norm"], row["eps"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"--aa-cells: {path} line {number} is not a bench_autoattack row "
                             f"({err})") from None
        need = {"n": n, "queries": queries, "steps": 10, "version": "standard"}
        wrong = [f"{k} {row.get(k)!r} (need {v!r})" for k, v in need.items() if row.get(k) != v]
        if row.get("asset_sha256") != fingerprints.get(row["model"]):
            wrong.append("measured on another bundled model (SHA-256 differs)")
        if wrong:
            rejected.append(f"line {number} {' '.join(key)}: {', '.join(wrong)}")
            continue
        for side in ("ours", "torchattacks"):
            if side in row:
                halves.setdefault(key, {})[side] = row
    found = {key: joined for key, sides in halves.items()
             if (joined := _join_halves(sides)) is not None}
    cells = [(m, norm, label) for m in models for norm, label, _ in eps_items]
    missing = [cell for cell in cells if cell not in found]
    if missing:
        def command(cell: tuple[str, str, str]) -> str:
            m, norm, label = cell
            has = halves.get(cell, {})
            only = " --skip-ours" if "ours" in has else " --skip-torchattacks" if has else ""
            return (f"python benchmarks/bench_autoattack.py --n {n} --queries {queries} --models {m} "
                    f"--eps {norm}:{label}{only} --json {path}")
        detail = f" (rejected: {'; '.join(rejected)})" if rejected else ""
        raise SystemExit(f"--aa-cells: {path} lacks {len(missing)} of {len(cells)} cells"
                         f"{detail}; measure them with: {'; '.join(map(command, missing))}")
    return [found[cell] for cell in cells]


_THEIR_KEYS = ("torchattacks", "torchattacks_s", "torchattacks_cpu_s", "torchattacks_robust_points")


def _join_halves(sides: dict[str, dict]) -> dict | None:
    """One cell's row from its latest ``ours`` and ``torchattacks`` measurements (a full row
    serves as either), or ``None`` while a half is missing."""
    if set(sides) != {"ours", "torchattacks"}:
        return None
    mine, theirs = sides["ours"], sides["torchattacks"]
    if mine is theirs:
        return mine
    row = {k: v for k, v in mine.items() if k not in _THEIR_KEYS + ("both_robust", "speedup_cpu")}
    row |= {k: theirs[k] for k in _THEIR_KEYS if k in theirs}
    row["speedup_cpu"] = row["torchattacks_cpu_s"] / row["ours_cpu_s"]
    if "ours_robust_points" in row and "torchattacks_robust_points" in row:
        both = set(row["ours_robust_points"]) & set(row["torchattacks_robust_points"])
        row["both_robust"] = len(both) / row["n"]
    row["joined_from_halves"] = True
    return row


RUNNERS = {1: section_training, 2: section_attacks, 3: section_cost, 4: section_tightness,
           5: section_scaling, 6: section_autoattack}


# ------------------------------------------------------------------ report


def _shape(row: dict) -> str:
    return f" (width {row['width']}, depth {row['depth']})" if "width" in row else ""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _aims(section: dict) -> list[str]:
    return [f"- {'✅ met' if a['met'] else '❌ not met'}: {a['aim']} — {a['detail']}"
            for a in section.get("aims", [])]


def _header(number: int, section: dict) -> list[str]:
    m = section["machine"]
    return [f"## {number}. {SECTIONS[number]}", "",
            f"Command: `{section['command']}`  ",
            f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads "
            f"(OMP_NUM_THREADS={m['omp_num_threads']}), torch {m['versions']['torch']}, "
            f"{m['platform']}; {m['date']}; {section['seconds']:.0f} s", ""]


def render(results: dict) -> str:
    """RESULTS.md from ``results.json``'s content."""
    lines = ["# Benchmarks against orthogonium, deel-torchlip, foolbox and torchattacks", "",
             "Written by `benchmarks/run_all.py` (see its docstring); every figure below comes "
             "with the command and machine that produced it. Aims are judged from the numbers. "
             "CIFAR-10 is read from `--data-root` or, without it, `$ROBUSTFLOW_DATA`.", ""]
    sections = results["sections"]
    all_aims = [a for s in sections.values() for a in s.get("aims", [])]
    if all_aims:
        lines += ["## Aims", ""]
        for key in sorted(sections, key=int):
            lines += _aims(sections[key])
        lines.append("")
    if "1" in sections:
        s = sections["1"]
        st = s["settings"]
        lines += _header(1, s)
        lines += [f"Each model trained for {st['budget']:.0f} s on the CIFAR-10 training set with "
                  f"robustflow's recipe ({', '.join(f'{k} {v}' for k, v in st['recipe'].items())}); "
                  f"certified on {st['test_n']} test images, PGD-L2 ({st['attack_steps']} steps) on "
                  f"the first {st['attack_n']} (points that robustflow's certificate proves are not "
                  "attacked, which changes no result). Peers are sized to the parameter count of "
                  "robustflow's default preset; depth = residual blocks (SLL) or 3×3 "
                  "convolutions (torchlip) per stage.", "",
                  "| model | parameters | train img/s | clean | certified 36/255 | certified 0.3 | "
                  "own cert. 36/255 | own cert. 0.3 | proven L | PGD-L2 0.3 (clean / certified "
                  "on the PGD subset) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["models"].values():
            p = r["pgd"]
            lines.append(
                f"| {r['label']}{_shape(r)} | {r['parameters']:,} | {r['images_per_second']:.0f} | "
                f"{_pct(r['clean_accuracy'])} | {_pct(r['certified_accuracy']['36/255'])} | "
                f"{_pct(r['certified_accuracy']['0.3'])} | "
                f"{_pct(r['own_certified_accuracy']['36/255'])} | "
                f"{_pct(r['own_certified_accuracy']['0.3'])} | {r['lipschitz_bound']:.6g} | "
                f"{_pct(p['robust_accuracy'])} ({_pct(p['clean_accuracy'])} / "
                f"{_pct(p['certified_accuracy'])}) |")
        reused = [r for r in s["models"].values() if r.get("reused_from")]
        if reused:
            lines += ["", "Not retrained in this run (`--reuse`): " + "; ".join(
                f"{r['label']}, trained {r['reused_from']} by an earlier run with the same budget, "
                f"recipe and layout" for r in reused) + "."]
        lines += ["", "\"certified\" is robustflow's `certify` (proven bound, exported weights); "
                  "\"own cert.\" is each library's own certificate:", ""]
        for r in s["models"].values():
            lines.append(f"- **{r['label']}** ({r['own_certificate']}): {r['explanation']}")
            if "agreement" in r:
                agree = "; ".join(f"at {k}: both {v['both']}, only own {v['own_only']}, only "
                                  f"robustflow {v['robustflow_only']}" for k, v in r["agreement"].items())
                lines.append(f"  Certified points — {agree}.")
        lines.append("")
    if "2" in sections:
        s = sections["2"]
        st = s["settings"]
        lines += _header(2, s)
        lines += [f"{st['n']} test images, ε = {st['eps']}, {st['steps']} steps, step 0.25·ε, "
                  f"one random start, on {st['model']}.", "",
                  "| attack | seconds | robust accuracy | ours faster by |", "|---|---|---|---|"]
        for r in s["results"]:
            speed = r.get("speedup_of_ours")
            lines.append(f"| {r['attack']} | {r['seconds']:.2f} | {_pct(r['robust_accuracy'])} | "
                         f"{'–' if speed is None else f'{speed:.2f}×'} |")
        lines.append("")
    if "3" in sections:
        s = sections["3"]
        lines += _header(3, s)
        lines += [f"Best of {s['settings']['repeats']} over {s['settings']['n']} test images, batch "
                  "500; certification = robustflow's `certify_dataset` (export, proven bound, one "
                  "pass); inference = the exported model's forward pass.", "",
                  "| model | inference s | certify s | ratio | proven L |", "|---|---|---|---|---|"]
        for name, r in s["models"].items():
            lines.append(f"| {LABELS[name]} | {r['inference_seconds']:.2f} | {r['certify_seconds']:.2f}"
                         f" | {r['ratio']:.3f} | {r['lipschitz_bound']:.6g} |")
        lines.append("")
    if "4" in sections:
        s = sections["4"]
        st = s["settings"]
        lines += _header(4, s)
        lines += [f"First {st['n']} test images; distance = the smaller adversarial that DDN and FMN "
                  f"({st['steps']} steps each) find; ratio = certified radius / distance on the "
                  "correctly classified points with a finite distance (≤ 1 for a sound "
                  "certificate; nearer 1 is tighter). \"robustflow certify\" is its float32 "
                  "radius, lowered by the proven normwise bound on float32 rounding (the decisions "
                  "at the ε of section 1 are re-checked in float64, so its certified accuracies "
                  "are exact); \"float64\" certifies the same weights in float64 arithmetic, "
                  "where that bound is negligible: the certificate's own tightness.", "",
                  "| model | certificate | points | ratio q1 | median | q3 | radius > distance | "
                  "median distance |", "|---|---|---|---|---|---|---|---|"]
        for name, r in s["models"].items():
            dist = r["distance"]
            for key, q in r["ratios"].items():
                if "median" not in q:
                    lines.append(f"| {LABELS[name]} | {key} | 0 | – | – | – | – | – |")
                    continue
                lines.append(f"| {LABELS[name]} | {key} | {q['n']} | {q['q1']:.3f} | "
                             f"{q['median']:.3f} | {q['q3']:.3f} | {q['above_distance']} | "
                             f"{dist['median']:.3f} |")
        lines.append("")
    if "5" in sections:
        s = sections["5"]
        st = s["settings"]
        lines += _header(5, s)
        lines += [f"One training step (forward, backward, Adam) on a batch of {st['batch']} random "
                  f"32×32 images, median of {st['repeats']}; memory = bytes autograd saves for "
                  f"backward. Depth = {st['depth_means']}.", "",
                  "| model | depth | width | channels | parameters | step s | img/s | saved MB | "
                  "step time vs base |", "|---|---|---|---|---|---|---|---|---|"]
        bases = {}
        for r in s["rows"]:
            bases.setdefault(r["model"], r["step_seconds"])
            lines.append(f"| {LABELS[r['model']]} | {r['depth']} | ×{r['width_multiplier']} | "
                         f"{'/'.join(map(str, r['channels']))} | {r['parameters']:,} | "
                         f"{r['step_seconds']:.3f} | {r['images_per_second']:.0f} | "
                         f"{r['saved_bytes'] / 2**20:.1f} | "
                         f"{r['step_seconds'] / bases[r['model']]:.2f}× |")
        lines.append("")
    if "6" in sections:
        s = sections["6"]
        st = s["settings"]
        lines += _header(6, s)
        lines += [f"The first {st['n']} images of the bundled test sample; both run AutoAttack's "
                  f"standard version (APGD-CE, APGD-T, FAB-T, Square; worst case per point) at "
                  f"torchattacks' budget ({st['steps']} iterations, {st['targets']} target "
                  f"classes, {st['queries']} Square queries), batch {st['batch_size']}, on "
                  f"{st['models']}. Ours skips the points robustflow certifies at ε (L2 only) and "
                  "its time includes that certification; CPU seconds of the process (the wall "
                  "clock of this shared machine drifts).", "",
                  "| model | norm | ε | clean | certified | ours | ours CPU s | without skipping "
                  "CPU s | torchattacks | torchattacks CPU s | ours faster by |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            plain = r.get("ours_no_skip_cpu_s")
            lines.append(f"| {r['model']} | {r['norm']} | {r['eps']} | {_pct(r['clean'])} | "
                         f"{_pct(r['certified'])} | {_pct(r['ours'])} | {r['ours_cpu_s']:.0f} | "
                         f"{'–' if plain is None else f'{plain:.0f}'} | {_pct(r['torchattacks'])} | "
                         f"{r['torchattacks_cpu_s']:.0f} | {r['speedup_cpu']:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def published_command(argv: list[str]) -> str:
    """The command line as RESULTS.md shows it: the data folder, a path of this machine, as
    ``$DATA`` (the README's name for it)."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append("$DATA")
        elif arg.startswith("--data-root="):
            shown.append("--data-root=$DATA")
        else:
            shown.append(shlex.quote(arg))
        hide_next = arg == "--data-root"
    return " ".join(["python benchmarks/run_all.py", *shown])


def main(argv: list[str] | None = None) -> dict:
    """Run the selected sections; write RESULTS.md and results.json; return the results."""
    line_buffered_output()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ctx = Context(args, published_command(argv))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    results: dict = {"sections": {}}
    if json_path.is_file():
        try:
            results = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            print(f"note: {json_path} is not valid JSON ({err}); starting a fresh one", flush=True)
        results.setdefault("sections", {})
    if args.render:
        if not results["sections"]:
            raise SystemExit(f"--render: no sections in {json_path}; run the benchmark first")
        (out / "RESULTS.md").write_text(render(results))
        print(f"wrote {out / 'RESULTS.md'} from {json_path}")
        return results
    for number in args.sections:
        started = time.monotonic()
        section = RUNNERS[number](ctx)
        section.update(command=ctx.command, machine=machine(), title=SECTIONS[number],
                       seconds=time.monotonic() - started)
        results["sections"][str(number)] = section
        json_path.write_text(json.dumps(results, indent=2, default=_jsonable))
        (out / "RESULTS.md").write_text(render(results))
        for aim in section.get("aims", []):
            print(("met     " if aim["met"] else "NOT MET ") + f"{aim['aim']}: {aim['detail']}")
    print(f"wrote {out / 'RESULTS.md'} and {json_path}")
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()

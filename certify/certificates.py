"""Certified L2 radii from logit margins and a proven Lipschitz bound.

If the logit map ``f`` is L-Lipschitz, every ``f_y − f_j`` is ``√2 L``-Lipschitz, so the
prediction ``y`` cannot change within radius ``M / (√2 L)`` where
``M = f_y − max_{j≠y} f_j`` (Tsuzuku et al. 2018). When ``f = W g + b`` with ``g``
``L_b``-Lipschitz, ``f_y − f_j`` is ``L_b ‖w_y − w_j‖``-Lipschitz, which gives the
pairwise radius ``min_{j≠y} (f_y − f_j) / (L_b ‖w_y − w_j‖)``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .bounds import analyse, freeze, leaves, local_rounding, measured_rules, product, split_head
from .rounding import (
    SUPPORTED_DTYPES,
    Affine,
    compose_errors,
    exact_arithmetic,
    norm_bound,
    unit_roundoff,
)
from .spectral import SAFETY

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: What a float64 multiply-add costs in float32 ones, for choosing the plan (CPU convolutions of
#: 24–128 channels on 4×4 to 16×16 grids: 5–11×, the larger grids dearer).
FLOAT64_COST = 8.0
_TINY = torch.finfo(torch.float64).tiny
_SQRT2 = math.sqrt(2.0)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``M = f_y − max_{j≠y} f_j`` per sample (float64); positive iff ``y`` wins strictly."""
    z = logits.detach().double()
    labels = labels.view(-1, 1).to(z.device)
    others = z.scatter(1, labels, -math.inf)
    return z.gather(1, labels).squeeze(1) - others.amax(dim=1)


def _per_sample(slack: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(slack, dtype=torch.float64, device=like.device).expand(like.shape[0])


def global_radius(logits: Tensor, labels: Tensor, lipschitz: float,
                  slack: Tensor | float = 0.0) -> Tensor:
    """``max(0, (M − s) / (√2 L))`` per sample, in float64.

    ``s`` bounds how much rounding can have moved any difference of two logits (``√2 E`` when
    the computed logits are within ``E`` of the exact ones in L2 norm).
    """
    numerator = margins(logits, labels) - _per_sample(slack, logits)
    return (numerator / max(_SQRT2 * lipschitz, _TINY)).clamp_min(0.0)


def head_distances(weight: Tensor) -> Tensor:
    """Upper bounds on ``‖w_i − w_j‖₂`` for all rows of a head weight (float64, ``K × K``)."""
    w = weight.detach().double().cpu()
    distances = torch.stack([torch.linalg.vector_norm(w - row, dim=1) for row in w])
    return distances * (1.0 + SAFETY)


def pairwise_radius(logits: Tensor, labels: Tensor, body_bound: float,
                    distances: Tensor, slack: Tensor | float = 0.0) -> Tensor:
    """``max(0, min_{j≠y} (f_y − f_j − s) / (L_b ‖w_y − w_j‖))`` per sample, in float64.

    ``distances`` comes from :func:`head_distances` of the last Linear layer; ``s`` as in
    :func:`global_radius`.
    """
    z = logits.detach().double()
    labels = labels.view(-1, 1).to(z.device)
    gaps = z.gather(1, labels) - z - _per_sample(slack, z).unsqueeze(1)
    scale = (body_bound * distances.to(z.device)[labels.squeeze(1)]).clamp_min(_TINY)
    ratios = (gaps / scale).scatter(1, labels, math.inf)
    return ratios.amin(dim=1).clamp_min(0.0)


def is_certified(correct: Tensor | np.ndarray, radius: Tensor | np.ndarray,
                 eps: float) -> Tensor | np.ndarray:
    """Certified at ``ε``: correct and (``ε == 0`` or ``radius > ε``)."""
    return correct & (radius > eps) if eps > 0 else correct


@dataclass
class CertificateBatch:
    """Per-sample certificates; ``radius`` is 0 for misclassified samples.

    ``rechecked`` marks the samples whose certificate was recomputed in float64 because
    rounding could have decided it at one of the requested ε; ``error_bound`` is the proven bound
    on the L2 error of each sample's logits in the first pass, measured on it.
    """

    prediction: Tensor
    margin: Tensor
    radius: Tensor
    correct: Tensor
    rechecked: Tensor
    error_bound: Tensor


@dataclass
class CertificationReport:
    """Aggregate certificates; the per-sample arrays stay out of ``to_dict``/``to_json``.

    ``rules`` names the rule that bounded each part (path, type, rule, bound); ``arithmetic``
    says in which precision the logits were computed, the a-priori proven rounding error bound
    ``E(x) = const + slope ‖x‖`` of the logits, the median and largest of the per-sample bounds
    measured on the pass (the ones subtracted from the margins), the parts the pass computed in
    float64 (:attr:`Certifier.plan`), and how many samples were re-checked in float64.
    """

    model: str
    lipschitz_bound: float
    n: int
    clean_accuracy: float
    certified_accuracy: dict[str, float]
    radius_quantiles: dict[str, float]
    method: str
    rules: list[dict] = field(default_factory=list)
    arithmetic: dict = field(default_factory=dict)
    labels: np.ndarray = field(default=None, repr=False, metadata={"per_sample": True})
    predictions: np.ndarray = field(default=None, repr=False, metadata={"per_sample": True})
    margins: np.ndarray = field(default=None, repr=False, metadata={"per_sample": True})
    radii: np.ndarray = field(default=None, repr=False, metadata={"per_sample": True})

    def certified_accuracy_at(self, eps: float) -> float:
        """Fraction of samples certified at ``eps``."""
        return float(is_certified(self.predictions == self.labels, self.radii, eps).mean())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.metadata.get("per_sample")}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per sample: ``index,label,prediction,margin,radius``."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "label", "prediction", "margin", "radius"])
            rows = zip(self.labels, self.predictions, self.margins, self.radii, strict=True)
            for index, (label, prediction, margin, radius) in enumerate(rows):
                writer.writerow([index, int(label), int(prediction), float(margin), float(radius)])


def model_dtype(model: nn.Module) -> torch.dtype:
    """The one floating dtype of ``model``'s parameters and buffers; ``ValueError`` if it has
    several, or one whose arithmetic certify has no rounding bound for (float16, bfloat16)."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the model mixes floating types {sorted(map(str, dtypes))}; convert it "
                         "to one with model.float() or model.double()")
    dtype = dtypes.pop() if dtypes else torch.float32
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the model computes in {dtype}, whose rounding certify cannot bound; "
                         "certify a float32 or float64 copy (model.float())")
    return dtype


class Certifier:
    """Certified radii of ``model`` (an ``nn.Module`` mapping inputs of ``input_shape`` to logits).

    At construction the model is checked (only registered computations, no hooks; see
    :mod:`certify.bounds`), frozen (input-independent values materialised) and bounded once:
    the Lipschitz bound, for ``method="pairwise"`` the body bound and head row distances, and a
    proven bound ``E(x)`` on the rounding error of the logits in the model's precision. Re-create
    the certifier after changing the parameters; later changes to ``model`` do not affect it.

    Every forward pass runs in exact IEEE arithmetic (:func:`~certify.rounding.exact_arithmetic`:
    no TF32, no autocast). A float32 model's first pass computes the parts that carry most of the
    rounding bound in float64 (:attr:`plan`). Radii are lowered by the rounding bound, so they
    are sound; a sample whose decision at one of the requested ``epsilons`` rounding could have
    flipped is recomputed in float64, so every decision at those ε equals the decision computed
    in float64.
    ``"auto"`` uses ``"pairwise"`` when the model is a sequential ending in a Linear layer
    (keeping per sample the larger of the two sound radii), else ``"global"``.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...],
                 method: str = "auto") -> None:
        if method not in ("auto", "global", "pairwise"):
            raise ValueError(f"method must be 'auto', 'global' or 'pairwise', got {method!r}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.dtype = model_dtype(model)
        with exact_arithmetic():
            analyse(model, self.input_shape)  # refuse what certify cannot see, before copying
            self.model = freeze(model).train(model.training)
            parts = analyse(self.model, self.input_shape)
            self._model64 = copy.deepcopy(self.model).double()
            offsets = self._offsets(parts)
        split = split_head(self.model) if method != "global" else None
        if method == "pairwise" and split is None:
            raise ValueError("pairwise certificates need a sequential model ending in nn.Linear")
        self.method = "global" if split is None else "pairwise"
        self.lipschitz = product(part.bound for part in parts)
        if split is not None:  # L = L_body · ‖head‖: the body bounded once, not twice
            self.body_bound = product(part.bound for part in parts[:-1])
            self.distances = head_distances(split[1].weight)
        self.parts = [{"path": p.path, "type": type(p.module).__name__, "rule": p.rule,
                       "bound": p.bound} for p in parts]
        self._leaves = leaves(self.model)
        self._leaves64 = leaves(self._model64)
        tracked = {dtype: local_rounding(parts, self.model, self.input_shape, dtype)
                   for dtype in {self.dtype, torch.float64}}
        self._local = {dtype: [t.error for t in ts] for dtype, ts in tracked.items()}
        # parts registered ``measured`` bound their rounding from the norms the pass produced;
        # in float64 the a-priori bound is already negligible
        self._measured = {self.dtype: measured_rules(self.model, self.input_shape)}
        # Π_{j>k} L_j: how far part k's own rounding error can travel to the logits
        self._suffix = [product(p.bound for p in parts[k + 1:]) for k in range(len(parts))]
        #: a-priori bound ``E(‖x‖)`` on the L2 error of the computed logits, per precision
        self.error = {dtype: compose_errors([(p.bound, offset, local) for p, offset, local
                                             in zip(parts, offsets, self._local[dtype], strict=True)])[1]
                      for dtype in self._local}
        #: the precision of each part in the first pass (see :meth:`_plan`, :meth:`_cheapest_plan`)
        self._products = [t.products for t in tracked[torch.float64]]
        self.plan = [self.dtype] * len(parts)
        self._planned = self.dtype == torch.float64
        if not self._planned:
            self.plan = self._plan()

    def _plan(self) -> list[torch.dtype]:
        """The plan before any decision is asked for: in float64, the parts that carry a larger
        share of the rounding bound than of the multiply-adds.

        Measured on a fixed random batch in the model's precision, part ``k`` contributes
        ``Π_{j>k} L_j e_k`` to the bound on the logits' error; in float64 its share all but
        vanishes, at a few times its float32 cost. Deterministic: the same model, the same plan.
        """
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(8, *self.input_shape, generator=generator, dtype=torch.float64)
        device = next((t.device for t in self.model.parameters()), torch.device("cpu"))
        shares = self._contributions(x.to(device, self.dtype)).median(dim=1).values
        products = self._products
        total_error, total_products = float(shares.sum()), sum(products)
        if total_error <= 0 or total_products <= 0:
            return [self.dtype] * len(products)
        return [torch.float64 if products[k] > 0
                and float(shares[k]) / total_error > products[k] / total_products
                else self.dtype for k in range(len(products))]

    def _cheapest_plan(self, logits: Tensor, y: Tensor, contributions: Tensor, extra: Tensor,
                       epsilons: Sequence[float]) -> list[torch.dtype]:
        """The plan that makes certifying this batch cheapest, from its all-float32 pass.

        Parts join float64 in the order of their share of the bound per multiply-add; for each
        prefix the slack without their contributions gives the samples that would be re-checked
        at ``epsilons``, and the cost counts multiply-adds, float64 ones as
        :data:`FLOAT64_COST` float32 ones, with every re-checked sample a full float64 pass.
        """
        products = torch.tensor(self._products, dtype=torch.float64, device=logits.device)
        total = float(products.sum())
        share = contributions.median(dim=1).values
        candidates = [k for k in torch.argsort(share / products.clamp_min(1.0), descending=True)
                      .tolist() if products[k] > 0 and share[k] > 0]
        correct = logits.argmax(dim=1) == y
        wide = torch.zeros(len(products), dtype=torch.bool, device=logits.device)
        best, best_cost = wide.clone(), math.inf
        for count in range(len(candidates) + 1):
            if count:
                wide[candidates[count - 1]] = True
            slack = _SQRT2 * contributions[~wide].sum(dim=0) * (1 + 1e-12)
            low = self._radius(logits, y, slack + extra)
            high = self._radius(logits, y, -slack)
            unsure = torch.zeros_like(correct)
            for eps in epsilons:
                unsure |= correct & (low <= eps) & (high > eps)
            cost = total + (FLOAT64_COST - 1) * float(products[wide].sum()) + \
                FLOAT64_COST * float(unsure.double().mean()) * total
            if cost < best_cost:
                best, best_cost = wide.clone(), cost
        return [torch.float64 if best[k] else self.dtype for k in range(len(products))]

    def _contributions(self, x: Tensor) -> Tensor:
        """``Π_{j>k} L_j e_k`` of every part ``k`` (rows) for every sample (columns), every part
        in the model's precision."""
        contributions: list[Tensor] = []
        with torch.inference_mode(), exact_arithmetic():
            self._forward(x, self.dtype, contributions)
        return torch.stack(contributions)

    def _offsets(self, parts: list) -> list[float]:
        """``‖f_k(0)‖`` of every part, computed in float64 and widened past its rounding."""
        leaves64 = dict(self._model64.named_modules())
        inputs: dict[str, torch.Size] = {}

        def record(path: str):
            def hook(module: nn.Module, args: tuple) -> None:
                inputs.setdefault(path, args[0].shape)
            return hook

        handles = [leaves64[p.path.removeprefix("model").removeprefix(".")].register_forward_pre_hook(
            record(p.path)) for p in parts]
        device = next((t.device for t in self._model64.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad():
                self._model64(torch.zeros(1, *self.input_shape, dtype=torch.float64, device=device))
        finally:
            for handle in handles:
                handle.remove()
        offsets = []
        with torch.no_grad():
            for part in parts:
                module = leaves64[part.path.removeprefix("model").removeprefix(".")]
                out = module(torch.zeros(inputs[part.path], dtype=torch.float64, device=device))
                offsets.append(float(out.norm()) * (1 + 1e-9) + 1e-300)
        return offsets

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise ValueError(f"this certifier was built for inputs of shape (N, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}; "
                             "the bound depends on the shape: build a Certifier for it")
        if x.dtype != self.dtype:
            raise ValueError(f"this certifier computes in {self.dtype}, got inputs of {x.dtype}; "
                             f"convert them with .to({self.dtype})")

    def _radius(self, logits: Tensor, y: Tensor, slack: Tensor) -> Tensor:
        radius = global_radius(logits, y, self.lipschitz, slack)
        if self.method == "pairwise":
            radius = torch.maximum(radius, pairwise_radius(logits, y, self.body_bound,
                                                           self.distances, slack))
        return radius

    def _slack(self, dtype: torch.dtype, norms: Tensor) -> Tensor:
        """``√2 E``: how far rounding can have moved any difference of two logits."""
        error: Affine = self.error[dtype]
        return _SQRT2 * (error.const + error.slope * norms) * (1 + 1e-12)

    def _forward(self, x: Tensor, dtype: torch.dtype | None = None,
                 contributions: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The logits, part by part, in ``dtype`` (by default each part in the precision of
        :attr:`plan`), and the bound ``√2 Σ_k Π_{j>k} L_j e_k`` on how far rounding moved any
        difference of two logits (each term is appended to ``contributions`` if given).

        ``e_k`` is part ``k``'s own rounding error at its computed input ``x̃_{k−1}``: measured
        operation by operation for parts registered ``measured``, else ``e_k(‖x̃_{k−1}‖)``.
        Rounding a float64 value to float32 before a part adds ``Π_{j≥k} L_j (u ‖x̃‖ + η₀ √n)``;
        widening float32 to float64 is exact."""
        plan = self.plan if dtype is None else [dtype] * len(self.plan)
        error = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for k, ((path, leaf), (_, leaf64)) in enumerate(zip(self._leaves, self._leaves64,
                                                            strict=True)):
            precision = plan[k]
            if x.dtype != precision:
                if x.dtype == torch.float64:  # rounded to the model's precision
                    u, tiny = unit_roundoff(precision), torch.finfo(precision).tiny
                    through = product((self.parts[k]["bound"], self._suffix[k]))
                    error += through * (u * norm_bound(x) + tiny * math.sqrt(x[0].numel()))
                x = x.to(precision)
            local = self._local[precision][k]
            measured = self._measured.get(precision, {}).get(path)
            if measured is not None:
                step = measured(x)
                own = self._suffix[k] * step.error
                x = step.value
            else:
                own = self._suffix[k] * (local.const + local.slope * norm_bound(x))
                x = (leaf if precision == self.dtype else leaf64)(x)
            error += own
            if contributions is not None:
                contributions.append(own)
        return x, _SQRT2 * error * (1 + 1e-12)

    def __call__(self, x: Tensor, y: Tensor, epsilons: Sequence[float] = ()) -> CertificateBatch:
        """Certificates of the batch ``x`` with labels ``y``; decisions at ``epsilons`` exact.

        A radius ``r`` from float32 logits within ``E`` of the exact ones is bracketed by
        ``r_lo`` (every logit gap lowered by ``√2 (E + 2 E₆₄)``) and ``r_hi`` (raised by ``√2 E``),
        and the float64 radius lies in between. Samples with ``r_lo ≤ ε < r_hi`` for a requested
        ``ε`` are recomputed in float64; the others keep ``r_lo``, whose decision is the same.
        The first batch with a requested ``ε > 0`` also fixes :attr:`plan` for the batches after
        it (:meth:`_cheapest_plan`); it is then computed with that plan too.
        """
        self._check_input(x)
        y = y.to(x.device)
        with torch.inference_mode(), exact_arithmetic():
            positive = [eps for eps in epsilons if eps > 0]
            norms = x.detach().double().flatten(1).norm(dim=1)
            extra = 2 * self._slack(torch.float64, norms)
            if positive and not self._planned:
                contributions: list[Tensor] = []
                logits, slack = self._forward(x, self.dtype, contributions)
                self.plan = self._cheapest_plan(logits, y, torch.stack(contributions), extra,
                                                positive)
                self._planned = True
                if torch.float64 in self.plan:
                    logits, slack = self._forward(x)
            else:
                logits, slack = self._forward(x)
            error = slack / _SQRT2
            if self.dtype == torch.float64:
                return self._batch(logits, y, self._radius(logits, y, slack),
                                   torch.zeros_like(y, dtype=torch.bool), error)
            low = self._radius(logits, y, slack + extra)
            high = self._radius(logits, y, -slack)
            correct = logits.argmax(dim=1) == y
            unsure = torch.zeros_like(correct)
            for eps in positive:
                unsure |= correct & (low <= eps) & (high > eps)
            if not unsure.any():
                return self._batch(logits, y, low, unsure, error)
            exact, slack64 = self._forward(x[unsure], torch.float64)
            radius, logits = low.clone(), logits.double()
            radius[unsure] = self._radius(exact, y[unsure], slack64)
            logits[unsure] = exact
            return self._batch(logits, y, radius, unsure, error)

    @staticmethod
    def _batch(logits: Tensor, y: Tensor, radius: Tensor, rechecked: Tensor,
               error: Tensor) -> CertificateBatch:
        prediction = logits.argmax(dim=1)
        correct = prediction == y
        return CertificateBatch(prediction, margins(logits, y), torch.where(correct, radius, 0.0),
                                correct, rechecked, error)

    def certify_loader(self, loader: Iterable, epsilons: Sequence[float],
                       eps_labels: Sequence[str] | None = None, progress: bool = True,
                       device: torch.device | str | None = None,
                       limit: int | None = None) -> CertificationReport:
        """Certify every ``(x, y)`` batch of ``loader`` (the first ``limit`` samples if given)."""
        epsilons = [float(eps) for eps in epsilons]
        labels = [f"{eps:g}" for eps in epsilons] if eps_labels is None else list(eps_labels)
        if len(labels) != len(epsilons) or any(eps < 0 for eps in epsilons):
            raise ValueError("need one label per epsilon and epsilons >= 0")
        if device is None:
            device = next((p.device for p in self.model.parameters()), "cpu")
        dataset = getattr(loader, "dataset", None)
        total = limit if limit is not None or not hasattr(dataset, "__len__") else len(dataset)
        batches: list[tuple[Tensor, CertificateBatch]] = []
        seen = 0
        with tqdm(total=total, disable=not progress, desc="certify", unit="img") as bar:
            for batch in loader:
                if limit is not None and seen >= limit:
                    break
                stop = None if limit is None else limit - seen
                x, y = batch[0][:stop].to(device), batch[1][:stop].to(device)
                batches.append((y, self(x.to(self.dtype), y, epsilons)))
                seen += len(y)
                bar.update(len(y))
        if seen == 0:
            raise ValueError("the loader gave no samples")
        y = torch.cat([b[0] for b in batches]).cpu().numpy()
        cert = {name: torch.cat([getattr(b[1], name) for b in batches]).cpu().numpy()
                for name in ("prediction", "margin", "radius", "correct", "rechecked",
                             "error_bound")}
        error = self.error[self.dtype]
        return CertificationReport(
            model=type(self.model).__name__,
            lipschitz_bound=self.lipschitz,
            n=seen,
            clean_accuracy=float(cert["correct"].mean()),
            certified_accuracy={label: float(is_certified(cert["correct"], cert["radius"],
                                                          eps).mean())
                                for label, eps in zip(labels, epsilons, strict=True)},
            radius_quantiles={str(q): float(np.quantile(cert["radius"], q)) for q in QUANTILES},
            method=self.method,
            rules=self.parts,
            arithmetic={"dtype": str(self.dtype).removeprefix("torch."),
                        "logit_error_bound": {"const": error.const, "slope": error.slope},
                        "measured_logit_error_bound": {
                            "median": float(np.median(cert["error_bound"])),
                            "max": float(cert["error_bound"].max())},
                        "float64_parts": [path for (path, _), precision in
                                          zip(self._leaves, self.plan, strict=True)
                                          if precision == torch.float64 != self.dtype],
                        "rechecked_in_float64": int(cert["rechecked"].sum())},
            labels=y, predictions=cert["prediction"], margins=cert["margin"],
            radii=cert["radius"],
        )


def parse_epsilon(text: str) -> float:
    """``"0.3"`` or a fraction ``"36/255"`` as a finite ``ε ≥ 0``; ValueError otherwise."""
    numerator, slash, denominator = text.strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except ValueError:
        raise ValueError(f"epsilon {text!r} is neither a number nor a fraction like "
                         "'36/255'") from None
    except ZeroDivisionError:
        raise ValueError(f"epsilon {text!r} has a zero denominator") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"epsilon {text!r} must be finite and non-negative")
    return value


def parse_epsilons(text: str) -> list[tuple[str, float]]:
    """``"36/255,0.3"`` → ``[("36/255", 0.1412), ("0.3", 0.3)]`` (label as written, value)."""
    return [(part.strip(), parse_epsilon(part)) for part in text.split(",")]


"""Training certified classifiers on CIFAR-10 (single process or torchrun + DDP)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from certify import Certifier
from robustflow.checkpoint import library_versions, load_checkpoint, load_weights, save_checkpoint
from robustflow.data import ImageSet, augment, load_cifar10
from robustflow.errors import UserError
from robustflow.layers import fold_bound_excess
from robustflow.losses import LOSSES, make_loss
from robustflow.networks import ImageClassifier, NetworkConfig, build_model, preset


@dataclass
class TrainConfig:
    """Options of ``robustflow train`` (saved in the checkpoint record)."""

    preset: str = "shallow"
    kind: str = "lipschitz"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    loss: str = "cce-pairwise"
    margin: float = 0.15
    train_eps: float = 0.15
    temperature: float = 0.25
    ema: float = 0.0
    cert_eps: float = 36 / 255
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    val_size: int = 1000
    time_budget: float | None = None
    augment: bool = False
    out: str = "runs/model.pt"
    resume: bool = False
    init: str | None = None
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in ("sgd", "adam"), f"--optimizer must be sgd or adam, got {self.optimizer!r}"),
            (self.schedule in ("cosine", "step", "constant"),
             f"--schedule must be cosine, step or constant, got {self.schedule!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.limit is None or self.limit >= 1, f"--limit must be ≥ 1, got {self.limit}"),
            (self.val_size >= 0, f"--val-size must be ≥ 0, got {self.val_size}"),
            (self.time_budget is None or self.time_budget > 0,
             f"--time-budget must be > 0 seconds, got {self.time_budget}"),
            (self.train_eps >= 0 and self.cert_eps >= 0, "ε values must be ≥ 0"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1) (0: off), got {self.ema}"),
            (not (self.init and self.resume),
             "--init starts a new run from a checkpoint's weights and --resume continues --out; "
             "use one of them"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def network_config(self) -> NetworkConfig:
        try:
            return preset(self.preset, kind=self.kind)
        except ValueError as err:
            raise UserError(str(err)) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def learning_rate(base: float, schedule: str, progress: float) -> float:
    """Learning rate at training progress ``p ∈ [0, 1]``: cosine, step (÷10 at 1/3, 2/3) or constant."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "step":
        return base * 0.1 ** min(int(p * 3), 2)
    return base


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def _shared_elapsed(started: float, world: _Dist, device: torch.device) -> float:
    """Seconds since ``started`` on rank 0's clock, the same on every rank, so that all ranks
    follow one learning-rate schedule and stop on one step under ``--time-budget``."""
    elapsed = time.monotonic() - started
    if world.world > 1:
        shared = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        elapsed = float(shared)
    return elapsed


def evaluate(model: nn.Module, data: ImageSet, eps: float, device: torch.device,
             batch_size: int = 500) -> dict[str, float]:
    """Clean and certified accuracy at ``eps`` (the bound computed once)."""
    if len(data) == 0:
        return {}
    model.eval()
    certifier = Certifier(model, tuple(data.images.shape[1:]))
    correct = certified = 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x, y = data.floats(slice(start, start + batch_size))
            batch = certifier(x.to(device), y.to(device), [eps])
            correct += int(batch.correct.sum())
            certified += int((batch.correct & (batch.radius > eps)).sum())
    model.train()
    return {"clean_accuracy": correct / len(data), "certified_accuracy": certified / len(data),
            "lipschitz_bound": certifier.lipschitz}


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """The average ``θ̄ ← d θ̄ + (1 − d) θ`` of ``model``'s unconstrained parameters updated
    after each step (``None`` for ``decay = 0``): its weights are the same maps of them, so it is
    certified exactly as the trained model; with ``--ema`` it is the model evaluated and saved."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def optimizer_step(net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: Tensor,
                   y: Tensor) -> tuple[Tensor, Tensor]:
    """One training step: forward (each parametrised weight computed once), loss, backward,
    update; returns ``(logits, loss)``. A non-finite loss raises ``FloatingPointError``
    before the weights are touched."""
    with parametrize.cached():  # the loss may read a parametrised weight too (cce-pairwise)
        logits = net(x)
        loss = loss_fn(logits, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {float(loss.detach())}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def train(cfg: TrainConfig, data_root: str | None = None, download: bool = False,
          train_set: ImageSet | None = None, val_set: ImageSet | None = None,
          log=print) -> tuple[ImageClassifier, dict[str, Any]]:
    """Train the model ``cfg`` describes; checkpoint atomically after every epoch.

    ``train_set``/``val_set`` may be given directly (tests, notebooks; no ``val_set`` then
    means no held-out evaluation); otherwise CIFAR-10 is loaded from ``data_root`` (train
    split; the first ``val_size`` test images are the held-out split reported after each
    epoch).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    world = _init_distributed(device)
    net_config = cfg.network_config()
    if train_set is None:
        train_set = load_cifar10(data_root, True, download=download, limit=cfg.limit)
        if val_set is None and cfg.val_size:
            val_set = load_cifar10(data_root, False, limit=cfg.val_size)
    elif cfg.limit is not None:
        train_set = train_set.subset(slice(0, cfg.limit))
    val_set = val_set.subset(slice(0, cfg.val_size)) if val_set is not None else None

    torch.manual_seed(cfg.seed)
    model = build_model(net_config).to(device)
    start = _initialise(model, Path(cfg.init), net_config, device) if cfg.init else None
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(cfg.loss, margin=cfg.margin, eps=cfg.train_eps, temperature=cfg.temperature,
                        model=model)
    averaged = weight_average(model, cfg.ema)
    result = model if averaged is None else averaged.module

    out = Path(cfg.out)
    start_epoch, step, history = 0, 0, []
    if cfg.resume:
        start_epoch, step, history, start = _resume(out, model, optimizer, net_config, device,
                                                    averaged)
        if world.main:
            log(f"resuming {out} after epoch {start_epoch}")
    if world.main and not cfg.resume and out.exists():
        log(f"note: {out} exists and will be overwritten (use --resume to continue it)")

    net = DistributedDataParallel(model) if world.world > 1 else model
    sampler = DistributedSampler(range(len(train_set)), num_replicas=world.world, rank=world.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = max(1, len(sampler) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    earlier = history[-1]["seconds"] if history else 0.0  # training time before a resume
    started = time.monotonic() - earlier
    first_step = step
    elapsed = earlier
    stopped = None
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + world.rank)
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and world.main), dynamic_ncols=True)
        seen = hits = 0
        loss_sum = 0.0
        for b in bar:
            progress = step / total_steps
            if cfg.time_budget:
                progress = max(progress, elapsed / cfg.time_budget)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg.lr, cfg.schedule, progress)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            images = train_set.images[idx]
            if cfg.augment:
                images = augment(images, gen)
            x = images.float().div_(255).to(device, non_blocking=True)
            y = train_set.labels[idx].to(device, non_blocking=True)
            try:
                logits, loss = optimizer_step(net, optimizer, loss_fn, x, y)
            except FloatingPointError as err:
                kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept at {out}"
                        if history else "no checkpoint was written")
                raise TrainingDiverged(f"{err} at epoch {epoch + 1}, step {b + 1}; {kept}; "
                                       "try a lower --lr") from None
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            seen += len(y)
            hits += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{hits / seen:.3f}")
            if cfg.time_budget:  # only a budget needs the (shared) clock
                elapsed = _shared_elapsed(started, world, device)
                if elapsed >= cfg.time_budget:
                    stopped = "time budget"
                    break
        bar.close()
        train_time = time.monotonic() - started
        images_now = (step - first_step) * cfg.batch_size * world.world  # in this process
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                   "train_accuracy": hits / max(seen, 1), "seconds": round(train_time, 1),
                   "images_per_second": round(images_now / max(train_time - earlier, 1e-9), 1)}
        if world.main:
            if val_set is not None:
                metrics.update(evaluate(result, val_set, cfg.cert_eps, device))
            history.append(metrics)
            log(_epoch_line(metrics, cfg.cert_eps))
            record = _record(cfg, net_config, train_set, history, stopped, start)
            training = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch + 1,
                        "torch_rng": torch.get_rng_state()}
            if averaged is not None:  # the trained weights, the average being the model
                training.update(weights=model.state_dict(), averaged=int(averaged.n_averaged))
            save_checkpoint(out, result, record, training)
        if stopped:
            break
    if world.world > 1:
        dist.barrier()
    result.eval()
    if world.main and history and history[-1]["epoch"] > start_epoch:
        factor = fold_bound_excess(result, train_set.images.shape[1:]) \
            if cfg.kind == "lipschitz" else 1.0
        if factor < 1.0:  # float32 rounding of the orthogonal weights, folded into the head
            record["bound_folded_into_head"] = factor
            save_checkpoint(out, result, record, training)
            log(f"proven bound was 1 + {1 / factor - 1:.2g}; head scaled by {factor:.8f}")
    return result, record or _record(cfg, net_config, train_set, history, stopped, start)


def _epoch_line(m: dict[str, Any], eps: float) -> str:
    line = (f"epoch {m['epoch']:3d}  loss {m['train_loss']:.4f}  train acc {m['train_accuracy']:.3f}"
            f"  {m['images_per_second']:.0f} img/s")
    if "clean_accuracy" in m:
        line += (f"  held-out clean {m['clean_accuracy']:.3f}"
                 f"  certified@{eps:.4g} {m['certified_accuracy']:.3f}")
    return line


def _record(cfg: TrainConfig, net_config: NetworkConfig, train_set: ImageSet,
            history: list[dict[str, Any]], stopped: str | None,
            start: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "config": net_config.to_dict(),
        "classes": list(train_set.classes),
        "normalization": {"mean": list(net_config.mean),
                          "std": list(net_config.std) if net_config.std else None},
        "eps": cfg.cert_eps,
        "train": dataclasses.asdict(cfg),
        "train_images": len(train_set),
        "epoch": history[-1]["epoch"] if history else 0,
        "metrics": history[-1] if history else {},
        "history": history,
        "stopped": stopped,
        "init": start,
        "versions": library_versions(),
    }


def _load_same_network(payload: dict[str, Any], path: Path, model: nn.Module,
                       net_config: NetworkConfig, purpose: str) -> None:
    """Load the weights of checkpoint ``payload`` (read from ``path``) into ``model``; a
    :class:`UserError` if it holds another network or weights that do not fit. ``purpose`` names
    the use in messages."""
    if NetworkConfig.from_dict(payload["record"]["config"]) != net_config:
        hint = " or a new --out" if purpose == "resumed" else ""
        raise UserError(f"{path} was trained with another network config; pass the same "
                        f"--preset/--kind{hint}")
    try:
        load_weights(model, payload["state_dict"])
    except (RuntimeError, ValueError) as err:
        raise UserError(f"{path} cannot be {purpose}: {str(err).strip().splitlines()[0][:300]}") from None


def _initialise(model: nn.Module, path: Path, net_config: NetworkConfig,
                device: torch.device) -> dict[str, Any]:
    """Load the weights of checkpoint ``path`` (same network config) into ``model`` for a new run
    (``--init``); returns where they came from: the file and the run that trained them."""
    payload = load_checkpoint(path, device)
    _load_same_network(payload, path, model, net_config, "loaded by --init")
    record = payload["record"]
    return {"checkpoint": str(path), "epoch": record.get("epoch"), "train": record.get("train"),
            "metrics": record.get("metrics"), "init": record.get("init")}


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            net_config: NetworkConfig, device: torch.device,
            averaged: AveragedModel | None = None) -> tuple[int, int, list, dict | None]:
    payload = load_checkpoint(path, device)
    if payload.get("training") is None:
        raise UserError(f"{path} holds no training state to resume from")
    record, training = payload["record"], payload["training"]
    had_average = training.get("weights") is not None
    if had_average != (averaged is not None):
        was = f"with --ema {record['train'].get('ema')}" if had_average else "without --ema"
        raise UserError(f"{path} was trained {was}; resume it with the same --ema")
    _load_same_network(payload, path, model if averaged is None else averaged.module, net_config,
                       "resumed")
    if averaged is not None:  # the trained weights, kept beside the average
        _load_same_network({**payload, "state_dict": training["weights"]}, path, model,
                           net_config, "resumed")
        averaged.n_averaged.fill_(int(training["averaged"]))
    optimizer.load_state_dict(training["optimizer"])
    torch.set_rng_state(training["torch_rng"])
    return (int(training["epoch"]), int(training["step"]), list(record.get("history", [])),
            record.get("init"))

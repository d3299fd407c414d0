"""Data-parallel training with torch.distributed: DistributedDataParallel or parameter averaging.

Two ways to train on N workers, both reading the same fixed splits (`training.data`):

- `ddp`: every worker holds a replica wrapped in DistributedDataParallel; after each backward
  pass the gradients are all-reduced (averaged), so the replicas take identical optimizer steps.
  With a global batch of B rows, each of N workers computes B/N of them: the result equals
  single-process training with batch B (same seed), up to floating-point rounding.
- `average`: every worker trains its own replica on its own shard with its own optimizer, and
  every K steps (and at the end of each epoch) the parameters are averaged across workers with
  one all-reduce (periodic model averaging, "local SGD"). Less communication, looser coupling.

Rows are dealt by a DistributedSampler (shuffled per epoch from the seed); each epoch runs
`len(train) // B` steps, so every step has exactly B rows across the workers and the rows of
step k are the same whatever N is. The incomplete last batch of an epoch is dropped (a
different one each epoch, since the order is reshuffled).

Launch: `train(config)` runs one worker in this process, or spawns N worker processes that meet
over TCP on 127.0.0.1 (gloo on CPU, NCCL on CUDA: one GPU per worker). Started by torchrun
(RANK / WORLD_SIZE / MASTER_ADDR in the environment), this process is one of the workers and
joins torchrun's rendezvous, which is how training spans several machines.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from training.default_models import accuracy, write_weights
from training.launch import die_with_parent, free_port, spawn
from training.models import checkpoint
from training.progress import Progress
from training.specs import UsageError, build, check_seed, spec

MODES = ("ddp", "average")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    workers: int = 1
    mode: str = "ddp"
    average_every: int = 8  # steps between parameter averages (mode "average")
    epochs: int | None = None  # None: the model's recipe
    batch_size: int | None = None  # global batch, split evenly across workers; None: recipe
    lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps (tests, benchmarks)
    threads: int = 1  # torch intra-op threads per worker
    device: str = "auto"  # auto | cpu | cuda
    arch_config: dict[str, Any] | None = None  # constructor arguments; None: the served ones
    keep_best: bool = True  # keep the epoch with the best validation accuracy
    progress: bool = True
    timeout_s: float = 300.0  # a collective waiting longer than this fails the run

    def resolved(self) -> TrainConfig:
        """Defaults filled in from the recipe, every value checked; UsageError if one is bad."""
        s = spec(self.model)
        r = s.recipe
        c = replace(
            self,
            epochs=r.epochs if self.epochs is None else self.epochs,
            batch_size=r.batch_size if self.batch_size is None else self.batch_size,
            lr=r.lr if self.lr is None else self.lr,
            weight_decay=r.weight_decay if self.weight_decay is None else self.weight_decay,
        )
        if c.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {c.workers}")
        if c.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {c.mode!r}")
        if c.average_every < 1:
            raise UsageError(f"--average-every must be at least 1, got {c.average_every}")
        if c.epochs is None or c.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {c.epochs}")
        if c.max_steps is not None and c.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {c.max_steps}")
        if c.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {c.threads}")
        check_seed(c.seed)
        assert c.batch_size is not None and c.lr is not None and c.weight_decay is not None
        if c.batch_size < c.workers or c.batch_size % c.workers:
            raise UsageError(
                f"--batch-size {c.batch_size} must be a multiple of --workers {c.workers} "
                "(it is the global batch, split evenly across workers)"
            )
        # Written so that NaN fails too (every comparison with NaN is False).
        if not (0 < c.lr < math.inf and 0 <= c.weight_decay < math.inf):
            raise UsageError(
                f"--lr must be a positive finite number and --weight-decay a finite one not negative, "
                f"got --lr {c.lr} --weight-decay {c.weight_decay}"
            )
        if c.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {c.device!r}")
        if c.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here")
        if c.device == "auto":
            c = replace(c, device=auto_device(c.workers))
        return c

    def use_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and auto_device(self.workers) == "cuda")


def auto_device(workers: int) -> str:
    """What ``--device auto`` trains on: CUDA when this machine has a GPU for each of its
    workers (NCCL gives each its own; under torchrun, the workers on this machine), else the CPU
    with gloo, so that two workers on a one-GPU machine still train rather than being refused."""
    local = _env_int("LOCAL_WORLD_SIZE", default=workers, low=1) if launched_by_torchrun() else workers
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "cpu"


@dataclass
class TrainResult:
    model: nn.Module  # rank 0's final model (the best epoch's weights with keep_best), on CPU
    arch_config: dict[str, Any]
    metrics: dict[str, float]
    history: list[dict[str, float]]
    config: TrainConfig
    rank_states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # each rank's final weights

    def payload(self, **extra: Any) -> dict[str, Any]:
        """The checkpoint written to --out: loadable by `training.models.load_checkpoint` and by
        the served model.py conventions (config + state_dict, weights_only)."""
        training = {k: v for k, v in asdict(self.config).items() if k not in ("arch_config", "progress")}
        return checkpoint(
            self.config.model,
            self.model,
            self.arch_config,
            metrics=dict(self.metrics),
            training=training,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            torch_version=str(torch.__version__),
            **extra,
        )


# --- launching ----------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _env_int(name: str, *, default: int | None = None, low: int = 0, high: int | None = None) -> int:
    """An integer torchrun's environment holds; a UsageError naming the variable otherwise."""
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise UsageError(f"started as a torchrun worker ({_why_torchrun()}), but {name} is not set")
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"torchrun environment: {name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise UsageError(f"torchrun environment: {name}={text!r} must be {bounds}")
    return value


def _why_torchrun() -> str:
    return "TORCHELASTIC_RUN_ID is set" if "TORCHELASTIC_RUN_ID" in os.environ else "RANK, WORLD_SIZE and MASTER_ADDR are set"


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of a worker started by torchrun, every variable checked
    before any rendezvous: a rank outside the world would wait for ever for peers that never come,
    and a variable missing or not a number would fail inside torch with a traceback."""
    world = _env_int("WORLD_SIZE", low=1)
    rank = _env_int("RANK")
    if rank >= world:
        rank_text, world_text = os.environ["RANK"], os.environ["WORLD_SIZE"]
        raise UsageError(f"torchrun environment: RANK={rank_text!r} must be below WORLD_SIZE={world_text!r}")
    local_world = _env_int("LOCAL_WORLD_SIZE", default=world, low=1)
    # LOCAL_RANK defaults to the rank (one machine), bounded by LOCAL_WORLD_SIZE when both are set.
    local_rank = _env_int("LOCAL_RANK", default=rank, high=local_world - 1 if "LOCAL_WORLD_SIZE" in os.environ else None)
    if not os.environ.get("MASTER_ADDR", "").strip():
        state = "empty" if "MASTER_ADDR" in os.environ else "not set"
        raise UsageError(f"started as a torchrun worker ({_why_torchrun()}), but MASTER_ADDR is {state}")
    _env_int("MASTER_PORT", low=1, high=65535)
    return rank, world, local_rank


def train(config: TrainConfig) -> TrainResult | None:
    """Train and return rank 0's result (None on the other ranks of a torchrun job)."""
    torchrun = torchrun_env() if launched_by_torchrun() else None  # checked before anything starts
    cfg = config.resolved()
    _check_rows(cfg)
    if torchrun is not None:
        rank, world, local_rank = torchrun
        if cfg.use_cuda() and local_rank >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise UsageError(f"torchrun environment: LOCAL_RANK={local_rank} on CUDA needs GPU {local_rank}, this machine has {gpus}")
        if cfg.workers not in (1, world):
            raise UsageError(f"--workers {cfg.workers} disagrees with torchrun's world size {world}; leave it out")
        cfg = replace(cfg, workers=world)
        _check_batch(cfg)
        with tempfile.TemporaryDirectory(prefix="training-") as tmp:
            state = _run_worker(rank, local_rank, world, cfg, "env://", Path(tmp))
        return _result(cfg, [state]) if rank == 0 else None
    _check_devices(cfg)
    if cfg.workers == 1:
        with tempfile.TemporaryDirectory(prefix="training-") as tmp:
            return _result(cfg, [_run_worker(0, 0, 1, cfg, None, Path(tmp))])
    with tempfile.TemporaryDirectory(prefix="training-") as tmp:
        out = Path(tmp)
        spawn(_spawned_worker, cfg.workers, (cfg, f"tcp://127.0.0.1:{free_port()}", out))
        states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(cfg.workers)]
    return _result(cfg, states)


def checked(config: TrainConfig) -> TrainConfig:
    """The config resolved and checked as `train` checks it before starting workers (outside
    torchrun); a UsageError if it would be refused. For callers that run several trainings and
    must refuse a bad one before running any (the worker benchmark)."""
    cfg = config.resolved()
    _check_rows(cfg)
    _check_devices(cfg)
    return cfg


def _check_batch(cfg: TrainConfig) -> None:
    assert cfg.batch_size is not None
    if cfg.batch_size % cfg.workers:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {cfg.workers} workers")


def _check_rows(cfg: TrainConfig) -> None:
    """Here, not in the workers: a worker's UsageError would reach the launcher as a traceback."""
    assert cfg.batch_size is not None
    rows = len(spec(cfg.model).splits(cfg.seed).x_train)
    if cfg.batch_size > rows:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {rows} training rows")


def _check_devices(cfg: TrainConfig) -> None:
    if cfg.use_cuda() and torch.cuda.device_count() < cfg.workers:
        raise UsageError(
            f"{cfg.workers} workers on CUDA need {cfg.workers} GPUs (NCCL gives each worker its own), "
            f"this machine has {torch.cuda.device_count()}; use fewer workers or --device cpu"
        )


def _spawned_worker(rank: int, cfg: TrainConfig, init_method: str, out: Path) -> None:
    die_with_parent()
    state = _run_worker(rank, rank, cfg.workers, cfg, init_method, out)
    torch.save(state, out / f"rank{rank}.pt")


# --- one worker ---------------------------------------------------------------------------------


def _run_worker(
    rank: int, local_rank: int, world: int, cfg: TrainConfig, init_method: str | None, out: Path
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    cuda = cfg.use_cuda()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    distributed = init_method is not None
    if distributed:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=dt.timedelta(seconds=cfg.timeout_s),
            **({"device_id": device} if cuda else {}),
        )
    try:
        return _train_loop(rank, world, cfg, device, distributed)
    finally:
        if distributed:
            dist.destroy_process_group()
        torch.set_num_threads(threads)  # when run in the caller's process


def _train_loop(rank: int, world: int, cfg: TrainConfig, device: torch.device, distributed: bool) -> dict[str, Any]:
    assert cfg.epochs is not None and cfg.batch_size is not None and cfg.lr is not None
    assert cfg.weight_decay is not None
    s = spec(cfg.model)
    splits = s.splits(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, arch_config = build(cfg.model, splits, cfg.arch_config)
    model.to(device)
    ddp = cfg.mode == "ddp" and distributed
    net: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()

    x_train = torch.from_numpy(splits.x_train).to(device)
    y_train = torch.from_numpy(splits.y_train).to(device)
    per_rank = cfg.batch_size // world
    steps_per_epoch = len(x_train) // cfg.batch_size
    assert steps_per_epoch >= 1, "train() checks the batch against the training rows"
    sampler = DistributedSampler(range(len(x_train)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    epochs = -(-total_steps // steps_per_epoch)

    history: list[dict[str, float]] = []
    best_val, best_state = -1.0, None
    step, train_seconds = 0, 0.0
    if distributed:
        dist.barrier()  # start the clock together
    started = time.perf_counter()
    show = cfg.progress and rank == 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long, device=device)
        steps = min(steps_per_epoch, total_steps - step)
        net.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, rows
        epoch_start = time.perf_counter()
        with Progress(steps, f"epoch {epoch + 1}/{epochs}", enabled=show) as bar:
            for i in range(steps):
                idx = order[i * per_rank : (i + 1) * per_rank]
                xb, yb = x_train[idx], y_train[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = net(xb)
                loss = loss_fn(logits, yb)
                loss.backward()  # DDP: gradients all-reduced here
                optimizer.step()
                step += 1
                if cfg.mode == "average" and distributed and step % cfg.average_every == 0:
                    average_parameters(model, world)
                with torch.no_grad():
                    totals += torch.stack(
                        [loss.detach().double() * len(yb), (logits.argmax(1) == yb).sum().double(), torch.tensor(float(len(yb)), dtype=torch.float64, device=device)]
                    )
                if show:
                    bar.update(1, per_rank * world, loss=totals[0].item() / totals[2].item(), acc=totals[1].item() / totals[2].item())
            if cfg.mode == "average" and distributed and step % cfg.average_every != 0:
                average_parameters(model, world)  # evaluate and save one consistent model
            if distributed:
                dist.all_reduce(totals)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - epoch_start
            record = {
                "epoch": epoch + 1,
                "steps": step,
                "train_loss": totals[0].item() / totals[2].item(),
                "train_accuracy": totals[1].item() / totals[2].item(),
            }
            if rank == 0:
                record["val_accuracy"] = _accuracy(model, splits.x_val, splits.y_val, device)
                if record["val_accuracy"] > best_val:
                    best_val = record["val_accuracy"]
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                bar.set(val_acc=record["val_accuracy"])
            history.append(record)
    wall = time.perf_counter() - started
    final_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "rank": rank,
        "world": world,
        "final_state": final_state,
        "best_state": best_state,
        "history": history,
        "arch_config": arch_config,
        "steps": step,
        "samples": step * cfg.batch_size,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
    }


def average_parameters(model: nn.Module, world: int) -> None:
    """Replace every parameter by its mean across the workers: one all-reduce of one flat vector."""
    params = [p for p in model.parameters()]
    with torch.no_grad():
        flat = torch.cat([p.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    model.eval()
    with torch.inference_mode():
        pred = model(torch.from_numpy(x).to(device)).argmax(dim=1).cpu().numpy()
    model.train()
    return float((pred == y).mean())


def _result(cfg: TrainConfig, states: list[dict[str, Any]]) -> TrainResult:
    s = spec(cfg.model)
    splits = s.splits(cfg.seed)
    lead = states[0]
    model = s.arch(**lead["arch_config"])
    use_best = cfg.keep_best and lead["best_state"] is not None
    model.load_state_dict(lead["best_state"] if use_best else lead["final_state"])
    model.eval()
    last = lead["history"][-1]
    val = accuracy(model, splits.x_val, splits.y_val)
    metrics = {
        "val_accuracy": val,
        "test_accuracy": accuracy(model, splits.x_test, splits.y_test),
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "epochs": float(len(lead["history"])),
        "steps": float(lead["steps"]),
        "samples": float(lead["samples"]),
        "train_seconds": lead["train_seconds"],
        "wall_seconds": lead["wall_seconds"],
        "samples_per_s": lead["samples"] / lead["train_seconds"] if lead["train_seconds"] > 0 else 0.0,
    }
    return TrainResult(
        model=model,
        arch_config=dict(lead["arch_config"]),
        metrics=metrics,
        history=lead["history"],
        config=cfg,
        rank_states=[st["final_state"] for st in states],
    )


def save(result: TrainResult, path: Path) -> None:
    write_weights(path, result.payload())

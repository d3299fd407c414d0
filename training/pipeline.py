"""Model parallelism: the breast-cancer MLP split across two ranks, a hand-placed stage split.

    rank 0 (stage 0): standardize -> Linear(30, hidden) -> ReLU  ──send activations──▶
    rank 1 (stage 1): Linear(hidden, 2) -> logits                ──send logits back──▶ rank 0

A batch is cut into micro-batches; rank 0 posts each micro-batch's activations with a
non-blocking send and goes on with the next one while rank 1 works (a two-stage GPipe fill).
Training runs backward across the split too: rank 1 computes the loss, back-propagates to its
input and sends that gradient to rank 0, which finishes the backward pass; each rank then steps
the optimizer of its own stage. Point-to-point messages carry a small shape header first, so
the receiving side needs no knowledge of the batch size.

`python -m training pipeline-check` (and the unit tests) run the split model on two processes
and compare its outputs, gradients and trained parameters with the unsplit model's.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.launch import die_with_parent, free_port, spawn
from training.models import BreastCancerMLP

STAGE_SPLIT = 2  # net[:2] (Linear, ReLU) on rank 0, net[2:] (Linear) on rank 1


class Stage0(nn.Module):
    def __init__(self, model: BreastCancerMLP):
        super().__init__()
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())
        self.layers = copy.deepcopy(model.net[:STAGE_SPLIT])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)


class Stage1(nn.Module):
    def __init__(self, model: BreastCancerMLP):
        super().__init__()
        self.layers = copy.deepcopy(model.net[STAGE_SPLIT:])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


def split(model: BreastCancerMLP) -> tuple[Stage0, Stage1]:
    return Stage0(model), Stage1(model)


def _send(t: torch.Tensor, dst: int) -> list[Any]:
    """Non-blocking send of a 2-D float tensor: shape header, then data. Returns the requests."""
    header = torch.tensor(t.shape, dtype=torch.long)
    data = t.detach().contiguous()
    return [dist.isend(header, dst), dist.isend(data, dst), header, data]  # keep buffers alive


def _recv(src: int) -> torch.Tensor:
    header = torch.empty(2, dtype=torch.long)
    dist.recv(header, src)
    out = torch.empty(*header.tolist())
    dist.recv(out, src)
    return out


def _wait(pending: list[list[Any]]) -> None:
    for reqs in pending:
        for r in reqs[:2]:
            r.wait()


def pipelined_forward(rank: int, stage: nn.Module, x: torch.Tensor | None, micro_batch: int, n_micro: int) -> torch.Tensor | None:
    """Inference through both stages; rank 0 passes x and gets the logits back."""
    with torch.inference_mode():
        if rank == 0:
            assert x is not None
            pending = [_send(stage(mb), 1) for mb in x.split(micro_batch)]
            outs = [_recv(1) for _ in range(n_micro)]
            _wait(pending)
            return torch.cat(outs)
        pending = []
        for _ in range(n_micro):
            pending.append(_send(stage(_recv(0)), 0))
        _wait(pending)
        return None


def pipelined_train_step(
    rank: int, stage: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, micro_batch: int
) -> float | None:
    """One optimizer step on a batch, forward and backward across the two ranks (GPipe: all
    micro-batches forward, then all backward, gradients accumulated, then one step).
    Rank 1 returns the batch loss."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    micro_x, micro_y = x.split(micro_batch), y.split(micro_batch)
    if rank == 0:
        acts = [stage(mb) for mb in micro_x]
        pending = [_send(a, 1) for a in acts]
        for a in acts:
            a.backward(_recv(1))
        _wait(pending)
        optimizer.step()
        return None
    total = 0.0
    pending = []
    for yb in micro_y:
        h = _recv(0).requires_grad_()
        loss = loss_fn(stage(h), yb) / len(y)  # the mean over the whole batch, like the unsplit model
        loss.backward()
        assert h.grad is not None
        pending.append(_send(h.grad, 0))
        total += loss.item()
    _wait(pending)
    optimizer.step()
    return total


def _worker(rank: int, init_method: str, payload: dict[str, Any], out: Path) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model = BreastCancerMLP(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        stage = split(model)[rank]
        x, y = torch.from_numpy(payload["x"]), torch.from_numpy(payload["y"])
        mb = payload["micro_batch"]
        n_micro = len(x.split(mb))
        logits = pipelined_forward(rank, stage, x if rank == 0 else None, mb, n_micro)
        # Training across the split: SGD steps on consecutive batches of the training rows.
        optimizer = torch.optim.SGD(stage.parameters(), lr=payload["lr"])
        xt, yt = torch.from_numpy(payload["x_train"]), torch.from_numpy(payload["y_train"])
        losses = []
        bs = payload["train_batch"]
        for i in range(payload["train_steps"]):
            sl = slice((i * bs) % len(xt), (i * bs) % len(xt) + bs)
            losses.append(pipelined_train_step(rank, stage, optimizer, xt[sl], yt[sl], mb))
        result = {f"stage{rank}": stage.state_dict(), "losses": [v for v in losses if v is not None]}
        if logits is not None:
            result["logits"] = logits
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_split(
    model: BreastCancerMLP,
    config: dict[str, Any],
    x: np.ndarray,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    micro_batch: int = 16,
    train_steps: int = 5,
    train_batch: int = 32,
    lr: float = 0.05,
) -> dict[str, Any]:
    """Run the split model on two spawned processes: logits for x, and the stage weights after
    `train_steps` pipelined SGD steps (plus the losses rank 1 saw)."""
    payload = {
        "config": config,
        "state_dict": model.state_dict(),
        "x": np.ascontiguousarray(x, np.float32),
        "x_train": np.ascontiguousarray(x_train, np.float32),
        "y_train": np.asarray(y_train, np.int64),
        "y": np.zeros(len(x), np.int64),
        "micro_batch": micro_batch,
        "train_steps": train_steps,
        "train_batch": train_batch,
        "lr": lr,
    }
    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        out = Path(tmp)
        spawn(_worker, 2, (f"tcp://127.0.0.1:{free_port()}", payload, out))
        r0 = torch.load(out / "rank0.pt", weights_only=True)
        r1 = torch.load(out / "rank1.pt", weights_only=True)
    return {"logits": r0["logits"], "stage0": r0["stage0"], "stage1": r1["stage1"], "losses": r1["losses"]}


def reference(
    model: BreastCancerMLP, x: np.ndarray, x_train: np.ndarray, y_train: np.ndarray, *, train_steps: int = 5, train_batch: int = 32, lr: float = 0.05
) -> dict[str, Any]:
    """The same computation on the unsplit model, in this process."""
    model = copy.deepcopy(model)
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train, np.float32)), torch.from_numpy(np.asarray(y_train, np.int64))
    losses = []
    for i in range(train_steps):
        sl = slice((i * train_batch) % len(xt), (i * train_batch) % len(xt) + train_batch)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xt[sl]), yt[sl])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    s0, s1 = split(model)
    return {"logits": logits, "stage0": s0.state_dict(), "stage1": s1.state_dict(), "losses": losses}


def compare(split_run: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Largest absolute differences between the split run and the unsplit reference."""
    def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    return {
        "logits_max_abs_diff": float((split_run["logits"] - ref["logits"]).abs().max()),
        "same_predictions": float(bool((split_run["logits"].argmax(1) == ref["logits"].argmax(1)).all())),
        "params_max_abs_diff_after_training": max(max_diff(split_run["stage0"], ref["stage0"]), max_diff(split_run["stage1"], ref["stage1"])),
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(split_run["losses"], ref["losses"])) if ref["losses"] else 0.0,
    }

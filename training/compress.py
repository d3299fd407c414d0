"""Compression: knowledge distillation, global magnitude pruning, int8 quantization.

`compress(...)` applies the requested steps in that order to a trained checkpoint (distill a
smaller student from it, prune, quantize) and measures every stage the same way (test
accuracy, parameters, file size, CPU latency; see `training.measure`), always on the artifact
as saved and loaded back. The result is one checkpoint that `python -m training publish` takes.

- Distillation trains a student (the same architecture, smaller: fewer channels or hidden
  units) on a mix of the teacher's soft targets at temperature T and the true labels:
  `alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)`.
  The same student is also trained from the same initial weights without the teacher
  (alpha = 0), so the table shows what the teacher added.
- Pruning removes the given share of all Conv2d/Linear weights with the smallest magnitude,
  ranked across layers (torch.nn.utils.prune.global_unstructured, L1), optionally fine-tunes
  with the masks in place, then makes the pruning permanent (prune.remove): plain zeros in an
  ordinary state dict.
- Quantization: see `training.quantize` (dynamic int8 Linear layers, or weight-only int8).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from training.data import Splits
from training.default_models import write_weights
from training.measure import Metrics, accuracy, measure, sparsity
from training.progress import Progress
from training.quantize import SCHEMES, load_payload, model_from_payload, quantize, read_source, split_seed
from training.specs import UsageError, build, check_seed, spec


@dataclass(frozen=True)
class DistillConfig:
    student_config: dict[str, Any]
    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int | None = None  # None: the model's recipe
    compare_baseline: bool = True  # also train the student without the teacher
    seed: int | None = None  # the student's initial weights and batch order; None: the split's seed


@dataclass
class Stage:
    name: str
    metrics: Metrics
    note: str = ""
    model: nn.Module | None = field(default=None, repr=False)  # as loaded back from its saved form


@dataclass
class CompressResult:
    payload: dict[str, Any]
    model: nn.Module
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def fit(
    model: nn.Module,
    splits: Splits,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int = 0,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """Single-process training (Adam), keeping the epoch with the best validation accuracy.
    With a teacher: distillation loss. With pruning masks in place, pruned weights stay zero."""
    if teacher is not None:
        teacher.eval()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    x = torch.from_numpy(splits.x_train)
    y = torch.from_numpy(splits.y_train)
    with torch.no_grad():
        soft = teacher(x) if teacher is not None else None
    generator = torch.Generator().manual_seed(seed)
    best_val, best_state = -1.0, None
    steps = -(-len(x) // batch_size)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        with Progress(steps, f"{desc} {epoch + 1}/{epochs}", enabled=progress) as bar:
            loss_sum = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                logits = model(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                if soft is not None:
                    kd = F.kl_div(
                        F.log_softmax(logits / temperature, dim=1),
                        F.log_softmax(soft[idx] / temperature, dim=1),
                        reduction="batchmean",
                        log_target=True,
                    )
                    loss = alpha * temperature**2 * kd + (1 - alpha) * loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                bar.update(1, len(idx), loss=loss_sum / min(len(x), start + len(idx)))
            model.eval()
            val = accuracy(model, splits.x_val, splits.y_val)
            bar.set(val_acc=val)
        if val > best_val:
            best_val = val
            best_state = copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval()


def prune_global(model: nn.Module, amount: float, finetune: dict[str, Any] | None = None) -> nn.Module:
    """Global L1 magnitude pruning of all Conv2d/Linear weights to `amount`, made permanent."""
    if not 0.0 <= amount < 1.0:
        raise UsageError(f"--prune must be in [0, 1), got {amount}")
    model = copy.deepcopy(model)
    targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if amount > 0:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        if finetune:
            fit(model, **finetune)
        for module, name in targets:
            prune.remove(module, name)
    return model.eval()


def _measure_saved(payload: dict[str, Any], splits: Splits, workdir: Path, name: str, runs: int) -> tuple[nn.Module, Metrics]:
    """Save the payload, load it back as a fresh model, and measure that."""
    path = workdir / f"{name}.pt"
    torch.save(payload, path)
    loaded = model_from_payload(load_payload(path))
    return loaded, measure(loaded, splits, path, runs=runs)


def _payload(arch: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {"arch": arch, "config": config, "state_dict": state_dict, **extra}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compress(
    model_name: str,
    source: Path,
    *,
    prune_amount: float | None = None,
    prune_finetune_epochs: int = 0,
    quantize_scheme: str | None = None,
    distill: DistillConfig | None = None,
    seed: int | None = None,
    progress: bool = True,
    latency_runs: int = 100,
) -> CompressResult:
    """`seed`: the split to measure and train on; None (the default) takes the one the source
    was trained on, and another one is refused (see `split_seed`)."""
    s = spec(model_name)
    if prune_amount is None and quantize_scheme is None and distill is None:
        raise UsageError("nothing to do: give --prune, --quantize and/or --distill")
    if prune_amount is not None and not 0.0 <= prune_amount < 1.0:
        raise UsageError(f"--prune must be in [0, 1), got {prune_amount}")
    if quantize_scheme is not None and quantize_scheme not in SCHEMES:
        raise UsageError(f"--quantize must be one of {', '.join(SCHEMES)}, got {quantize_scheme!r}")
    if seed is not None:
        check_seed(seed)
    if distill is not None and distill.seed is not None:
        check_seed(distill.seed, "--student-seed")
    src_payload = read_source(source, model_name)
    seed = split_seed(src_payload, source, seed)
    if src_payload.get("quantization"):
        raise UsageError(f"--from {source} is already quantized; compress its float source instead")
    if distill is not None and not (0 < distill.temperature < math.inf and 0.0 <= distill.alpha <= 1.0):
        raise UsageError(f"--temperature must be a positive finite number and --alpha in [0, 1], "
                         f"got {distill.temperature:g} and {distill.alpha:g}")  # fmt: skip

    splits = s.splits(seed)
    recipe = s.recipe
    stages: list[Stage] = []
    steps: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="compress-") as tmp:
        work = Path(tmp)
        source_payload = _payload(model_name, dict(src_payload["config"]), src_payload["state_dict"])
        model, m = _measure_saved(source_payload, splits, work, "source", latency_runs)
        stages.append(Stage("source", m, Path(source).name, model))
        config = dict(src_payload["config"])

        if distill is not None:
            teacher = model
            epochs = distill.epochs or recipe.epochs
            student_seed = seed if distill.seed is None else distill.seed
            common = dict(splits=splits, epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                          weight_decay=recipe.weight_decay, seed=student_seed, progress=progress)  # fmt: skip
            torch.manual_seed(student_seed)
            student, student_config = build(model_name, splits, distill.student_config)
            initial = copy.deepcopy(student.state_dict())
            if distill.compare_baseline:
                baseline = fit(student, desc="student alone", **common)
                alone, m = _measure_saved(_payload(model_name, student_config, baseline.state_dict()), splits, work, "baseline", latency_runs)
                stages.append(Stage("student alone", m, "same student, no teacher", alone))
                student.load_state_dict(initial)
            student = fit(student, teacher=teacher, temperature=distill.temperature, alpha=distill.alpha,
                          desc="distill", **common)  # fmt: skip
            model, config = student, student_config
            model, m = _measure_saved(_payload(model_name, config, model.state_dict()), splits, work, "distilled", latency_runs)
            stages.append(Stage("distilled", m, f"T={distill.temperature:g} alpha={distill.alpha:g}", model))
            steps["distill"] = {"student_config": student_config, "temperature": distill.temperature,
                                "alpha": distill.alpha, "epochs": epochs, "seed": student_seed}  # fmt: skip

        if prune_amount is not None:
            finetune = None
            if prune_finetune_epochs > 0:
                finetune = dict(splits=splits, epochs=prune_finetune_epochs, batch_size=recipe.batch_size,
                                lr=recipe.lr / 3, weight_decay=0.0, seed=seed, desc="fine-tune", progress=progress)  # fmt: skip
            model = prune_global(model, prune_amount, finetune)
            achieved = sparsity(model)
            model, m = _measure_saved(_payload(model_name, config, model.state_dict()), splits, work, "pruned", latency_runs)
            stages.append(Stage("pruned", m, f"sparsity {achieved:.3f}", model))
            steps["prune"] = {"amount": prune_amount, "sparsity": achieved, "finetune_epochs": prune_finetune_epochs}

        extra: dict[str, Any] = {}
        if quantize_scheme is not None:
            _, stored, scheme = quantize(model, quantize_scheme)
            extra["quantization"] = scheme
            model, m = _measure_saved(_payload(model_name, config, stored, quantization=scheme), splits, work, "quantized", latency_runs)
            stages.append(Stage("quantized", m, scheme, model))
            steps["quantize"] = {"scheme": scheme}
            state = stored
        else:
            state = model.state_dict()

    final = stages[-1].metrics
    payload = _payload(
        model_name,
        config,
        state,
        **extra,
        metrics=final.as_dict(),
        compression=steps,
        source={"path": str(source), "sha256": sha256(source), "metrics": dict(src_payload.get("metrics", {}))},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=str(torch.__version__),
        seed=seed,
    )
    return CompressResult(payload=payload, model=model, stages=stages)


def save(result: CompressResult, path: Path) -> None:
    write_weights(Path(path), result.payload)


def stage_rows(stages: list[Stage]) -> list[list[Any]]:
    base = stages[0].metrics
    rows = []
    for st in stages:
        m = st.metrics
        rows.append([
            st.name, f"{m.test_accuracy:.4f}", f"{(m.test_accuracy - base.test_accuracy) * 100:+.2f}",
            m.params, m.nonzero_params, _kib(m.file_bytes), _kib(m.zipped_bytes),
            f"{m.latency_ms_b1:.3f}", f"{m.latency_ms_b64:.3f}", st.note,
        ])  # fmt: skip
    return rows


STAGE_HEADERS = ["stage", "test acc", "Δ pts", "params", "non-zero", "file KiB", "zlib KiB", "ms b=1", "ms b=64", "note"]


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


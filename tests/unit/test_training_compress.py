"""Compression: pruning reaches the requested sparsity and stays permanent, int8 keeps the digits
model within 2 accuracy points, distillation is compared honestly with the student alone, and
every stage reports accuracy, parameters, file size and latency."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.compress import DistillConfig, compress, save
from training.distributed import TrainConfig, train
from training.measure import accuracy, sparsity
from training.quantize import dequantize_weights, load_payload, model_from_payload, quantize_weights
from training.specs import UsageError, spec

FAST = dict(progress=False, latency_runs=10)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these tiny models train faster on one than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits CNN trained for a few epochs (about 96% test accuracy)."""
    result = train(TrainConfig("digits_cnn", epochs=12, progress=False))
    assert result is not None and result.metrics["test_accuracy"] > 0.92, result.metrics
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save(result.payload(), path)
    return path


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_pruning_reaches_the_requested_sparsity_permanently(digits_checkpoint: Path, tmp_path: Path, amount: float) -> None:
    result = compress("digits_cnn", digits_checkpoint, prune_amount=amount, **FAST)
    weights = sum(m.weight.numel() for m in result.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert abs(sparsity(result.model) - amount) <= 1 / weights
    # Permanent: a plain state dict (no masks, no weight_orig), and the zeros survive saving.
    save(result, tmp_path / "pruned.pt")
    payload = load_payload(tmp_path / "pruned.pt")
    assert not any(k.endswith(("_orig", "_mask")) for k in payload["state_dict"])
    assert abs(sparsity(model_from_payload(payload)) - amount) <= 1 / weights
    pruned = result.stage("pruned").metrics
    source = result.stage("source").metrics
    assert pruned.nonzero_params < source.nonzero_params
    assert pruned.zipped_bytes < source.zipped_bytes  # the zeros compress away
    assert payload["compression"]["prune"]["amount"] == amount


def test_pruning_with_fine_tuning_keeps_the_zeros(digits_checkpoint: Path) -> None:
    result = compress("digits_cnn", digits_checkpoint, prune_amount=0.8, prune_finetune_epochs=1, **FAST)
    assert abs(sparsity(result.model) - 0.8) < 1e-3


@pytest.mark.parametrize("scheme", ["dynamic", "weight-only"])
def test_quantized_digits_model_stays_within_two_points(digits_checkpoint: Path, scheme: str) -> None:
    result = compress("digits_cnn", digits_checkpoint, quantize_scheme=scheme, **FAST)
    source, quantized = result.stage("source").metrics, result.stage("quantized").metrics
    assert abs(quantized.test_accuracy - source.test_accuracy) <= 0.02, (source, quantized)
    assert quantized.file_bytes < source.file_bytes / 2
    assert quantized.params == source.params
    assert result.payload["quantization"] in ("dynamic_int8", "weight_only_int8")
    if scheme == "dynamic":
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in result.model.modules())


def test_weight_only_int8_round_trip_error_is_at_most_half_a_step() -> None:
    w = torch.randn(6, 3, 3, 3)
    stored = quantize_weights({"conv.weight": w, "conv.bias": torch.zeros(6)}, ["conv.weight"])
    assert stored["conv.weight_int8"].dtype == torch.int8 and stored["conv.weight_scale"].shape == (6,)
    back = dequantize_weights(stored)["conv.weight"]
    step = stored["conv.weight_scale"].view(-1, 1, 1, 1)
    assert bool(((back - w).abs() <= step / 2 + 1e-7).all())


def test_every_stage_reports_accuracy_params_size_and_latency(digits_checkpoint: Path) -> None:
    result = compress("digits_cnn", digits_checkpoint, prune_amount=0.5, quantize_scheme="dynamic", **FAST)
    assert [s.name for s in result.stages] == ["source", "pruned", "quantized"]
    for stage in result.stages:
        m = stage.metrics
        assert 0.9 < m.test_accuracy <= 1 and m.params > 0 and m.file_bytes > 0
        assert m.latency_ms_b1 > 0 and m.latency_ms_b64 > 0
    assert result.payload["metrics"]["test_accuracy"] == result.stages[-1].metrics.test_accuracy


@pytest.fixture(scope="module")
def teacher_checkpoint(digits_checkpoint: Path) -> Path:
    """The served digits weights when set-up has trained them (read only), else the fixture's."""
    served = REPO_ROOT / "model_repository" / "digits_cnn" / "1" / "model.pt"
    return served if served.exists() else digits_checkpoint


def test_distilled_student_against_the_same_student_alone(teacher_checkpoint: Path) -> None:
    """Distillation makes the student imitate the teacher (always checked); whether that buys
    accuracy on 360 test digits is reported as measured: a failure to beat the student alone is
    an expected failure (xfail) that says by how much."""
    teacher = model_from_payload(load_payload(teacher_checkpoint))
    x = torch.from_numpy(spec("digits_cnn").splits(0).x_test)
    with torch.inference_mode():
        soft = F.log_softmax(teacher(x), dim=1)

    def kl_to_teacher(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            return float(F.kl_div(F.log_softmax(model(x), 1), soft, log_target=True, reduction="batchmean"))

    student = {"channels": [4, 8], "hidden": 16, "num_classes": 10}
    alone, distilled, kl_alone, kl_distilled = [], [], [], []
    for seed in (0, 1, 2):
        # Measured on the teacher's own test split; the seed varies the student only.
        config = DistillConfig(student, temperature=2.0, alpha=0.9, epochs=20, seed=seed)
        result = compress("digits_cnn", teacher_checkpoint, distill=config, **FAST)
        by_itself, taught = result.stage("student alone"), result.stage("distilled")
        alone.append(by_itself.metrics.test_accuracy)
        distilled.append(taught.metrics.test_accuracy)
        assert by_itself.model is not None and taught.model is not None
        kl_alone.append(kl_to_teacher(by_itself.model))
        kl_distilled.append(kl_to_teacher(taught.model))
        assert taught.metrics.params < result.stage("source").metrics.params / 10
        assert result.payload["config"]["channels"] == [4, 8]
    assert statistics.mean(kl_distilled) < statistics.mean(kl_alone), (kl_distilled, kl_alone)
    assert min(distilled) > 0.85
    gain = (statistics.mean(distilled) - statistics.mean(alone)) * 100
    print(f"student alone {alone}, distilled {distilled}: mean gain {gain:+.2f} points")
    if gain <= 0:
        pytest.xfail(f"the distilled student did not beat the student alone: {gain:+.2f} points (mean of 3 seeds)")


def test_bad_requests_are_refused(digits_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--prune must be in \[0, 1\)"):
        compress("digits_cnn", digits_checkpoint, prune_amount=1.0, **FAST)
    with pytest.raises(UsageError, match=r"--prune must be in \[0, 1\)"):
        compress("digits_cnn", digits_checkpoint, prune_amount=-0.1, **FAST)
    with pytest.raises(UsageError, match="nothing to do"):
        compress("digits_cnn", digits_checkpoint, **FAST)
    with pytest.raises(UsageError, match="holds a 'digits_cnn' model, not 'breast_cancer_mlp'"):
        compress("breast_cancer_mlp", digits_checkpoint, prune_amount=0.5, **FAST)
    with pytest.raises(UsageError, match="no such file"):
        compress("digits_cnn", tmp_path / "missing.pt", prune_amount=0.5, **FAST)
    with pytest.raises(UsageError, match="unknown model"):
        compress("lenet", digits_checkpoint, prune_amount=0.5, **FAST)
    student = {"channels": [4, 8], "hidden": 16, "num_classes": 10}
    for temperature in (0.0, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="--temperature must be a positive finite number"):
            compress("digits_cnn", digits_checkpoint, distill=DistillConfig(student, temperature=temperature), **FAST)


def test_compress_measures_on_the_split_the_source_was_trained_on(tmp_path: Path) -> None:
    """A checkpoint trained with --seed 1 is measured on the seed-1 test split (the seed-0 one
    is mostly its training rows), the compressed checkpoint records it, and another is refused."""
    trained = train(TrainConfig("breast_cancer_mlp", epochs=3, seed=1, progress=False))
    assert trained is not None
    source = tmp_path / "seed1.pt"
    torch.save(trained.payload(), source)
    result = compress("breast_cancer_mlp", source, prune_amount=0.0, **FAST)
    assert result.payload["seed"] == 1
    splits = spec("breast_cancer_mlp").splits(1)
    assert result.stage("source").metrics.test_accuracy == accuracy(trained.model, splits.x_test, splits.y_test)
    with pytest.raises(UsageError, match=r"--seed 0: .*seed1\.pt was trained on the seed-1 split"):
        compress("breast_cancer_mlp", source, prune_amount=0.0, seed=0, **FAST)
    # The compressed checkpoint carries the seed on to publish and evaluate.
    save(result, tmp_path / "pruned.pt")
    with pytest.raises(UsageError, match="was trained on the seed-1 split"):
        compress("breast_cancer_mlp", tmp_path / "pruned.pt", prune_amount=0.0, seed=0, **FAST)

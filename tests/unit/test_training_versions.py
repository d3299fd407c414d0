"""Publishing: the next version folder appears in one rename with a self-contained model.py, the
checkpoint and metadata; its accuracy is measured through its own model.py; the accuracy gate
refuses a worse model unless forced; the canary entry touches only its model's table; and the
command line refuses bad arguments clearly."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import torch

from training import cli
from training.cli import main
from training.compress import DistillConfig, compress
from training.distributed import TrainConfig, train
from training.harness import version_network
from training.measure import accuracy
from training.models import DigitsCNN
from training import publish as publishing
from training.publish import GateRefused, publish, versions, write_rollout
from training.quantize import SCHEMES, model_from_payload, quantize, split_seed
from training.specs import MODELS, UsageError, spec

REPO_ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(latency_runs=5, log=lambda *_: None)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = train(TrainConfig("digits_cnn", epochs=6, progress=False))  # one thread, in-process
    assert result is not None
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    torch.save(result.payload(), path)
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained network: about one digit in ten right."""
    torch.manual_seed(0)
    config = dict(MODELS["digits_cnn"].default_config)
    path = tmp_path_factory.mktemp("ckpt") / "bad.pt"
    torch.save({"arch": "digits_cnn", "config": config, "state_dict": DigitsCNN(**config).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def mlp_seed(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """breast_cancer_mlp checkpoints trained briefly on the seed-0 and the seed-1 split."""
    paths = {}
    for seed in (0, 1):
        result = train(TrainConfig("breast_cancer_mlp", epochs=3, seed=seed, progress=False))
        assert result is not None
        paths[seed] = tmp_path_factory.mktemp("ckpt") / f"mlp-seed{seed}.pt"
        torch.save(result.payload(), paths[seed])
    return paths


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository holding the real config.pbtxt files and no version yet."""
    root = tmp_path / "model_repository"
    for name in MODELS:
        (root / name).mkdir(parents=True)
        shutil.copyfile(REPO_ROOT / "model_repository" / name / "config.pbtxt", root / name / "config.pbtxt")
    return root


def test_first_and_next_versions_are_complete_folders_renamed_into_place(repo: Path, good: Path) -> None:
    first = publish("digits_cnn", good, repo, **QUIET)
    assert first.version == 1 and first.stable_version is None
    second = publish("digits_cnn", good, repo, **QUIET)
    assert second.version == 2 and second.stable_version == 1
    model_dir = repo / "digits_cnn"
    assert versions(model_dir) == [1, 2]
    assert sorted(p.name for p in model_dir.iterdir()) == [".published", ".published.lock", "1", "2", "config.pbtxt"]  # no staging left
    assert not [p.name for p in repo.parent.iterdir() if "publish" in p.name]  # staged beside the repository
    folder = model_dir / "2"
    assert sorted(p.name for p in folder.iterdir()) == ["__pycache__", "metadata.json", "model.pt", "model.py"]
    # model.py is compiled ahead, so the backend's first import writes nothing into the folder
    # (a write would make Triton in poll mode reload the model).
    assert [p.name for p in (folder / "__pycache__").iterdir()] == [f"model.{sys.implementation.cache_tag}.pyc"]
    assert (folder / "model.pt").read_bytes() == good.read_bytes()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["source"]["path"] == str(good.resolve()) and len(meta["source"]["sha256"]) == 64
    assert meta["gate"] == {"stable_version": 1, "stable_test_accuracy": pytest.approx(first.metrics.test_accuracy),
                            "stable_seed": 0, "margin": 0.01, "forced": False}  # fmt: skip
    assert meta["seed"] == 0
    assert meta["published_at"].endswith("+00:00") and meta["lineage"]["training"]["epochs"] == 6
    # The accuracy recorded is that of the folder as Triton runs it: its own model.py.
    splits = spec("digits_cnn").splits(0)
    served = version_network(model_dir, 2, "digits_cnn")
    assert accuracy(served, splits.x_test, splits.y_test) == meta["metrics"]["test_accuracy"]


def test_only_folders_named_by_ascii_digits_are_versions(repo: Path, good: Path) -> None:
    for name in ("\u00b2", "\u0663", "0", "draft", "01x"):  # str.isdigit() holds for the first two
        (repo / "digits_cnn" / name).mkdir(parents=True)
    assert versions(repo / "digits_cnn") == []
    config = repo / "rollout.toml"
    config.write_text('[models.digits_cnn]\nstable = "\u00b2"\n')
    assert publish("digits_cnn", good, repo, canary_config=config, **QUIET).version == 1


def test_a_version_number_is_never_given_twice_even_after_its_folder_was_removed(repo: Path, good: Path) -> None:
    """A rolled-back version's folder is removed; the fix published next must not reuse its
    number, which the gateway's rollout remembers as rolled back."""
    publish("digits_cnn", good, repo, **QUIET)
    publish("digits_cnn", good, repo, **QUIET)
    shutil.rmtree(repo / "digits_cnn" / "2")
    assert publish("digits_cnn", good, repo, **QUIET).version == 3
    assert versions(repo / "digits_cnn") == [1, 3]


def test_staging_falls_back_inside_the_model_folder_across_file_systems(
    repo: Path, good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        st = real_stat(path, *args, **kwargs)
        if "publish" in str(path) and Path(path).parent == repo.parent:  # "another file system"
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:]))
        return st

    monkeypatch.setattr(os, "stat", stat)
    result = publish("digits_cnn", good, repo, **QUIET)
    assert result.version == 1 and (repo / "digits_cnn" / "1" / "model.py").exists()
    assert sorted(p.name for p in (repo / "digits_cnn").iterdir()) == [".published", ".published.lock", "1", "config.pbtxt"]
    assert not [p.name for p in repo.parent.iterdir() if "publish" in p.name]


def test_the_gate_refuses_a_worse_model_and_leaves_no_trace(repo: Path, good: Path, bad: Path) -> None:
    publish("digits_cnn", good, repo, **QUIET)
    with pytest.raises(GateRefused, match=r"refusing to publish digits_cnn: test accuracy 0\.\d+ is \d+\.\d+ points below stable version 1"):
        publish("digits_cnn", bad, repo, margin=0.05, **QUIET)
    assert sorted(p.name for p in (repo / "digits_cnn").iterdir()) == [".published", ".published.lock", "1", "config.pbtxt"]
    assert not [p.name for p in repo.parent.iterdir() if "publish" in p.name]
    forced = publish("digits_cnn", bad, repo, margin=0.05, force=True, **QUIET)
    assert forced.version == 2 and forced.forced
    assert json.loads((repo / "digits_cnn" / "2" / "metadata.json").read_text())["gate"]["forced"] is True


def test_the_gate_compares_with_the_stable_version_named_in_the_rollout_config(repo: Path, good: Path, bad: Path) -> None:
    publish("digits_cnn", good, repo, **QUIET)
    publish("digits_cnn", bad, repo, force=True, **QUIET)  # version 2, bad
    rollout = repo.parent / "rollout.toml"
    rollout.write_text('[models.digits_cnn]\nstable = "2"\n')
    # Against the stable version 2 (bad), a bad model passes; against the newest it would too,
    # but against version 1 it would not: stable comes from the rollout config.
    result = publish("digits_cnn", bad, repo, canary_config=rollout, **QUIET)
    assert result.stable_version == 2 and result.version == 3


def test_rollout_entries_written_at_once_for_several_models_are_all_kept(tmp_path: Path) -> None:
    rollout = tmp_path / "rollout.toml"

    def writes(n: int) -> None:
        for i in range(20):
            write_rollout(rollout, f"model_{n}", {"stable": "1", "canary": str(i + 2), "canary_share": 0.1})

    threads = [threading.Thread(target=writes, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    models = tomllib.loads(rollout.read_text())["models"]
    assert {name: table["canary"] for name, table in models.items()} == {f"model_{n}": "21" for n in range(8)}


def test_canary_entry_updates_only_its_model_table(repo: Path, good: Path) -> None:
    rollout = repo.parent / "rollout.toml"
    rollout.write_text(
        "# rollout settings\n[gateway]\nkeep = true\n\n[models.breast_cancer_mlp]\nstable = \"4\"\n\n"
        "[models.digits_cnn]\nstable = \"1\"  # pinned\nrollback_error_rate = 0.05\n"
    )
    publish("digits_cnn", good, repo, **QUIET)
    result = publish("digits_cnn", good, repo, canary_config=rollout, canary_share=0.25, **QUIET)
    data = tomllib.loads(rollout.read_text())
    assert data["models"]["digits_cnn"] == {"stable": "1", "canary": str(result.version), "canary_share": 0.25,
                                            "rollback_error_rate": 0.05}  # fmt: skip
    assert data["models"]["breast_cancer_mlp"] == {"stable": "4"} and data["gateway"] == {"keep": True}
    assert rollout.read_text().startswith("# rollout settings\n[gateway]\nkeep = true\n")


def test_a_rollout_file_the_canary_cannot_be_written_into_stops_the_publish_before_it_happens(repo: Path, good: Path) -> None:
    rollout = repo.parent / "rollout.toml"
    text = '[models]\ndigits_cnn = { stable = "1" }\n'  # an inline table: no [models.digits_cnn] can follow
    rollout.write_text(text)
    publish("digits_cnn", good, repo, **QUIET)
    with pytest.raises(UsageError, match=r"cannot set \[models.digits_cnn\] in .*rollout.toml"):
        publish("digits_cnn", good, repo, canary_config=rollout, canary_share=0.25, **QUIET)
    assert versions(repo / "digits_cnn") == [1] and rollout.read_text() == text


def test_the_gateway_accepts_the_rollout_file_publish_writes(repo: Path, good: Path) -> None:
    from gateway.rollout import parse_rollouts

    rollout = repo.parent / "rollout.toml"
    first = publish("digits_cnn", good, repo, canary_config=rollout, **QUIET)  # no earlier version
    assert tomllib.loads(rollout.read_text()) == {"models": {"digits_cnn": {"stable": str(first.version)}}}
    second = publish("digits_cnn", good, repo, canary_config=rollout, canary_share=0.2, **QUIET)
    parsed = parse_rollouts(tomllib.loads(rollout.read_text()))["digits_cnn"]
    assert (parsed.stable, parsed.canary, parsed.canary_share) == ("1", str(second.version), 0.2)
    # A table with a ramp: the ramp's first step is the canary's share (the gateway refuses both).
    rollout.write_text('[models.digits_cnn]\nstable = "1"\nramp = [0.05, 0.5, 1.0]\n')
    third = publish("digits_cnn", good, repo, canary_config=rollout, canary_share=0.2, **QUIET)
    parsed = parse_rollouts(tomllib.loads(rollout.read_text()))["digits_cnn"]
    assert (parsed.stable, parsed.canary, parsed.ramp) == ("1", str(third.version), (0.05, 0.5, 1.0))
    assert "canary_share" not in tomllib.loads(rollout.read_text())["models"]["digits_cnn"]


def test_canary_config_is_created_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "configs" / "rollout.toml"
    write_rollout(path, "digits_cnn", {"stable": "1", "canary": "2", "canary_share": 0.1})
    write_rollout(path, "breast_cancer_mlp", {"stable": "3"})
    write_rollout(path, "digits_cnn", {"canary": "3"})
    assert tomllib.loads(path.read_text()) == {
        "models": {"digits_cnn": {"stable": "1", "canary": "3", "canary_share": 0.1}, "breast_cancer_mlp": {"stable": "3"}}
    }


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_served_model_py_gives_the_training_models_outputs(tmp_path: Path, model: str, scheme: str | None) -> None:
    """The self-contained model.py a version carries rebuilds exactly the network the checkpoint
    describes: float, dynamic int8 and weight-only int8, for both architectures."""
    s = spec(model)
    splits = s.splits(0)
    torch.manual_seed(0)
    net = s.arch(**s.default_config).eval()
    payload = {"arch": model, "config": dict(s.default_config), "state_dict": net.state_dict()}
    if scheme is not None:
        _, stored, name = quantize(net, scheme)
        payload.update(state_dict=stored, quantization=name)
    folder = tmp_path / model / "7"
    folder.mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "training" / "templates" / "model.py", folder / "model.py")
    torch.save(payload, folder / "model.pt")
    served = version_network(tmp_path / model, 7, model)
    x = torch.from_numpy(splits.x_test[:64])
    with torch.inference_mode():
        assert torch.allclose(served(x), model_from_payload(payload)(x), atol=1e-6)


def test_config_pbtxt_names_the_inputs_the_training_module_expects() -> None:
    for name, s in MODELS.items():
        text = (REPO_ROOT / "model_repository" / name / "config.pbtxt").read_text()
        block = re.search(r"input \[\s*\{(.*?)\}", text, re.S)
        assert block is not None
        assert f'name: "{s.input_name}"' in block.group(1)
        dims = re.search(r"dims: \[([^\]]*)\]", block.group(1))
        assert dims is not None and tuple(int(d) for d in dims.group(1).split(",")) == s.input_shape
        assert 'name: "logits"' in text and 'name: "probabilities"' in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["train", "--model", "digits_cnn", "--workers", "0"], "--workers: must be at least 1, got 0"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "1.0"], r"sparsity must be in \[0, 1\), got 1.0"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "-0.5"], r"sparsity must be in \[0, 1\), got -0.5"),
        (["compress", "--model", "digits_cnn", "--from", "missing.pt", "--prune", "0.5"], "--from missing.pt: no such file"),
        (["publish", "--model", "digits_cnn", "--from", "x.pt", "--canary-share", "0"], r"must be in \(0, 1\], got 0.0"),
        (["publish", "--model", "digits_cnn", "--from", "x.pt", "--margin", "5"], r"margin is a share of accuracy in \[0, 1\]"),
        (["train", "--model", "breast_cancer_mlp", "--channels", "8,16"], "--channels applies to digits_cnn only"),
        (["train", "--model", "digits_cnn", "--channels", "8"], "--channels must be 2 positive integers"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "0.5", "--student-seed", "3"], "--student-seed needs --distill"),
        # Seeds outside what numpy and scikit-learn take, refused by the argument parser.
        (["train", "--model", "breast_cancer_mlp", "--seed", "-1"], r"--seed: a seed is an integer from 0 to 4294967295 \(2\*\*32 - 1\), got -1"),
        (["train", "--model", "breast_cancer_mlp", "--seed", "99999999999999999999"], "--seed: a seed is an integer from 0 to 4294967295"),
        (["train", "--model", "breast_cancer_mlp", "--seed", "4294967296"], "--seed: a seed is an integer from 0 to 4294967295"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--distill", "--student-seed", "-1"], "--student-seed: a seed is an integer"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "0.5", "--seed", "-1"], "--seed: a seed is an integer"),
        (["publish", "--model", "digits_cnn", "--from", "x.pt", "--seed", "-1"], "--seed: a seed is an integer"),
        (["evaluate", "--model", "digits_cnn", "--from", "x.pt", "--seed", "2.5"], r"--seed: a seed is an integer from 0 to 4294967295 \(2\*\*32 - 1\), got '2\.5'"),
        # Options that would be ignored with the others given.
        (["train", "--model", "digits_cnn", "--mode", "ddp", "--average-every", "4"], "--average-every applies to --mode average only"),
        (["train", "--model", "digits_cnn", "--average-every", "4"], "--average-every applies to --mode average only"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "0.5", "--temperature", "5"], "--temperature needs --distill"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "0.5", "--alpha", "0.5"], "--alpha needs --distill"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--quantize", "--distill-epochs", "3"], "--distill-epochs needs --distill"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--prune", "0.5", "--no-baseline", "--alpha", "0.5"],
         "--alpha, --no-baseline need --distill"),
        (["compress", "--model", "digits_cnn", "--from", "x.pt", "--quantize", "--finetune-epochs", "0"], "--finetune-epochs needs --prune"),
        (["evaluate", "--model", "digits_cnn", "--from", "x.pt", "--repository", "elsewhere"], "--repository applies to --version only, not --from"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_every_seed_refusal_reads_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    """The argument parser, TrainConfig, compress and a checkpoint's recorded seed refuse a seed
    in one wording: the same mistake should not read differently depending on where it is caught."""
    refusals = []
    for argv in (["train", "--model", "digits_cnn", "--seed", "-1"], ["evaluate", "--model", "digits_cnn", "--from", "x.pt", "--seed", "2.5"]):
        with pytest.raises(SystemExit):
            main(argv)
        refusals.append(capsys.readouterr().err.strip().splitlines()[-1])
    calls = (lambda: TrainConfig("digits_cnn", seed=-1).resolved(),
             lambda: compress("digits_cnn", Path("x.pt"), prune_amount=0.5, distill=DistillConfig({}, seed=2**32)),
             lambda: split_seed({"seed": -1}, "x.pt", None))  # fmt: skip
    for call in calls:
        with pytest.raises(UsageError) as exc:
            call()
        refusals.append(str(exc.value))
    seed = "a seed is an integer from 0 to 4294967295 (2**32 - 1), got"
    assert refusals == [
        f"python -m training train: error: argument --seed: {seed} -1",
        f"python -m training evaluate: error: argument --seed: {seed} '2.5'",
        f"--seed: {seed} -1",
        f"--student-seed: {seed} 4294967296",
        f"the split seed x.pt records: {seed} -1",
    ]


def test_evaluate_refuses_from_and_repository_together(
    repo: Path, good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--repository only says where --version's folder is: given with --from, it was dropped
    without a word and the user could not tell which model was measured. Left out, --version
    still reads the project's repository."""
    publish("digits_cnn", good, repo, **QUIET)
    capsys.readouterr()
    assert main(["evaluate", "--model", "digits_cnn", "--from", str(good), "--repository", str(repo)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "python -m training evaluate: error: --repository applies to --version only, not --from\n"
    assert main(["evaluate", "--model", "digits_cnn", "--from", str(good)]) == 0
    assert str(good) in capsys.readouterr().out
    monkeypatch.setattr(cli, "REPO_ROOT", repo.parent)
    assert main(["evaluate", "--model", "digits_cnn", "--version", "1"]) == 0
    assert str(repo / "digits_cnn" / "1") in capsys.readouterr().out


def test_publish_command_exits_3_when_the_gate_refuses(repo: Path, good: Path, bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "--model", "digits_cnn", "--from", str(good), "--repository", str(repo)]) == 0
    assert main(["publish", "--model", "digits_cnn", "--from", str(bad), "--repository", str(repo)]) == 3
    assert "refusing to publish digits_cnn" in capsys.readouterr().err
    assert versions(repo / "digits_cnn") == [1]


def test_publish_and_evaluate_measure_on_the_split_the_checkpoint_was_trained_on(
    repo: Path, mlp_seed: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint trained with --seed 1 trained on most of the seed-0 test rows: it is measured
    on its own seed-1 test split, and another --seed is refused."""
    result = publish("breast_cancer_mlp", mlp_seed[1], repo, **QUIET)
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["seed"] == 1
    splits = spec("breast_cancer_mlp").splits(1)
    assert result.metrics.test_accuracy == accuracy(version_network(repo / "breast_cancer_mlp", 1, "breast_cancer_mlp"),
                                                    splits.x_test, splits.y_test)  # fmt: skip
    with pytest.raises(UsageError, match=r"--seed 0: .* was trained on the seed-1 split"):
        publish("breast_cancer_mlp", mlp_seed[1], repo, seed=0, **QUIET)
    for where in (["--from", str(mlp_seed[1])], ["--version", "1", "--repository", str(repo)]):
        capsys.readouterr()
        assert main(["evaluate", "--model", "breast_cancer_mlp", *where, "--seed", "0"]) == 2
        assert "was trained on the seed-1 split" in capsys.readouterr().err


def test_the_gate_refuses_a_candidate_trained_on_another_split_than_the_stable_version(
    repo: Path, mlp_seed: dict[int, Path]
) -> None:
    publish("breast_cancer_mlp", mlp_seed[1], repo, **QUIET)
    with pytest.raises(GateRefused, match="trained on the seed-0 split and stable version 1 on the seed-1 split"):
        publish("breast_cancer_mlp", mlp_seed[0], repo, **QUIET)
    assert versions(repo / "breast_cancer_mlp") == [1]
    forced = publish("breast_cancer_mlp", mlp_seed[0], repo, force=True, **QUIET)
    assert forced.version == 2 and forced.forced and forced.stable_accuracy is None
    gate = json.loads((forced.path / "metadata.json").read_text())["gate"]
    assert gate["stable_seed"] == 1 and gate["forced"] is True


def test_concurrent_publishes_never_move_the_published_marker_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publisher A is held up while recording its number; publisher B, started meanwhile, must
    not record a higher one that A then overwrites (the number would be given again once the
    higher version's folder is removed)."""
    model_dir = tmp_path / "repo" / "digits_cnn"
    (model_dir / "1").mkdir(parents=True)

    def staged(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.py").write_text("")
        return folder

    real_replace = os.replace
    a_recording = threading.Event()

    def replace(src, dst):  # noqa: ANN001, ANN202
        if str(dst).endswith(publishing.PUBLISHED) and threading.current_thread().name == "A":
            a_recording.set()
            time.sleep(0.5)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    given: dict[str, int | BaseException] = {}

    def run(name: str) -> None:
        try:
            given[name] = publishing._commit(staged(name), model_dir)
        except BaseException as exc:  # reported by the assertion below
            given[name] = exc

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert a_recording.wait(10)
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    a.join()
    b.join()
    assert given == {"A": 2, "B": 3}
    assert (model_dir / publishing.PUBLISHED).read_text() == "3"
    shutil.rmtree(model_dir / "3")
    assert publishing._commit(staged("C"), model_dir) == 4


def test_a_broken_newest_version_is_skipped_by_the_gate_and_named_by_evaluate(
    repo: Path, good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish("digits_cnn", good, repo, **QUIET)
    broken = repo / "digits_cnn" / "2"
    broken.mkdir()
    shutil.copyfile(repo / "digits_cnn" / "1" / "model.py", broken / "model.py")  # no model.pt
    logged: list[str] = []
    result = publish("digits_cnn", good, repo, latency_runs=5, log=logged.append)
    assert result.version == 3 and result.stable_version == 1
    assert any("version 2 of digits_cnn" in line and "no model.pt" in line and "newest version that loads" in line
               for line in logged), logged  # fmt: skip
    assert main(["evaluate", "--model", "digits_cnn", "--version", "2", "--repository", str(repo)]) == 2
    assert re.search(r"error: version 2 of digits_cnn \(.*\) does not load: it has no model\.pt$", capsys.readouterr().err.strip())
    # A stable version named in the rollout config is not passed over: it must load.
    rollout = repo.parent / "rollout.toml"
    rollout.write_text('[models.digits_cnn]\nstable = "2"\n')
    with pytest.raises(UsageError, match=r"the stable version 2 of digits_cnn .* does not load: it has no model\.pt \(named in"):
        publish("digits_cnn", good, repo, canary_config=rollout, **QUIET)
    assert versions(repo / "digits_cnn") == [1, 2, 3]


@pytest.fixture
def unloadable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files --from cannot take, each with the one line that must say why."""
    config = dict(MODELS["breast_cancer_mlp"].default_config)
    state = spec("breast_cancer_mlp").arch(**config).state_dict()
    files: dict[str, tuple[Path, str]] = {}

    def save(name: str, payload: object, message: str) -> None:
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        files[name] = (path, message)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    files["garbage"] = (garbage, r"garbage\.pt: not a checkpoint \(not a torch file: [^)]+\)$")
    files["folder"] = (tmp_path, r" is a folder, not a checkpoint file$")
    save("objects", {"arch": "breast_cancer_mlp", "config": config, "state_dict": state, "hook": print},
         r"objects\.pt: not a checkpoint \(it holds objects other than tensors and plain values: [^)]+\)$")  # fmt: skip
    save("unknown_key", {"arch": "breast_cancer_mlp", "config": {**config, "bogus": 1}, "state_dict": state},
         r"unknown_key\.pt does not fit the breast_cancer_mlp architecture \(config: got an unexpected keyword argument 'bogus'\)$")  # fmt: skip
    save("missing_key", {"arch": "breast_cancer_mlp", "config": config, "state_dict": {k: v for k, v in state.items() if k != "mean"}},
         r"missing_key\.pt does not fit the breast_cancer_mlp architecture \(Missing key\(s\) in state_dict: \"mean\"\)$")  # fmt: skip
    save("shapes", {"arch": "breast_cancer_mlp", "config": config,
                    "state_dict": spec("breast_cancer_mlp").arch(**{**config, "hidden": 4}).state_dict()},
         r"shapes\.pt does not fit the breast_cancer_mlp architecture \(net\.0\.weight has shape \[4, 30\] in the file, \[32, 30\] in the model")  # fmt: skip
    return files


@pytest.mark.parametrize("command", ["evaluate", "compress", "publish", "pipeline-check"])
def test_a_from_that_is_not_a_checkpoint_that_fits_is_refused_in_one_line(
    command: str, unloadable: dict[str, tuple[Path, str]], repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"evaluate": ["--model", "breast_cancer_mlp"], "compress": ["--model", "breast_cancer_mlp", "--prune", "0.5"],
             "publish": ["--model", "breast_cancer_mlp", "--repository", str(repo)], "pipeline-check": []}[command]  # fmt: skip
    for name, (path, message) in unloadable.items():
        capsys.readouterr()
        assert main([command, "--from", str(path), *extra]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "weights_only" not in err, err
        assert re.search(rf"^python -m training {command}: error: --from .*{message}", err), err
    assert versions(repo / "breast_cancer_mlp") == []


def test_an_out_that_cannot_be_written_as_a_file_is_refused_before_training_or_compressing(
    tmp_path: Path, good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import training.compress
    import training.distributed

    def ran(*_: object, **__: object) -> None:
        raise AssertionError("it ran before refusing --out")

    monkeypatch.setattr(training.distributed, "train", ran)
    monkeypatch.setattr(training.compress, "compress", ran)
    a_file = tmp_path / "a-file.toml"
    a_file.write_text("")
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, message in ((folder, r"--out .*folder is a folder; give the path of a file to write"),
                         (a_file / "x.pt", r"--out .*a-file\.toml/x\.pt: .*a-file\.toml is not a folder")):  # fmt: skip
        for argv in (["train", "--model", "breast_cancer_mlp", "--max-steps", "1", "--quiet"],
                     ["compress", "--model", "digits_cnn", "--from", str(good), "--prune", "0.5", "--quiet"]):  # fmt: skip
            capsys.readouterr()
            assert main([*argv, "--out", str(out)]) == 2
            assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file.toml", "folder"] and not list(folder.iterdir())


def test_a_checkpoint_that_cannot_be_moved_into_place_leaves_no_temporary_file(tmp_path: Path) -> None:
    from training.default_models import write_weights

    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(OSError):
        write_weights(target, {"x": torch.zeros(1)})
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_canary_config_that_cannot_be_read_or_written_stops_the_publish_before_it_happens(
    repo: Path, mlp_seed: dict[int, Path], tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file.toml"
    a_file.write_text("")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[models]\n")
    for config, message in ((a_file / "rollout.toml", r"--canary-config .*a-file\.toml/rollout\.toml: .*a-file\.toml is not a folder"),
                            (tmp_path, r"--canary-config .* is a folder"),
                            (binary, r"--canary-config .*binary\.toml: not UTF-8 text")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            publish("breast_cancer_mlp", mlp_seed[0], repo, canary_config=config, force=True, **QUIET)
        assert versions(repo / "breast_cancer_mlp") == []
    assert a_file.read_text() == "" and binary.read_bytes() == b"\xff\xfe[models]\n"


@pytest.mark.parametrize(("stable", "message"), [
    ('"7"', r"the stable version '7' of breast_cancer_mlp is not in .* \(versions present: 1\)"),
    ('"abc"', r"the stable version of breast_cancer_mlp is 'abc', not a version number"),
    ('"0"', r"the stable version of breast_cancer_mlp is '0', not a version number"),
    ("true", r"the stable version of breast_cancer_mlp is True, not a version number"),
])  # fmt: skip
def test_a_stable_named_in_the_rollout_config_that_is_not_a_version_present_is_a_usage_error(
    repo: Path, mlp_seed: dict[int, Path], stable: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publish("breast_cancer_mlp", mlp_seed[0], repo, **QUIET)
    rollout = repo.parent / "rollout.toml"
    text = f"[models.breast_cancer_mlp]\nstable = {stable}\n"
    rollout.write_text(text)
    with pytest.raises(UsageError, match=rf"--canary-config .*rollout\.toml: {message}"):
        publish("breast_cancer_mlp", mlp_seed[0], repo, canary_config=rollout, force=True, **QUIET)
    argv = ["publish", "--model", "breast_cancer_mlp", "--from", str(mlp_seed[0]), "--repository", str(repo),
            "--canary-config", str(rollout)]  # fmt: skip
    assert main(argv) == 2 and re.search(message, capsys.readouterr().err)
    assert versions(repo / "breast_cancer_mlp") == [1] and rollout.read_text() == text
    # Named as a number, or with a leading zero (the gateway reads both as the version), it is the stable.
    rollout.write_text("[models.breast_cancer_mlp]\nstable = 1\n")
    assert publish("breast_cancer_mlp", mlp_seed[0], repo, canary_config=rollout, **QUIET).stable_version == 1
    rollout.write_text('[models.breast_cancer_mlp]\nstable = "01"\n')
    assert publish("breast_cancer_mlp", mlp_seed[0], repo, canary_config=rollout, **QUIET).stable_version == 1

"""The user's path: ``examples/train.py`` (LightningCLI) with every shipped YAML config, the README's snippets and
commands, and the example DataModules. Nothing here downloads: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` (installed by ``make test``), the CIFAR-10 and ImageNet configs are only built, not fit."""

from __future__ import annotations

import copy
import inspect
import json
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_decor import DecorrelationCallback, Decorrelator, decorrelation_matrices
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.patching import eligible_layers
from lightning_decor.plan import LayerPlan, Plan
from lightning_decor.planner import plain_steps

from conftest import TinyModule, checkout_env, correlated_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
README = (ROOT / "README.md").read_text()
LOCAL_DATA = {"FashionMNISTDataModule"}  # data this machine and CI have; the others need the user's data

sys.path.insert(0, str(EXAMPLES))

from train import cli_main  # noqa: E402

from data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CIFAR10DataModule,
    ImageNetDataModule,
    prepare_fashion_mnist,
)

# A value other than the default for every DecorrelationCallback argument (a new argument must be added here).
CALLBACK_VALUES: dict[str, Any] = {
    "decor_lr": 0.002,
    "kappa": 0.25,
    "normalize": "trace",
    "sample_fraction": 0.5,
    "max_rows": 32,
    "max_features": 4096,
    "block_size": 256,
    "max_overhead": 0.25,
    "max_memory": 2.5,
    "update_every": 2,
    "include": ["net.*"],
    "exclude": ["net.19"],
    "log_per_layer": True,
    "use_cuda_stream": False,
    "fold_on_fit_end": False,
    "log_histograms_every_n_epochs": 2,
    "log_correlation_image": "net.0",
    "log_image_every_n_epochs": 3,
    "plan": "pinned_plan.json",  # written by the test that uses it
    "plan_cache": False,
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def data_class(config: dict[str, Any]) -> str:
    return config["data"]["class_path"].rsplit(".", 1)[-1]


def decor_callbacks(trainer: pl.Trainer) -> list[DecorrelationCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, DecorrelationCallback)]


def section(title: str) -> str:
    """The README text under ``## <title>`` up to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    prepare_fashion_mnist(root, download=False)  # from /usr/share/datasets/fashion-mnist; never downloads
    return root


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when both `args` and sys.argv are given


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder: the configs write to the relative ``runs/`` and ``data/``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------- the configs
def test_configs_are_shipped_in_dbp_bp_pairs() -> None:
    assert CONFIGS, "no YAML config in examples/configs"
    names = {path.stem for path in CONFIGS}
    for path in CONFIGS:
        assert path.read_text().startswith("# "), f"{path.name} does not document itself at the top"
        pair = path.stem.rsplit("_", 1)
        assert pair[1] in ("dbp", "bp") and f"{pair[0]}_dbp" in names and f"{pair[0]}_bp" in names, path.name


@pytest.mark.parametrize("dbp", [p for p in CONFIGS if p.stem.endswith("_dbp")], ids=lambda p: p.stem)
def test_bp_config_is_the_dbp_config_without_the_callback(dbp: Path) -> None:
    with_dbp, without = load(dbp), load(dbp.with_name(dbp.name.replace("_dbp.yaml", "_bp.yaml")))
    callbacks = with_dbp["trainer"].pop("callbacks")
    assert [cb["class_path"] for cb in callbacks] == ["lightning_decor.DecorrelationCallback"]
    assert "callbacks" not in without["trainer"]
    assert with_dbp["trainer"]["logger"]["init_args"].pop("name") == dbp.stem
    assert without["trainer"]["logger"]["init_args"].pop("name") == dbp.stem.replace("_dbp", "_bp")
    assert with_dbp == without


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_what_it_names_without_touching_the_disk(config: Path, in_tmp: Path) -> None:
    expected = load(config)
    cli = cli_main(["--config", str(config)], run=False)
    assert type(cli.datamodule).__name__ == data_class(expected)
    for key, value in expected["data"]["init_args"].items():
        assert getattr(cli.datamodule, key) == value, key
    assert {k: cli.model.hparams[k] for k in expected["model"]} == expected["model"]
    assert cli.trainer.max_epochs == expected["trainer"]["max_epochs"]
    cbs = decor_callbacks(cli.trainer)
    yaml_cbs = [cb["init_args"] for cb in expected["trainer"].get("callbacks", [])]
    assert len(cbs) == len(yaml_cbs)
    for cb, init_args in zip(cbs, yaml_cbs, strict=True):
        assert {k: getattr(cb, k) for k in init_args} == init_args
        if cb.log_correlation_image is not None:  # names a layer the callback will patch (checked again in setup)
            assert eligible_layers(cli.model, cb.max_features)[cb.log_correlation_image] is None
    assert list(in_tmp.iterdir()) == []  # no download, no log folder


@pytest.mark.parametrize("config", [p for p in CONFIGS if data_class(load(p)) in LOCAL_DATA], ids=lambda p: p.stem)
def test_config_with_local_data_fits_one_batch(config: Path, fashion_dir: Path, in_tmp: Path, capsys) -> None:
    args = [
        "--trainer.fast_dev_run=true",
        f"--data.init_args.data_dir={fashion_dir}",
        "--data.init_args.download=false",
    ]
    cli = cli_main(["fit", "--config", str(config), *args])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    cbs = decor_callbacks(cli.trainer)
    # one step: the DBP callback is still measuring the plain step for its cost plan, so R has not moved yet
    assert [cb.updates for cb in cbs] == ([0] if config.stem.endswith("_dbp") else [])
    assert all(cb.engine is not None and cb.engine.planner is not None and not cb.engine.planner.done for cb in cbs)
    assert not any(isinstance(m, DecorrelatedLayer) for m in cli.model.modules())  # folded at fit end
    assert "(fast_dev_run): loggers and checkpoints are off" in capsys.readouterr().out
    assert list(in_tmp.iterdir()) == []


def test_train_py_writes_tensorboard_logs_and_says_where(fashion_dir: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, str(EXAMPLES / "train.py"), "fit",
        "--config", str(EXAMPLES / "configs" / "fashion_mnist_dbp.yaml"),
        f"--data.init_args.data_dir={fashion_dir}", "--data.init_args.download=false",
        "--data.init_args.train_limit=3072", "--data.init_args.eval_batch_size=100", "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0.01", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks.max_overhead=100.0",  # a budget every layer fits in: the same plan on a busy machine
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = (tmp_path / "runs" / "fashion_mnist_dbp" / "version_0").resolve()
    assert f"Training: logs in {log_dir}\n" in done.stdout
    assert f"Done: logs in {log_dir}\n" in done.stdout
    assert done.stdout.count("View them with: tensorboard --logdir runs\n") == 2
    assert (log_dir / "config.yaml").exists()  # LightningCLI's copy of the resolved config
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert {"decor/loss", "train/loss", "val/acc"} <= set(acc.Tags()["scalars"])
    # 3072 images / batch 128 = 24 steps, logged every step; R moves after the planning steps
    assert len(acc.Scalars("decor/loss")) == 24 - plain_steps()
    assert len(acc.Scalars("decor/overhead")) >= 1  # measured by the plan's check
    plan = done.stderr[done.stderr.index("Decorrelation plan") :].splitlines()[2:8]  # the table printed at the plan
    kept = {line.split()[0] for line in plan if line.split()[5] != "plain"}
    assert {"net.0", "net.19"} <= {line.split()[0] for line in plan}  # every conv and the head: 6 layers
    assert set(acc.Tags()["histograms"]) == {f"decor/R_offdiag/{name}" for name in kept} and "net.0" in kept
    assert acc.Tags()["images"] == ["decor/correlation/net.0"]


# ------------------------------------------------------------------------------------ the callback's CLI arguments
def test_print_config_shows_every_callback_argument_with_its_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["--config", str(EXAMPLES / "configs" / "fashion_mnist_dbp.yaml"), "--print_config=comments"], run=False
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)["trainer"]["callbacks"][0]
    params = inspect.signature(DecorrelationCallback).parameters
    assert printed["class_path"] == "lightning_decor.DecorrelationCallback"
    assert set(printed["init_args"]) == set(params)
    comments = " ".join(line.strip().lstrip("#").strip() for line in out.splitlines() if line.strip().startswith("#"))
    doc = inspect.getdoc(DecorrelationCallback) or ""
    args = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    helps = dict(re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", args, flags=re.DOTALL | re.MULTILINE))
    assert set(helps) == set(params)
    for name, text in helps.items():
        assert " ".join(text.split()) in comments, name


def test_every_callback_argument_from_yaml_and_from_the_command_line(in_tmp: Path) -> None:
    assert set(CALLBACK_VALUES) == set(inspect.signature(DecorrelationCallback).parameters)
    pinned = Plan({"net.0": LayerPlan("net.0", "fused", 9, 9, 100, 32, 1, 0.0)}, step_seconds=0.1, max_overhead=0.1)
    pinned.save(in_tmp / CALLBACK_VALUES["plan"])
    defaults = DecorrelationCallback()
    assert all(getattr(defaults, k) != v for k, v in CALLBACK_VALUES.items())  # each value really is set
    bp = str(EXAMPLES / "configs" / "fashion_mnist_bp.yaml")
    extra = in_tmp / "decor.yaml"
    callback = {"class_path": "lightning_decor.DecorrelationCallback", "init_args": CALLBACK_VALUES}
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    from_yaml = cli_main(["--config", bp, "--config", str(extra)], run=False)
    # As a user types them: strings bare (jsonargparse keeps quotes of a `str` argument), the rest as YAML/JSON.
    flags = [
        f"--trainer.callbacks.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in CALLBACK_VALUES.items()
    ]
    from_flags = cli_main(["--config", bp, "--trainer.callbacks+=DecorrelationCallback", *flags], run=False)
    for cli in (from_yaml, from_flags):
        (cb,) = decor_callbacks(cli.trainer)
        assert {k: getattr(cb, k) for k in CALLBACK_VALUES if k != "plan"} == {
            k: v for k, v in CALLBACK_VALUES.items() if k != "plan"
        }
        assert cb.plan.layouts() == pinned.layouts()  # the file, read


def test_command_line_overrides_the_callback_of_a_config(in_tmp: Path) -> None:
    dbp = str(EXAMPLES / "configs" / "fashion_mnist_dbp.yaml")
    (cb,) = decor_callbacks(cli_main(["--config", dbp, "--trainer.callbacks.kappa=0.2"], run=False).trainer)
    assert cb.kappa == 0.2 and cb.decor_lr == load(Path(dbp))["trainer"]["callbacks"][0]["init_args"]["decor_lr"]
    assert decor_callbacks(cli_main(["--config", dbp, "--trainer.callbacks=[]"], run=False).trainer) == []


# -------------------------------------------------------------------------------------------------- the README
def slow_collate(batch: list[Any]) -> Any:
    """A loader as slow as a real one (50 ms a batch): the plan keeps the layers of a tiny model, whose DBP cost
    would otherwise be a large share of its sub-millisecond step."""
    time.sleep(0.05)
    return torch.utils.data.default_collate(batch)


class InOrderData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=32, collate_fn=slow_collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(64, seed=1), batch_size=32)


def test_readme_python_usage_runs(in_tmp: Path) -> None:
    (snippet,) = code_blocks(section("Usage"), "python")
    namespace: dict[str, Any] = {"MyLightningModule": TinyModule, "my_datamodule": InOrderData()}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    trainer, model = namespace["trainer"], namespace["model"]
    (cb,) = decor_callbacks(trainer)
    # 256 samples / batch 32 per epoch; R moves once per step after the planning steps
    assert cb.updates == trainer.max_epochs * 8 - plain_steps() == trainer.global_step - plain_steps()
    assert cb.plan is not None
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())  # "a plain model again"


def test_readme_plain_pytorch_usage_runs() -> None:
    snippet, _ = code_blocks(section("Usage in plain PyTorch"), "python")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = correlated_data().tensors

    def loader_batches() -> Any:  # a loader as slow as a real one (50 ms a batch), so the plan keeps both layers
        for i in range(0, 3 * 256, 32):  # three epochs: 24 steps
            time.sleep(0.05)
            yield x[i % 256 : i % 256 + 32], y[i % 256 : i % 256 + 32]

    loader = loader_batches()
    reference = copy.deepcopy(model)
    namespace: dict[str, Any] = {"model": model, "loader": loader}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    dec = namespace["dec"]
    assert dec.updates == 24 - plain_steps() and dec.plan is not None  # after the planning steps
    assert all(p.form != "plain" for p in dec.plan.layers.values())
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Tanh) for m in model.modules())  # "a plain model again"
    assert not torch.equal(model[0].weight, reference[0].weight)  # it trained


def test_readme_grad_scaler_loop_leaves_r_where_the_scaler_skips() -> None:
    """The README's GradScaler lines, in a loop on the CPU (float16 autocast and a CPU GradScaler): R moves with every
    optimizer step the scaler takes and stays where it skips one (an overflowing loss)."""
    _, snippet = code_blocks(section("Usage in plain PyTorch"), "python")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = correlated_data().tensors
    dec = Decorrelator(model, max_overhead=None, sample_fraction=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    code = compile(snippet, "README.md", "exec")
    for step in range(4):
        before = {n: R.clone() for n, R in decorrelation_matrices(model).items()}
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x[32 * step : 32 * (step + 1)]), y[32 * step : 32 * (step + 1)])
        loss = loss * (1e38 if step == 2 else 1.0)  # overflows the scaled gradients: the scaler skips this step
        optimizer.zero_grad()
        exec(code, {"loss": loss, "scaler": scaler, "dec": dec, "optimizer": optimizer})  # noqa: S102
        moved = [not torch.equal(R, before[n]) for n, R in decorrelation_matrices(model).items()]
        assert moved == [step != 2] * 2, step
    assert dec.updates == 4


FABRIC_PRELUDE = """
import os, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
initial = {k: v.clone() for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(1)
x = torch.randn(1536, 8, generator=g) @ (torch.randn(8, 8, generator=g) + 2.0)
data = TensorDataset(x, (x[:, 0] > 0).long())

def slow_collate(batch):  # a loader as slow as a real one (100 ms a batch), so the plan keeps both layers (two
    time.sleep(0.1)  # processes on two cores: their plan's check runs on a busy machine)
    return torch.utils.data.default_collate(batch)

loader = DataLoader(data, batch_size=32, collate_fn=slow_collate)  # 24 batches of each rank's 768 samples
"""

FABRIC_EPILOGUE = """
torch.save(
    {"state": {k: v.detach().cpu() for k, v in dec.model.state_dict().items()}, "initial": initial,
     "updates": dec.updates, "plan": dec.plan.state_dict(), "plain": not dec.layers},
    os.path.join(os.environ["OUT"], f"rank{fabric.global_rank}.pt"),
)
"""


def test_readme_fabric_usage_runs_on_two_processes_with_identical_r(tmp_path: Path) -> None:
    (snippet,) = code_blocks(section("Usage with Lightning Fabric"), "python")
    script = tmp_path / "fabric_snippet.py"
    script.write_text(FABRIC_PRELUDE + snippet + FABRIC_EPILOGUE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**checkout_env(), "OUT": str(tmp_path), "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    for var in ("MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["updates"] == 24 - plain_steps() and rank["plain"]  # R moved after the planning steps; folded
        assert all(p["form"] != "plain" for p in rank["plan"]["layers"].values())
    assert ranks[0]["plan"] == ranks[1]["plan"]  # rank 0's plan on both ranks
    for name, value in ranks[0]["state"].items():  # the same trained function (W R folded) on both ranks
        assert torch.equal(value, ranks[1]["state"][name]), name
        assert not torch.equal(value, ranks[0]["initial"][name]), name  # it trained


def test_readme_yaml_usage_parses(in_tmp: Path) -> None:
    blocks = [b for b in code_blocks(section("Usage in YAML (LightningCLI)"), "yaml") if "DecorrelationCallback" in b]
    assert len(blocks) == 1
    (in_tmp / "snippet.yaml").write_text(blocks[0])
    bp = str(EXAMPLES / "configs" / "fashion_mnist_bp.yaml")
    (cb,) = decor_callbacks(cli_main(["--config", bp, "--config", "snippet.yaml"], run=False).trainer)
    init_args = yaml.safe_load(blocks[0])["trainer"]["callbacks"][0]["init_args"]
    assert {k: getattr(cb, k) for k in init_args} == init_args


def test_readme_train_commands_parse(in_tmp: Path, capsys) -> None:
    (bash,) = code_blocks(section("Usage in YAML (LightningCLI)"), "bash")
    lines = [line for line in bash.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    commands = [shlex.split(line) for line in lines if line.startswith("python examples/train.py")]
    assert len(commands) >= 5
    for command in commands:
        assert command[2] == "fit"
        args = [a.replace("examples/configs/", f"{EXAMPLES}/configs/") for a in command[3:]]
        if any(a.startswith("--print_config") for a in args):
            with pytest.raises(SystemExit) as exit_info:
                cli_main(args, run=False)
            assert exit_info.value.code == 0 and "DecorrelationCallback" in capsys.readouterr().out
        else:
            cli_main(args, run=False)
    save_dirs = {load(p)["trainer"]["logger"]["init_args"]["save_dir"] for p in CONFIGS}
    assert save_dirs == {"runs"} and "tensorboard --logdir runs" in bash


# ----------------------------------------------------------------------------------------------- the DataModules
def test_imagenet_datamodule_reads_an_image_folder(tmp_path: Path) -> None:
    colours = {"cat": (255, 0, 128), "dog": (10, 200, 30)}
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                size = (40 + 7 * i, 30 + 5 * i)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if split == "train" else None
                image = Image.fromarray(pixels) if pixels is not None else Image.new("RGB", size, colour)
                image.save(tmp_path / split / name / f"{i}.png")
    dm = ImageNetDataModule(
        str(tmp_path), batch_size=4, eval_batch_size=6, num_workers=0, image_size=32, eval_resize=36
    )
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]  # ImageFolder: classes sorted by name
    for image, label in zip(x, y, strict=True):  # a plain-coloured image stays plain through resize and crop
        colour = torch.tensor(colours[["cat", "dog"][label]]) / 255
        expected = (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        # resizing a plain colour keeps it (measured 2.4e-7, float32 normalisation); 1e-2 is below one grey level
        # (1 / 255 / std >= 0.017), so any change of colour fails
        torch.testing.assert_close(image, expected[:, None, None].expand(3, 32, 32), atol=1e-2, rtol=0)


def test_imagenet_datamodule_says_what_is_missing(tmp_path: Path) -> None:
    match = rf"Expected an ImageFolder tree at {re.escape(str(tmp_path / 'nope' / 'train'))} \(train/<class>/<image>\)"
    with pytest.raises(FileNotFoundError, match=match):
        ImageNetDataModule(str(tmp_path / "nope")).prepare_data()


def test_cifar10_datamodule_does_not_download_unless_asked(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Dataset not found or corrupted"):  # torchvision's message
        CIFAR10DataModule(str(tmp_path), download=False).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_cifar10_transforms_normalise_and_augment() -> None:
    dm = CIFAR10DataModule(augment=True)
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    # the same float32 normalisation of the same pixel: exact (measured 0); torch's float32 defaults
    torch.testing.assert_close(dm.transform(False)(image), expected[:, None, None].expand(3, 32, 32))
    torch.manual_seed(0)
    augmented = torch.stack([dm.transform(True)(image) for _ in range(8)])
    assert augmented.shape == (8, 3, 32, 32)
    padded = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)  # RandomCrop pads with black
    # some crops shift: a black padded column, normalised as the reference: exact (measured 0; allclose's defaults)
    assert any(torch.allclose(a[:, :, 0], padded[:, None].expand(3, 32)) for a in augmented)

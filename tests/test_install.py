"""Packaging: the light install (torch and einops) imports and computes without the training
stack, the wheel ships the subpackages, the configs and the extras, and the installed trainer
runs by name from any folder."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
TRAINING_STACK = (
    "deepspeed",
    "datasets",
    "wandb",
    "tokenizers",
    "yaml",
    "pydantic",
    "safetensors",
    "huggingface_hub",
    "matplotlib",
    "tqdm",
    "transformers",
)
LIGHT = """
import sys

# None in sys.modules: `import x` fails as if x were not installed (and find_spec says None).
BLOCKED = sys.argv[1:]
sys.modules.update(dict.fromkeys(BLOCKED, None))
import torch

import LongNet
import longnet
import longnet.distributed
from longnet.reference import dense_dilated_attention

q, k, v = (torch.randn(1, 24, 4, 8, dtype=torch.float64) for _ in range(3))
out = longnet.dilated_attention(q, k, v, [8, 16], [1, 2], causal=True)
torch.testing.assert_close(out, dense_dilated_attention(q, k, v, [8, 16], [1, 2], causal=True))
layer = LongNet.DilatedAttention(d_model=32, num_heads=4, dilation_rate=2, segment_size=8)
assert layer(torch.randn(1, 24, 32)).shape == (1, 24, 32)
print("light install ok")
"""


def test_light_install_needs_no_training_stack(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LIGHT, *TRAINING_STACK],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: the installed packages
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "light install ok"


def test_wheel_ships_packages_configs_and_extras(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("longnet", "distributed", "launch", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LongNet.py"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("longnet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "longnet-train = longnet.launch.trainer:main" in archive.read(entry_points).decode()
    shipped = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {f"longnet/configs/{name}" for name in shipped} <= names
    modules = ("launch/data/packing", "launch/config", "distributed/__init__", "dilated")
    for module in (*modules, "integrations/transformers"):
        assert f"longnet/{module}.py" in names
    assert "LongNet.py" in names
    always = sorted(r.split(">")[0].split("=")[0] for r in requires if "extra ==" not in r)
    assert always == ["einops", "torch"]

    def extra(name: str) -> set[str]:
        marker = f'; extra == "{name}"'
        found = (r.removesuffix(marker) for r in requires if r.endswith(marker))
        return {r if "==" in r else re.split(r"[<>=!~,]", r)[0] for r in found}  # pins kept

    assert {"safetensors", "huggingface_hub"} == extra("hub")
    assert extra("hub") | {"deepspeed", "datasets", "wandb", "pydantic", "pyyaml"} <= extra("train")
    assert extra("cpu") == {"torch==2.13.0"}
    assert "transformers" in extra("hf") and extra("hub") <= extra("hf")
    assert {"lm_eval", "accelerate", "transformers"} <= extra("eval")
    assert "triton" in extra("triton")


@pytest.mark.parametrize(
    "command",
    [["longnet-train"], [sys.executable, "-m", "longnet.launch.train"]],
    ids=["console-script", "module"],
)
def test_installed_trainer_finds_shipped_configs_by_name(tmp_path, command):
    """From a folder without configs/, `--config tiny-cpu` is the shipped file: its checks run (a
    bad override stops it before any work), and an unknown name lists the shipped ones."""
    if command[0] == "longnet-train":
        command = [str(Path(sys.executable).parent / "longnet-train")]
    for args, message in (
        (["tiny-cpu", "train.steps=0"], "error: train.steps: Input should be greater than 0"),
        (["tiny-gpu"], "error: config file 'tiny-gpu' does not exist (shipped: gpu-125m-1m-sp8"),
    ):
        result = subprocess.run(
            [*command, "--config", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(message), result.stderr

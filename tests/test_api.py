"""The Python API (`lopt_dist.train`, configs built in code, `__version__`) and what the package installs."""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata

import lopt_dist
from tests.conftest import REPO


def test_train_a_config_built_in_code(tiny_model_dir, tmp_path):
    import lopt_dist.train.optim  # noqa: F401  (importing from the subpackage keeps lopt_dist.train callable)

    cfg = lopt_dist.ExperimentConfig(
        name="api", output_dir=str(tmp_path / "run"),
        model=lopt_dist.ModelConfig(name=str(tiny_model_dir("llama"))),
        data=lopt_dist.DataConfig(builtin_samples=16, max_seq_length=128),
        train=lopt_dist.TrainConfig(steps=1, micro_batch_size=2),
        checkpoint=lopt_dist.CheckpointConfig(export=False),
        logging=lopt_dist.LoggingConfig(progress=False),
    )
    result = lopt_dist.train(cfg)
    assert isinstance(result, lopt_dist.RunResult)
    assert result.output_dir == tmp_path / "run" and len(result.records) == 1
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step_000001"


def test_version_comes_from_the_package_metadata():
    assert lopt_dist.__version__ == importlib.metadata.version("lopt-dist")


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def test_install_lists_every_package_and_no_generic_top_level_one():
    """setup.cfg names its packages one by one (tools/ is installed as lopt_dist_tools): every package directory of
    lopt_dist/ and tools/ must be listed, and nothing else at the top level."""
    options = _setup_cfg()["options"]
    listed = set(options["packages"].split())
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for root in ("lopt_dist", "tools")
               for p in (REPO / root).rglob("__init__.py")}
    assert listed == {name.replace("tools", "lopt_dist_tools", 1) if name.startswith("tools") else name
                      for name in on_disk}
    assert {name.split(".")[0] for name in listed} == {"lopt_dist", "lopt_dist_tools"}
    assert options["package_dir"].split() == ["lopt_dist_tools", "=", "tools"]


def test_console_scripts_point_at_functions_that_exist():
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    for line in scripts:
        name, target = (part.strip() for part in line.split("="))
        module, function = target.split(":")
        # From the repository, lopt_dist_tools is the tools/ directory.
        module = module.replace("lopt_dist_tools", "tools", 1) if module.startswith("lopt_dist_tools") else module
        assert callable(getattr(importlib.import_module(module), function)), name

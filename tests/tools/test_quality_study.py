"""The quality study trains both methods on the same samples with the same task learning rate, and reuses only
work made with the same settings."""

import json

from lopt_dist.config import load_config
from tests.conftest import REPO
from tools.quality_study import StudySettings, _reusable, run_name, train_overrides


def _config(method, lr_first, tmp_path):
    settings = StudySettings(data=str(REPO / "configs/default.yaml"))  # any existing file: only paths are checked
    return load_config(REPO / "configs/default.yaml", train_overrides(settings, method, tmp_path / method, lr_first))


def test_both_methods_see_the_same_samples_and_task_learning_rate(tmp_path):
    e2e, lopt = _config("e2e", 5e-5, tmp_path), _config("lopt", 5e-5, tmp_path)
    assert (e2e.train.method, e2e.runtime.mode) == ("e2e", "local")
    assert (lopt.train.method, lopt.runtime.mode) == ("lopt", "ray")
    assert [g.workers for g in lopt.runtime.groups] == [1, 1]
    assert e2e.data == lopt.data
    for key in ("steps", "micro_batch_size", "micro_batches_per_step", "lr", "warmup_steps", "seed", "grad_clip"):
        assert getattr(e2e.train, key) == getattr(lopt.train, key), key
    assert lopt.train.lr_first == lopt.train.lr


def test_a_first_half_variant_changes_only_lr_first_and_gets_its_own_run(tmp_path):
    main, variant = _config("lopt", 5e-5, tmp_path), _config("lopt", 5e-6, tmp_path)
    assert variant.train.lr_first == 5e-6 and variant.train.lr == main.train.lr
    settings = StudySettings()
    assert run_name("lopt", settings.lr, settings) == "lopt"
    assert run_name("lopt", 5e-6, settings) == "lopt_lr_first_5e-06"


def test_finished_work_is_reused_only_with_the_same_settings(tmp_path):
    path = tmp_path / "run.json"
    assert _reusable(path, {"command": "a"}) is None
    path.write_text(json.dumps({"command": "a", "wall_s": 3.0}))
    assert _reusable(path, {"command": "a"}) == {"command": "a", "wall_s": 3.0}
    assert _reusable(path, {"command": "b"}) is None

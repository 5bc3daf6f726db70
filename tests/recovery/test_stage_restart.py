"""Planning a one-stage restart (pipeline/stage_restart.py): where it stays exact, and every case that falls back
to restarting every stage, each with its reason."""

import pytest

from lopt_dist.config import ExperimentConfig, config_from_dict
from lopt_dist.pipeline.activity import WorkerStatus
from lopt_dist.pipeline.errors import Failure
from lopt_dist.pipeline.health import Diagnosis, Probe
from lopt_dist.pipeline.stage_restart import RestartPlan, plan_restart

STAGES = {"stage 0 worker 0": 0, "stage 1 worker 0": 1}


def _cfg(**overrides) -> ExperimentConfig:
    raw = {"runtime": {"mode": "ray"}, "train": {"micro_batches_per_step": 2}}
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def _diagnosis(replay_from: int | None = 0, other: str = "alive", phase: str = "train_step",
               failed=("stage 1 worker 0",)) -> Diagnosis:
    status = WorkerStatus(pid=1, step=5, doing="sending", for_s=1.0, waits_on_peer=True, steps_run=5,
                          checkpoint_loads=0, first_step=0, replay_from=replay_from)
    failure = Failure(worker="stage 1 worker 0", kind="died", cause="killed", phase=phase, step=5, stage=1)
    probes = {"stage 0 worker 0": Probe(other, status if other == "alive" else None), "stage 1 worker 0": Probe("dead")}
    return Diagnosis(failure, None, probes, frozenset(failed))


def test_a_failed_stage_with_a_complete_replay_log_restarts_alone_from_the_newest_checkpoint(tmp_path):
    plan = plan_restart(_cfg(), _diagnosis(replay_from=8), STAGES, (tmp_path / "step_000004", 4))
    assert plan == RestartPlan(1, tmp_path / "step_000004", 4)  # needs micro-batches from 4 x 2 = 8 on
    assert "restart stage 1 alone from step_000004" in plan.action()


@pytest.mark.parametrize("cfg, diagnosis, reason", [
    (_cfg(**{"runtime.restart_stage_only": False}), _diagnosis(), "restart_stage_only is false"),
    (_cfg(**{"eval.every": 2, "eval.retention": True}), _diagnosis(), "eval.every"),
    (_cfg(), _diagnosis(phase="start-up"), "while the pipeline was starting"),
    (_cfg(), _diagnosis(other="dead"), "workers of other stages failed too (stage 0 worker 0)"),
    (_cfg(), _diagnosis(failed=("stage 1 worker 0", "stage 0 worker 0")), "workers of other stages failed too"),
    (_cfg(), _diagnosis(replay_from=9), "keeps activations only from micro-batch 9 on"),
    (_cfg(), _diagnosis(replay_from=None), "keeps no replay log"),
])
def test_cases_that_cannot_stay_exact_fall_back_with_their_reason(cfg, diagnosis, reason, tmp_path):
    plan = plan_restart(cfg, diagnosis, STAGES, (tmp_path / "step_000004", 4))
    assert isinstance(plan, str) and reason in plan

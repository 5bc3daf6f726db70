"""Restart the group of one failed stage while the other stages keep their state.

Nothing flows backward, so the stages around a failed one hold nothing that depends on its lost state: the
stage before it sent activations that its senders keep in a replay log (transport/replay.py) since the last
checkpoint, and the stage after it has everything it consumed. So only the failed stage's group restarts,
from the newest committed checkpoint c (or from the model at step 0): it redoes steps c, c+1, ... on the same
activations, which on a CPU gives bit for bit the state it lost, and skips sending what the next stage already
took. Meanwhile the other stages wait on their boundaries (transport/link.py) and never reload anything.

A single-stage restart is planned only when it stays exact; otherwise the run restarts every stage (run.py):
- one stage failed: every worker of every other stage answers the status probe and no call of theirs failed;
- the previous stage's replay logs still reach back to checkpoint c (`runtime.replay_buffer_size`);
- the run is not stopping on a signal, and was past its start-up;
- no evaluation during training (`eval.every: 0`): its micro-batches cross the boundaries between steps;
- the restarted group lands where the transports and device views decided at start stay the same
  (launch.relaunch_stage checks; a restart that fails at any point falls back to restarting every stage).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from lopt_dist.config import ExperimentConfig
from lopt_dist.pipeline.health import Diagnosis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPlan:
    stage: int
    checkpoint: Path | None  # the newest committed checkpoint, None: start from the model
    step: int  # the checkpoint's step (0 without one)

    def action(self) -> str:
        start = self.checkpoint.name if self.checkpoint is not None else "step 0 (no checkpoint yet)"
        return f"restart stage {self.stage} alone from {start}; the other stages keep their state"


def plan_restart(cfg: ExperimentConfig, diagnosis: Diagnosis, stages: dict[str, int],
                 latest: tuple[Path, int] | None) -> RestartPlan | str:
    """A plan to restart the failed stage alone, or why it cannot be (then every stage restarts).
    `stages`: each worker's stage, by label; `latest`: the newest committed checkpoint and its step."""
    failure = diagnosis.failure
    if not cfg.runtime.restart_stage_only:
        return "runtime.restart_stage_only is false"
    if cfg.eval.every:  # evaluation micro-batches share the boundaries; the replay log does not order them
        return "evaluation during training (eval.every) is on"
    if failure.stage is None or failure.phase == "start-up":
        return "the failure happened while the pipeline was starting"
    stage = failure.stage
    others = [label for label, s in stages.items() if s != stage]
    broken = [label for label in others
              if diagnosis.probes[label].state != "alive" or label in diagnosis.failed]
    if broken:
        return f"workers of other stages failed too ({', '.join(broken)})"
    checkpoint, step = latest if latest is not None else (None, 0)
    needed = step * cfg.train.micro_batches_per_step
    for label in (label for label, s in stages.items() if s == stage - 1):
        kept = diagnosis.probes[label].status.replay_from
        if kept is None or kept > needed:
            have = "keeps no replay log" if kept is None else f"keeps activations only from micro-batch {kept} on"
            return (f"{label} {have}, and a restart from step {step} needs them from micro-batch {needed} "
                    "(runtime.replay_buffer_size)")
    return RestartPlan(stage, checkpoint, step)


def clear_stage_files(directory: Path, stage: int) -> None:
    """A staged checkpoint that the failed stage was writing: its part is written again by the new group."""
    shutil.rmtree(directory / f"stage_{stage}", ignore_errors=True)

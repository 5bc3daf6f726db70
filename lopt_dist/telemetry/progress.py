"""The driver's progress bar: step, tokens/s, losses, channel depth and ETA (tqdm computes the ETA).

The run creates it when training starts, after the set-up (reported on its own line), so its rate and ETA
count steps only.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from lopt_dist.config import ExperimentConfig


class Progress:
    def __init__(self, cfg: ExperimentConfig, start_step: int) -> None:
        self.every = cfg.train.log_every
        self.failures = 0  # shown on the bar once there is one
        self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.name, unit="step",
                        disable=not cfg.logging.progress, file=sys.stderr, dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if (record["step"] + 1) % self.every:
            self.bar.update(1)
            return
        shown = {"tok/s": f"{record['tokens_per_s']:.0f}", "loss": f"{record['task_loss']:.4f}"}
        recon = {k.replace("recon_loss_", "rec"): f"{v:.4g}" for k, v in record.items() if k.startswith("recon_loss_")}
        shown.update(recon)
        if "channel_depth" in record:
            shown["depth"] = record["channel_depth"]
        if "eval_task_loss" in record:
            shown["eval"] = f"{record['eval_task_loss']:.4f}"
        if self.failures:
            shown["failures"] = self.failures
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if not self.bar.disable:
            return
        # Without a bar (logging.progress: false, or no terminal) print one line per logged step.
        line = " ".join(f"{k}={v}" for k, v in shown.items())
        print(f"step {record['step'] + 1}: {line}", file=sys.stderr, flush=True)

    def rewind(self, step: int) -> None:
        """The run restarted from the checkpoint of `step`: the bar goes back to it."""
        self.bar.n = step
        self.bar.refresh()

    def note(self, line: str) -> None:
        """A line above the bar (a failure and what the run does about it); the log has it too, so without a bar
        nothing more is printed."""
        self.failures += 1
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

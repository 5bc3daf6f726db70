"""The memory benchmark's figures: per-worker ratios, the 70B projection, the JSON and the markdown table.

Measured: every RSS figure in a layout's table. Projected: the 70B table, where each worker's figure is its
measured runtime RSS (before set-up) plus the measured ratio (memory above the runtime per byte of parameters
the worker owns) times what the same worker would own of a Llama-3-70B-shaped model in bf16. The projection
assumes that what a stage holds above the runtime grows with its parameters (weights, gradients, optimizer
state, loading buffers); activations, which grow with sequence length and batch instead, are small at the
measured settings and are scaled with the parameters too.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from lopt_dist.model.stages import split_model

from .run import llama_config

GIB = 2**30
_FIGURES = (("load", "load_peak_rss"), ("setup", "setup_peak_rss"), ("engine", "rss_after_engine"),
            ("step", "step_peak"))


def add_ratios(layout_result: dict, model_bytes: int) -> None:
    """Each worker's memory above its runtime, per byte of parameters it owns; the export's per model byte."""
    for w in layout_result["workers"]:
        base, owned = w["rss_before_setup"], w["owned_param_bytes"]
        for name, key in _FIGURES:
            if key in w:
                w[f"{name}_ratio"] = (w[key] - base) / owned
    export = layout_result["export"]
    export["model_bytes"] = model_bytes
    export["ratio"] = (export["driver_peak_rss"] - export["driver_rss_before"]) / model_bytes


def empty_model(config):
    """Parameters on the meta device: counted, never allocated."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def model_parameter_bytes(size: str, bytes_per_param: int = 2) -> int:
    """Parameter bytes of the whole `size` Llama (what an exported checkpoint holds)."""
    return sum(p.numel() for p in empty_model(llama_config(size)).parameters()) * bytes_per_param


def stage_parameter_bytes(size: str, stages: int, bytes_per_param: int = 2) -> list[int]:
    """Parameter bytes of each stage (decoders included) of the `size` Llama cut into `stages` even stages."""
    config = llama_config(size)
    model = empty_model(config)
    cuts = [config.num_hidden_layers * i // stages for i in range(1, stages)]
    with init_empty_weights(include_buffers=False):
        split = split_model(model, cuts, lambda_aux=1.0, seed=0)
    return [sum(p.numel() for p in stage.parameters()) * bytes_per_param for stage in split]


def project(layouts: list[dict], size: str = "70b") -> dict:
    """Per layout and stage: each worker's projected RSS at `size`, from the largest measured ratio of the stage."""
    out = {"model": size, "model_bytes": None, "layouts": []}
    for result in layouts:
        stage_bytes = stage_parameter_bytes(size, len(result["stages"]))
        out["model_bytes"] = sum(stage_bytes)
        rows = []
        for stage, workers in enumerate(result["stages"]):
            measured = [w for w in result["workers"] if w["stage"] == stage]
            owned = stage_bytes[stage] // workers if result["zero"] == 3 else stage_bytes[stage]
            runtime = max(w["rss_before_setup"] for w in measured)
            row = {"stage": stage, "workers": workers, "owned_param_bytes": owned}
            for name, _ in _FIGURES:
                if all(f"{name}_ratio" in w for w in measured):
                    row[name] = runtime + max(w[f"{name}_ratio"] for w in measured) * owned
            rows.append(row)
        export = result["export"]
        out["layouts"].append({"layout": result["layout"], "workers": rows,
                               "driver_export_peak": export["driver_rss_before"] + export["ratio"] * sum(stage_bytes)})
    return out


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Model: random Llama `{s['size']}` ({report['model']['parameters'] / 1e6:.1f}M parameters, "
             f"{_gib(report['model']['bytes'])} in bf16), bf16 run, {s['steps']} steps of "
             f"{s['micro_batch_size']} x {s['seq_len']} tokens per micro-batch; {report['machine']}.",
             f"Command: `{report['command']}`", ""]
    for result in report["layouts"]:
        lines += [f"**{result['layout']}** (measured; ratios: (figure - before set-up) / owns)", "",
                  "| stage.worker | owns (params) | RSS before set-up | loading peak | ratio | set-up peak | ratio "
                  "| after engine | step peak | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for w in result["workers"]:
            lines.append(f"| {w['stage']}.{w['rank']} | {_gib(w['owned_param_bytes'])} | {_gib(w['rss_before_setup'])} "
                         f"| {_figure(w, 'load_peak_rss', 'load')} | {_figure(w, 'setup_peak_rss', 'setup')} "
                         f"| {_gib(w['rss_after_engine'])} | {_figure(w, 'step_peak', 'step')} |")
        e = result["export"]
        lines += ["", f"Driver during export: {_gib(e['driver_rss_before'])} before, {_gib(e['driver_peak_rss'])} "
                      f"peak ({e['ratio']:.2f} x the model's bytes above it).", ""]
    p = report["projection"]
    lines += [f"**{p['model']} (projected** from the ratios above; {_gib(p['model_bytes'])} of bf16 parameters)", "",
              "| layout | stage | workers | owns per worker | loading peak | set-up peak | after engine | step peak |",
              "|---|---|---|---|---|---|---|---|"]
    for result in p["layouts"]:
        for r in result["workers"]:
            cells = " | ".join(_gib(r[name]) if name in r else "-" for name, _ in _FIGURES)
            lines.append(f"| {result['layout']} | {r['stage']} | {r['workers']} | {_gib(r['owned_param_bytes'])} "
                         f"| {cells} |")
        lines.append(f"| {result['layout']} | driver export | | | | {_gib(result['driver_export_peak'])} | | |")
    return "\n".join(lines) + "\n"


def _figure(worker: dict, key: str, name: str) -> str:
    if key not in worker:
        return "- | -"
    return f"{_gib(worker[key])} | {worker[f'{name}_ratio']:.2f}"


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"

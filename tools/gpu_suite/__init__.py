"""`python -m tools.gpu_suite --out DIR`: the GPU check suite, one command on a machine with a GPU.

It installs nothing (README, "GPUs": how to bring ray, deepspeed and datasets to a machine that lacks them),
runs the `gpu`-marked tests and the GPU rows, and writes DIR/gpu_suite.json and DIR/gpu_suite.md. Modules:
steps (what runs, as commands), results (figures and checks read from each step's outputs), report (JSON
and markdown), cli.
"""

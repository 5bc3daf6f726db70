"""`python -m tools.bench.memory` (`lopt-bench-memory`): what each worker holds in memory, measured.

For a random Llama saved in bf16, it runs lopt-dist's own pipeline in each layout asked (default 1+1 workers
on ZeRO-0 and 2+2 on ZeRO-3) and reports per worker: host RSS before set-up (the runtime), the loading peak,
the set-up peak and the RSS after the engine is built against the bytes of the stage's parameters that worker
owns, and the training-step peak; and the driver's peak RSS during export. A 70B projection is computed from the measured
ratios. Modules: worker (the instrumented stage worker), run (layouts, model, export), report (JSON, markdown,
projection), cli.
"""

"""`lopt-bench`: lopt-dist against the usual ways of training the same model on the same devices.

One invocation trains the same model on the same batches of the same samples as: a single device end to
end and LoPT stage by stage; end-to-end pipeline parallelism with torch.distributed.pipelining schedules;
DeepSpeed ZeRO-2 data parallelism; and the lopt-dist decoupled pipeline. Each row runs in fresh Ray
workers. The modules, in the order a run uses them: config (settings), models and data (what is trained),
plan (which rows can run here), runner (runs them) with one module per contender (single, stage_alone,
pipeline_pp, zero_dp, lopt_dist_row), results (figures), report (JSON and tables), plots (PNGs), cli.
"""

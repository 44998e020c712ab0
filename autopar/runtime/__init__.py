"""The runtime: process groups per mesh axis, the local launcher, micro-batches, pipeline stages and
schedules, data-parallel wrappers, deterministic dropout. ``autopar.api`` assembles them.

Public API, by module (the package ``__init__`` re-exports nothing, so importing one piece stays
cheap):

* :mod:`autopar.runtime.launch`: :func:`~autopar.runtime.launch.run_local` (a function on N local
  gloo ranks, never hangs) and :class:`~autopar.runtime.launch.LaunchFailure`.
* :mod:`autopar.runtime.groups`: :func:`~autopar.runtime.groups.build_process_groups` ->
  :class:`~autopar.runtime.groups.ProcessGroups` (one group per mesh axis, plus tied parameters),
  :func:`~autopar.runtime.groups.init_from_env`, :func:`~autopar.runtime.groups.describe_groups`.
* :mod:`autopar.runtime.failure`: :class:`~autopar.runtime.failure.FailureReporter` and
  :func:`~autopar.runtime.failure.guard` (the first failing rank is named on every rank).
* :mod:`autopar.runtime.microbatch`: data-parallel shares, micro-batch split and merge.
* :mod:`autopar.runtime.pipeline`: :class:`~autopar.runtime.pipeline.Pipeline` (torch pipelining
  stages and schedule), :func:`~autopar.runtime.pipeline.run_accumulation` (pp == 1),
  :class:`~autopar.runtime.pipeline.Events` (the measured timeline).
* :mod:`autopar.runtime.schedule`: the schedules as action lists
  (:func:`~autopar.runtime.schedule.for_plan`).
* :mod:`autopar.runtime.engines`: the engine of each recompute value and ZeRO stage (DDP, ZeRO-1's
  :class:`~autopar.runtime.engines.ShardedOptimizer`, FSDP2).
* :mod:`autopar.runtime.recompute`: full and selective activation recompute (checkpointed block
  segments, outlined attention-score regions).
* :mod:`autopar.runtime.state`: full (unsharded) state dicts, gradients and optimizer state,
  gathered and scattered.
* :mod:`autopar.runtime.checkpoint`: atomic DCP checkpoints with a manifest, resharded on load
  (:func:`~autopar.runtime.checkpoint.save_checkpoint`, :func:`~autopar.runtime.checkpoint.load_checkpoint`,
  :func:`~autopar.runtime.checkpoint.resolve`, :func:`~autopar.runtime.checkpoint.list_checkpoints`).
* :mod:`autopar.runtime.replan`: planning inside a job (:func:`~autopar.runtime.replan.plan_in_job`:
  the layout measured by the running ranks, never spawned) and live re-planning
  (:func:`~autopar.runtime.replan.replan_measured`, :func:`~autopar.runtime.replan.decide`,
  :class:`~autopar.runtime.replan.Replan`), used by ``autopar.compile`` and
  ``ParallelModule.maybe_replan``.
* :mod:`autopar.runtime.rank_code`: :func:`~autopar.runtime.rank_code.render`, a rank's program as
  readable Python.
"""

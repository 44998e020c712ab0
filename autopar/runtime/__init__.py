"""The runtime: process groups per mesh axis, the local launcher, micro-batches, pipeline stages and
schedules, data-parallel wrappers, deterministic dropout. ``autopar.api`` assembles them."""

"""Experts streamed from the store: ``reader`` (aligned reads of expert records, verified),
``cache`` (the experts held in memory and their eviction policies), ``switch`` (``StreamingSwitch``,
the drop-in for mlx-lm's ``SwitchGLU``) and ``grouped`` (one matmul per expert over its tokens)."""

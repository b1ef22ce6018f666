"""Running work units: the scheduler (:mod:`.scheduler`), in-process (:mod:`.local`) or on Ray
actors (:mod:`.ray_exec`, :mod:`.actor_pool`), what one unit does (:mod:`.unit`: read, evaluate
with :mod:`.evaluate`, write), devices (:mod:`.devices`) and process-wide settings
(:mod:`.runtime`, :mod:`.heap`, :mod:`.cpu_capability`)."""

"""Running work units: in-process (:mod:`.local`) or on Ray actors (:mod:`.ray_exec`)."""

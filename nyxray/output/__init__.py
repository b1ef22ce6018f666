"""The output side of a run: claiming an output and its resume records, committing it with its
manifest, model card and verification (:mod:`.commit`), the output's lease (:mod:`.lease`), and
shards split into parts: the worker's side (:mod:`.parts`) and the driver's assembly (:mod:`.assemble`)."""

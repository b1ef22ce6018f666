"""Planning, from headers only: model sources (:mod:`.sources`: configs, shard headers, tokenizers),
architectures (:mod:`.architectures`: the catalogue of families, inference, checkpoint layouts),
the output tensors module by module (:mod:`.modules`), tensor expressions (:mod:`.expr`), per-tensor planning
(:mod:`.tensor`), stages, shards and sizes (:mod:`.stages`), write order (:mod:`.write_order`) and
the human-readable plan (:mod:`.describe`). Nothing here reads tensor bytes or writes output.

``nyxray.plan`` as an attribute of the ``nyxray`` package is the public function
:func:`nyxray.api.plan`, not this package: import from here with
``from nyxray.plan.stages import ...``, never ``import nyxray.plan.stages as ...``.
"""

"""Recipes: mergekit YAML -> typed recipes and pipelines (:mod:`.parse`), parameter settings and
their per-tensor values (:mod:`.parameters`), sweep files and their expansion (:mod:`.sweep`).

Every validation rule of a recipe lives here, with its key path. Nothing here reads a model or
runs anything: the planner (:mod:`nyxray.plan`) takes it from there.
"""

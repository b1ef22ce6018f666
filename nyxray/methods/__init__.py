"""The catalogue of merge methods: one declaration per method (:mod:`.registry`, the table of
contents; records in :mod:`.base`) and its pure math, one file per family (SLERP's kernel in
:mod:`._slerp`, shared geometry in :mod:`._geometry`). No I/O, no Ray."""

"""Bytes in and out: locations and URLs (:mod:`.location`: local paths, ``s3://``, ``hf://`` and
other fsspec file systems, ranged reads, atomic writes), retries (:mod:`.retry`), safetensors
headers (:mod:`.safetensors`), and the backend-specific pieces in :mod:`.backends`.
"""

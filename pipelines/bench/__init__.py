"""Benchmarks (``instalign bench {model,data,predict,fuzz,gpu}``): speed, memory and robustness figures.

Holds: ``command`` (the verb), one module per benchmark, ``clock`` (wall time and the
process tree's CPU seconds) and ``coco_like`` (the COCO-sized release ``data`` measures on).
Speed targets live here and in ``docs/performance.md``, never in tests.

May import: any stage. Nothing imports ``bench``.
"""

"""Benchmarks (``instalign bench {model,data,predict,fuzz}``): speed, memory and robustness figures.

Holds: ``command`` (the verb), one module per benchmark. Speed targets live here and in
``docs/performance.md``, never in tests.

May import: any stage. Nothing imports ``bench``.
"""

"""Collection rules for the doctests of the package modules (``--doctest-modules`` imports each of them)."""
import importlib.util

# the CUDA dropout kernel imports triton, which CPU-only builds of torch do not install
collect_ignore = [] if importlib.util.find_spec('triton') else ['timm_dropfix/_triton.py']

"""Collection rules for the whole suite (``--doctest-modules`` imports every module under the test paths)."""
import importlib.util

# run only when named: under TRITON_INTERPRET=1 by tests/test_fastdrop.py, or on a GPU (benchmarks/gpu_session.sh)
collect_ignore = ['tests/triton_checks.py']
if importlib.util.find_spec('triton') is None:  # CPU-only builds of torch do not install it
    collect_ignore.append('timm_dropfix/_triton.py')

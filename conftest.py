"""Collection rules for the whole suite (``--doctest-modules`` imports every module under the test paths)."""
import importlib.util

# run only when named: under TRITON_INTERPRET=1 by tests/test_fastdrop.py, or on a GPU (benchmarks/gpu_session.sh)
collect_ignore = ['tests/triton_checks.py']
# its examples walk through a folder of photos and a GPU, which a doctest cannot have; tests/test_fastdata.py
# covers every one of those functions
collect_ignore.append('finetune/fastdata.py')
if importlib.util.find_spec('triton') is None:  # CPU-only builds of torch do not install it
    collect_ignore.append('timm_dropfix/_triton.py')

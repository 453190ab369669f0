"""Build of the optional compiled extension ``peft_kernels._C``; all metadata lives in pyproject.toml.

Install (torch first, then this package against it):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

The extension is a ``CppExtension`` (csrc/torch_bindings.cpp + csrc/cpu/*.cpp) unless the installed torch was built
with CUDA *and* a CUDA toolkit is found (CUDA_HOME), in which case csrc/cuda/*.cu are added to a ``CUDAExtension``.
No GPU is probed. Environment overrides:

    PEFT_KERNELS_BUILD_EXT=0   skip the extension entirely (pure-Python install; the torch/triton backends remain)
    PEFT_KERNELS_CUDA=0        build the CPU kernels only, even with a CUDA torch and toolkit
    MAX_JOBS=N                 parallel compile jobs (ninja)

The module links only against libtorch (ops are registered with the dispatcher; ``PyInit__C`` creates an empty
module), so it is built with ``py_limited_api`` and one abi3 wheel serves every CPython >= 3.10.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str, default: str = "auto") -> str:
    return os.environ.get(name, default).strip().lower() or default


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions() -> tuple[list, dict]:
    if _env_flag("PEFT_KERNELS_BUILD_EXT") in ("0", "false", "no", "off"):
        print("peft_kernels: PEFT_KERNELS_BUILD_EXT=0, building without the compiled extension")
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = _env_flag("PEFT_KERNELS_CUDA") not in ("0", "false", "no", "off")
    cuda_sources = _rel("csrc/cuda/*.cu")
    use_cuda = bool(want_cuda and torch.version.cuda and CUDA_HOME is not None and cuda_sources)

    sources = ["csrc/torch_bindings.cpp", *_rel("csrc/cpu/*.cpp")]
    # -O3 and OpenMP only: no -march, the wheel must run on any x86-64 / aarch64 machine. The hot CPU loops are
    # compiled twice (csrc/cpu/adapter_kernels_{base,avx2}.cpp, the latter under `#pragma GCC target`) and chosen at
    # run time from the CPU's features.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-fdiagnostics-color=always"]  # torch adds -std=c++20
    kwargs = {
        "include_dirs": [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],  # include/: CUDA templates
        "extra_compile_args": {"cxx": cxx_flags},
        "extra_link_args": ["-fopenmp"],
        "py_limited_api": True,
    }
    if use_cuda:
        sources += cuda_sources
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math"]
        kwargs["define_macros"] = [("PEFT_KERNELS_WITH_CUDA", "1")]
        ext = CUDAExtension("peft_kernels._C", sources, **kwargs)
    else:
        ext = CppExtension("peft_kernels._C", sources, **kwargs)
    print(f"peft_kernels: building peft_kernels._C ({'CUDA + CPU' if use_cuda else 'CPU'} kernels)")
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)

"""Builds ouvert's CPU kernels (ouvert/kernels/csrc) as the extension ouvert._kernels, with torch's
cpp_extension. Everything else about the package is in pyproject.toml. Without a C++ compiler the
package installs without the extension, and ouvert runs its plain PyTorch path (and says so once)."""

import os
import shutil
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("OUVERT_NO_KERNELS") == "1":
    print("ouvert: OUVERT_NO_KERNELS=1, building without the C++ kernels", file=sys.stderr)
elif not shutil.which(os.environ.get("CXX", "g++")):
    print("ouvert: no C++ compiler (apt-get install g++), building without the C++ kernels", file=sys.stderr)
else:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    src = "ouvert/kernels/csrc"
    ext_modules = [CppExtension(
        "ouvert._kernels",
        [f"{src}/{f}" for f in ("ops.cpp", "kernels_scalar.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp",
                                        "kernels_avx512_vnni.cpp", "kernels_avx512_bf16.cpp")],
        # No -march: the baseline is plain x86-64; each kernels_<isa>.cpp turns its own set on.
        # No fused multiply-adds except where the code asks for one, so decoding rounds as the twin does.
        # -fopenmp: at::parallel_for is inlined here, and without it runs on one thread.
        extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        depends=[f"{src}/{f}" for f in ("kernels.h", "impl.h", "blocks.h", "avx2_shared.h", "kquant_dots.h",
                                        "kernels_avx512.cpp")],
    )]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

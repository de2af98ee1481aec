"""Build script for fusedres._C.

Knobs (environment variables):
  FUSEDRES_CUDA=auto|0|1   build the CUDA kernels: auto (default) when nvcc is found, 0 never, 1 always.
  TORCH_CUDA_ARCH_LIST     CUDA archs to build for (default "8.0;9.0").
  MAX_JOBS                 parallel compile jobs (ninja), honoured by torch's build_ext.
  FUSEDRES_DEBUG=1         -O0 -g build.
  FUSEDRES_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ (host) code, -O1 -g; load
                           it with the runtimes preloaded (tools/sanitize.sh builds it into build/sanitize and runs
                           the tests: `make sanitize`).
  FUSEDRES_NO_AVX512=1     leave out the AVX-512 build of the CPU kernels (the AVX2 one runs on AVX-512 CPUs); the
                           sanitizer run uses it on CPUs without AVX-512, where that build could not run anyway.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and (
        os.path.isdir(os.path.join(home, "lib64")) or os.path.isdir(os.path.join(home, "lib"))
    )


def _find_cuda_home() -> str | None:
    """The toolkit root: CUDA_HOME if it is one, else the root nvcc itself reports (TOP= in its dry run).

    Asking nvcc matters: the nvcc on PATH may be a wrapper script or a link outside the toolkit (here
    /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so the PATH-based guess torch makes would
    point at /usr/local and the link would not find libcudart.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit(home):
        return home
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = os.path.realpath(line.split("=", 1)[1].strip())
                if _is_toolkit(top):
                    return top
    except (OSError, subprocess.SubprocessError):
        pass
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return guess if _is_toolkit(guess) else None


def _nvidia_pip_includes() -> list[str]:
    """Headers torch's CUDA headers need that a bare toolkit may lack (cusparse.h, ...): the pip nvidia wheels."""
    out = []
    for p in sys.path:
        base = os.path.join(p, "nvidia")
        if os.path.isdir(base):
            out += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return out


def get_extensions():
    mode = os.environ.get("FUSEDRES_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FUSEDRES_CUDA must be auto, 0 or 1, got {mode!r}")
    cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: F401

    with_cuda = mode == "1" or (mode == "auto" and cuda_home is not None)
    if mode == "1" and cuda_home is None:
        raise SystemExit("FUSEDRES_CUDA=1 but no nvcc was found (set CUDA_HOME)")
    debug = os.environ.get("FUSEDRES_DEBUG", "0") == "1"
    sanitize = os.environ.get("FUSEDRES_SANITIZE", "0") == "1"

    sources = ["csrc/fusedres.cpp"] + sorted(set(glob.glob("csrc/*.cpp")) - {"csrc/fusedres.cpp"})
    # Baseline translation units first: for inline functions that several TUs emit, the linker keeps the
    # first copy, so the ISA-specific kernel TUs (listed last) never provide code the baseline path runs.
    cpu_sources = glob.glob("csrc/cpu/*.cpp")
    if os.environ.get("FUSEDRES_NO_AVX512", "0") == "1":
        cpu_sources = [s for s in cpu_sources if not s.endswith("_avx512.cpp")]
        define_macros_isa = [("FUSEDRES_NO_AVX512", "1")]
    else:
        define_macros_isa = []
    sources += sorted(cpu_sources, key=lambda s: ("_avx" in s, s))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -O1 keeps a sanitized build fast enough to run the tests and its stacks readable.
    sanitizer = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"] if sanitize else []
    cxx_flags = opt + ["-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-fopenmp"]
    cxx_flags += sanitizer
    define_macros = [("TORCH_EXTENSION_NAME", "_C")] + define_macros_isa
    extra_link = ["-fopenmp"] + (["-fsanitize=address,undefined"] if sanitize else [])
    include_dirs = [os.path.join(ROOT, "csrc")]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FUSEDRES_WITH_CUDA", "1"))
        define_macros.append(("FUSEDRES_CUDA_ARCHS", '"' + archs + '"'))
        include_dirs += _nvidia_pip_includes()
        nvcc_flags = opt + [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-Xcompiler=-Wall",
            "-Xptxas=-v,-warn-spills,-warn-lmem-usage",  # -v: per-kernel figures for tools/ptxas_report.py
            "-Werror=all-warnings",
        ]
        ext = CUDAExtension(
            "fusedres._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "fusedres._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    print(
        f"fusedres build: cuda={'yes' if with_cuda else 'no'} (FUSEDRES_CUDA={mode}, CUDA_HOME={cuda_home}), "
        f"archs={archs if with_cuda else '-'}, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, "
        f"debug={debug}, sanitize={sanitize}, sources={len(sources)}",
        flush=True,
    )
    return [ext], BuildExtension


def main():
    exts, build_ext = get_extensions()
    setup(
        packages=find_packages(include=["fusedres", "fusedres.*"]),
        ext_modules=exts,
        cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()

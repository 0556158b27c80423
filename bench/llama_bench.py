"""llama.cpp's own llama-bench binary, built from source, as the strongest reference beside blocks.py's
cyllama figures. No registry package ships the binary, so build() takes the llama.cpp source that
llama-cpp-python's sdist vendors (vendor/llama.cpp, b11312 = commit 0c1e570 for 0.3.36; cyllama
0.2.18's library is b9190), configures it for this CPU's instruction sets (no -march=native; AMX
always off, a native build hit SIGILL in its AMX kernels on an earlier machine) and builds only the
llama-bench target into bench/out/llama.cpp-build/bin/, at nice 19. A bench-only step, never part
of `make test`; about 8 minutes on 2 cores. run() times one GGUF file the way llama-bench does.

    .venv/bin/python bench/llama_bench.py --build-only
    .venv/bin/python bench/llama_bench.py bench/out/blocks-smollm2-135m-seed0-q8_0.gguf [...]
        [--threads 2] [--prompt-len 256] [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SDIST = "llama-cpp-python==0.3.36"
# the llama.cpp build that sdist vendors; its shallow .git would give the commit but count build 1
BUILD_NUMBER, BUILD_COMMIT = 11312, "0c1e570"
SRC = OUT / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BUILD = OUT / "llama.cpp-build"
BINARY = BUILD / "bin" / "llama-bench"


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_options() -> list[str]:
    """Release, static, no network; AVX2/FMA/F16C always, the AVX-512 and VNNI sets this CPU has."""
    flags = cpu_flags()
    isa = {"GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
           "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
    opts = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", f"-DLLAMA_BUILD_NUMBER={BUILD_NUMBER}", f"-DLLAMA_BUILD_COMMIT={BUILD_COMMIT}",
            "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    opts += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in isa.items()]
    return opts + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def sh(cmd: list[str]) -> None:
    print("$", shlex.join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True)


def build() -> Path:
    """bench/out/llama.cpp-build/bin/llama-bench, downloaded, configured and built if not there yet."""
    if BINARY.is_file():
        return BINARY
    OUT.mkdir(parents=True, exist_ok=True)
    if not SRC.is_dir():
        tgz = OUT / "llama_cpp_python-0.3.36.tar.gz"
        if not tgz.is_file():
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", OUT])
        print(f"extracting {tgz.name}", flush=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(OUT, filter="data")
    sh(["cmake", "-S", SRC, "-B", BUILD, *cmake_options()])
    sh(["nice", "-n", "19", "cmake", "--build", BUILD, "--target", "llama-bench", "-j2"])
    return BINARY


def run(path: Path | str, threads: int = 2, prompt_len: int = 256, new_tokens: int = 64, repeats: int = 2,
        depth: int | None = None) -> dict[str, float]:
    """{"pp_tok_s", "tg_tok_s"}: llama-bench's avg_ts over repeats runs on threads threads (its defaults
    otherwise): pp, prompt_len tokens in one batch into an empty context; tg, new_tokens one a step
    after depth (default prompt_len) tokens already in the context (-d), as ouvert's decode runs after
    its prompt."""
    def avg_ts(*args) -> float:
        cmd = [build(), "-m", path, "-t", threads, "-r", repeats, "-o", "json", *args]
        out = subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]["avg_ts"]
    return {"pp_tok_s": avg_ts("-p", prompt_len, "-n", 0),
            "tg_tok_s": avg_ts("-p", 0, "-n", new_tokens, "-d", prompt_len if depth is None else depth)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="GGUF files to time")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    print(build())
    if args.build_only:
        return
    rows = []
    for path in args.paths:
        r = run(path, args.threads, args.prompt_len, args.new_tokens, args.repeats)
        rows.append({"path": str(path), **r})
        print(f"{Path(path).name}: pp{args.prompt_len} {r['pp_tok_s']:.1f} tok/s, tg{args.new_tokens} "
              f"{r['tg_tok_s']:.1f} tok/s", flush=True)
    print(json.dumps({"bench": "llama-bench", "build": f"b{BUILD_NUMBER}-{BUILD_COMMIT}", "threads": args.threads,
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "rows": rows}))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU (CI runs this: `bash tools/compile_cuda.sh`).
#
# Step 1: every framework-free .cu under csrc/cuda (each file that includes no torch/ATen/c10 header) is compiled
#         with nvcc for sm_80 and sm_90 with --resource-usage; the ptxas report is turned into a table of registers,
#         spills, stack and shared memory per kernel. Fails if a file does not compile or any kernel spills.
#         The torch extension build (BuildExtension) adds the -D__CUDA_NO_HALF*__ flags below, so we do too.
# Step 2: the torch launcher(s) (the .cu files that include torch headers) are syntax-checked against the installed
#         torch headers: g++ -fsyntax-only (host code as C++), then nvcc front end + host -fsyntax-only with
#         BuildExtension's flags (-std=c++20). The CPU wheel of torch ships the ATen/c10 CUDA headers except the
#         generated c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS), so we pass
#         -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE. No cuBLAS/cuSPARSE headers are installed here, which is why the
#         launcher avoids ATen/cuda/CUDAContext.h. Linking needs a CUDA build of torch: not checked here.
#         Set PEFT_KERNELS_SKIP_LAUNCHER_CHECK=1 to skip step 2 (it takes 1-2 minutes on 2 cores).
#
# Environment: NVCC (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or nvcc on PATH), PYTHON (default python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/csrc/cuda"
INCLUDE_DIR="$ROOT/csrc/include"
PYTHON="${PYTHON:-python}"

if [[ -z "${NVCC:-}" ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  else
    NVCC="$(command -v nvcc || true)"
  fi
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
CUDA_INCLUDE="$(dirname "$(dirname "$NVCC")")/include"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ARCH_FLAGS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

kernel_files=()
launcher_files=()
for f in "$CUDA_DIR"/*.cu; do
  [[ -e "$f" ]] || continue
  if grep -qE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' "$f"; then
    launcher_files+=("$f")
  else
    kernel_files+=("$f")
  fi
done
# The framework-free headers must stay framework-free (FlashInfer rule).
if grep -rlE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' "$INCLUDE_DIR" >"$TMP/torch_in_include" 2>/dev/null; then
  echo "FAIL: torch headers included under csrc/include:" >&2
  cat "$TMP/torch_in_include" >&2
  exit 1
fi

echo "== nvcc: $("$NVCC" --version | tail -n 1)"
echo "== step 1: ${#kernel_files[@]} framework-free file(s), sm_80 + sm_90"
failed=0
start=$SECONDS
for f in "${kernel_files[@]}"; do
  name="$(basename "$f" .cu)"
  log="$TMP/$name.log"
  if "$NVCC" -std=c++17 -O3 "${ARCH_FLAGS[@]}" "${TORCH_NVCC_DEFINES[@]}" --threads 2 --resource-usage \
    -I"$INCLUDE_DIR" -c "$f" -o "$TMP/$name.o" >"$log" 2>&1; then
    echo "   compiled $(realpath --relative-to="$ROOT" "$f")"
  else
    echo "FAIL: $(realpath --relative-to="$ROOT" "$f") does not compile:" >&2
    cat "$log" >&2
    failed=1
  fi
  if grep -qE 'warning' "$log"; then
    echo "   warnings in $name:"
    grep -E 'warning' "$log" | sed 's/^/     /'
  fi
done
echo "   ($((SECONDS - start)) s)"

# ptxas report -> one row per (kernel, arch). Also catches spills in non-inlined device functions.
cat "$TMP"/*.log 2>/dev/null | awk '
  /Compiling entry function/ {
    match($0, /function \x27[^\x27]+\x27/); kern = substr($0, RSTART + 10, RLENGTH - 11)
    match($0, /for \x27sm_[0-9a-z]+\x27/); arch = substr($0, RSTART + 5, RLENGTH - 6)
    next
  }
  /bytes stack frame/ {
    stack = $1; stores = $5; loads = $9
    if (stores + 0 > 0 || loads + 0 > 0) spilled = 1
    next
  }
  /ptxas info *: Used [0-9]+ registers/ {
    match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
    smem = 0
    if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
    if (kern != "") printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", arch, regs, stores, loads, stack, smem, kern
    kern = ""
  }
  END { if (spilled) print "SPILLED" > "/dev/stderr" }
' >"$TMP/table.tsv" 2>"$TMP/spilled"

if [[ -s "$TMP/table.tsv" ]]; then
  printf '   %-6s %5s %7s %7s %6s %6s  %s\n' arch regs spill_st spill_ld stack smem kernel
  # demangle, keep the kernel name and template arguments short
  while IFS=$'\t' read -r arch regs st ld stack smem kern; do
    pretty="$(echo "$kern" | c++filt 2>/dev/null || echo "$kern")"
    pretty="${pretty#void }"
    pretty="${pretty//peft_kernels::/}"
    pretty="${pretty%%(*}"
    printf '   %-6s %5s %7s %7s %6s %6s  %s\n' "$arch" "$regs" "$st" "$ld" "$stack" "$smem" "$pretty"
  done < <(sort -t$'\t' -k7,7 -k1,1 "$TMP/table.tsv")
fi
n_kernels=$(wc -l <"$TMP/table.tsv")
n_spill=$(awk -F'\t' '$3 + 0 > 0 || $4 + 0 > 0' "$TMP/table.tsv" | wc -l)
echo "   $n_kernels kernel build(s), $n_spill with spills"
if [[ "$n_spill" -gt 0 || -s "$TMP/spilled" ]]; then
  echo "FAIL: register spills (see spill_st / spill_ld above)" >&2
  failed=1
fi
if [[ ${#kernel_files[@]} -gt 0 && "$n_kernels" -eq 0 && "$failed" -eq 0 ]]; then
  echo "FAIL: no ptxas resource report parsed (nvcc output format changed?)" >&2
  failed=1
fi

if [[ "${PEFT_KERNELS_SKIP_LAUNCHER_CHECK:-0}" == "1" ]]; then
  echo "== step 2: skipped (PEFT_KERNELS_SKIP_LAUNCHER_CHECK=1)"
elif [[ ${#launcher_files[@]} -gt 0 ]]; then
  echo "== step 2: syntax check of ${#launcher_files[@]} torch launcher(s) against the installed torch headers"
  if ! TORCH_INCLUDES="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>"$TMP/py.err")"; then
    echo "FAIL: could not get torch include paths:" >&2
    cat "$TMP/py.err" >&2
    failed=1
  else
    # shellcheck disable=SC2206
    TI=($TORCH_INCLUDES)
    for f in "${launcher_files[@]}"; do
      rel="$(realpath --relative-to="$ROOT" "$f")"
      start=$SECONDS
      if g++ -std=c++20 -fsyntax-only -x c++ -Wall -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${TI[@]}" -I"$CUDA_INCLUDE" \
        -I"$INCLUDE_DIR" "$f" >"$TMP/gxx.log" 2>&1; then
        echo "   g++ -fsyntax-only $rel: ok ($((SECONDS - start)) s)"
      else
        echo "FAIL: g++ -fsyntax-only $rel:" >&2
        cat "$TMP/gxx.log" >&2
        failed=1
      fi
      start=$SECONDS
      if "$NVCC" -std=c++20 "${TORCH_NVCC_DEFINES[@]}" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${TI[@]}" -I"$INCLUDE_DIR" \
        -gencode arch=compute_80,code=sm_80 -Xcompiler -fsyntax-only -c "$f" -o "$TMP/launcher.o" \
        >"$TMP/nvcc_launcher.log" 2>&1; then
        echo "   nvcc (front end + host -fsyntax-only) $rel: ok ($((SECONDS - start)) s)"
      else
        echo "FAIL: nvcc $rel:" >&2
        cat "$TMP/nvcc_launcher.log" >&2
        failed=1
      fi
    done
  fi
fi

if [[ "$failed" -ne 0 ]]; then
  echo "compile_cuda.sh: FAILED" >&2
  exit 1
fi
echo "compile_cuda.sh: OK"

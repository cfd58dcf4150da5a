# LOTTERY_EXT_CUDA = AUTO (default) | ON | OFF, from -D or from the environment at pip time:
#   LOTTERY_EXT_CUDA=ON pip install .
# (pyproject.toml passes the environment variable as -D on every pip build, so a value cached
# in the reused build directory never outlives the variable; plain cmake reads it here.)
#   ON    compile csrc/cuda/; fail without a CUDA compiler.
#   OFF   never.
#   AUTO  only where they can be used (cmake/cuda_probe.py): the installed torch has CUDA,
#         or, with torch not installed yet, an NVIDIA driver is present; and nvcc is found.
set(_cuda_default AUTO)
if(DEFINED ENV{LOTTERY_EXT_CUDA})
  set(_cuda_default $ENV{LOTTERY_EXT_CUDA})
endif()
set(LOTTERY_EXT_CUDA ${_cuda_default} CACHE STRING "Build CUDA kernels: AUTO, ON or OFF")
set_property(CACHE LOTTERY_EXT_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${LOTTERY_EXT_CUDA}" LOTTERY_EXT_CUDA)
if(NOT LOTTERY_EXT_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "LOTTERY_EXT_CUDA must be AUTO, ON or OFF, not '${LOTTERY_EXT_CUDA}'")
endif()

# Explicit architectures, never "native" (the build machine may have no GPU): Ampere, Ada,
# Hopper as SASS, plus sm_90 PTX for newer GPUs to JIT. Override with LOTTERY_EXT_CUDA_ARCHS
# (environment) or -DCMAKE_CUDA_ARCHITECTURES=...
set(_archs "80-real;86-real;89-real;90")
if(DEFINED ENV{LOTTERY_EXT_CUDA_ARCHS})
  set(_archs "$ENV{LOTTERY_EXT_CUDA_ARCHS}")
endif()
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "${_archs}")
endif()

# Every branch ends in one status line "lottery_ext: CUDA kernels ON|OFF: <why>", shown by
# `pip install -v .` (see the README's Install section).
set(LOTTERY_EXT_WITH_CUDA OFF)
set(_want_cuda OFF)
if(LOTTERY_EXT_CUDA STREQUAL "ON")
  set(_want_cuda ON)
  set(_why "LOTTERY_EXT_CUDA=ON")
elseif(LOTTERY_EXT_CUDA STREQUAL "OFF")
  set(_why "LOTTERY_EXT_CUDA=OFF")
else()
  # The probe reads torch/version.py (no torch import: fast, and works in pip's isolated build
  # environment) and looks for an NVIDIA driver; it prints ON|OFF, then the reason.
  if(NOT Python_EXECUTABLE)
    find_package(Python 3.10 REQUIRED COMPONENTS Interpreter)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/cuda_probe.py"
    OUTPUT_VARIABLE _probe ERROR_VARIABLE _probe_err RESULT_VARIABLE _probe_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE)
  if(_probe_rc EQUAL 0 AND _probe MATCHES "^(ON|OFF)\n(.*)$")
    set(_want_cuda ${CMAKE_MATCH_1})
    set(_why "${CMAKE_MATCH_2}")
  else()
    string(REGEX MATCH "[^\n]*$" _probe_err "${_probe_err}")  # a traceback's last line
    set(_why "cmake/cuda_probe.py failed (${_probe_rc}: ${_probe_err})")
  endif()
  if(NOT _want_cuda)
    string(APPEND _why "; set LOTTERY_EXT_CUDA=ON to build them anyway")
  endif()
endif()

if(_want_cuda)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(LOTTERY_EXT_WITH_CUDA ON)
    message(STATUS "lottery_ext: CUDA kernels ON: ${_why} (nvcc ${CMAKE_CUDA_COMPILER_VERSION} "
                   "at ${CMAKE_CUDA_COMPILER}, archs ${CMAKE_CUDA_ARCHITECTURES})")
  elseif(LOTTERY_EXT_CUDA STREQUAL "ON")
    message(FATAL_ERROR
      "LOTTERY_EXT_CUDA=ON but no CUDA compiler was found. Put nvcc on PATH or set CUDACXX=/path/to/nvcc, "
      "or build without CUDA: LOTTERY_EXT_CUDA=OFF pip install .")
  else()
    # Kernels that could be used but cannot be built: worth a warning, not a failed install.
    message(WARNING "lottery_ext: CUDA kernels OFF: ${_why}, but no CUDA compiler was found. "
                    "Put nvcc on PATH or set CUDACXX=/path/to/nvcc, then reinstall.")
  endif()
else()
  message(STATUS "lottery_ext: CUDA kernels OFF: ${_why}")
endif()

function(lottery_add_cuda target)
  if(NOT LOTTERY_EXT_WITH_CUDA)
    return()
  endif()
  # Listed explicitly (no glob): a new kernel file is a reviewed build change.
  target_sources(${target} PRIVATE
    ${PROJECT_SOURCE_DIR}/csrc/cuda/info.cu
    ${PROJECT_SOURCE_DIR}/csrc/cuda/optim.cu
    ${PROJECT_SOURCE_DIR}/csrc/cuda/select.cu
    ${PROJECT_SOURCE_DIR}/csrc/cuda/rewind.cu)
  target_compile_definitions(${target} PRIVATE LOTTERY_EXT_WITH_CUDA)
  # --fmad=false: no contraction of a*b+c into FMA, like -ffp-contract=off for the CPU kernels,
  # so the CUDA updates round exactly like the CPU loops (the same lottery/math.h functors).
  set(cuda_flags -O3 --fmad=false --Werror=all-warnings -Xcompiler=-Wall,-Wextra)
  if(LOTTERY_EXT_WERROR)
    list(APPEND cuda_flags -Xcompiler=-Werror)
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${cuda_flags}>)
  # Static cudart: the module needs no libcudart.so and does not depend on torch's CUDA build.
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static
                                             CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
endfunction()

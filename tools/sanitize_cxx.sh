#!/usr/bin/env bash
# The C++ compiler for the CUDA-emulator test libraries under `make sanitize`: tests/_cuda_emu.py builds
# them with $CXX, so pointing CXX here adds the sanitizer flags (and a different compiler name, so they are cached
# apart from the plain builds). The compiler itself must not run with the sanitizer runtimes preloaded.
unset LD_PRELOAD
exec "${SANITIZE_REAL_CXX:-g++}" "$@" -fsanitize=address,undefined -fno-omit-frame-pointer -g

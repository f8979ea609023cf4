# opt: `make` builds ./opt; `make test`, `make run`, `make bench`.
#   CUDA=0         build without CUDA even where nvcc exists (a fully static binary)
#   MODEL=DIR      checkpoint for `make run` (default: a synthetic OPT-125m)
CC      ?= gcc
NVCC    ?= nvcc
PYTHON  ?= /usr/bin/python3
WARN     = -Wall -Wextra
# -ffp-contract=off: every fused multiply-add is written out, so all SIMD
# levels round identically (see the kernels section of opt.c).
CFLAGS  ?= -std=c11 -O3 -ffp-contract=off -fno-math-errno -fopenmp -D_GNU_SOURCE $(WARN)
SRC      = opt.c lp.c
HDR      = opt.h unicode_tab.h

ifeq ($(CUDA),)
  CUDA := $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
endif

# mimalloc is linked statically from Debian's source package, built here
# (Debian ships only a shared library); none of its code is in this tree.
MI_DIR   = third_party/mimalloc
MI_OBJ   = $(MI_DIR)/mimalloc.o

ifeq ($(CUDA),1)
  CUDA_HOME ?= $(patsubst %/bin/,%,$(dir $(shell command -v $(NVCC))))
  CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
               -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 \
               -gencode arch=compute_90,code=compute_90
  LDFLAGS_OPT = -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lpthread -lrt -lstdc++ -lm
  EXTRA_OBJ   = build/kernels.o
  CFLAGS     += -DOPT_CUDA
else
  LDFLAGS_OPT = -static -lm
  EXTRA_OBJ   =
endif

all: opt

opt: $(SRC) $(HDR) $(EXTRA_OBJ) $(MI_OBJ) tokenizer/vocab.json tokenizer/merges.txt
	$(CC) $(CFLAGS) -o $@ $(SRC) $(EXTRA_OBJ) $(MI_OBJ) $(LDFLAGS_OPT)
	@echo "built ./opt: CUDA $(if $(filter 1,$(CUDA)),✓,✗)  mimalloc ✓  OpenMP ✓  $(if $(filter 1,$(CUDA)),dynamic glibc,static)"

build/kernels.o: kernels.cu opt.h
	@mkdir -p build
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler "-Wall -Wextra" -c kernels.cu -o $@

$(MI_OBJ):
	@sh tests/get_mimalloc.sh $(MI_DIR)
	$(CC) -O3 -DNDEBUG -DMI_MALLOC_OVERRIDE -I$(MI_DIR)/src/include -c $(MI_DIR)/src/src/static.c -o $@

# The address/undefined-behaviour sanitizer build the bad-input tests run.
opt-asan: $(SRC) $(HDR)
	$(CC) $(CFLAGS) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -o $@ $(SRC) -lm

test: opt opt-asan
	@sh tests/run.sh

MODEL ?=
run: opt
	@if [ -z "$(MODEL)" ]; then [ -f models/opt-125m-synth/config.json ] || ./opt synth --shape opt-125m --seed 1 -o models/opt-125m-synth; fi
	./opt generate -m $(if $(MODEL),$(MODEL),models/opt-125m-synth) -f tests/prompts.txt -n 24

bench: opt
	@sh bench/run.sh

clean:
	rm -rf opt opt-asan build

.PHONY: all test run bench clean

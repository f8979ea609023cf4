# opt: `make` builds ./opt; `make test`, `make run`, `make bench`.
#   CUDA=0         build without CUDA even where nvcc exists (a fully static binary)
#   MPI=1          pipeline stages across processes and nodes (mpirun -np N ./opt ...), built
#                  with the system's mpicc (Open MPI or MPICH); the default binary has no MPI
#   MODEL=DIR      checkpoint for `make run` (default: a synthetic OPT-125m)
CC      ?= gcc
NVCC    ?= nvcc
PYTHON  ?= /usr/bin/python3
MPICC   ?= mpicc
WARN     = -Wall -Wextra
# -ffp-contract=off: every fused multiply-add is written out, so all SIMD
# levels round identically (see the kernels section of opt.c).
CFLAGS  ?= -std=c11 -O3 -ffp-contract=off -fno-math-errno -fopenmp -D_GNU_SOURCE $(WARN)
SRC      = opt.c quant.c offload.c lp.c
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
  # libgomp is linked statically here too, so opt's defaults reach it first
  LDFLAGS_OPT = -L$(CUDA_HOME)/lib64 -lcudart_static -Wl,--push-state,-Bstatic -lgomp -Wl,--pop-state -ldl -lpthread -lrt -lstdc++ -lm
  EXTRA_OBJ   = build/cuda/kernels.o
  CFLAGS     += -DOPT_CUDA
else
  LDFLAGS_OPT = -static -fopenmp -lm
  EXTRA_OBJ   =
endif

ifeq ($(MPI),1)
  CC         := $(MPICC)
  SRC        += pipe.c
  CFLAGS     += -DOPT_MPI
  LDFLAGS_OPT := $(filter-out -static,$(LDFLAGS_OPT))
endif

all: opt

# Objects per configuration; build/last-config changes when CUDA= does, so the
# binary is relinked.
BUILD = build/$(if $(filter 1,$(CUDA)),cuda,cpu)$(if $(filter 1,$(MPI)),-mpi,)
OBJ   = $(SRC:%.c=$(BUILD)/%.o)
$(shell mkdir -p build; [ "$$(cat build/last-config 2>/dev/null)" = "$(CUDA)$(MPI)" ] || echo $(CUDA)$(MPI) > build/last-config)

$(BUILD)/%.o: %.c $(HDR) tokenizer/vocab.json tokenizer/merges.txt
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -c $< -o $@

opt: $(OBJ) $(EXTRA_OBJ) $(MI_OBJ) build/last-config
	$(CC) -o $@ $(OBJ) $(EXTRA_OBJ) $(MI_OBJ) $(LDFLAGS_OPT)
	@echo "built ./opt: CUDA $(if $(filter 1,$(CUDA)),✓,✗)  MPI $(if $(filter 1,$(MPI)),✓,✗)  mimalloc ✓  OpenMP ✓  $(if $(filter 1,$(CUDA) $(MPI)),dynamic glibc,static)"

build/cuda/kernels.o: kernels.cu opt.h
	@mkdir -p build/cuda
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler "-Wall -Wextra" -c kernels.cu -o $@

$(MI_OBJ):
	@sh tests/get_mimalloc.sh $(MI_DIR)
	$(CC) -O3 -DNDEBUG -DMI_MALLOC_OVERRIDE -I$(MI_DIR)/src/include -c $(MI_DIR)/src/src/static.c -o $@

# The address/undefined-behaviour sanitizer build the bad-input tests run.
opt-asan: $(SRC) $(HDR)
	$(CC) $(filter-out -DOPT_CUDA,$(CFLAGS)) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -o $@ $(SRC) -lm -lpthread

# The pipeline build (MPI=1's CPU variant) the tests run beside the plain one: tests/run.sh mpi.
opt-mpi: $(SRC) pipe.c $(HDR) $(MI_OBJ)
	$(MPICC) $(filter-out -DOPT_CUDA,$(CFLAGS)) -DOPT_MPI -o $@ $(filter-out pipe.c,$(SRC)) pipe.c $(MI_OBJ) -lm

# tests/deps.sh installs what the tests need (numpy, torch, tokenizers, GLPK) when it is missing
test: opt opt-asan
	@PYTHON=$(PYTHON) sh tests/deps.sh
	@$(MAKE) -s opt-mpi
	@PYTHON=$(PYTHON) sh tests/run.sh

# Without MODEL=, a synthetic OPT-125m (random weights) made once; opt synth renames its
# directory into place only when complete, so an interrupted run leaves nothing behind.
MODEL ?=
SYNTH  = models/opt-125m-synth
run: opt
ifeq ($(MODEL),)
	@[ -d $(SYNTH) ] || { mkdir -p models && ./opt synth --shape opt-125m --seed 1 -o $(SYNTH); }
	@echo "make run: $(SYNTH) has random weights, so its completions are noise; for real text give a" \
	      "Hugging Face OPT checkpoint directory: make run MODEL=path/to/opt-125m" >&2
endif
	./opt generate -m $(if $(MODEL),$(MODEL),$(SYNTH)) -f tests/prompts.txt -n 24

bench: opt
	@sh bench/run.sh

# Fuzzing (tests/fuzz/README.md): each harness of tests/fuzz/targets.c under libFuzzer for
# SECONDS seconds, new inputs kept in build/fuzz/corpus/, crashes written to build/fuzz/.
# libFuzzer comes with clang's runtime (Debian: libclang-rt-dev). RSS limit 4 GiB, as in the
# campaign: libFuzzer's own corpus and the mps harness's largest accepted problems reach ~2 GiB.
# tests/run.sh fuzz replays the regression inputs through tests/fuzz/replay.c, built with
# $(CC), plain and sanitized, then runs this for FUZZ_SECONDS (20) where libFuzzer is.
FUZZ_TARGETS = json safetensors bin index native tok lines mps probe args jobs policy
FUZZ_FLAGS   = -std=c11 -O1 -g -fopenmp -D_GNU_SOURCE -DOPT_FUZZ -I. $(WARN) -Wno-unused-function
SECONDS     ?= 60
CLANG       ?= clang

build/fuzz/libfuzzer: tests/fuzz/libfuzzer.c tests/fuzz/targets.c $(SRC) $(HDR)
	@mkdir -p build/fuzz
	@echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { (void)d; (void)n; return 0; }' | \
	    $(CLANG) -fsanitize=fuzzer -x c - -o build/fuzz/probe 2>/dev/null || \
	    { echo "make fuzz: $(CLANG) has no libFuzzer; install it as root with: apt-get install -y libclang-rt-dev" >&2; exit 1; }
	$(CLANG) $(FUZZ_FLAGS) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	    -o $@ tests/fuzz/libfuzzer.c quant.c offload.c -lm -lpthread

fuzz: build/fuzz/libfuzzer
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p build/fuzz/corpus/$$t; \
	    echo "fuzz $$t: $(SECONDS) s"; \
	    OPT_FUZZ_TARGET=$$t ASAN_OPTIONS=detect_leaks=0 build/fuzz/libfuzzer -max_total_time=$(SECONDS) -rss_limit_mb=4096 \
	        -print_final_stats=1 -artifact_prefix=build/fuzz/$$t- build/fuzz/corpus/$$t \
	        $$(ls -d tests/fuzz/corpus/$$t tests/fuzz/regress/$$t 2>/dev/null) 2>build/fuzz/$$t.log || \
	        { tail -n 60 build/fuzz/$$t.log; echo "make fuzz: $$t found a crash: $$(sed -n 's/.*Test unit written to //p' build/fuzz/$$t.log)"; exit 1; }; \
	    grep -E '^#[0-9]+.*DONE|stat::number_of_executed_units|cov:' build/fuzz/$$t.log | tail -n 2; \
	done

clean:
	rm -rf opt opt-asan opt-mpi build

.PHONY: all test run bench clean fuzz

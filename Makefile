# make test   : create .venv if absent, install pinned dependencies and nnfast, run the tests
# make bench  : the benchmark suite on this machine's device (markdown table, CSV and plot)
# make demo   : the research demos (coordinate network on a photo; make demo-sdf: SDF with second
#               derivatives); make gpu-check on a GPU machine
PYTHON_SYS ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nnfast-installed

.PHONY: test bench lint install clean check-cuda check-triton gpu-check demo demo-sdf

$(PY):
	$(PYTHON_SYS) -m venv $(VENV)

# csrc/ in the prerequisites: an edited C++ source is rebuilt before the tests use it
$(STAMP): $(PY) requirements-dev.txt setup.py pyproject.toml nnfast/_build.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# The multi-process tests (DDP/FSDP2 over gloo) run in a pytest process of their own, away from the
# state that 2,600 single-process tests leave behind.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_distributed.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_distributed.py

bench: $(STAMP)
	$(PY) benchmarks/bench_dense.py
	$(PY) benchmarks/bench_mlp.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_fuse.py

# On a GPU machine with torch/triton already installed: build, test, benchmark; installs nothing
gpu-check:
	$(PYTHON_SYS) tools/gpu_check.py

# The research demos: a coordinate network fitting a photo, and a 2-D signed-distance field
# trained with an eikonal term (second derivatives); nnfast vs eager from the same initial weights
demo: $(STAMP)
	$(PY) examples/coordinate_network.py
	$(PY) examples/sdf.py

demo-sdf: $(STAMP)
	$(PY) examples/sdf.py

# nvcc -c of every .cu for sm_80 and sm_90 (no GPU needed); says so and passes where nvcc is absent
check-cuda: $(STAMP)
	$(PY) tools/check_cuda.py

# Every Triton kernel variant the backend launches, compiled to sm_90/sm_80 cubins (no GPU needed):
# fails on compile errors, shared memory over the block limit, or register-file overflow
check-triton: $(STAMP)
	$(PY) tools/check_triton.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info $(STAMP)

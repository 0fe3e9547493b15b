# Two commands do all set-up on a fresh Debian/Ubuntu machine (or any Linux box with Python >= 3.10):
#   make demo   # the main job: the demo bench, pretraining to comparison tables
#   make test   # the test suite
# Both create/refresh the virtual environment in .venv, install the project and its data, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data slurm demo test pretrain-demo bench-perf clean

setup: $(VENV)/.installed

# pip takes PyTorch's CUDA build (5.5 GB) even for the CPU: check the room before a new venv.
NEED_GB := 8
$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		free=$$(df -Pk $(dir $(VENV)) | awk 'NR==2 {print int($$4 / 1048576)}'); \
		[ "$$free" -ge $(NEED_GB) ] || { echo "make: only $$free GB free here, and the environment needs about $(NEED_GB) GB (PyTorch alone is 5.5 GB): free some space, or give VENV=<folder on a larger disk>"; exit 1; }; \
		echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/pip install -q -e '.[dev,segment]'
	touch $@

# Where apt-get exists: Fashion-MNIST from Debian's dataset-fashion-mnist, and the system
# libraries OpenCV (pulled in by MMSegmentation) loads. Elsewhere the first run downloads
# Fashion-MNIST through torchvision (or set FASHION_MNIST_DIR).
DEB_PACKAGES := dataset-fashion-mnist libgl1 libglib2.0-0
data:
	@if command -v apt-get >/dev/null && ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEB_PACKAGES); fi

# Where apt-get exists: SLURM and munge, for the tests of the bench's SLURM executor. The tests
# start a private single-node cluster of their own (tests/slurm_cluster.py: own munge socket,
# config, ports) and skip, saying why, where they cannot. Under systemd the packages' own
# services may start too (munge does; slurmd/slurmctld stop at once without /etc/slurm/slurm.conf).
# The three daemons/clients of slurm-wlm without its recommends: 8 packages instead of 42
# (no HDF5/IPMI/ROCm/-dev plugins; the full 42 took 11 s to unpack and configure on a machine
# of the CI's kind, apt history, downloads excluded).
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm:
	@if command -v apt-get >/dev/null && ! dpkg -s $(SLURM_PACKAGES) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $(SLURM_PACKAGES); fi

demo: setup data
	$(BIN)/python -m transfer bench --config configs/bench/demo.yaml --output $(OUT)

pretrain-demo: setup data
	$(BIN)/python -m pretrain --config configs/pretrain/moco_v2_fmnist_demo.yaml --output runs/pretrain-demo

test: setup data slurm
	$(BIN)/python -m pytest -q

bench-perf: setup data
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands for a fresh machine (see README):
#   make demo   the main job (flexemr demo): embedding servers on loopback + a DLRM ranker, no configuration
#   make test   every test, including the verbs suite inside the Soft-RoCE VM
.PHONY: demo test bench torch clean

demo: .venv/.installed
	.venv/bin/python -m flexemr demo

test:
	bash scripts/test.sh

bench: .venv/.installed
	.venv/bin/python -m rdmaio.bench
	.venv/bin/python -m flexemr bench

.venv/.installed: pyproject.toml setup.py
	bash scripts/install.sh

# TorchRec on the CPU (pinned CPU torch build), the peer of the compare and kernel benchmarks
torch: .venv/.installed
	bash scripts/install-torch.sh

clean:
	rm -rf .venv build *.egg-info .cache .pytest_cache

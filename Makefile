# Two commands for a fresh machine (see README):
#   make demo   the main job (flexemr demo): embedding servers on loopback + a DLRM ranker, no configuration
#   make test   every test, including the verbs suite inside the Soft-RoCE VM
# Also: make docs   the docs site into site/ (API pages from the docstrings, search)
.PHONY: demo test bench torch docs clean

demo: .venv/.installed
	.venv/bin/python -m flexemr demo

test:
	bash scripts/test.sh

# the TorchRec CPU peer is installed first (idempotent), so that it is measured in the same run
bench: .venv/.installed
	bash scripts/install-torch.sh
	.venv/bin/python -m rdmaio.bench
	.venv/bin/python -m flexemr bench

.venv/.installed: pyproject.toml setup.py
	bash scripts/install.sh

# strict: a broken link, anchor or docstring reference fails the build
docs: .venv/.docs-installed
	NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --site-dir site

.venv/.docs-installed: pyproject.toml setup.py
	bash scripts/install.sh apps,docs
	touch $@

# TorchRec on the CPU (pinned CPU torch build), the peer of the compare and kernel benchmarks
torch: .venv/.installed
	bash scripts/install-torch.sh

clean:
	rm -rf .venv build site *.egg-info .cache .pytest_cache report.json report.png report.svg
	python3 rdmaio/testing/softroce.py --clean   # the Soft-RoCE VM's kernel cache (~0.5 GB in ~/.cache)

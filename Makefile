# One command each: `make smoke-test` (the whole pipeline on a built-in tiny model) and `make test`.
# Both create .venv and install what they need. On a machine without an NVIDIA GPU the CPU build of
# torch is installed first (pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build);
# with a GPU, pip resolves torch normally and gets CUDA.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CPU_TORCH ?= torch==2.13.0
RUNS   ?= runs/smoke
STAMP  := $(VENV)/.installed

.PHONY: install browser smoke-test test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet "$(CPU_TORCH)"; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The UI's browser test drives Debian's Chromium through Playwright. Installed where we can (root
# with apt); elsewhere that test skips and says why. Never fails the install.
browser:
	@if command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian chromium (and a CJK font for readable screenshots) for the UI browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null) \
	    || echo "could not install chromium: the UI browser test will skip"; \
	else echo "chromium not installed (needs root + apt): the UI browser test will skip"; fi

# Trains every recipe for a few steps in 4-bit on the built-in tiny model, merges one, generates.
smoke-test: $(STAMP)
	rm -rf $(RUNS)
	for r in legal medical finance industrial; do \
	  $(BIN)/qlora-kit train $$r --base-model builtin:tiny --max-steps 4 --run-dir $(RUNS)/$$r || exit 1; \
	done
	$(BIN)/qlora-kit merge $(RUNS)/legal --out $(RUNS)/legal-merged --dtype fp32
	$(BIN)/qlora-kit generate $(RUNS)/legal --prompt "劳动者被违法解除劳动合同，可以主张什么？" --max-new-tokens 24
	$(BIN)/qlora-kit generate $(RUNS)/legal-merged --prompt "劳动者被违法解除劳动合同，可以主张什么？" --max-new-tokens 24
	@echo "smoke test passed: runs under $(RUNS) (a random tiny model: the answer text is noise; this checks the pipeline)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .cache .pytest_cache

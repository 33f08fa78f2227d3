# Two commands from a fresh machine (each creates .venv when missing and installs what this
# machine needs, see scripts/setup-env.sh):
#   make demo   generate + animate an example story on the tiny built-in model, offline
#   make test   lint and the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := outputs/demo

.PHONY: env demo test
env: $(VENV)/.storydiff-installed

$(VENV)/.storydiff-installed: pyproject.toml scripts/setup-env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup-env.sh
	touch $@

demo: env
	$(BIN)/storydiff generate stories/two_friends.yaml --model tiny --out $(DEMO)
	$(BIN)/storydiff animate $(DEMO)/two-friends --decoder animatediff --model tiny --frames 8
	@echo "keyframes: $(DEMO)/two-friends/frame_*.png and grid.png"
	@echo "videos:    $(DEMO)/two-friends/video/transition_*.mp4 and story.mp4"

# pytest exits 5 when it collects nothing: that is a failure too.
test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n auto; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

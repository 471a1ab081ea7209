# The two README commands: `make demo` and `make test`. Both do all set-up on a fresh
# Debian machine: system libraries through apt-get (only when missing), then a venv and pip.
VENV    ?= .venv
PY      := $(VENV)/bin/python
APT_PKGS := libportaudio2 portaudio19-dev pulseaudio pulseaudio-utils alsa-utils \
            libasound2-plugins ffmpeg sip-tester baresip tmux
PYTEST_ARGS ?=

.PHONY: demo test setup system lint bench clean

demo: setup
	$(VENV)/bin/tts-stream demo

test: setup
	$(VENV)/bin/ruff check tts_stream sinks tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check tts_stream sinks tests bench
	$(VENV)/bin/mypy

setup: system $(VENV)/.installed

system:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[dev]"
	# Only the speaker encoder's weights (tests, bench/likeness.py): the wheel declares torch,
	# which tts_stream/testing/voice_encoder.py does not need.
	$(PY) -m pip install -q --no-deps "resemblyzer==0.1.4"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

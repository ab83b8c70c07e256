# osteoscreen: the two commands the README promises.
#   make demo   create .venv, install, run `osteoscreen demo`
#   make test   install the real DICOM peers (apt), create .venv, install, run the full test suite
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
APT_PACKAGES := dcmtk dicom3tools orthanc

.PHONY: demo test venv system-peers

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/osteoscreen demo --output demo-output

# Real peers for the integration tests (DCMTK, dicom3tools' dciodvfy, Orthanc), from Debian.
system-peers:
	@if command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null; then \
	  echo "DICOM peers already installed"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

test: system-peers venv
	$(VENV)/bin/python -m pytest

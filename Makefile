# osteoscreen: the two commands the README promises.
#   make demo   create .venv, install, run `osteoscreen demo`
#   make test   install the real DICOM peers (apt), create .venv, install, run the full test suite
PYTHON ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
APT_PACKAGES := dcmtk dicom3tools orthanc

TRITON := .cache/triton
TRITON_WHEEL := nvidia-pytriton==0.7.0

.PHONY: demo test venv system-peers triton-server

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

# A real Triton Inference Server for tests/test_triton.py: the server binary and its Python backend
# from the nvidia-pytriton wheel (PyPI), and a small environment (numpy < 2, as that backend needs)
# for the test models it serves.
$(TRITON)/.installed:
	rm -rf $(TRITON) && mkdir -p $(TRITON)
	$(PYTHON) -m venv $(TRITON)/env
	$(TRITON)/env/bin/pip install --quiet "numpy<2" onnxruntime
	$(TRITON)/env/bin/pip download --quiet --no-deps --only-binary=:all: --dest $(TRITON) $(TRITON_WHEEL)
	$(TRITON)/env/bin/python -m zipfile -e $(TRITON)/nvidia_pytriton-*.whl $(TRITON)/server
	chmod +x $(TRITON)/server/pytriton/tritonserver/bin/tritonserver $(TRITON)/server/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
	touch $@

triton-server: $(TRITON)/.installed

test: system-peers venv triton-server
	$(VENV)/bin/python -m pytest

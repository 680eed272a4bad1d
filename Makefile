# Two entry points for a newcomer: `make demo` (set up, then run the whole job on demo data)
# and `make test` (set up, then run the test suite). Override PYTHON or TORCH as needed,
# e.g. `make demo TORCH='torch>=2.4'` on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO ?= demo
DEMO_SEQUENCES ?= 2000
DEMO_SIGNS ?= 25
DEMO_EPOCHS ?= 20

.PHONY: setup setup-tflite setup-video demo test test-fast test-tflite test-video lint bench bench-export bench-extract clean

# A venv with the project and some of its extras: $(call venv,DIR,EXTRAS). The CPU torch wheel goes in first so
# that installing the project never pulls a CUDA build.
define venv
$(1)/.installed: pyproject.toml
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(1)/bin/python -m pip install --quiet -e ".[$(2)]"
	touch $$@
endef

# The export extra (onnx, onnxscript, onnxruntime) is installed so that the tests cover `asl-train export`.
MAIN_EXTRAS := dev,export,tensorboard
setup: $(VENV)/.installed
$(eval $(call venv,$(VENV),$(MAIN_EXTRAS)))

# LiteRT export (tensorflow-cpu converts, ai-edge-litert runs) in a venv of its own: TensorFlow is about 1.5 GB,
# and where it is installed torch's TensorBoard writer changes (a resumed run's purged steps come back), so
# the main venv never gets it.
TFLITE_VENV ?= .venv-tflite
TFLITE_BIN := $(TFLITE_VENV)/bin

TFLITE_EXTRAS := dev,export,tflite
setup-tflite: $(TFLITE_VENV)/.installed
$(eval $(call venv,$(TFLITE_VENV),$(TFLITE_EXTRAS)))

# Video extraction (mediapipe 0.10.21, the last release that ships the Holistic models) in a venv of its own:
# mediapipe pins numpy<2, and pyarrow 26 refuses numpy 1.x, so the video extra holds numpy and pyarrow back;
# the main venv keeps numpy 2.
VIDEO_VENV ?= .venv-video
VIDEO_BIN := $(VIDEO_VENV)/bin

VIDEO_EXTRAS := dev,export,video
setup-video: $(VIDEO_VENV)/.installed
$(eval $(call venv,$(VIDEO_VENV),$(VIDEO_EXTRAS)))

# The main job: demo data -> shards -> a small model trained on CPU -> evaluation -> prediction -> ONNX export.
demo: setup
	test -f $(DEMO)/data/train.csv || $(BIN)/asl-pipeline demo-data $(DEMO)/data \
		--sequences $(DEMO_SEQUENCES) --signs $(DEMO_SIGNS)
	$(BIN)/asl-pipeline build-shards --data-dir $(DEMO)/data --out $(DEMO)/shards
	$(BIN)/asl-pipeline verify $(DEMO)/shards
	$(BIN)/asl-pipeline stats $(DEMO)/shards --top 5
	rm -rf $(DEMO)/runs/small
	$(BIN)/asl-train --shards $(DEMO)/shards --preset small --epochs $(DEMO_EPOCHS) --batch-size 64 \
		--lr 3e-3 --out $(DEMO)/runs/small
	$(BIN)/asl-train evaluate --checkpoint $(DEMO)/runs/small/best.pt
	$(BIN)/asl-train predict --checkpoint $(DEMO)/runs/small/best.pt \
		$$(ls $(DEMO)/data/train_landmark_files/*/*.parquet | head -n 3)
	$(BIN)/asl-train export --checkpoint $(DEMO)/runs/small/best.pt --out $(DEMO)/model.onnx
	$(BIN)/asl-train predict --model $(DEMO)/model.onnx --format json \
		$$(ls $(DEMO)/data/train_landmark_files/*/*.parquet | head -n 3)

test: setup
	$(BIN)/python -m pytest -q -m "not tflite and not video"

# The edit loop: every test but those that train a model or start processes (marker `slow`).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not tflite and not video"

# The LiteRT export tests (marker `tflite`), on their own time budget; CI runs both targets.
test-tflite: setup-tflite
	$(TFLITE_BIN)/python -m pytest -q -m tflite

# The tests that run MediaPipe (marker `video`), in the video venv; CI runs this target too.
test-video: setup-video
	$(VIDEO_BIN)/python -m pytest -q -m video

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/read.py
	$(BIN)/python bench/build.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/train_step.py

bench-export: setup-tflite
	$(TFLITE_BIN)/python bench/export.py

bench-extract: setup-video
	$(VIDEO_BIN)/python bench/extract.py

clean:
	rm -rf $(DEMO) runs

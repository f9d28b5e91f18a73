# FLARE-style inference container: `sh predict.sh` turns every /workspace/inputs/<case>_0000.nii.gz into a
# /workspace/outputs/<case>.nii.gz lesion mask. Build, save, run and measure it: docs/docker.md.
#
# Base: the official PyTorch runtime image (Ubuntu 24.04, system Python 3.12, torch 2.13.0+cu126 and the
# CUDA 12.6 / cuDNN 9 libraries as pip wheels in /usr/local/lib/python3.12/dist-packages). torch 2.13.0 is
# the version the engine is developed and tested with (.venv); CUDA 12.6 runs on any driver >= 525
# (CUDA minor-version compatibility) and includes Hopper (sm_90) kernels. Pinned by tag; pin the digest too
# when building for a submission: --build-arg BASE_IMAGE=pytorch/pytorch:<tag>@sha256:<digest>.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# ---- deps: the runtime Python packages, installed into their own folder ------------------------------
# A folder of its own (on PYTHONPATH, so it comes before the base's site-packages) rather than the base's
# site-packages: our pinned numpy does not replace the base's copy file by file (the replaced files would
# stay in the base layer and count twice), and nothing of the base image is modified.
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements.txt requirements-nodeps.txt /tmp/requirements/
# --only-binary: wheels only, nothing is compiled from source. --target skips the PEP 668 "externally
# managed" check of Ubuntu's Python (nothing is installed into the system's site-packages).
# dynamic-network-architectures: --no-deps, its timm -> torchvision -> torch dependencies are not needed.
# --no-compile then compileall: byte-code compiled once, in place, with paths of the final location;
# unchecked-hash .pyc files stay valid whatever the file times after COPY --from (no run-time compile).
RUN python3 -m pip install --no-cache-dir --no-compile --only-binary=:all: \
        --target /opt/flare/site-packages -r /tmp/requirements/requirements.txt \
    && python3 -m pip install --no-cache-dir --no-compile --only-binary=:all: --no-deps \
        --target /opt/flare/site-packages -r /tmp/requirements/requirements-nodeps.txt \
    && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/flare/site-packages \
    && rm -rf /tmp/requirements

# ---- export: the model folder with its ONNX export, made here once ------------------------------------
# Without a GPU the engine runs ONNX Runtime (`--backend auto`: 1.6x torch's network on the CPU) from an export of
# the very checkpoint it loads. A run of the image keeps nothing (a fresh container, FLARE_CACHE_DIR=off), so the
# export is made at build time, into the model folder (fold_X/model.onnx): no run pays for it, and none falls back
# to torch. export_onnx checks it (onnx.checker, then ONNX Runtime against torch on a patch: max abs logits
# difference <= 1e-3, else the build fails) and writes into it the fingerprint of the plans and checkpoint it was
# made from, which the engine checks at every load. `onnx` is needed to export, not to run: it stays in this stage.
# The model folder to embed (nnU-Net v2 layout, under models/ of the build context). It always lands in
# /workspace/models/default, where predict.sh looks when MODEL_DIR is not set.
FROM deps AS export
ARG MODEL_SRC=models/default
RUN python3 -m pip install --no-cache-dir --no-compile --only-binary=:all: --no-deps \
        --target /opt/flare/export-tools onnx==1.23.2 ml_dtypes==0.7.0 typing_extensions==4.16.0
WORKDIR /workspace
COPY inference/ /workspace/inference/
COPY flare_common/ /workspace/flare_common/
COPY ${MODEL_SRC}/ /workspace/models/default/
RUN PYTHONPATH=/opt/flare/site-packages:/opt/flare/export-tools FLARE_CACHE_DIR=off PYTHONDONTWRITEBYTECODE=1 \
        python3 -m inference.export_onnx -m /workspace/models/default

# ---- the image FLARE runs ------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# Extra `python -m inference` flags baked into the image (the FLARE command passes none), e.g.
# --build-arg PREDICT_ARGS="--lesion-labels 2"; predict.sh reads them from the environment.
ARG PREDICT_ARGS=""
LABEL org.opencontainers.image.title="flare-lesion-inference" \
      org.opencontainers.image.description="Whole-body pan-cancer CT lesion segmentation, FLARE container contract"
# PYTHONDONTWRITEBYTECODE: every .pyc is made at build time; at run time Python only reads them and never
# tries to write next to the code. PYTHONUNBUFFERED: log lines reach `docker logs` as they happen.
# CUDA_VISIBLE_DEVICES is deliberately not set: the GPU is chosen by `docker run --gpus`.
# FLARE_CACHE_DIR=off: every run is a fresh container and nothing may be written inside it: no remembered
# checkpoint digests (inference/model/fingerprint.py), no cached ONNX export.
ENV PYTHONPATH=/opt/flare/site-packages \
    FLARE_CACHE_DIR=off \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREDICT_ARGS="${PREDICT_ARGS}"
COPY --from=deps /opt/flare/site-packages /opt/flare/site-packages
WORKDIR /workspace
COPY inference/ /workspace/inference/
COPY flare_common/ /workspace/flare_common/
COPY --from=export /workspace/models/default/ /workspace/models/default/
COPY predict.sh /workspace/predict.sh
# Compile the engine now (the first case must not pay for it) and fail the build, not the first case, if
# an import or the model folder is broken: import everything the engine needs and parse the CLI.
RUN python3 -m compileall -q /workspace/inference /workspace/flare_common \
    && python3 -c "import torch, numpy, SimpleITK, cc3d, onnxruntime, dynamic_network_architectures; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'numpy', numpy.__version__)" \
    && python3 -m inference --help > /dev/null \
    && test -f /workspace/models/default/plans.json \
    && test -f /workspace/models/default/dataset.json \
    && test -n "$(find /workspace/models/default -path '*/fold_*/model.onnx')"
CMD ["/bin/sh", "predict.sh"]

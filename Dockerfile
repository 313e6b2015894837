# megatron-dga on an NGC PyTorch image (CUDA, cuDNN, NCCL, transformer-engine and apex
# are preinstalled there; they are this project's optional [gpu] extras).
#
#   docker build -t megatron-dga .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v /checkpoints:/checkpoints megatron-dga \
#       bash examples/pretrain_gpt_dga.sh
#   docker run --gpus all --ipc=host megatron-dga bash scripts/gpu_check.sh
#
# Versions. megatron-core is pinned to exactly the release CI tests (requirements/cpu.txt).
# NVIDIA's own CI builds and tests megatron-core 0.16.1 on two NGC images: 25.09-py3 ("lts",
# with the image's transformer-engine) and 25.11-py3 ("dev", with a transformer-engine built
# from git). We use the lts one, whose transformer-engine is the image's own. Change the
# tag and MEGATRON_CORE_VERSION together, and only to a pair megatron-core's CI lists.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1
ENV PYTHONUNBUFFERED=1 \
    # Kernels for Ampere (sm_80) and Hopper (sm_90), plus sm_90 PTX that the driver JIT-compiles
    # for newer GPUs; built without a GPU at image build time.
    FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    MAX_JOBS=8

WORKDIR /workspace/megatron-dga
# The image's PIP_CONSTRAINT stays in force: it pins torch (and everything else the image was
# built with), so nothing below can replace the image's torch. megatron-core's own dependencies
# (torch, numpy, packaging) are already in the image, hence --no-deps.
RUN pip install --no-cache-dir --no-deps "megatron-core==${MEGATRON_CORE_VERSION}" \
 && pip install --no-cache-dir sentencepiece pybind11 tqdm pyyaml psutil tensorboard matplotlib scikit-learn scipy \
        pytest pytest-timeout \
 && python -c "import torch, megatron.core as m; print('torch', torch.__version__, '| megatron-core', m.__version__)"

COPY . .
# --no-build-isolation: compile csrc/ against the image's torch, not a fresh one from PyPI.
RUN pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import megatron_dga._C as C; assert C.has_cuda(), 'the CUDA kernels were not built'; print('megatron_dga._C built with CUDA')"

CMD ["bash"]

# megatron-dga on an NGC PyTorch image (CUDA, cuDNN, NCCL, transformer-engine and apex
# are preinstalled there; they are this project's optional [gpu] extras).
#
#   docker build -t megatron-dga .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v /checkpoints:/checkpoints megatron-dga \
#       bash examples/pretrain_gpt_dga.sh
#
# Megatron-core is released against the previous month's NGC container; pick a tag one
# month older than the megatron-core release you pin if you change either.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

# NGC images pin the global pip environment through PIP_CONSTRAINT; our requirements are
# loose (torch>=2.6, megatron-core>=0.16) so that the image's torch is kept, but the
# constraint file would block megatron-core's own dependency updates.
ENV PIP_CONSTRAINT= \
    PYTHONUNBUFFERED=1 \
    # Build the CUDA kernels for Ampere and Hopper without a GPU at build time.
    FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=8

WORKDIR /workspace/megatron-dga
# Dependencies first, so code changes do not re-install them.
RUN pip install --no-cache-dir "megatron-core>=0.16,<0.20" sentencepiece pybind11 tqdm pyyaml \
        tensorboard matplotlib scikit-learn scipy pytest pytest-timeout

COPY . .
# --no-build-isolation: compile csrc/ against the image's torch, not a fresh one from PyPI.
RUN pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import megatron_dga._C as C; print('megatron_dga._C built with CUDA:', C.has_cuda())"

CMD ["bash"]

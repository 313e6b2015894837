"""Build and install megatron-dga.

The fused alignment ops in csrc/ become the extension ``megatron_dga._C``:
the C++/OpenMP kernels always, the CUDA kernels as well when a CUDA toolkit and a
CUDA build of torch are present (or FORCE_CUDA=1, for image builds without a GPU).
Build with ``pip install --no-build-isolation -e .`` so the extension compiles
against the torch already installed (the pinned CPU wheel here, the NGC torch in
the Docker image).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds (e.g. `pip download`) need no extension
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()
    )
    openmp = ["-fopenmp"]
    # `import megatron_dga._C` must work before anything imported torch (the package
    # __init__ does not): record torch's lib dir so libc10/libtorch resolve on their own.
    torch_rpath = ["-Wl,-rpath," + os.path.join(os.path.dirname(torch.__file__), "lib")]
    # -fno-math-errno lets std::sqrt vectorise (the kernels never read errno).
    cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno"] + openmp
    if with_cuda:
        ext = CUDAExtension(
            name="megatron_dga._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            # No --use_fast_math: the kernels are bandwidth-bound, and fast math would flush
            # denormal (tiny bf16) gradients to zero and approximate the Adam sqrt/divide.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp + torch_rpath,
        )
    else:
        ext = CppExtension(
            name="megatron_dga._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp + torch_rpath,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron-dga",
    version="0.1.0",
    description="Dynamic Gradient Alignment (online data mixing) on megatron-core",
    long_description=open(os.path.join(ROOT, "README.md")).read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dga", "megatron_dga.*"]),
    package_data={"megatron_dga": ["data/README.md", "mixing/README.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Loose on purpose: GPU images keep their own torch. requirements/cpu.txt pins a CPU set.
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16",
        "numpy",
        "sentencepiece",
        "pybind11",
        "tqdm",
        "pyyaml",
        "tensorboard",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "apex"],  # NGC images ship both; see Dockerfile
        "plots": ["matplotlib"],
        "cluster": ["scikit-learn", "scipy"],
        # tools/convert_hf_checkpoint.py (safetensors), HuggingFaceTokenizer (tokenizers), the converter's tests
        "hf": ["transformers", "safetensors", "tokenizers"],
        # Weights & Biases logging (--wandb-project); ~20 MB with its dependencies, so not in the CPU pins
        "wandb": ["wandb"],
        # downstream accuracy: tools/evaluate.py, examples/experiments.py --eval-tasks (megatron_dga/evaluation.py)
        "eval": ["lm-eval>=0.4.13,<0.5"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "megatron-dga-pretrain-gpt=megatron_dga.pretrain_gpt:main",
        ]
    },
)

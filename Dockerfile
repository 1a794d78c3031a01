# GPU image: CUDA, NCCL, PyTorch and Transformer Engine come from NGC.
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megatron_sv
COPY . .
# torch/TE from the base image are kept: install our package without touching its dependencies.
# megatron-core: the release tested on Python 3.12 (docs/versions.md)
RUN pip install --no-cache-dir "megatron-core==0.19.2" sentencepiece tensorboard psutil \
 && pip install --no-cache-dir --no-deps -e .

CMD ["bash"]

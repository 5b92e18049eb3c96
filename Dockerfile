# zero-one-instruction on the official vLLM image: `zoi worker` by default.
#
#   docker build -t zero-one-instruction .
#   docker run --gpus '"device=0,1"' --ipc=host -v $PWD/runs:/runs \
#     -e ZOI_REDIS_URL=redis://:PASSWORD@redis-host:6379/0 zero-one-instruction worker --run /runs/run
#
# The vLLM version is the image's; pick it with --build-arg VLLM_IMAGE=vllm/vllm-openai:<tag>.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    HF_HOME=/cache/huggingface

WORKDIR /opt/zero-one-instruction
COPY pyproject.toml README.md ./
COPY zero_one_instruction ./zero_one_instruction
# vLLM (and torch) come with the image; this adds the package and its small dependencies.
RUN python3 -m pip install --no-cache-dir . \
    && zoi --version

RUN useradd --create-home --uid 1000 zoi \
    && mkdir -p /runs /cache/huggingface \
    && chown zoi:zoi /runs /cache/huggingface
USER 1000
WORKDIR /runs
VOLUME ["/runs", "/cache/huggingface"]

# The image's own entrypoint starts vLLM's HTTP server; this one runs zoi.
ENTRYPOINT ["zoi"]
CMD ["worker", "--run", "/runs/run"]

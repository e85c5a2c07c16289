# SPDX-License-Identifier: Apache-2.0
# ROCm vLLM (MI300X) + LMCache + vllm-kvplugin.
#
# NOT BUILT HERE, and not run on MI300X: written against AMD's public vLLM image
# (https://hub.docker.com/r/rocm/vllm). Pin BASE_IMAGE to a dated tag in production.
#
#   docker build -f docker/rocm.Dockerfile -t vllm-kvplugin:rocm .
#   docker run --rm --device /dev/kfd --device /dev/dri --group-add video --ipc=host \
#     -p 8000:8000 -v /var/cache/kvplugin:/var/cache/kvplugin vllm-kvplugin:rocm \
#     vllm serve MODEL --kv-transfer-config "$(cat examples/cpu-nvme-directio.json)"
ARG BASE_IMAGE=rocm/vllm:latest
FROM ${BASE_IMAGE}

# Keep the image's ROCm torch and vLLM: LMCache declares `torch`, and pip would
# otherwise be free to replace the ROCm build with a CUDA one.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|triton|pytorch-triton-rocm)==' > /tmp/keep.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/keep.txt "lmcache==0.5.6"

COPY . /opt/vllm-kvplugin
# The `rocm` extra brings the pre-release hipFile bindings (`hipfile`, sdist only, built
# against $ROCM_PATH; ROCm >= 7.2). Without them the direct-I/O tier uses O_DIRECT.
RUN python3 -m pip install --no-cache-dir --pre -c /tmp/keep.txt "/opt/vllm-kvplugin[rocm]"

ENV LMCACHE_TRACK_USAGE=false \
    DO_NOT_TRACK=1
# No GPU at build time: doctor's device findings are only meaningful at run time
# (`docker run ... vllm-kvplugin doctor --kv-transfer-config ...`).

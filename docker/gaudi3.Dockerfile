# SPDX-License-Identifier: Apache-2.0
# Intel Gaudi 3: Gaudi PyTorch image (habana bridge) + vLLM + vllm-gaudi + LMCache + vllm-kvplugin.
#
# NOT BUILT HERE, and not run on Gaudi: written against Intel's public Gaudi PyTorch
# images (vault.habana.ai) and vllm-gaudi's documented source install, which pins the
# vLLM commit it is tested with. Pick BASE_IMAGE for your Gaudi software release
# (vllm-gaudi needs Gaudi software >= 1.24 for LMCache support).
#
#   docker build -f docker/gaudi3.Dockerfile --build-arg VLLM_COMMIT=... -t vllm-kvplugin:gaudi3 .
#   docker run --rm --runtime=habana -e HABANA_VISIBLE_DEVICES=all --cap-add=sys_nice \
#     --ipc=host -p 8000:8000 -v /var/cache/kvplugin:/var/cache/kvplugin vllm-kvplugin:gaudi3 \
#     vllm serve MODEL --kv-transfer-config "$(cat examples/cpu-nvme-directio.json)"
ARG BASE_IMAGE=vault.habana.ai/gaudi-docker/1.24.0/ubuntu24.04/habanalabs/pytorch-installer-2.9.0:latest
FROM ${BASE_IMAGE}
ARG VLLM_GAUDI_REF=main
# The vLLM commit vllm-gaudi is tested with: see vllm-gaudi's installation guide.
ARG VLLM_COMMIT

# The habana bridge's torch is not on PyPI: nothing below may replace it.
RUN python3 -m pip freeze | grep -iE '^(torch|habana[-_].*)==' > /tmp/keep.txt

# vllm-gaudi's documented route: vLLM at the commit vllm-gaudi pins, built for no device
# (VLLM_TARGET_DEVICE=empty), then the vllm-gaudi plugin on top.
RUN test -n "${VLLM_COMMIT}" || { echo "set --build-arg VLLM_COMMIT=<vLLM commit vllm-gaudi pins>"; exit 1; } \
 && git clone https://github.com/vllm-project/vllm-gaudi /opt/vllm-gaudi \
 && cd /opt/vllm-gaudi && git checkout "${VLLM_GAUDI_REF}" \
 && git clone https://github.com/vllm-project/vllm /opt/vllm \
 && cd /opt/vllm && git checkout "${VLLM_COMMIT}" \
 && VLLM_TARGET_DEVICE=empty python3 -m pip install --no-cache-dir -c /tmp/keep.txt . \
 && python3 -m pip install --no-cache-dir -c /tmp/keep.txt /opt/vllm-gaudi

RUN python3 -m pip install --no-cache-dir -c /tmp/keep.txt "lmcache==0.5.6"
COPY . /opt/vllm-kvplugin
RUN python3 -m pip install --no-cache-dir -c /tmp/keep.txt /opt/vllm-kvplugin

# PT_HPU_GPU_MIGRATION stays unset: it makes torch.cuda look available and LMCache
# could pick its CUDA backend; the plugin pins LMCACHE_DEVICE_BACKEND=hpu itself.
ENV LMCACHE_TRACK_USAGE=false \
    DO_NOT_TRACK=1

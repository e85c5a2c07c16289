# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind ``vllm-kvplugin bench``: functions the tests can import, results as rows.

Every figure is a ratio against a baseline measured in the same run, interleaved
with it: these machines are noisy, absolute times mean little across runs.
"""

# SPDX-License-Identifier: Apache-2.0
"""LMCache glue: build LMCache's engine around our KV mover, without patching LMCache."""

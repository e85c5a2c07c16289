# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O storage tier: chunk file format and I/O engines (torch-free core, real files)."""

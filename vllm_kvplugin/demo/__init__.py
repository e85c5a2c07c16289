# SPDX-License-Identifier: Apache-2.0
"""Demo and test helpers: a locally generated model, and the README's main job."""

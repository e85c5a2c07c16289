# SPDX-License-Identifier: Apache-2.0
"""``doctor`` recognises vllm-gaudi's runner from its source: the replayed behaviours, or what differs.

The runner text below is written for this test (no vllm-gaudi code): one line
per behaviour the doctor looks for, in the shape vllm-gaudi 091bbadd has it.
"""

import re

import pytest

from vllm_kvplugin.doctor import Findings
from vllm_kvplugin.doctor.gaudi import MARKERS, check_gaudi_runner

RUNNER_LIKE_091BBADD = """
if isinstance(scheduler_output.kv_connector_metadata, LMCacheConnectorMetadata):
    pass
kv_connector.bind_connector_metadata(scheduler_output.kv_connector_metadata)
# comment between, as upstream has
kv_connector.start_load_kv(get_forward_context())
return get_kv_transfer_group().get_finished(scheduler_output.finished_req_ids)
if cache_4d.shape[0] == expected_num_blocks + 1:
    pass
kv_caches_4D[name] = TensorTuple(tuple(kv_cache_per_layer))
"""


def finding(source):
    found = Findings()
    check_gaudi_runner(found, source)
    assert len(found) == 1 and found[0].check == "vllm-gaudi"
    return found[0]


def test_absent_vllm_gaudi_is_fine():
    found = Findings()
    check_gaudi_runner(found)  # not installed here
    assert found[0].level == "ok" and "not installed" in found[0].message


def test_the_replayed_runner_is_recognised_with_its_version():
    f = finding(("0.19.0", RUNNER_LIKE_091BBADD))
    assert f.level == "ok" and "0.19.0" in f.message and "091bbadd" in f.message
    assert "drops load errors" in f.message


@pytest.mark.parametrize("behaviour", list(MARKERS))
def test_a_runner_without_one_behaviour_is_a_warning_naming_it(behaviour):
    drop = {"bind_connector_metadata then start_load_kv before the forward": "start_load_kv"}.get(behaviour)
    lines = [line for line in RUNNER_LIKE_091BBADD.splitlines()
             if not (re.search(MARKERS[behaviour], line) or (drop and drop in line))]
    source = "\n".join(lines)
    f = finding(("0.20.0", source))
    assert f.level == "warn" and behaviour in f.message and "untested" in f.message


def test_a_runner_that_reports_load_errors_says_so():
    f = finding(("0.20.0", RUNNER_LIKE_091BBADD + "\noutput.invalid_block_ids = errors\n"))
    assert f.level == "ok" and "reports load errors" in f.message


def test_a_missing_runner_file_is_a_warning():
    f = finding(("0.19.0", ""))
    assert f.level == "warn" and "not found" in f.message

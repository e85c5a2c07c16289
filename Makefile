# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: demo test setup

setup:
	bash ci/setup-env.sh

demo: setup
	.venv/bin/vllm-kvplugin demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25

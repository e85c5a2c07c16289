# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin doctor``: can vLLM on this host reuse KV through this plugin, and if not, why?

Runs in the user's shell process, never inside vLLM, and starts no engine. It
reads the configuration the connector reads (the ``--kv-transfer-config`` JSON,
``LMCACHE_CONFIG_FILE``, ``LMCACHE_*``) through LMCache's own loader, runs the
connector's startup validation on it, and probes every configured storage tier
for real (:mod:`.tiers`). Each finding is ``ok``, ``warn`` or ``fail``; a
``fail`` means something blocks KV reuse (vLLM refuses to start, or it starts
and never hits), and makes the exit status 1.

Modules: :mod:`.host` (environment, entry points, platform, connectors, KV
mover), :mod:`.gaudi` (vllm-gaudi's runner), :mod:`.config` (the connector's config checks), :mod:`.tiers`,
:mod:`.mp` (LMCache MP servers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

_STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@dataclass
class Finding:
    check: str
    level: str  # "ok" | "warn" | "fail"
    message: str


class Findings(list):
    """The findings of one run, in the order the checks ran."""

    def add(self, check: str, level: str, message: str) -> None:
        assert level in _STYLES, level
        self.append(Finding(check, level, message))

    @contextlib.contextmanager
    def guard(self, check: str):
        """A check that raises becomes a ``fail`` finding, and the remaining checks still run."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any error here is what the user needs to see
            self.add(check, "fail", f"{type(e).__name__}: {one_line(e)}")


def diagnose(kv_transfer_config: str | None = None, block_size: int | None = None) -> Findings:
    """Every finding for this host and configuration (``kv_transfer_config`` as given to ``vllm serve``).

    Applies to ``os.environ`` the defaults vLLM would get from our platform entry,
    so the configuration is read as vLLM's processes will read it.
    """
    from vllm_kvplugin.doctor import config, gaudi, host, mp, tiers

    found = Findings()
    host.check_environment(found, os.environ)
    defaults: dict[str, str] = {}
    with found.guard("entry points"):
        if host.check_entry_points(found, os.environ):
            defaults = host.apply_plugin_defaults(os.environ)
    device = None
    with found.guard("platform"):
        device = host.check_platform(found)
    with found.guard("connectors"):
        host.check_connectors(found)
    with found.guard("vllm-gaudi"):
        gaudi.check_gaudi_runner(found)
    with found.guard("KV mover"):
        host.check_mover(found, device)
    with found.guard("config"):
        block_size = block_size or host.default_block_size(device)
        lmcache_config, extra = config.check_config(found, kv_transfer_config, block_size, device)
        if lmcache_config is None:
            mp.check_servers(found, extra, device)
        else:
            config.check_hash(found, lmcache_config, os.environ, defaults)
            tiers.check_tiers(found, lmcache_config, extra)
    return found


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == "fail" for f in findings) else 0


def render(findings: list[Finding], as_json: bool) -> str:
    """The findings as JSON, or as one screen of text (a rich table; colours only on a terminal)."""
    if as_json:
        return json.dumps({"findings": [asdict(f) for f in findings], "exit_code": exit_code(findings)}, indent=2)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="vllm-kvplugin doctor")
    for column in ("level", "check", "finding"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f"[{_STYLES[f.level]}]{f.level}[/]", escape(f.check), escape(f.message))  # "[rocm]" is text
    counts = {level: sum(f.level == level for f in findings) for level in _STYLES}
    console = Console(file=io.StringIO(), width=max(100, shutil.get_terminal_size().columns), record=True)
    console.print(table)
    console.print(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail: "
                  + ("something blocks KV reuse (exit 1)" if counts["fail"] else "nothing blocks KV reuse"))
    return console.export_text(styles=sys.stdout.isatty())


def run(kv_transfer_config: str | None, block_size: int | None, as_json: bool) -> int:
    """The ``doctor`` subcommand. vLLM and LMCache log while loading: to stderr, so stdout stays parseable."""
    for quiet in ("VLLM_LOGGING_LEVEL", "LMCACHE_LOG_LEVEL"):  # read at import; the findings say what matters
        os.environ.setdefault(quiet, "WARNING")
    sys.stdout.flush()
    stdout = os.dup(1)
    try:
        os.dup2(2, 1)
        findings = diagnose(kv_transfer_config, block_size)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    print(render(findings, as_json).rstrip("\n"))
    return exit_code(findings)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (pydantic and LMCache errors span several)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(e).__name__

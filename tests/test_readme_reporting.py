"""The reporting example in docs/reporting.md is a configuration borgtunnel accepts, with the
values the text says it has (a stale example would teach administrators a broken file)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from borgtunnel.config import parse_config

REPORTING_DOC = Path(__file__).resolve().parent.parent / "docs" / "reporting.md"


def test_reporting_example_loads():
    text = REPORTING_DOC.read_text()
    match = re.search(r"```toml\n# example: reporting[^\n]*\n(.*?)```", text, re.DOTALL)
    assert match, "the reporting example block is gone from docs/reporting.md"
    config = parse_config(tomllib.loads(match.group(1)))
    web1 = config.clients["web1"]
    assert config.max_age_for(web1) == 2 * 86400
    assert config.hooks_for(web1).on_failure == (
        ("/usr/local/bin/page-oncall", "{client}", "{error}"),
    )
    assert len(config.notify_urls_for(web1)) == 3
    assert config.metrics.listen == "127.0.0.1:9468"

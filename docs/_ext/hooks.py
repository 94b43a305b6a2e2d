"""MkDocs hooks for danlu's site.

Three pages of the site are written alongside other parts of the project: ``distributed.md``
(distributed training), ``performance.md`` (benchmarks) and ``arena.md`` (``danlu arena``). While a
branch does not have one of them yet, its nav entry is left out (logged at INFO) so that the
strict build still checks everything else; once the page exists, nothing is left out. No other
page is treated this way: any other missing page fails the strict build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.danlu")

PAGES_FROM_OTHER_PARTS = ("distributed.md", "performance.md", "arena.md")


def _prune(items: list[Any], missing: set[str]) -> list[Any]:
    kept = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                kept.append({title: _prune(value, missing)})
            elif value in missing:
                log.info("nav: %s is not in this branch yet, left out", value)
            else:
                kept.append(item)
        elif item in missing:
            log.info("nav: %s is not in this branch yet, left out", item)
        else:
            kept.append(item)
    return kept


def on_config(config: Any, **kwargs: Any) -> Any:
    docs = Path(config["docs_dir"])
    missing = {page for page in PAGES_FROM_OTHER_PARTS if not (docs / page).is_file()}
    if missing and config.get("nav"):
        config["nav"] = _prune(config["nav"], missing)
    return config

"""Regenerate the README's generated sections (``make docs``): the settings table from
``kiban.settings`` and the message reference from the message registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kiban.messages import registry
from kiban.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:begin[^\n]*-->\n).*?(<!-- {name}:end -->)", re.S)


def messages_markdown() -> str:
    """One section per registered message: task, queue, docstring and a valid example."""
    parts = []
    for kind, cls in registry().items():
        example = cls.model_validate(cls.example).model_dump(mode="json")
        doc = " ".join((cls.__doc__ or "").split())
        parts.append(
            f"#### `{kind}` → task `{cls.task}`, queue `{cls.queue}`\n\n"
            f"{doc} Served by `kiban worker {cls.service}`.\n\n"
            f"```json\n{json.dumps({'message': example}, indent=2)}\n```\n"
        )
    return "\n".join(parts)


def render(text: str) -> str:
    """``text`` (the README) with every generated block brought up to date."""
    for name, body in (("settings", settings_table()), ("messages", messages_markdown())):
        text = _block(name).sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    return text


def main() -> None:
    README.write_text(render(README.read_text()))


if __name__ == "__main__":
    main()

"""The report as one document, rendered twice: markdown (report.md, images as links to the PNGs
beside it) and HTML (report.html, self-contained: images inline as base64). The report builds a
list of blocks once; each renderer walks it."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Caption:
    """A paragraph; `code` spans are kept as code."""
    text: str


@dataclass
class Table:
    markdown: str  # a markdown table (what livr_ds.evaluation.table writes)


@dataclass
class Image:
    path: str  # relative to the report directory
    alt: str


@dataclass
class Gallery:
    images: list[Image]


@dataclass
class Code:
    text: str
    language: str


Block = Heading | Caption | Table | Image | Gallery | Code

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
td{text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}.cap{color:#555;font-size:13px}
.probes img{max-width:48%;margin:2px}"""


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Caption):
            lines.append(b.text)
        elif isinstance(b, Table):
            lines.append(b.markdown)
        elif isinstance(b, Image):
            lines.append(f"![{b.alt}]({b.path})")
        elif isinstance(b, Gallery):
            lines += [f"![{os.path.basename(im.path)}]({im.path})" for im in b.images]
        elif isinstance(b, Code):
            lines += [f"```{b.language}", b.text.rstrip("\n"), "```"]
        lines.append("")
    return "\n".join(lines)


def to_html(title: str, blocks: list[Block], out_dir: str) -> str:
    """`out_dir`: where the images' files are (they are read and inlined)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Caption):
            parts.append(f"<p class='cap'>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            parts.append(_table_html(b.markdown))
        elif isinstance(b, Image):
            parts.append(_img_html(out_dir, b))
        elif isinstance(b, Gallery):
            parts.append("<div class='probes'>" + "".join(_img_html(out_dir, im) for im in b.images) + "</div>")
        elif isinstance(b, Code):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table_html(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(md)}</p>"

    def cells(ln):
        return [c.strip() for c in ln.strip().strip("|").split("|")]

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('`', '')}</td>" for c in cells(ln)) + "</tr>"
                   for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _img_html(out_dir: str, image: Image) -> str:
    with open(os.path.join(out_dir, image.path), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(image.alt)}" '
            f'data-file="{html.escape(image.path)}">')

"""A small document model of a study report and its two renderings: one self-contained HTML file and markdown.

Build a :class:`Report` block by block (headings, paragraphs, tables, figures, feature cards, notes,
code) and :meth:`Report.write` it: ``report.html`` holds everything inline (CSS in a ``<style>``,
figures as base64 ``data:`` URIs, no script, no external URL), so it opens offline and can be
mailed; ``report.md`` links its figures from ``figures/NN-slug.png`` next to it and renders on
GitHub. All text is plain text: it is HTML-escaped in the HTML and markdown-escaped in the markdown.

:func:`check_in_browser` opens a written report in headless Chromium and reports console errors,
undecoded images and a full-page screenshot (for tests and for the study's own check).
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from posttrain_probe.errors import ProbeError

Value = Union[str, int, float, None]
"""A table or card value: text, or a number formatted by :func:`format_value`."""
ContextTokens = tuple[Sequence[str], int, float]
"""A feature card's context: (token strings, index of the highlighted token, activation)."""

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
_FIGURE_DPI = 150


def format_value(value: Value) -> str:
    """A table cell as text: ints as they are, floats with about four significant digits.

    Floats: 0 -> "0"; |x| >= 1e6 or < 1e-3 in scientific notation ("1.23e+06", "4.50e-05");
    1000 <= |x| < 1e6 without decimals ("12346"); otherwise 4 significant digits ("0.1235", "12.35").
    NaN is "nan", infinities "inf"/"-inf"; None is "–"; bools "yes"/"no".
    """
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if number == 0:
            return "0"
        size = abs(number)
        if size >= 1e6:
            return f"{number:.3g}"
        if size >= 1000:
            return f"{number:.0f}"
        if size < 1e-3:
            return f"{number:.2e}"
        return f"{number:.4g}"
    return str(value)


def _is_number(value: Value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _slug(text: str, limit: int = 40) -> str:
    """Lower-case ASCII words joined by '-' (at most ``limit`` characters; 'figure' when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-")
    return slug or "figure"


# -- blocks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Heading:
    text: str
    level: int


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Table:
    columns: list[str]
    rows: list[list[Value]]
    caption: str | None
    highlighted: frozenset[int]


@dataclass(frozen=True)
class _Figure:
    data: bytes
    suffix: str
    caption: str | None
    number: int


@dataclass(frozen=True)
class _Card:
    title: str
    rows: list[tuple[str, Value]]
    contexts: list[tuple[list[str], int, float]]


@dataclass(frozen=True)
class _Note:
    text: str
    title: str


@dataclass(frozen=True)
class _Code:
    text: str


class Report:
    """A report as a list of blocks; the methods append one block each and return the report (chainable)."""

    def __init__(self, title: str) -> None:
        """An empty report whose page title and top heading are ``title``."""
        self.title = str(title)
        self.blocks: list[Any] = []

    def heading(self, text: str, level: int = 2) -> Report:
        """A section heading; ``level`` 2 (sections, listed in the HTML's contents) to 4 (level 1 is the title)."""
        if not 1 <= level <= 6:
            raise ProbeError(f"heading level must be 1..6, got {level}")
        self.blocks.append(_Heading(str(text), int(level)))
        return self

    def paragraph(self, text: str) -> Report:
        """A paragraph of plain text (blank lines inside split it into several paragraphs)."""
        self.blocks.append(_Paragraph(str(text)))
        return self

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Value]],
        caption: str | None = None,
        highlight: Iterable[int] | Callable[[Sequence[Value]], bool] | None = None,
    ) -> Report:
        """A table: ``columns`` names, ``rows`` of str/int/float values (formatted by :func:`format_value`;
        numeric columns are right-aligned). ``highlight`` marks rows: their indices, or a predicate on a row
        (highlighted rows are shaded in the HTML and bold in the markdown)."""
        columns = [str(c) for c in columns]
        rows = [list(row) for row in rows]
        bad = [i for i, row in enumerate(rows) if len(row) != len(columns)]
        if bad:
            raise ProbeError(f"table rows {bad[:5]} do not have {len(columns)} values (columns {columns})")
        if highlight is None:
            marked: frozenset[int] = frozenset()
        elif callable(highlight):
            marked = frozenset(i for i, row in enumerate(rows) if highlight(row))
        else:
            marked = frozenset(int(i) for i in highlight)
        self.blocks.append(_Table(columns, rows, None if caption is None else str(caption), marked))
        return self

    def figure(self, figure, caption: str | None = None) -> Report:
        """A figure: a matplotlib ``Figure`` (rendered to PNG now, at 150 dpi) or the path of a PNG, JPEG or SVG file
        (read now)."""
        if isinstance(figure, (str, os.PathLike)):
            path = Path(figure)
            suffix = path.suffix.lower()
            if suffix not in _MIME:
                raise ProbeError(f"figure {path} is not a PNG, JPEG or SVG file (expected one of {sorted(_MIME)})")
            try:
                data = path.read_bytes()
            except OSError as err:
                raise ProbeError(f"cannot read figure {path}: {err}") from err
            suffix = ".jpg" if suffix == ".jpeg" else suffix
        elif hasattr(figure, "savefig"):
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=_FIGURE_DPI, bbox_inches="tight")
            data, suffix = buffer.getvalue(), ".png"
        else:
            raise ProbeError(f"a figure must be a matplotlib Figure or an image path, got {type(figure).__name__}")
        number = 1 + sum(isinstance(b, _Figure) for b in self.blocks)
        self.blocks.append(_Figure(data, suffix, None if caption is None else str(caption), number))
        return self

    def card(
        self,
        title: str,
        rows: Mapping[str, Value] | Iterable[tuple[str, Value]],
        contexts: Iterable[ContextTokens] = (),
    ) -> Report:
        """A feature card: ``title``, key/value ``rows`` (scores) and ``contexts`` as (token strings, index of
        the highlighted token, activation) - the highlighted token is <mark>ed in HTML, **bold** in markdown."""
        pairs = list(rows.items()) if isinstance(rows, Mapping) else [tuple(pair) for pair in rows]
        shown = []
        for tokens, index, activation in contexts:
            tokens = [str(t) for t in tokens]
            if not 0 <= int(index) < len(tokens):
                raise ProbeError(f"card {title!r}: highlight index {index} is outside its {len(tokens)} tokens")
            shown.append((tokens, int(index), float(activation)))
        self.blocks.append(_Card(str(title), [(str(k), v) for k, v in pairs], shown))
        return self

    def note(self, text: str, title: str = "Note") -> Report:
        """A callout box (plain text) headed ``title``."""
        self.blocks.append(_Note(str(text), str(title)))
        return self

    def code(self, text: str) -> Report:
        """A preformatted block (commands, configs), shown verbatim."""
        self.blocks.append(_Code(str(text)))
        return self

    # -- rendering ------------------------------------------------------------------------------
    def figure_names(self) -> list[str]:
        """File names (``NN-slug.ext``) of the figures in ``figures/`` next to report.md, in order."""
        return [
            f"{b.number:02d}-{_slug(b.caption or 'figure')}{b.suffix}" for b in self.blocks if isinstance(b, _Figure)
        ]

    def to_html(self) -> str:
        """The whole report as one self-contained HTML document (inline CSS, images as data URIs, no script)."""
        return _HtmlRenderer(self).render()

    def to_markdown(self, figures_dir: str = "figures") -> str:
        """The report as GitHub markdown; figures are linked as ``<figures_dir>/NN-slug.ext`` (see :meth:`figure_names`)."""
        return _markdown(self, figures_dir)

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``out_dir/report.html``, ``out_dir/report.md`` and ``out_dir/figures/NN-slug.ext``; returns
        (html path, markdown path). Figures of an earlier write that this report no longer has are removed."""
        out = Path(out_dir)
        figures = out / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        names = self.figure_names()
        for stale in figures.glob("[0-9][0-9]-*"):
            if stale.suffix in _MIME and stale.name not in names:
                stale.unlink()
        for name, block in zip(names, (b for b in self.blocks if isinstance(b, _Figure))):
            _write_atomic(figures / name, block.data)
        html_path, md_path = out / "report.html", out / "report.md"
        _write_atomic(html_path, self.to_html().encode("utf-8"))
        _write_atomic(md_path, self.to_markdown().encode("utf-8"))
        return html_path, md_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- HTML ------------------------------------------------------------------------------------------
_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d0d7de; --soft: #f6f8fa; --accent: #0969da;
        --mark: #ffd33d; --row: #fff8c5; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 16px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 60rem; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
h1 { font-size: 1.9rem; margin: 0 0 1rem; padding-bottom: .4rem; border-bottom: 2px solid var(--line); }
h2 { font-size: 1.4rem; margin: 2.4rem 0 .8rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.15rem; margin: 1.8rem 0 .6rem; }
h4, h5, h6 { font-size: 1rem; margin: 1.4rem 0 .5rem; }
p { margin: .6rem 0; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1rem;
          margin: 1rem 0 1.5rem; font-size: .95rem; }
nav.toc ol { margin: .3rem 0; padding-left: 1.4rem; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .92rem; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 .35rem; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .3rem .6rem; vertical-align: top; }
th { background: var(--soft); text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tbody tr.hl { background: var(--row); font-weight: 600; }
figure { margin: 1.5rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .4rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; margin: 1rem 0;
        box-shadow: 0 1px 2px rgba(31, 35, 40, .06); break-inside: avoid; }
.card h4 { margin: 0 0 .5rem; }
.card dl { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; margin: 0 0 .6rem;
           font-size: .92rem; }
.card dt { color: var(--muted); }
.card dd { margin: 0; font-variant-numeric: tabular-nums; }
.contexts { border-collapse: collapse; width: 100%; font-size: .88rem; }
.contexts tr { background: none !important; }
.contexts td { border: none; border-top: 1px solid var(--line); padding: .25rem .4rem; }
.contexts td.num { width: 4.5rem; color: var(--muted); }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap;
       word-break: break-word; }
.ctx mark { background: var(--mark); border-radius: 3px; padding: 0 .1rem; font-weight: 700; }
.note { border-left: 4px solid var(--accent); background: #ddf4ff; border-radius: 0 6px 6px 0;
        padding: .6rem 1rem; margin: 1rem 0; }
.note strong { display: block; margin-bottom: .2rem; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: .8rem 1rem;
      overflow-x: auto; font-size: .88rem; line-height: 1.45; }
@media print { main { max-width: none; } .card, figure, table { break-inside: avoid; } }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


class _HtmlRenderer:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.ids: dict[str, int] = {}

    def _id(self, text: str) -> str:
        base = "s-" + _slug(text, 50)
        self.ids[base] = self.ids.get(base, 0) + 1
        return base if self.ids[base] == 1 else f"{base}-{self.ids[base]}"

    def render(self) -> str:
        body, toc = [], []
        for block in self.report.blocks:
            if isinstance(block, _Heading):
                anchor = self._id(block.text)
                if block.level == 2:
                    toc.append(f'<li><a href="#{anchor}">{_esc(block.text)}</a></li>')
                body.append(f'<h{block.level} id="{anchor}">{_esc(block.text)}</h{block.level}>')
            else:
                body.append(self._block(block))
        contents = f'<nav class="toc"><strong>Contents</strong><ol>{"".join(toc)}</ol></nav>' if len(toc) >= 3 else ""
        title = _esc(self.report.title)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<link rel="icon" href="data:,">\n'
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{title}</h1>\n{contents}\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
        )

    def _block(self, block) -> str:
        if isinstance(block, _Paragraph):
            return "\n".join(
                f"<p>{_esc(part.strip())}</p>" for part in re.split(r"\n\s*\n", block.text) if part.strip()
            )
        if isinstance(block, _Table):
            return self._table(block)
        if isinstance(block, _Figure):
            data = base64.b64encode(block.data).decode("ascii")
            label = f"Figure {block.number}" + (f". {block.caption}" if block.caption else "")
            return (
                f'<figure><img src="data:{_MIME[block.suffix]};base64,{data}" alt="{_esc(label)}">'
                f"<figcaption>{_esc(label)}</figcaption></figure>"
            )
        if isinstance(block, _Card):
            return self._card(block)
        if isinstance(block, _Note):
            return f'<div class="note"><strong>{_esc(block.title)}</strong>{_esc(block.text)}</div>'
        if isinstance(block, _Code):
            return f"<pre><code>{_esc(block.text)}</code></pre>"
        raise ProbeError(f"unknown report block {type(block).__name__}")

    @staticmethod
    def _table(block: _Table) -> str:
        numeric = [
            bool(block.rows) and all(_is_number(row[j]) or row[j] is None for row in block.rows)
            for j in range(len(block.columns))
        ]
        head = "".join(
            f'<th{" class=num" if numeric[j] else ""} scope="col">{_esc(c)}</th>' for j, c in enumerate(block.columns)
        )
        rows = []
        for i, row in enumerate(block.rows):
            cells = "".join(
                f"<td{' class=num' if numeric[j] else ''}>{_esc(format_value(v))}</td>" for j, v in enumerate(row)
            )
            rows.append(f"<tr{' class=hl' if i in block.highlighted else ''}>{cells}</tr>")
        caption = f"<caption>{_esc(block.caption)}</caption>" if block.caption else ""
        return (
            f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )

    @staticmethod
    def _card(block: _Card) -> str:
        pairs = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(format_value(v))}</dd>" for k, v in block.rows)
        parts = [f'<section class="card"><h4>{_esc(block.title)}</h4>']
        if pairs:
            parts.append(f"<dl>{pairs}</dl>")
        if block.contexts:
            rows = []
            for tokens, index, activation in block.contexts:
                text = "".join(
                    f'<mark title="activation {_esc(format_value(activation))}">{_esc(t)}</mark>'
                    if j == index
                    else _esc(t)
                    for j, t in enumerate(tokens)
                )
                rows.append(
                    f'<tr><td class="num">{_esc(format_value(activation))}</td><td class="ctx">{text}</td></tr>'
                )
            parts.append(f'<table class="contexts"><tbody>{"".join(rows)}</tbody></table>')
        parts.append("</section>")
        return "".join(parts)


# -- markdown --------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _md(text: str) -> str:
    """Plain text safe in markdown: formatting characters backslash-escaped, line breaks as spaces."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split("\n")))


def _md_bold(text: str) -> str:
    """``text`` in bold, its leading/trailing spaces kept outside the markers (CommonMark needs that)."""
    core = text.strip()
    if not core:
        return "**\u2423**"  # a visible space
    start = text.index(core[0])
    return f"{_md(text[:start])}**{_md(core)}**{_md(text[start + len(core) :])}"


def _markdown(report: Report, figures_dir: str) -> str:
    names = iter(report.figure_names())
    out = [f"# {_md(report.title)}", ""]
    for block in report.blocks:
        if isinstance(block, _Heading):
            out += [f"{'#' * block.level} {_md(block.text)}", ""]
        elif isinstance(block, _Paragraph):
            for part in re.split(r"\n\s*\n", block.text):
                if part.strip():
                    out += [_md(part.strip()), ""]
        elif isinstance(block, _Table):
            if block.caption:
                out += [f"*{_md(block.caption)}*", ""]
            numeric = [
                bool(block.rows) and all(_is_number(row[j]) or row[j] is None for row in block.rows)
                for j in range(len(block.columns))
            ]
            out.append("| " + " | ".join(_md(c) for c in block.columns) + " |")
            out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            for i, row in enumerate(block.rows):
                cells = [_md(format_value(v)) for v in row]
                if i in block.highlighted:
                    cells = [f"**{c}**" if c.strip() else c for c in cells]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, _Figure):
            label = f"Figure {block.number}" + (f". {block.caption}" if block.caption else "")
            out += [f"![{_md(label)}]({figures_dir}/{next(names)})", "", f"*{_md(label)}*", ""]
        elif isinstance(block, _Card):
            out += [f"#### {_md(block.title)}", ""]
            out += [f"- {_md(k)}: {_md(format_value(v))}" for k, v in block.rows]
            if block.rows:
                out.append("")
            if block.contexts:
                out += ["| activation | context |", "|---:|---|"]
                for tokens, index, activation in block.contexts:
                    text = "".join(_md_bold(t) if j == index else _md(t) for j, t in enumerate(tokens))
                    out.append(f"| {_md(format_value(activation))} | {text} |")
                out.append("")
        elif isinstance(block, _Note):
            out += [f"> **{_md(block.title)}:** {_md(block.text)}", ""]
        elif isinstance(block, _Code):
            fence = "```"
            while fence in block.text:
                fence += "`"
            out += [fence, block.text, fence, ""]
    return "\n".join(out).rstrip("\n") + "\n"


# -- headless browser check ---------------------------------------------------------------------------

"""Number formats and Markdown/HTML plumbing of the report: every number in the report and in the variants
comparison is written by these functions, so tests can check the report shows exactly the stats outputs.
"""
from __future__ import annotations

import base64
import html
import math

import markdown

MD_SPECIAL = "\\`*_[]|#~$<>"  # escaped as entities so answer text never turns into markup or breaks a table
CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5;
color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem}code{background:#f5f5f5}"""


ALPHAS = (0.1, 0.05, 0.01, 0.001)  # the usual significance levels: a printed p never lands on the other side of one


def fmt_p(p, note: str = "") -> str:
    """A p-value: '<1e-4' when tiny, else four decimals, more where four would round it onto a usual alpha
    (0.04996 is not '0.0500', which would read as not significant); 'n/a (reason)' when undefined (None or NaN)."""
    if p is None or not math.isfinite(p):
        return f"n/a ({md_escape(note)})" if note else "n/a"
    if p < 1e-4:
        return "<1e-4"
    for digits in range(4, 10):
        text = f"{p:.{digits}f}"
        if all((p < alpha) == (float(text) < alpha) for alpha in ALPHAS):
            break
    return text


def p_is(p, note: str = "") -> str:
    """A p-value in prose: 'p = 0.0004', 'p < 1e-4' or 'p = n/a (reason)'."""
    text = fmt_p(p, note)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def fmt_pct(x) -> str:
    """A proportion as a percentage with one decimal: 0.7312 -> '73.1%'."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_pp(x) -> str:
    """A difference of proportions in signed percentage points: 0.19 -> '+19.0 pp'."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} pp"


def fmt_spread(x) -> str:
    """A spread of proportions (a standard deviation) in unsigned percentage points: 0.053 -> '5.3 pp'."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f} pp"


def fmt_num(x, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_count(correct: int, total: int) -> str:
    return f"{correct}/{total}"


def fmt_interval(low, high, fmt=fmt_pct) -> str:
    return f"[{fmt(low)}, {fmt(high)}]"


def fmt_param(value) -> str:
    """A params.yaml value as written there: 5e-06, 0.04, 16, all-linear, [q_proj, v_proj]."""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def md_escape(text: str) -> str:
    """Model output or notes made safe inside Markdown and HTML: one line, markup characters as entities."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return "".join(f"&#{ord(ch)};" if ch in MD_SPECIAL else ch for ch in text)


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*cells) -> list[str]:
    return [row(*cells), row(*["---"] * len(cells))]


def render_html(md_text: str, images: dict[str, bytes]) -> str:
    """A standalone page: the Markdown as HTML with each image (keyed by its relative path) inlined as base64."""
    body = markdown.markdown(md_text, extensions=["tables"], output_format="html")
    for rel, data in sorted(images.items()):
        body = body.replace(f'src="{rel}"', f'src="data:image/png;base64,{base64.b64encode(data).decode()}"')
    title = html.escape(md_text.splitlines()[0].lstrip("# "))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")

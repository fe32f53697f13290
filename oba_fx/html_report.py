"""One self-contained HTML page per pruning run: tables and inline PNG pictures, no script, no
style sheet or font fetched from anywhere.

Example:
    >>> page = render({"target": {"kind": "flops", "value": 0.5}, "flops_before": 100, "flops_after": 50,
    ...                "params_before": 10, "params_after": 6, "layers": {}, "heads": {}, "barriers": []},
    ...               images={}, title="demo")
    >>> page.startswith("<!DOCTYPE html>"), "<script" in page, "50.0 %" in page
    (True, False, True)
"""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path
from typing import Any, Mapping

from .pictures.curves import history_rows
from .pictures.removed import removed_rows
from oba_fx.errors import BadInputError

CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1800px}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f2f2f2;text-align:left}td.n{text-align:right}figure{margin:10px 0 28px}
figcaption{font-size:13px;color:#555}img{max-width:none;border:1px solid #eee}
.scroll{overflow-x:auto}details{margin:8px 0}"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG from its header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise BadInputError("not a PNG file")
    return struct.unpack(">II", data[16:24])


def _img(path: Path, alt: str) -> str:
    data = Path(path).read_bytes()
    w, h = png_size(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<div class="scroll"><img src="{uri}" width="{w}" height="{h}" alt="{html.escape(alt)}"></div>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        cls = ' class="n"' if number else ""
        return f"<td{cls}>{html.escape(f'{v:,}' if number and isinstance(v, int) else str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(a: float | None, b: float | None) -> str:
    return f"{100 * a / b:.1f} %" if a is not None and b else "—"


def _settings(report: Mapping, settings: Mapping | None) -> str:
    rows = [[f"target {k}", v] for k, v in report.get("target", {}).items()]
    rows += [[k, report[k]] for k in ("criterion", "steps", "bn_recalibrated", "max_rel_error", "groups",
                                      "units_prunable", "units_removed") if k in report]
    rows += [[k, v] for k, v in (settings or {}).items() if v is not None]
    return "<h2>Settings</h2>" + _table(["setting", "value"], rows)


def _results(report: Mapping, accuracy: Mapping | None) -> str:
    rows = [["FLOPs", report["flops_before"], report["flops_after"], _pct(report["flops_after"], report["flops_before"])],
            ["parameters", report["params_before"], report["params_after"],
             _pct(report["params_after"], report["params_before"])]]
    out = "<h2>Result</h2>" + _table(["", "before", "after", "kept"], rows)
    if accuracy:
        acc_rows = []
        for when, value in accuracy.items():
            items = value.items() if isinstance(value, Mapping) else [("", value)]
            acc_rows += [[when, where, f"{100 * a:.2f} %"] for where, a in items]
        out += "<h3>Accuracy</h3>" + _table(["when", "on", "top-1"], acc_rows)
    return out


def _layers(report: Mapping) -> str:
    rows = [[name, unit, b, a, _pct(a, b)] for name, unit, b, a in removed_rows(report)]
    barriers = report.get("barriers", [])
    out = (f"<h2>Per layer</h2><details open><summary>{len(rows)} layers</summary>"
           + _table(["layer", "unit", "before", "after", "kept"], rows) + "</details>")
    if barriers:
        out += "<h3>Barriers</h3>" + _table(["node", "op", "target", "reason"],
                                            [[b["node"], b["op"], b["target"], b["reason"]] for b in barriers])
    return out


def _history(history: Any) -> str:
    rows = [[e, f"{loss:.4f}", f"{100 * a:.2f} %" if a is not None else "—"] for e, loss, a in history_rows(history)]
    return "<h3>Fine-tuning per epoch</h3>" + _table(["epoch", "train loss", "eval accuracy"], rows)


def render(report: Mapping, images: Mapping[str, tuple[Path, str]], title: str = "oba_fx pruning report",
           accuracy: Mapping | None = None, settings: Mapping | None = None, history: Any = None,
           notes: list[str] | None = None) -> str:
    """The page's HTML: ``images`` maps a heading to ``(PNG path, caption)``, inlined as data URIs."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes or []]
    parts += [_results(report, accuracy), _settings(report, settings)]
    for heading, (path, caption) in images.items():
        parts.append(f"<h2>{html.escape(heading)}</h2><figure>{_img(path, heading)}"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if history is not None:
        parts.append(_history(history))
    parts.append(_layers(report))
    parts.append("</body></html>")
    return "\n".join(parts)

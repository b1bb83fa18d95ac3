"""A self-contained HTML report of a fitted head: metrics, confusion matrix, per-class bars and
a gallery of misclassified held-out images. PNGs are written next to the HTML and also
embedded (base64), so the single .html file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from pathlib import Path

from heads.metrics import SCALARS

THUMB = 128


def _displayable(obj):
    """Strings made safe to print, plot and encode: a file name that is not UTF-8 (kept in the
    index as its raw bytes) shows with U+FFFD in place of each undecodable byte."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(obj, dict):
        return {_displayable(k): _displayable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_displayable(v) for v in obj]
    return obj


def _e(value) -> str:
    """Every value that reaches the page is escaped: the sidecar is a JSON file anyone can edit."""
    return html.escape(str(value), quote=True)


def _f(value, spec: str) -> str:
    """A number formatted with ``spec``; anything else (an edited sidecar) shown escaped as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return _e(value)


def _png(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _confusion_fig(m: dict, title: str):
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.array(m["confusion"])
    classes = m["classes"]
    size = max(3.5, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = cm.max() or 1
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > hi / 2 else "black")
    return fig


def _per_class_fig(m: dict, title: str):
    import matplotlib.pyplot as plt
    import numpy as np

    classes = list(m["per_class"])
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(classes) + 2), 3.2))
    for name, off in (("precision", -0.27), ("recall", 0.0), ("f1", 0.27)):
        ax.bar(x + off, [m["per_class"][c][name] for c in classes], width=0.27, label=name)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return fig


def _thumb(path: str) -> str | None:
    """Return a base64 JPEG thumbnail, or None when the image is gone or unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            from featurize.pixels import to_rgb

            im = to_rgb(im)
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode()
    except Exception:  # a moved or damaged file must not break the report
        return None


def _metrics_table(metrics: dict) -> str:
    head = "".join(f"<th>{_e(p)}</th>" for p in metrics)
    rows = []
    for k in SCALARS:
        cells = []
        for m in metrics.values():
            if "mean" in m:
                v = f"{_f(m['mean'][k], '.4f')} &plusmn; {_f(m['std'][k], '.4f')}" if k in m["mean"] else "-"
            else:
                v = _f(m[k], ".4f") if k in m else "-"
            cells.append(f"<td>{v}</td>")
        if any(c != "<td>-</td>" for c in cells):
            rows.append(f"<tr><th>{k}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _per_class_table(m: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{_f(v['precision'], '.3f')}</td><td>{_f(v['recall'], '.3f')}</td>"
        f"<td>{_f(v['f1'], '.3f')}</td><td>{_f(v['support'], 'd')}</td></tr>" for c, v in m["per_class"].items())
    return f"<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>{rows}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}.g{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:140px;font-size:11px;word-break:break-all}figure img{width:128px;height:128px;object-fit:contain;
background:#eee}.bad{color:#b00}.meta{color:#555;font-size:13px}"""


def build_report(meta: dict, out_dir, max_errors: int = 60) -> dict:
    """Write ``report.html`` and PNGs for a head's saved metadata.

    Takes the head's meta (as written by ``fit``), the output folder and the gallery size;
    returns ``{"html", "pngs": [...], "gallery": n}``.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_errors, raw_root = meta.get("errors", []), meta.get("dataset", "")  # raw: they name files on disk
    meta = _displayable(meta)
    metrics = meta["metrics"]
    pngs, sections = [], []
    for part, m in metrics.items():
        for kind, fig in (("confusion", _confusion_fig(m, f"confusion matrix ({part})")),
                          ("per_class", _per_class_fig(m, f"per-class precision / recall / F1 ({part})"))):
            p = out / f"{kind}_{part}.png"
            b64 = _png(fig, p)
            pngs.append(str(p))
            sections.append((part, kind, b64))
    figs = "".join(f'<img alt="{k} {_e(part)}" src="data:image/png;base64,{b}" style="max-width:100%;'
                   f'margin-right:16px">' for part, k, b in sections)
    per_class = "".join(f"<h3>{_e(part)} (n={_f(m['n'], 'd')})</h3>{_per_class_table(m)}"
                        for part, m in metrics.items())
    cards = []
    for raw, e in list(zip(raw_errors, meta.get("errors", [])))[:max_errors]:
        full = Path(os.path.join(raw_root, raw["path"]))  # index paths are root-relative
        b64 = _thumb(str(full))
        img = f'<img src="data:image/jpeg;base64,{b64}" alt="">' if b64 else '<div class="bad">(image missing)</div>'
        if b64 and full.is_absolute():  # the thumbnail opens the full image
            img = f'<a href="{_e(full.as_uri())}">{img}</a>'
        prob = f" ({_f(e['prob'], '.2f')})" if e.get("prob") is not None else ""
        part = f" [{_e(e['part'])}]" if e.get("part") else ""
        cards.append(f"<figure>{img}<figcaption>true <b>{_e(e['true'])}</b><br>"
                     f"pred <b class=bad>{_e(e['pred'])}</b>{prob}<br>{_e(e['path'])}{part}"
                     f"</figcaption></figure>")
    n_err = len(meta.get("errors", []))
    gallery = (f"<p>{n_err} misclassified held-out images; {len(cards)} shown, taken in turn from each true "
               f"class, the most confident mistakes first.</p><div class=g>{''.join(cards)}</div>"
               if cards else "<p>No misclassified held-out images.</p>")
    t = meta.get("timings") if isinstance(meta.get("timings"), dict) else {}
    title = f"featurize head {meta.get('head')} on {Path(str(meta.get('dataset'))).name}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{_e(title)}</h1>
<p class=meta>dataset {_e(meta.get('dataset'))} &middot; backbone {_e(meta.get('backbone'))}
({_e(meta.get('space_id'))}) &middot; head {_e(meta.get('resolved'))}
&middot; protocol {_e(meta.get('protocol'))} &middot; {_f(meta.get('n_images'), 'd')} images,
{len(meta.get('classes', []))} classes &middot; class weight {_e(meta.get('class_weight') or 'none')} &middot; seed {_f(meta.get('seed'), 'd')}
<br>best hyper-parameters {_e(meta.get('best_params'))} &middot; fit {_f(t.get('fit_s', 0), '.2f')} s
(protocol {_f(t.get('eval_s', 0), '.2f')} s) &middot; report written {time.strftime('%Y-%m-%d %H:%M')}</p>
<h2>Metrics</h2>{_metrics_table(metrics)}
<h2>Confusion matrix and per-class scores</h2>{figs}
<h2>Per class</h2>{per_class}
<h2>Misclassified held-out images</h2>{gallery}
</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {"html": str(html_path), "pngs": pngs, "gallery": len(cards)}

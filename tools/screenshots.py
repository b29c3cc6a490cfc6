#!/usr/bin/env python3
"""Screenshots of the course notebooks as a fresh clone shows them in JupyterLab (a maintainer tool).

    python tools/screenshots.py                  # all notebooks/NN_*.ipynb -> docs/screenshots/
    python tools/screenshots.py notebooks/05_LoRA訓練.ipynb   # only some notebooks

Run it from the repository root with the project venv (``.venv/bin/python tools/screenshots.py``): the JupyterLab
server is started with the same interpreter (``sys.executable -m jupyterlab``), so jupyterlab and ipywidgets come
from ``requirements.txt``.

Prerequisites, NOT in requirements.txt (this tool is not run by the tests or CI):

    apt-get install chromium fonts-noto-cjk       # the browser; without a CJK font Chinese text draws as boxes
    .venv/bin/pip install playwright               # only the Python driver: no `playwright install`, it must not
                                                   # download a browser; /usr/bin/chromium is used

What it does, without touching the notebooks in the repository and without running any cell:

1. copies the working tree's tracked files (and the notebooks asked for) into a temporary folder, as a fresh clone:
   the notebooks are NOT trusted (a fresh, empty Jupyter data folder holds no signatures), unless ``--trust``;
2. starts JupyterLab there on a free port of 127.0.0.1, no token, with its own empty settings, workspace, config and
   data folders (the user's are not read or written), windowing mode "none" (every cell is in the page), news and
   update checks off, autosave off; by default no kernel can start (``--kernel`` lets the notebook's kernel start;
   either way only the stored outputs are shown);
3. opens each notebook headless in Debian's Chromium (through Playwright), waits until every cell is in the page,
   images and fonts are loaded and the page has stopped changing, closes any dialog, then scrolls JupyterLab's
   notebook panel page by page and stitches the pages into one picture of the whole notebook;
4. writes ``docs/screenshots/<notebook name>-<n>.jpg`` (n = 1, 2, ...: a tall notebook is cut between cells into
   parts of at most ``--part-height`` pixels), removing that notebook's older parts first, and prints, per notebook,
   the outputs a learner may find odd (a widget drawn as its text fallback such as ``VBox(children=...``, a
   ``0%|`` progress bar, ``NaN``, an error output, output wider than the page, a code line cut off at the right);
5. rewrites the "last run" block of ``docs/screenshots/README.md`` (date, versions, the list of pictures).

The same inputs give byte-identical pictures (checked: two runs in a row, same md5 for every file).
``--trust`` and ``--kernel`` exist to compare with a trusted notebook or a running kernel (see the README there).

Exit status: 0 when every notebook was captured; 2 when a prerequisite is missing (with what to install); 1 when
the server did not start, a notebook did not render, or a widget output stayed "Loading widget..." (the reason is
printed, the temporary folder with the server log is kept; pictures of the notebooks that did render are written).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "screenshots"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
README_BEGIN = "<!-- screenshots:last-run (written by tools/screenshots.py) -->"
README_END = "<!-- /screenshots:last-run -->"

# JupyterLab user settings for the temporary server (file name -> content).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": False,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/apputils-extension/themes.jupyterlab-settings": {"theme": "JupyterLab Light"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

# Shown in the page before capture: no scrollbars, no cell toolbar over the first cell, no caret, no animations.
CAPTURE_CSS = """
::-webkit-scrollbar { display: none !important; }
* { scrollbar-width: none !important; caret-color: transparent !important;
    animation: none !important; transition: none !important; }
.jp-cell-toolbar { display: none !important; }
.jp-Toolbar { box-shadow: none !important; }
/* no hover effects (heading anchors, fold arrows, row highlights) wherever the mouse happens to be */
.jp-NotebookPanel, .jp-NotebookPanel * { pointer-events: none !important; }
"""

# Finds the notebook panel's scrolling element and the tops of its cells (page-independent, relative to content).
JS_LAYOUT = """
() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const nb = panel.querySelector('.jp-Notebook');
  let scroller = nb;
  for (const el of [panel.querySelector('.jp-WindowedPanel-outer'), nb]) {
    if (el && el.scrollHeight > 0) { scroller = el; break; }
  }
  const r = scroller.getBoundingClientRect();
  const cells = [...nb.querySelectorAll('.jp-Cell')].map(
      c => c.getBoundingClientRect().top - r.top + scroller.scrollTop);
  const all = nb.querySelectorAll('.jp-Cell');
  const end = all.length ? all[all.length - 1].getBoundingClientRect().bottom - r.top + scroller.scrollTop : 0;
  return {x: r.left, y: r.top, width: r.width, height: scroller.clientHeight,
          scrollHeight: scroller.scrollHeight, cells: cells, end: end};
}
"""

# A fingerprint of the rendered notebook: changes while outputs, images, widgets or math are still arriving.
JS_STATE = """
() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const nb = panel.querySelector('.jp-Notebook');
  const imgs = [...nb.querySelectorAll('img')];
  const pendingImgs = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const scroller = panel.querySelector('.jp-WindowedPanel-outer') || nb;
  return {cells: nb.querySelectorAll('.jp-Cell').length,
          outputs: nb.querySelectorAll('.jp-OutputArea-output').length,
          imgs: imgs.length, pendingImgs: pendingImgs,
          height: scroller.scrollHeight, text: nb.innerText.length,
          fonts: document.fonts.status,
          loadingWidgets: (nb.innerText.match(/Loading widget/g) || []).length,
          spinner: !!document.querySelector('#jupyterlab-splash, .jp-Spinner:not(.lm-mod-hidden)')};
}
"""

# What a learner may find odd, per cell (1-based position as JupyterLab shows the cells top to bottom).
JS_FINDINGS = r"""
() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const out = [];
  const checks = [
    [/\b(V?H?Box|HTML|Label|Button|Password|Text|Output|\w+Progress|Dropdown)\((children|value|description|layout|outputs)=/,
     'widget drawn as its text fallback'],
    [/(^|\s)0%\|/m, 'progress bar frozen at 0%'],
    [/\bNaN\b|\bnan\b/, 'NaN in the output'],
    [/Traceback \(most recent call last\)|\b\w+Error:/, 'error or traceback'],
    [/Loading widget|Error displaying widget|Model not found/, 'widget did not draw'],
  ];
  nb.querySelectorAll('.jp-Cell').forEach((cell, i) => {
    const cm = cell.querySelector('.jp-InputArea .cm-scroller');
    if (cm && cm.scrollWidth > cm.clientWidth + 2) {
      const right = cm.getBoundingClientRect().right;
      const lines = [...cell.querySelectorAll('.jp-InputArea .cm-line')].filter(l => {
        const range = document.createRange();
        range.selectNodeContents(l);
        return range.getBoundingClientRect().right > right + 2;
      });
      out.push({cell: i + 1, output: 0, mime: 'code', what: 'code line cut off at the right edge',
                sample: (lines.length ? lines[0].innerText : '').trim().slice(0, 90)});
    }
    cell.querySelectorAll('.jp-OutputArea-output').forEach((o, j) => {
      const text = o.innerText || '';
      const mime = o.getAttribute('data-mime-type') || '';
      for (const [re, what] of checks) {
        const m = text.match(re);
        if (m) {
          const k = Math.max(0, m.index - 20);
          out.push({cell: i + 1, output: j + 1, mime: mime, what: what,
                    sample: text.slice(k, k + 90).replace(/\s+/g, ' ')});
        }
      }
      if (o.classList.contains('jp-OutputArea-executeResult') === false &&
          o.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr') {
        out.push({cell: i + 1, output: j + 1, mime: mime, what: 'stderr stream (red background)',
                  sample: text.slice(0, 90).replace(/\s+/g, ' ')});
      }
      const wide = [o, ...o.querySelectorAll('pre, table, div')].find(
          e => e.scrollWidth > e.clientWidth + 2 && getComputedStyle(e).overflowX !== 'visible');
      if (wide) out.push({cell: i + 1, output: j + 1, mime: mime,
                          what: `wider than the page (${wide.scrollWidth} px in ${wide.clientWidth} px)`,
                          sample: text.slice(0, 60).replace(/\s+/g, ' ')});
    });
  });
  return out;
}
"""


class Failure(Exception):
    """A notebook or the server failed: the message says why."""


def die(code: int, message: str) -> None:
    print(f"screenshots: {message}", file=sys.stderr)
    sys.exit(code)


def check_prerequisites(chromium: str) -> None:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append(f"the Python package playwright:  {sys.executable} -m pip install playwright")
    if not (Path(chromium).is_file() and os.access(chromium, os.X_OK)):
        missing.append(f"Chromium at {chromium}:  apt-get install chromium   (or pass --chromium PATH)")
    for mod, pkg in (("jupyterlab", "jupyterlab"), ("ipywidgets", "ipywidgets"), ("PIL", "pillow")):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"{pkg} in {sys.executable} (run this tool with the project venv: .venv/bin/python)")
    if missing:
        die(2, "missing prerequisites:\n  - " + "\n  - ".join(missing))
    fc = shutil.which("fc-list")
    if fc:
        fonts = subprocess.run([fc, ":lang=zh-tw", "family"], capture_output=True, text=True).stdout
        if not fonts.strip():
            die(2, "no font for Traditional Chinese: Chinese text would draw as boxes.  apt-get install fonts-noto-cjk")


def versions(chromium: str) -> dict[str, str]:
    from importlib.metadata import version

    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "?"

    try:
        chrome = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        chrome = "?"
    return {
        "chromium": chrome,
        "jupyterlab": v("jupyterlab"),
        "ipywidgets": v("ipywidgets"),
        "jupyterlab_widgets": v("jupyterlab_widgets"),
        "playwright": v("playwright"),
    }


def make_clone(tmp: Path, notebooks: list[Path]) -> list[str]:
    """Copy the working tree's tracked files and the notebooks into tmp/clone; return the notebooks' paths there."""
    clone = tmp / "clone"
    clone.mkdir()
    try:
        names = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        names = []
    for raw in names:
        if not raw:
            continue
        rel = raw.decode("utf-8", "surrogateescape")
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            dst = clone / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    rels = []
    for nb in notebooks:
        try:
            rel = nb.resolve().relative_to(REPO).as_posix()
        except ValueError:
            rel = "notebooks/" + nb.name
        dst = clone / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(nb, dst)  # the working tree's content, never written back
        rels.append(rel)
    return rels


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jupyter_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "jupyter-config"),
        ("JUPYTER_DATA_DIR", "jupyter-data"),
        ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
        ("IPYTHONDIR", "ipython"),
    ):
        (tmp / sub).mkdir(exist_ok=True)
        env[var] = str(tmp / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def start_server(tmp: Path, env: dict[str, str], kernel: bool, timeout: float) -> tuple[subprocess.Popen, str, Path]:
    settings = tmp / "lab-user-settings"
    for name, content in LAB_SETTINGS.items():
        f = settings / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content, indent=2), encoding="utf-8")
    (tmp / "lab-workspaces").mkdir()
    conf: dict = {"LabApp": {"news_url": None}}  # no news feed, no request to a website
    if not kernel:
        # No kernel spec is offered, so opening a notebook starts nothing (JupyterLab then shows "No Kernel").
        conf["KernelSpecManager"] = {"allowed_kernelspecs": ["no-kernel-for-screenshots"]}
    for name in ("jupyter_server_config.json", "jupyter_lab_config.json"):
        (Path(env["JUPYTER_CONFIG_DIR"]) / name).write_text(json.dumps(conf), encoding="utf-8")
    port = free_port()
    log = tmp / "jupyterlab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={tmp / 'clone'}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp / 'lab-workspaces'}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp / "clone", env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failure(f"JupyterLab exited with status {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(base + "/api/status", timeout=2) as r:
                if r.status == 200:
                    return proc, base, log
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise Failure(f"JupyterLab did not answer on {base} within {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, n: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def dismiss_dialogs(page) -> list[str]:
    """Close every JupyterLab dialog (kernel choice, errors); return their texts."""
    seen = []
    for _ in range(10):
        dialog = page.locator(".jp-Dialog")
        if dialog.count() == 0:
            break
        text = dialog.first.inner_text().strip().replace("\n", " | ")
        seen.append(text)
        buttons = dialog.first.locator(".jp-Dialog-footer button")
        labels = [b.strip() for b in buttons.all_inner_texts()]
        for wanted in ("No Kernel", "Cancel", "Dismiss", "OK", "Ok", "Close"):
            if wanted in labels:
                buttons.nth(labels.index(wanted)).click()
                break
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    return seen


def fold_left_sidebar(page) -> None:
    """Close the kernel dialog (it comes a moment after the cells), then fold the file browser away."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for d in dismiss_dialogs(page):
            print(f"    closed dialog: {d[:120]}")
        tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if tab.count() == 0:
            return
        with contextlib.suppress(Exception):
            tab.first.click(timeout=2000)
        page.wait_for_timeout(300)
    raise Failure("could not fold the left sidebar (a dialog kept coming back?)")


def wait_rendered(page, n_cells: int, timeout: float, widget_wait: float) -> tuple[dict, str | None]:
    """Wait until the page stops changing with every cell, image and font there; return (state, problem).

    A widget output that still reads "Loading widget..." after widget_wait seconds of an otherwise finished page is
    a problem (returned, so the picture is still taken and shows it); anything else unfinished after timeout fails.
    """
    deadline = time.monotonic() + timeout
    last, stable, state, only_widgets_since = None, 0, None, None
    while time.monotonic() < deadline:
        dialogs = dismiss_dialogs(page)
        for d in dialogs:
            if "error" in d.lower() and "kernel" not in d.lower():
                raise Failure(f"JupyterLab showed an error dialog: {d}")
            print(f"    closed dialog: {d[:120]}")
        state = page.evaluate(JS_STATE)
        settled = (
            state is not None
            and state["cells"] == n_cells
            and state["pendingImgs"] == 0
            and state["fonts"] == "loaded"
            and not state["spinner"]
        )
        key = json.dumps(state, sort_keys=True)
        stable = stable + 1 if (settled and key == last) else 0
        last = key
        if stable >= 4:  # unchanged for 4 looks, 0.5 s apart
            if state["loadingWidgets"] == 0:
                return state, None
            only_widgets_since = only_widgets_since or time.monotonic()
            if time.monotonic() - only_widgets_since > widget_wait:
                n = state["loadingWidgets"]
                return state, f'{n} widget output(s) still show "Loading widget..." after {widget_wait:.0f} s'
        else:
            only_widgets_since = None
        page.wait_for_timeout(500)
    raise Failure(f"the notebook did not finish rendering within {timeout:.0f} s (last state: {state}, "
                  f"{n_cells} cells expected)")  # fmt: skip


def capture(page) -> tuple[object, list[float]]:
    """Scroll the notebook panel page by page; return the stitched picture and the cell tops in it."""
    from PIL import Image

    lay = page.evaluate(JS_LAYOUT)
    width, view_h = int(lay["width"]), int(lay["height"])
    # Stop below the last cell: JupyterLab pads the end of a notebook with empty space to scroll into.
    total = min(int(lay["scrollHeight"]), int(lay["end"]) + 24)
    sheet = Image.new("RGB", (width, total), "white")
    set_scroll = """(y) => {
        const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
        const s = p.querySelector('.jp-WindowedPanel-outer') || p.querySelector('.jp-Notebook');
        s.scrollTop = y; return s.scrollTop; }"""
    margin = 16  # each later page overlaps the one before; its top rows (under the toolbar's edge) are not used
    filled = 0
    while filled < total:
        actual = int(page.evaluate(set_scroll, max(0, filled - margin if filled else 0)))
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        page.wait_for_timeout(150)
        clip = {"x": lay["x"], "y": lay["y"], "width": width, "height": view_h}
        shot = Image.open(io.BytesIO(page.screenshot(clip=clip, animations="disabled", caret="hide")))
        shot = shot.convert("RGB")
        end = min(actual + view_h, total)
        if end <= filled or actual > filled:
            raise Failure(f"the notebook panel did not scroll as asked (at {filled} px of {total} px)")
        sheet.paste(shot.crop((0, filled - actual, width, end - actual)), (0, filled))
        filled = end
    page.evaluate(set_scroll, 0)
    return sheet, lay["cells"]


def cut_points(total: int, cells: list[float], max_h: int) -> list[int]:
    """Where to cut a picture of height total into parts of at most max_h, between cells where possible."""
    tops = sorted(int(c) for c in cells if 0 < c < total)
    cuts, start = [0], 0
    while total - start > max_h:
        limit = start + max_h
        between = [t for t in tops if start + max_h // 3 < t <= limit]
        start = between[-1] if between else limit
        cuts.append(start)
    cuts.append(total)
    return cuts


def git_state() -> str:
    """The commit the pictures were made from, and whether the notebooks differed from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "notebooks"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no git)"
    return f"commit {head}" + (" with uncommitted notebook changes" if dirty else "")


def update_readme(
    out: Path, vers: dict[str, str], written: dict[str, list[Path]], args, seconds: float, source: str
) -> None:
    readme = out / "README.md"
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return
    total = sum(p.stat().st_size for p in out.glob("*.jpg"))
    lines = [
        README_BEGIN,
        "",
        f"- Date: {_dt.date.today().isoformat()}; run time {seconds:.0f} s; notebooks: working tree at {source}",
        f"- {'Trusted' if args.trust else 'Untrusted'} notebooks, {'kernel allowed' if args.kernel else 'no kernel'}",
        f"- {vers['chromium']}; JupyterLab {vers['jupyterlab']}; ipywidgets {vers['ipywidgets']} "
        f"(jupyterlab_widgets {vers['jupyterlab_widgets']}); Playwright {vers['playwright']}",
        f"- Viewport {args.width} px wide, JPEG quality {args.quality}, parts of at most {args.part_height} px; "
        f"all pictures here: {total / 1e6:.1f} MB",
        "",
        "| notebook | pictures | captured in this run |",
        "|---|---|---|",
    ]
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(out.glob("*.jpg")):
        m = re.fullmatch(r"(.+)-(\d+)\.jpg", p.name)
        if m:
            by_stem.setdefault(m.group(1), []).append(p)
    captured = {Path(rel).stem for rel in written}
    for stem, parts in sorted(by_stem.items()):
        parts.sort(key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        links = ", ".join(f"[{p.name}]({urllib.parse.quote(p.name)})" for p in parts)
        lines.append(f"| `{stem}.ipynb` | {links} | {'yes' if stem in captured else 'no (older run)'} |")
    lines += ["", README_END]
    head, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(head + "\n".join(lines) + after, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9][0-9]_*.ipynb")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: docs/screenshots")
    ap.add_argument("--chromium", default=DEFAULT_CHROMIUM, help="default: /usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1200, help="browser window width in px (default 1200)")
    ap.add_argument("--quality", type=int, default=70, help="JPEG quality (default 70)")
    ap.add_argument("--part-height", type=int, default=6000, help="tallest part in px (default 6000)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds one notebook may take to render")
    ap.add_argument("--widget-wait", type=float, default=30, help='seconds a "Loading widget..." may stay')
    ap.add_argument("--trust", action="store_true", help="`jupyter trust` the copies first (not a fresh clone)")
    ap.add_argument("--kernel", action="store_true", help="let JupyterLab start the notebooks' kernel")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary clone and the server log")
    args = ap.parse_args()

    check_prerequisites(args.chromium)
    notebooks = args.notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        die(2, f"no notebooks found in {REPO / 'notebooks'}")
    for nb in notebooks:
        if not nb.is_file():
            die(2, f"no such notebook: {nb}")
    vers = versions(args.chromium)
    print("screenshots: " + "; ".join(f"{k} {v}" for k, v in vers.items()))

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="medgemma-zh-screenshots-"))
    proc = None
    failures: list[str] = []
    written: dict[str, list[Path]] = {}
    source = "(unknown)"
    try:
        source = git_state()
        rels = make_clone(tmp, notebooks)
        env = jupyter_env(tmp)
        if args.trust:
            subprocess.run([sys.executable, "-m", "jupyter", "trust", *rels], cwd=tmp / "clone", env=env, check=True)
        proc, base, log = start_server(tmp, env, args.kernel, timeout=90)
        print(f"screenshots: JupyterLab at {base}, clone in {tmp / 'clone'}")
        args.out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium,
                headless=True,
                args=[
                    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", "--font-render-hinting=none", "--force-color-profile=srgb",
                ],
            )  # fmt: skip
            context = browser.new_context(
                viewport={"width": args.width, "height": 1000},
                device_scale_factor=1,
                locale="zh-TW",
                timezone_id="Asia/Taipei",
                color_scheme="light",
                reduced_motion="reduce",
            )
            for rel in rels:
                stem = Path(rel).stem
                try:  # the copy, as the server shows it
                    n_cells = len(json.loads((tmp / "clone" / rel).read_text(encoding="utf-8"))["cells"])
                except (ValueError, KeyError) as e:
                    failures.append(f"{rel}: not a readable notebook ({e})")
                    print(f"    FAILED: {failures[-1]}", file=sys.stderr)
                    continue
                print(f"screenshots: {rel} ({n_cells} cells)")
                t0 = time.monotonic()
                page = context.new_page()
                page_errors: list[str] = []
                page.on("pageerror", lambda e, errs=page_errors: errs.append(str(e)))
                try:
                    # ?reset: a workspace with only this notebook (not the ones opened before it)
                    url = f"{base}/lab/tree/{urllib.parse.quote(rel)}?reset"
                    page.goto(url, wait_until="load", timeout=args.timeout * 1000)
                    page.add_style_tag(content=CAPTURE_CSS)
                    page.wait_for_selector(
                        ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell", timeout=args.timeout * 1000
                    )
                    # Fold the left sidebar (file browser) so the notebook gets the page's width.
                    fold_left_sidebar(page)
                    page.mouse.move(args.width - 2, 998)  # over the status bar, away from the notebook
                    state, problem = wait_rendered(page, n_cells, args.timeout, args.widget_wait)
                    findings = page.evaluate(JS_FINDINGS)
                    sheet, cells = capture(page)
                except (Failure, PlaywrightError) as e:
                    msg = f"{rel}: {e}".strip()
                    if page_errors:
                        msg += "\n    page errors: " + " | ".join(page_errors[:5])
                    failures.append(msg)
                    print(f"    FAILED: {msg}", file=sys.stderr)
                    page.close()
                    continue
                page.close()
                for old in args.out.glob(f"{glob_escape(stem)}-*.jpg"):
                    if re.fullmatch(re.escape(stem) + r"-\d+\.jpg", old.name):
                        old.unlink()
                cuts = cut_points(sheet.height, cells, args.part_height)
                parts = []
                for k, (a, b) in enumerate(zip(cuts, cuts[1:]), start=1):
                    path = args.out / f"{stem}-{k}.jpg"
                    sheet.crop((0, a, sheet.width, b)).save(path, "JPEG", quality=args.quality, optimize=True)
                    parts.append(path)
                written[rel] = parts
                size = sum(p.stat().st_size for p in parts)
                print(
                    f"    {sheet.width}x{sheet.height} px, {state['outputs']} outputs, {state['imgs']} images -> "
                    f"{len(parts)} part(s), {size / 1e3:.0f} kB, {time.monotonic() - t0:.1f} s"
                )
                if problem:
                    failures.append(f"{rel}: {problem}")
                    print(f"    PROBLEM: {problem}", file=sys.stderr)
                for f in findings:
                    where = f"output {f['output']} [{f['mime']}]" if f["output"] else "input"
                    print(f"    look at: cell {f['cell']} {where}: {f['what']}: {f['sample']!r}")
                for err in page_errors[:5]:
                    print(f"    page error: {err[:200]}")
            browser.close()
    except Failure as e:
        failures.append(str(e))
        print(f"screenshots: {e}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
        if args.keep_tmp or failures:
            print(f"screenshots: temporary clone and server log kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    seconds = time.monotonic() - started
    if written:
        update_readme(args.out, vers, written, args, seconds, source)
    total = sum(p.stat().st_size for p in args.out.glob("*.jpg")) if args.out.is_dir() else 0
    print(f"screenshots: {len(written)} notebook(s) in {args.out}, {total / 1e6:.1f} MB of pictures, {seconds:.0f} s")
    if failures:
        print("screenshots: FAILED:\n  - " + "\n  - ".join(failures), file=sys.stderr)
        return 1
    return 0


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


if __name__ == "__main__":
    sys.exit(main())

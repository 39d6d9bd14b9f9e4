"""Build the static site of the executed notebooks with Jupyter Book 2, offline (``make site``).

    python scripts/build_site.py                  # -> site/_build/html/index.html
    python scripts/build_site.py --out /tmp/site  # -> /tmp/site/html/index.html

**What goes in.** The committed notebooks as they are (never executed here: the site shows the
committed outputs): the chapters ``notebooks/NN_*.ipynb`` in order, each with its exercise solutions
``notebooks/solutions/NN_*.ipynb`` under it when there are any; the reading list
``references/README.md``; and a landing page made from ``site/index.md``, whose ``{{ learning_path }}``
becomes the "Learning path" section of ``notebooks/00_overview.ipynb`` (when it has one) followed by
the ordered list of chapters, and whose ``{{ verdicts }}`` becomes ``notebooks/results/SUMMARY.md``.
They are copied into ``<out>/src``, laid out as in the repository so that every relative link keeps
its meaning; a repository file that one of them links to comes along too (a Markdown file as an
extra page, anything else as a download), so that no link of the site points nowhere.

**How it is built.** ``jupyter-book build --html`` (Jupyter Book 2.1.7 = mystmd 1.11.0, pinned in
``requirements/site.txt``) parses everything into MyST's AST, typesetting the math with KaTeX, and
hands it to the site template. Its default template (book-theme) would be downloaded from GitHub
at build time (``api.mystmd.org/templates/site/myst/book-theme``), which fails offline, so the site
uses the project's own template, ``site/template/`` (template.yml says how it plugs in): render.mjs
writes static pages with relative links and copies KaTeX's CSS and fonts into the site. No page
loads anything from the network.

**What is cached.** Like the AdapterHub side environment (``peft_from_scratch/interop/adapterhub.py``),
both halves install once into ``$PFS_CACHE`` (default ``~/.cache/peft_from_scratch``), in folders
whose names hash what they install, built under a temporary name and renamed when complete:
``jupyter-book-<hash>`` (``pip install --no-deps --target`` of requirements/site.txt) and
``site-node-<hash>`` (``npm ci`` of site/template/package-lock.json). Only the first build needs the
registries (PyPI, npm); after that it runs with no network at all.

The build writes ``<out>/html/_render.json`` (the pages written and any link that resolved nowhere)
and prints mystmd's warnings; ``--strict`` makes a warning or an unresolved link an error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "site"
TEMPLATE = SITE / "template"
TEMPLATE_FILES = ["template.yml", "render.mjs", "site.css", "package.json", "package-lock.json"]
REQUIREMENTS = REPO / "requirements" / "site.txt"
TITLE = "peft-from-scratch"


class SiteError(RuntimeError):
    """The site could not be built."""


class NoNetwork(SiteError):
    """A side install is not cached yet and its registry (PyPI or npm) cannot be reached."""


def reachable(url: str, timeout: float = 10.0) -> bool:
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:   # an answer, even an error page, means the network works
        return True
    except OSError:
        return False


def _offline_check(error: SiteError, registry: str, url: str) -> None:
    if not reachable(url):
        raise NoNetwork(f"no network: {registry} is unreachable, so the site's side install cannot be made "
                        f"(it is cached in {cache_dir()} after the first build)") from error


def cache_dir() -> Path:
    """``$PFS_CACHE`` or ``~/.cache/peft_from_scratch`` (as ``peft_from_scratch.models.cache_dir``,
    without importing torch)."""
    return Path(os.environ.get("PFS_CACHE", Path.home() / ".cache" / "peft_from_scratch"))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _cached(name: str, install) -> Path:
    """``cache_dir()/name``, made by ``install(tmp)`` in a temporary folder renamed when complete."""
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".tmp.", dir=target.parent))
    try:
        install(tmp)
        try:
            tmp.rename(target)   # atomic: other builds see no folder or a complete one
        except OSError:
            pass                 # another build renamed its copy first; ours is removed below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SiteError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                        f"{proc.stdout[-3000:]}{proc.stderr[-4000:]}")
    return proc


# ----------------------------------------------------------------------------- the two side installs

def requirement_lines() -> list[str]:
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def jupyter_book_env() -> Path:
    """The cached folder holding requirements/site.txt (Jupyter Book 2), installed on first use."""
    pins = requirement_lines()
    key = _digest(*pins, sys.version.split()[0])
    try:
        return _cached(f"jupyter-book-{key}", lambda tmp: _run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:", "--no-compile",
             "--disable-pip-version-check", "--quiet", "--timeout", "30", "--target", str(tmp), *pins],
            f"pip install of {REQUIREMENTS.relative_to(REPO)} (needs PyPI the first time)"))
    except NoNetwork:
        raise
    except SiteError as e:
        _offline_check(e, "PyPI", "https://pypi.org/simple/jupyter-book/")
        raise


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        raise SiteError("node is not on PATH: the site needs Node.js 18, 20 or 22+ (Debian: apt-get install nodejs npm)")
    return _run([node, "--version"], "node --version").stdout.strip()


def node_env() -> Path:
    """The cached ``node_modules`` of site/template/package-lock.json, installed with ``npm ci`` on first use."""
    npm = shutil.which("npm")
    if npm is None:
        raise SiteError("npm is not on PATH: the site template's packages install with npm (Debian: apt-get install npm)")
    manifest = [(TEMPLATE / f).read_text() for f in ("package.json", "package-lock.json")]
    key = _digest(*manifest, node_version().split(".")[0])

    def install(tmp: Path) -> None:
        for f in ("package.json", "package-lock.json"):
            shutil.copy2(TEMPLATE / f, tmp / f)
        _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
             "npm ci of site/template/package-lock.json (needs the npm registry the first time)", cwd=tmp)
    try:
        return _cached(f"site-node-{key}", install) / "node_modules"
    except SiteError as e:
        _offline_check(e, "the npm registry", "https://registry.npmjs.org/katex")
        raise


# ----------------------------------------------------------------------------- the sources

def chapters() -> list[tuple[Path, list[Path]]]:
    """``notebooks/NN_*.ipynb`` in order, each with its ``notebooks/solutions/NN_*.ipynb``."""
    out = []
    for nb in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        solutions = sorted((REPO / "notebooks" / "solutions").glob(f"{nb.name[:2]}_*.ipynb"))
        out.append((nb, solutions))
    return out


def notebook_title(path: Path) -> str:
    """The notebook's first Markdown heading (what mystmd takes as the page title), else its name."""
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            m = re.search(r"^#\s+(.+)$", "".join(cell.get("source", "")), re.M)
            if m:
                return m.group(1).strip()
    return path.stem


LINK = re.compile(r"(\]\()(<[^>]*>|[^)\s]*)((?:\s+\"[^\"]*\")?\))")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def local_target(target: str) -> str | None:
    target = target.strip("<>")
    if not target or target.startswith(("#", "/")) or SCHEME.match(target):
        return None
    return target


def rebase(text: str, src_dir: Path, dst_dir: Path) -> str:
    """Markdown ``text`` written in repository folder ``src_dir``, its relative links rewritten for a
    file in ``dst_dir`` (both relative to the repository root, which the staging tree mirrors)."""
    def fix(m: re.Match) -> str:
        target = local_target(m.group(2))
        if target is None:
            return m.group(0)
        path, _, anchor = target.partition("#")
        moved = os.path.relpath(os.path.normpath(src_dir / path), dst_dir) if path else ""
        return f"{m.group(1)}{moved}{'#' + anchor if anchor else ''}{m.group(3)}"
    return LINK.sub(fix, text)


def demote(markdown: str, levels: int) -> str:
    """Every ATX heading ``levels`` deeper (at most ######), code fences left alone."""
    out, fence = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6})(\s.*)$", line)
        out.append(f"{'#' * min(len(m.group(1)) + levels, 6)}{m.group(2)}" if m else line)
    return "\n".join(out)


def _cell_markdown(cell: dict) -> str:
    """A cell as Markdown: a Markdown cell's source; a code cell's Markdown, HTML and printed outputs
    (its code is left out: the landing page shows what the cell computed, e.g. the learning-path table)."""
    if cell.get("cell_type") == "markdown":
        return "".join(cell.get("source", ""))
    if cell.get("cell_type") != "code":
        return ""
    parts = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "text/markdown" in data:
            parts.append("".join(data["text/markdown"]))
        elif "text/html" in data:
            parts.append("".join(data["text/html"]))
        elif out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append("```text\n" + "".join(out.get("text", "")).rstrip("\n") + "\n```")
    return "\n\n".join(parts)


def learning_path_section(overview: Path) -> str | None:
    """What 00_overview has under its heading that names the learning path, to the next heading of the
    same or a higher level: Markdown cells and code cells' outputs (``_cell_markdown``), headings below
    it re-levelled under the landing page's h2; or None."""
    if not overview.exists():
        return None
    nb = json.loads(overview.read_text())
    lines = "\n\n".join(_cell_markdown(c) for c in nb.get("cells", [])).splitlines()
    start = level = None
    fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and start is None and re.search(r"learning path", m.group(2), re.I):
            start, level = i + 1, len(m.group(1))
        elif m and start is not None and len(m.group(1)) <= level:
            return demote("\n".join(lines[start:i]).strip(), 2 - level) or None
    if start is None:
        return None
    return demote("\n".join(lines[start:]).strip(), 2 - level) or None


def chapter_list(found: list[tuple[Path, list[Path]]]) -> str:
    items = []
    for nb, solutions in found:
        line = f"1. [{notebook_title(nb)}](notebooks/{nb.name})"
        if solutions:
            line += " · " + ", ".join(f"[{'solutions' if len(solutions) == 1 else s.stem}](notebooks/solutions/{s.name})"
                                      for s in solutions)
        items.append(line)
    return "\n".join(items)


def landing(found: list[tuple[Path, list[Path]]]) -> tuple[str, bool]:
    """The landing page's Markdown, and whether 00_overview supplied a learning-path section."""
    template = (SITE / "index.md").read_text()
    path = learning_path_section(REPO / "notebooks" / "00_overview.ipynb")
    learning = "The chapters, in the order to read them:\n\n" + chapter_list(found)
    if path:
        learning = rebase(path, Path("notebooks"), Path(".")) + "\n\n" + learning
    summary_file = REPO / "notebooks" / "results" / "SUMMARY.md"
    if summary_file.exists():
        summary = summary_file.read_text()
        summary = re.sub(r"\A\s*#\s+[^\n]*\n", "", summary)   # its title: the section has one
        # SUMMARY.md is data a script wrote (model answers, metrics): a "$" in it is a dollar sign, not
        # math ("Carmen has $100 - 25 = $200" would otherwise be typeset, and fail, as TeX)
        summary = re.sub(r"(?<!\\)\$", r"\\$", summary)
        verdicts = demote(rebase(summary, Path("notebooks/results"), Path(".")), 1)
    else:
        verdicts = "*`notebooks/results/SUMMARY.md` is missing: run `make notebooks`.*"
    text = rebase(template, Path("site"), Path("."))
    return text.replace("{{ learning_path }}", learning).replace("{{ verdicts }}", verdicts), path is not None


def markdown_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        return "\n\n".join("".join(c.get("source", "")) for c in nb.get("cells", []) if c.get("cell_type") == "markdown")
    return path.read_text()


def stage(src: Path) -> dict:
    """Lay the site's sources out in ``src`` (mirroring the repository) and write its myst.yml."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    found = chapters()
    if not found:
        raise SiteError("no notebooks/NN_*.ipynb found")
    staged: set[Path] = set()   # relative to the repository root

    def copy(rel: Path) -> None:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
        staged.add(rel)

    toc = [{"file": "index.md"}]
    for nb, solutions in found:
        copy(nb.relative_to(REPO))
        entry = {"file": str(nb.relative_to(REPO))}
        for s in solutions:
            copy(s.relative_to(REPO))
        if solutions:
            entry["children"] = [{"file": str(s.relative_to(REPO))} for s in solutions]
        toc.append(entry)
    reading = Path("references/README.md")
    if (REPO / reading).exists():
        copy(reading)
        toc.append({"file": str(reading)})
    text, has_path = landing(found)
    (src / "index.md").write_text(text)

    # the repository files the pages link to: Markdown as extra pages, anything else as a download
    extra_pages, downloads, missing = [], [], []
    sources = [(Path("."), text)] + [(rel.parent, markdown_of(REPO / rel)) for rel in sorted(staged)]
    for folder, markdown in sources:
        for m in LINK.finditer(markdown):
            target = local_target(m.group(2))
            if target is None or not target.partition("#")[0]:
                continue
            rel = Path(os.path.normpath(folder / target.partition("#")[0]))
            if rel in staged or rel.as_posix().startswith("../"):
                continue
            if (REPO / rel).is_file():
                copy(rel)
                (extra_pages if rel.suffix == ".md" else downloads).append(str(rel))
            else:
                missing.append(f"{folder / target} (in {folder})")
    if extra_pages:
        toc.append({"title": "More from the repository", "children": [{"file": f} for f in extra_pages]})

    template = src / "_template"
    template.mkdir()
    for f in TEMPLATE_FILES:
        shutil.copy2(TEMPLATE / f, template / f)
    (template / "node_modules").symlink_to(node_env(), target_is_directory=True)
    config = {"version": 1,
              "project": {"title": TITLE, "toc": toc},
              "site": {"title": TITLE, "template": "./_template"}}
    # JSON is YAML: no YAML writer needed
    (src / "myst.yml").write_text(json.dumps(config, indent=2) + "\n")
    return {"chapters": len(found), "solutions": sum(len(s) for _, s in found), "learning_path_from_overview": has_path,
            "extra_pages": extra_pages, "downloads": downloads, "missing_link_targets": missing}


# ----------------------------------------------------------------------------- the build

def build(out: Path, strict: bool = False, quiet: bool = False) -> dict:
    """Build the site into ``out/html`` (sources staged in ``out/src``); a summary dict."""
    t0 = time.time()
    out = out.resolve()
    jb = jupyter_book_env()
    src = out / "src"
    info = stage(src)
    env = {k: v for k, v in os.environ.items() if k not in ("BASE_URL", "READTHEDOCS", "READTHEDOCS_CANONICAL_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(jb), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HOST", "localhost")
    proc = subprocess.run([sys.executable, "-m", "jupyter_book", "build", "--html"],
                          cwd=src, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / "build.log").write_text(log)
    html = src / "_build" / "html"
    report = html / "_render.json"
    if proc.returncode != 0 or not report.exists():
        raise SiteError(f"jupyter-book build --html failed (exit {proc.returncode}; log in {out / 'build.log'}):\n{log[-6000:]}")
    final = out / "html"
    if final.exists():
        shutil.rmtree(final)
    shutil.move(str(html), str(final))
    rendered = json.loads((final / "_render.json").read_text())
    warnings = [line.strip() for line in log.splitlines() if "⚠" in line or "⛔" in line or re.search(r"\berror\b", line, re.I)]
    info.update(pages=len(rendered["pages"]), unresolved=rendered["unresolved"], warnings=warnings,
                index=str(final / "index.html"), seconds=round(time.time() - t0, 1))
    problems = warnings + [f"unresolved link on {u['page']}: {u['url']}" for u in rendered["unresolved"]] + \
        [f"link to a missing file: {m}" for m in info["missing_link_targets"]]
    if not quiet:
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        print(f"site: {info['pages']} pages ({info['chapters']} chapters, {info['solutions']} solutions) "
              f"in {info['seconds']} s -> {info['index']}")
    if strict and problems:
        raise SiteError(f"{len(problems)} warning(s) with --strict:\n" + "\n".join(problems))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SITE / "_build", help="build folder (default site/_build); the site is OUT/html")
    ap.add_argument("--strict", action="store_true", help="fail on any mystmd warning or unresolved link")
    args = ap.parse_args(argv)
    try:
        build(args.out, strict=args.strict)
    except SiteError as e:
        print(f"build_site: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

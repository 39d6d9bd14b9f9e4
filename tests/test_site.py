"""The static site (``make site``, scripts/build_site.py): built once, offline, then read as a browser would.

One test builds the site into a temporary folder (about 15 s once the cached side installs exist; the
first build installs Jupyter Book 2 from PyPI and the template's node packages from npm) and checks
what a reader depends on:

* every chapter ``notebooks/NN_*.ipynb`` and every solutions notebook has a page, titled as the notebook;
* the landing page has the learning path (a link to every chapter, in order), the verdict table (every
  table of notebooks/results/SUMMARY.md) and a link to the reading list, whose page exists;
* every link and every asset (href, src, CSS url()) of every page resolves to a file of the site,
  and every ``#anchor`` to an id on its page; no link was left unresolved by the renderer;
* the math is typeset by KaTeX at build time (no raw ``$...$`` TeX left in any page, no KaTeX error) and
  its stylesheet and fonts are served from the site: no URL in any HTML/JS/CSS file points at a CDN.

One test rather than several: under ``pytest -n 2`` several tests would let both workers build it.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.site

CDN = re.compile(r"https?://[^\s\"'<>)]*(cdn|jsdelivr|unpkg|mathjax|katex|googleapis|gstatic)[^\s\"'<>)]*", re.I)
VOID = ("img", "br", "hr", "input", "meta", "link", "source", "wbr", "col", "area")
# TeX as dollarmath would read it (no space inside either dollar) holding a TeX character: left raw
RAW_TEX = re.compile(r"\$\$?(?=\S)[^$\n]*[\\^_{}][^$\n]*(?<=\S)\$\$?")


def build_site_module():
    spec = importlib.util.spec_from_file_location("build_site", REPO / "scripts" / "build_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Page(HTMLParser):
    """The links, ids, h1/h2 sections, tables and visible text (outside code and KaTeX) of one page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []     # (attribute, value)
        self.ids: set[str] = set()
        self.h1 = ""
        self.sections: dict[str, dict] = {}        # h2 text -> {"links": [...], "tables": n}
        self.text: list[str] = []
        self.katex_errors = 0
        self._stack: list[tuple[str, bool]] = []   # open tags, and whether inside code/pre/script/style/KaTeX
        self._heading: str | None = None
        self._heading_text: list[str] = []
        self._section: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append((key, a[key]))
                if self._section is not None and tag == "a":
                    self._section["links"].append(a[key])
        classes = (a.get("class") or "").split()
        if "katex-error" in classes:
            self.katex_errors += 1
        if tag in ("h1", "h2"):
            self._heading, self._heading_text = tag, []
        if tag == "table" and self._section is not None:
            self._section["tables"] += 1
        if tag in VOID:
            return
        inside = bool(self._stack) and self._stack[-1][1]
        self._stack.append((tag, inside or tag in ("code", "pre", "script", "style") or "katex" in classes))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if tag == "article":
            self._section = None                   # the pager and the page's TOC belong to no section
        if any(t == tag for t, _ in self._stack):
            while self._stack and self._stack.pop()[0] != tag:
                pass
        if tag == self._heading:
            title = "".join(self._heading_text).strip().rstrip("#").strip()
            if tag == "h1" and not self.h1:
                self.h1 = title
            elif tag == "h2":
                self._section = self.sections.setdefault(title, {"links": [], "tables": 0})
            self._heading = None

    def handle_data(self, data):
        if self._heading:
            self._heading_text.append(data)
        if not (self._stack and self._stack[-1][1]):
            self.text.append(data)


def markdown_tables(markdown: str) -> int:
    return len(re.findall(r"^\|.*\|\s*\n\|[\s:|-]*-[\s:|-]*\|\s*$", markdown, re.M))


def test_site(tmp_path):
    bs = build_site_module()
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to build the site (Debian: apt-get install nodejs npm)")
    t0 = time.time()
    try:
        info = bs.build(tmp_path, quiet=True)
    except bs.NoNetwork as e:
        pytest.skip(str(e))
    seconds = time.time() - t0
    html = tmp_path / "html"
    rendered = json.loads((html / "_render.json").read_text())
    by_source = {p["source"].lstrip("/"): p for p in rendered["pages"]}
    pages = {f.name: Page(f.read_text()) for f in html.glob("*.html")}
    problems: list[str] = []

    # 1. a page for every notebook, titled as the notebook
    found = bs.chapters()
    notebooks = [nb for nb, sols in found for nb in [nb, *sols]]
    assert len(found) >= 10, [nb.name for nb, _ in found]
    for nb in notebooks:
        rel = nb.relative_to(REPO).as_posix()
        page = by_source.get(rel)
        if page is None:
            problems.append(f"no page for {rel}")
            continue
        if page["file"] not in pages:
            problems.append(f"{rel}: its page {page['file']} was not written")
        elif pages[page["file"]].h1 != bs.notebook_title(nb):
            problems.append(f"{page['file']}: title {pages[page['file']].h1!r}, notebook's {bs.notebook_title(nb)!r}")

    # 2. the landing page: learning path, verdict table, reading list
    landing = pages["index.html"]
    path = landing.sections.get("Learning path")
    if path is None:
        problems.append(f"landing page has no 'Learning path' section: {list(landing.sections)}")
    else:
        chapter_files = [by_source[nb.relative_to(REPO).as_posix()]["file"] for nb, _ in found
                         if nb.relative_to(REPO).as_posix() in by_source]
        linked = [link.split("#")[0] for link in path["links"]]
        in_order = [f for f in linked if f in chapter_files]
        if sorted(set(in_order), key=in_order.index) != chapter_files:
            problems.append(f"learning path links {in_order}, chapters are {chapter_files}")
    verdicts = landing.sections.get("Verdicts")
    summary = REPO / "notebooks" / "results" / "SUMMARY.md"
    want = markdown_tables(summary.read_text()) if summary.exists() else 0
    if verdicts is None or verdicts["tables"] < max(want, 1):
        problems.append(f"landing page's Verdicts section has {verdicts and verdicts['tables']} tables, SUMMARY.md {want}")
    reading = by_source.get("references/README.md")
    if reading is None or reading["file"] not in pages or pages[reading["file"]].h1 != "Reading list":
        problems.append(f"no reading-list page titled 'Reading list': {reading}")
    elif not any(link.split("#")[0] == reading["file"] for link in landing.sections.get("Reading list", {}).get("links", [])):
        problems.append("the landing page's Reading list section does not link to the reading list")

    # 3. every link and asset resolves (relative links only: the site links nothing else internally)
    problems += [f"unresolved link on {u['page']}: {u['url']}" for u in rendered["unresolved"]]
    for name, page in pages.items():
        for attr, url in page.links:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https", "mailto", "data"):
                if attr == "src" and parts.scheme != "data":
                    problems.append(f"{name}: remote asset {url}")
                continue
            if url.startswith("/") or parts.scheme:
                problems.append(f"{name}: non-relative link {url}")
                continue
            target = name if not parts.path else unquote(parts.path)
            if not (html / target).is_file():
                problems.append(f"{name}: {attr}={url} -> no file {target}")
            elif parts.fragment and target.endswith(".html") and unquote(parts.fragment) not in pages[target].ids:
                problems.append(f"{name}: {url} -> no id {parts.fragment!r} on {target}")
    for css in html.rglob("*.css"):
        for url in re.findall(r"url\(([^)]+)\)", css.read_text()):
            url = url.strip("'\"")
            if not url.startswith("data:") and not (css.parent / url.split("?")[0].split("#")[0]).is_file():
                problems.append(f"{css.relative_to(html)}: url({url}) not in the site")

    # 4. math typeset offline, nothing from a CDN
    for f in [*html.rglob("*.html"), *html.rglob("*.js"), *html.rglob("*.css")]:
        for m in CDN.finditer(f.read_text(errors="replace")):
            problems.append(f"{f.relative_to(html)}: CDN URL {m.group(0)}")
    for name, page in pages.items():
        raw = RAW_TEX.findall("".join(page.text))
        if raw:
            problems.append(f"{name}: raw TeX left untypeset: {raw[:3]}")
        if page.katex_errors:
            problems.append(f"{name}: {page.katex_errors} formula(s) KaTeX could not typeset")
    lora = by_source.get("notebooks/02_lora.ipynb")
    if lora and (html / lora["file"]).read_text().count('class="katex"') < 5:
        problems.append("02_lora's page has fewer than 5 typeset formulas")
    assert (html / "assets" / "katex" / "katex.min.css").is_file()
    assert list((html / "assets" / "katex" / "fonts").glob("KaTeX_Main-Regular.woff2"))

    assert not problems, f"{len(problems)} problem(s) in the site built in {seconds:.0f} s:\n" + "\n".join(problems[:60])

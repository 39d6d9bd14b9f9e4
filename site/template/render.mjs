// Renders the MyST content that `jupyter-book build --html` serves to static HTML (see template.yml).
//
//   CONTENT_CDN=http://localhost:3100 BUILD_DIRECTORY=_build/html node render.mjs
//
// Reads config.json (the projects, their pages and TOC) and content/<slug>.json (each page's MyST
// AST: mdast with the notebook cells as blocks, math already typeset by mystmd's KaTeX, notebook
// outputs as nbformat data) from the content server, and writes
//   index.html, <slug>.html          one page per TOC entry, every link relative
//   build/<file>                     images, downloads and the .ipynb of each notebook
//   assets/katex/, assets/*.css      KaTeX's CSS and fonts, the highlight.js theme, site.css
//   _render.json                     what was written and every link that could not be resolved
// Markdown outputs (verdict tables, paper cards) are parsed with myst-parser and their math typeset
// with the same KaTeX version (0.15.6) that mystmd bundles, so they look like the cells' math.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import katex from 'katex';
import hljs from 'highlight.js';
import { mystParse } from 'myst-parser';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CDN = (process.env.CONTENT_CDN || '').replace(/\/$/, '');
const OUT = process.env.BUILD_DIRECTORY;
if (!CDN || !OUT) {
  console.error('render.mjs: CONTENT_CDN and BUILD_DIRECTORY must be set (jupyter-book build --html sets them)');
  process.exit(2);
}

// ------------------------------------------------------------------ helpers

const esc = (s) => String(s ?? '').replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const attr = (s) => esc(s).replace(/"/g, '&quot;');

async function get(url, kind = 'json') {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${resp.status} for ${url}`);
  if (kind === 'json') return resp.json();
  if (kind === 'text') return resp.text();
  return Buffer.from(await resp.arrayBuffer());
}

const ANSI = /\x1b\[[0-9;?]*[ -\/]*[@-~]/g;
/** Terminal text as a reader saw it: colour codes dropped, each "\r"-rewritten line at its last state. */
function terminal(text) {
  return String(text ?? '').replace(ANSI, '').split('\n')
    .map((line) => { const parts = line.split('\r').filter((p) => p !== ''); return parts.length ? parts[parts.length - 1] : ''; })
    .join('\n');
}

const plain = (node) => node.value ?? (node.children || []).map(plain).join('');

// ------------------------------------------------------------------ the site

const config = await get(`${CDN}/config.json`);
const project = config.projects?.[0];
if (!project) throw new Error('config.json has no project');
const siteTitle = project.title || config.title || 'site';
const order = [{ slug: project.index, title: null, level: 0, index: true },
               ...project.pages.filter((p) => p.slug)];
const fileOf = (slug) => (slug === project.index ? 'index.html' : `${slug}.html`);
const pages = new Map(order.map((p) => [p.slug, p]));

const unresolved = [];
const assets = new Map();   // content-server path -> site path (relative)
fs.mkdirSync(path.join(OUT, 'build'), { recursive: true });

/** Copy a file the content server has (an image, a download) into build/; its relative URL. */
async function asset(serverPath) {
  const clean = serverPath.split(/[?#]/)[0];
  if (!assets.has(clean)) {
    const name = path.basename(decodeURIComponent(clean));
    const data = await get(`${CDN}/${clean.replace(/^\/+/, '')}`, 'binary');
    fs.writeFileSync(path.join(OUT, 'build', name), data);
    assets.set(clean, `build/${encodeURIComponent(name)}`);
  }
  return assets.get(clean);
}

/** Where a link of the AST points in the static site, or null (recorded) when it points nowhere. */
async function href(url, ctx, text) {
  if (!url) return null;
  if (/^(https?:|mailto:|data:)/i.test(url)) return url;
  if (url.startsWith('#')) return url;
  const [pathPart, hash = ''] = url.split('#');
  const anchor = hash ? `#${hash}` : '';
  if (pathPart.startsWith('/')) {
    const slug = pathPart.replace(/^\/+/, '').replace(/\.json$/, '').replace(/\/$/, '');
    if (slug === '' || pages.has(slug)) return fileOf(slug || project.index) + anchor;
    try { return (await asset(pathPart)) + anchor; } catch (e) { /* falls through: recorded below */ }
  } else {
    // a relative link mystmd did not resolve (e.g. in a notebook's Markdown output): match a page by file name
    const base = path.basename(pathPart).replace(/\.(ipynb|md)$/, '');
    const hit = order.find((p) => p.file === base);
    if (hit) return fileOf(hit.slug) + anchor;
  }
  unresolved.push({ page: ctx.slug, url, text: String(text ?? '').slice(0, 80) });
  return null;
}

// ------------------------------------------------------------------ mdast -> HTML

function mathHtml(node, display) {
  if (node.html) return node.html;
  return katex.renderToString(node.value ?? '', { displayMode: display, throwOnError: false, output: 'htmlAndMathml' });
}

function highlight(code, lang) {
  const language = (lang || '').toLowerCase();
  if (language && hljs.getLanguage(language)) {
    return `<code class="hljs language-${attr(language)}">${hljs.highlight(code, { language, ignoreIllegals: true }).value}</code>`;
  }
  return `<code class="hljs">${esc(code)}</code>`;
}

async function children(node, ctx) {
  const parts = [];
  for (const child of node.children || []) parts.push(await render(child, ctx));
  return parts.join('');
}

const idAttr = (node) => (node.html_id || node.identifier ? ` id="${attr(node.html_id || node.identifier)}"` : '');

async function render(node, ctx) {
  if (!node) return '';
  if (node.visibility === 'remove') return '';
  if (node.visibility === 'hide' && !ctx.inHidden) {
    const inner = await render({ ...node, visibility: 'show' }, { ...ctx, inHidden: true });
    const what = node.type === 'code' ? 'code' : node.type === 'outputs' ? 'output' : 'cell';
    return `<details class="hidden-${what}"><summary>Show ${what}</summary>${inner}</details>`;
  }
  const kids = () => children(node, ctx);
  switch (node.type) {
    case 'root': return kids();
    case 'block': {
      const kind = node.kind === 'notebook-code' ? 'cell code-cell' : node.kind === 'notebook-content' ? 'cell md-cell' : 'block';
      return `<div class="${kind}"${idAttr(node)}>${await kids()}</div>`;
    }
    case 'text': return esc(node.value);
    case 'paragraph': return `<p>${await kids()}</p>`;
    case 'heading': {
      const d = Math.min(Math.max(node.depth || 1, 1), 6);
      const id = node.html_id || node.identifier;
      if (d >= 2 && d <= 3 && ctx.toc && id) ctx.toc.push({ depth: d, id, text: plain(node) });
      const anchor = id ? `<a class="anchor" href="#${attr(id)}" aria-label="link to this section">#</a>` : '';
      return `<h${d}${idAttr(node)}>${await kids()}${anchor}</h${d}>`;
    }
    case 'emphasis': return `<em>${await kids()}</em>`;
    case 'strong': return `<strong>${await kids()}</strong>`;
    case 'underline': return `<u>${await kids()}</u>`;
    case 'delete': return `<del>${await kids()}</del>`;
    case 'subscript': return `<sub>${await kids()}</sub>`;
    case 'superscript': return `<sup>${await kids()}</sup>`;
    case 'smallcaps': return `<span class="smallcaps">${await kids()}</span>`;
    case 'keyboard': return `<kbd>${await kids()}</kbd>`;
    case 'abbreviation': return `<abbr title="${attr(node.title)}">${await kids()}</abbr>`;
    case 'inlineCode': return `<code>${esc(node.value)}</code>`;
    case 'break': return '<br>';
    case 'thematicBreak': return '<hr>';
    case 'blockquote': return `<blockquote>${await kids()}</blockquote>`;
    case 'html': return node.value || '';
    case 'comment': return '';
    case 'inlineMath': return mathHtml(node, false);
    case 'math': {
      const number = node.enumerator ? `<span class="eq-number">(${esc(node.enumerator)})</span>` : '';
      return `<div class="math-block"${idAttr(node)}>${mathHtml(node, true)}${number}</div>`;
    }
    case 'code': return `<pre class="${node.executable ? 'input' : 'code'}">${highlight(node.value || '', node.lang)}</pre>`;
    case 'list': {
      const tag = node.ordered ? 'ol' : 'ul';
      const start = node.ordered && node.start && node.start !== 1 ? ` start="${attr(node.start)}"` : '';
      return `<${tag}${start}>${await kids()}</${tag}>`;
    }
    case 'listItem': {
      const check = typeof node.checked === 'boolean' ? `<input type="checkbox" disabled${node.checked ? ' checked' : ''}> ` : '';
      // a tight list item's paragraphs render inline, as in CommonMark
      const inner = node.spread ? await kids()
        : (await Promise.all((node.children || []).map((c) => (c.type === 'paragraph' ? children(c, ctx) : render(c, ctx))))).join('');
      return `<li>${check}${inner}</li>`;
    }
    case 'table': return `<div class="table-wrap"><table${idAttr(node)}>${await kids()}</table></div>`;
    case 'tableRow': return `<tr>${await kids()}</tr>`;
    case 'tableCell': {
      const tag = node.header ? 'th' : 'td';
      const align = node.align ? ` style="text-align:${attr(node.align)}"` : '';
      const span = (node.colspan ? ` colspan="${attr(node.colspan)}"` : '') + (node.rowspan ? ` rowspan="${attr(node.rowspan)}"` : '');
      return `<${tag}${align}${span}>${await kids()}</${tag}>`;
    }
    case 'link': {
      const inner = await kids();
      const target = await href(node.url, ctx, plain(node));
      if (target === null) return `<span class="unresolved-link" title="${attr(node.url)}">${inner}</span>`;
      const external = /^https?:/i.test(target) ? ' rel="noopener"' : '';
      return `<a href="${attr(target)}"${external}>${inner || esc(node.url)}</a>`;
    }
    case 'crossReference': {
      const id = node.html_id || node.identifier;
      const url = node.url ? `${node.url}${id && !node.url.includes('#') ? `#${id}` : ''}` : `#${id}`;
      const inner = (await kids()) || esc(node.label || id);
      const target = await href(url, ctx, plain(node));
      if (target === null) return `<span class="unresolved-link">${inner}</span>`;
      return `<a class="xref" href="${attr(target)}">${inner}</a>`;
    }
    case 'cite': return `<span class="cite">${(await kids()) || esc(node.label)}</span>`;
    case 'citeGroup': return `<span class="cite-group">${await kids()}</span>`;
    case 'footnoteReference': {
      const id = node.identifier || node.label;
      return `<sup class="footnote-ref"><a href="#fn-${attr(id)}">${esc(node.enumerator || node.label)}</a></sup>`;
    }
    case 'footnoteDefinition': {
      const id = node.identifier || node.label;
      return `<div class="footnote" id="fn-${attr(id)}"><span class="footnote-label">${esc(node.enumerator || node.label)}.</span> ${await kids()}</div>`;
    }
    case 'image': {
      const src = await href(node.urlOptimized || node.url, ctx, node.alt);
      if (src === null) return `<span class="unresolved-link">[image: ${esc(node.alt || node.url)}]</span>`;
      const width = node.width ? ` style="width:${attr(node.width)}"` : '';
      return `<img src="${attr(src)}" alt="${attr(node.alt || '')}"${width}${idAttr(node)}>`;
    }
    case 'container': {
      const tag = node.kind === 'figure' ? 'figure' : 'div';
      return `<${tag} class="container ${attr(node.kind || '')}"${idAttr(node)}>${await kids()}</${tag}>`;
    }
    case 'caption': return `<figcaption>${await kids()}</figcaption>`;
    case 'legend': return `<div class="legend">${await kids()}</div>`;
    case 'admonition': {
      const kind = node.kind || 'note';
      return `<aside class="admonition ${attr(kind)}">${await kids()}</aside>`;
    }
    case 'admonitionTitle': return `<p class="admonition-title">${await kids()}</p>`;
    case 'definitionList': return `<dl>${await kids()}</dl>`;
    case 'definitionTerm': return `<dt>${await kids()}</dt>`;
    case 'definitionDescription': return `<dd>${await kids()}</dd>`;
    case 'mystTarget': return `<span id="${attr(node.label)}"></span>`;
    case 'outputs': {
      // consecutive stream outputs of one stream are one text, as Jupyter shows them: a progress bar
      // that rewrites its line with "\r" across several outputs ends as its last state
      const merged = [];
      for (const child of node.children || []) {
        const jd = child.jupyter_data || {};
        const prev = merged[merged.length - 1]?.jupyter_data;
        const text = (t) => (Array.isArray(t) ? t.join('') : String(t ?? ''));
        if (jd.output_type === 'stream' && prev?.output_type === 'stream' && prev.name === jd.name) {
          prev.text = text(prev.text) + text(jd.text);
        } else {
          merged.push(jd.output_type === 'stream' ? { ...child, jupyter_data: { ...jd } } : child);
        }
      }
      const inner = await children({ ...node, children: merged }, ctx);
      return inner ? `<div class="outputs">${inner}</div>` : '';
    }
    case 'output': return output(node, ctx);
    case 'iframe': return `<iframe src="${attr(node.src)}" width="100%" height="400"></iframe>`;
    default: return kids();
  }
}

// Jupyter's own preference order for a display's MIME bundle
const MIME_ORDER = ['image/svg+xml', 'image/png', 'image/jpeg', 'image/gif', 'text/html', 'text/markdown', 'text/latex', 'text/plain'];

async function mimeText(entry) {
  if (entry.content !== undefined) return Array.isArray(entry.content) ? entry.content.join('') : String(entry.content);
  if (entry.path) return get(`${CDN}/${entry.path.replace(/^\/+/, '')}`, 'text');
  return '';
}

async function output(node, ctx) {
  const jd = node.jupyter_data || {};
  switch (jd.output_type) {
    case 'stream': {
      const text = terminal(Array.isArray(jd.text) ? jd.text.join('') : jd.text);
      return text.trim() ? `<pre class="output stream ${attr(jd.name || 'stdout')}">${esc(text.replace(/\n+$/, ''))}</pre>` : '';
    }
    case 'error': {
      const tb = terminal((jd.traceback || []).join('\n')) || `${jd.ename}: ${jd.evalue}`;
      return `<pre class="output error">${esc(tb)}</pre>`;
    }
    case 'execute_result':
    case 'display_data': {
      const data = jd.data || {};
      const mime = MIME_ORDER.find((m) => data[m]) || Object.keys(data).find((m) => m.startsWith('image/'));
      if (!mime) return '';
      const entry = data[mime];
      if (mime.startsWith('image/')) {
        let src;
        if (entry.path) src = await href(entry.path, ctx, mime);
        else src = `data:${mime};base64,${String(entry.content || '').replace(/\s/g, '')}`;
        if (src === null) return '';
        return `<div class="output display"><img src="${attr(src)}" alt="${attr(data['text/plain']?.content || 'figure')}"></div>`;
      }
      const text = await mimeText(entry);
      if (mime === 'text/html') return `<div class="output display html">${text}</div>`;
      if (mime === 'text/markdown') {
        const tree = mystParse(text);
        return `<div class="output display markdown">${await render(tree, { ...ctx, toc: null })}</div>`;
      }
      if (mime === 'text/latex') {
        const tex = text.trim().replace(/^\$\$?|\$\$?$/g, '');
        return `<div class="output display math-block">${katex.renderToString(tex, { displayMode: true, throwOnError: false })}</div>`;
      }
      return `<pre class="output text">${esc(terminal(text))}</pre>`;
    }
    default: return '';
  }
}

// ------------------------------------------------------------------ pages

function nav(current) {
  const items = order.map((p) => {
    const title = p.index ? 'Home' : p.title;
    const cls = `level-${Math.min(p.level || 1, 3)}${p.slug === current ? ' current' : ''}`;
    return `<li class="${cls}"><a href="${attr(fileOf(p.slug))}">${esc(title)}</a></li>`;
  });
  return `<nav class="sidebar" aria-label="pages"><a class="site-title" href="index.html">${esc(siteTitle)}</a><ul>${items.join('')}</ul></nav>`;
}

function onThisPage(toc) {
  if (!toc.length) return '';
  const items = toc.map((h) => `<li class="depth-${h.depth}"><a href="#${attr(h.id)}">${esc(h.text)}</a></li>`).join('');
  return `<aside class="page-toc" aria-label="on this page"><p>On this page</p><ul>${items}</ul></aside>`;
}

function shell({ title, body, current, toc, prev, next, download }) {
  const pager = [
    prev ? `<a class="prev" href="${attr(fileOf(prev.slug))}">← ${esc(prev.index ? 'Home' : prev.title)}</a>` : '<span></span>',
    next ? `<a class="next" href="${attr(fileOf(next.slug))}">${esc(next.title)} →</a>` : '<span></span>',
  ].join('');
  const dl = download ? `<p class="download"><a href="${attr(download.href)}" download="${attr(download.name)}">Download ${esc(download.name)}</a> (executed, with its outputs)</p>` : '';
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}${title === siteTitle ? '' : ` · ${esc(siteTitle)}`}</title>
<link rel="stylesheet" href="assets/katex/katex.min.css">
<link rel="stylesheet" href="assets/hljs.css">
<link rel="stylesheet" href="assets/site.css">
</head>
<body>
${nav(current)}
<main>
<article>
<header><h1 class="page-title">${esc(title)}</h1>${dl}</header>
${body}
<footer class="pager">${pager}</footer>
</article>
</main>
${onThisPage(toc)}
</body>
</html>
`;
}

function copyTree(src, dst) {
  fs.mkdirSync(dst, { recursive: true });
  for (const entry of fs.readdirSync(src, { withFileTypes: true })) {
    const from = path.join(src, entry.name), to = path.join(dst, entry.name);
    if (entry.isDirectory()) copyTree(from, to);
    else fs.copyFileSync(from, to);
  }
}

// the static assets: KaTeX's stylesheet and fonts (the stylesheet loads fonts/ relative to itself)
const katexRoot = path.join(HERE, 'node_modules', 'katex', 'dist');
fs.mkdirSync(path.join(OUT, 'assets', 'katex'), { recursive: true });
fs.copyFileSync(path.join(katexRoot, 'katex.min.css'), path.join(OUT, 'assets', 'katex', 'katex.min.css'));
copyTree(path.join(katexRoot, 'fonts'), path.join(OUT, 'assets', 'katex', 'fonts'));
fs.copyFileSync(path.join(HERE, 'node_modules', 'highlight.js', 'styles', 'github.css'), path.join(OUT, 'assets', 'hljs.css'));
fs.copyFileSync(path.join(HERE, 'site.css'), path.join(OUT, 'assets', 'site.css'));

const written = [];
for (let i = 0; i < order.length; i++) {
  const page = order[i];
  const data = await get(`${CDN}/content/${page.slug}.json`);
  page.file = path.basename(data.location || '').replace(/\.(ipynb|md)$/, '');
  page.data = data;
}
for (let i = 0; i < order.length; i++) {
  const page = order[i];
  const { data } = page;
  const ctx = { slug: page.slug, toc: [] };
  const body = await render(data.mdast, ctx);
  const fm = data.frontmatter || {};
  const title = page.index ? (fm.title || siteTitle) : (fm.title || page.title);
  let download = null;
  const nb = (fm.exports || []).find((e) => e.format === 'ipynb' && e.url);
  if (nb) {
    const target = await href(nb.url, ctx, nb.filename);
    if (target) download = { href: target, name: nb.filename || path.basename(nb.url) };
  }
  const html = shell({ title, body, current: page.slug, toc: ctx.toc, prev: order[i - 1], next: order[i + 1], download });
  fs.writeFileSync(path.join(OUT, fileOf(page.slug)), html);
  written.push({ slug: page.slug, file: fileOf(page.slug), source: data.location, title });
}

fs.writeFileSync(path.join(OUT, '_render.json'), JSON.stringify({ pages: written, unresolved }, null, 1));
for (const u of unresolved) console.error(`render.mjs: unresolved link on ${u.page}: ${u.url} (${u.text})`);
console.log(`render.mjs: wrote ${written.length} pages and ${assets.size} files to ${OUT}`);

"""The API reference at ``/docs``: shared/openapi.json rendered to one HTML page, on the server.

The document is the only reference there is, so the page cannot drift from what tests/test_openapi.py
checks. Descriptions are CommonMark (markdown-it-py with raw HTML turned off: a description cannot
inject markup); everything else is escaped text. No script, no inline style: the page is served
under the dashboard's Content-Security-Policy and styled by /ui/app.css.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from markdown_it import MarkdownIt

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


def _md(text: str | None) -> str:
    return _markdown.render(text) if text else ""


def _code(text: Any) -> str:
    return f"<code>{escape(str(text))}</code>"


class _Doc:
    def __init__(self, document: dict[str, Any]):
        self.doc = document

    def resolve(self, obj: dict) -> dict:
        """Follow internal references (responses, parameters, headers) to the object itself."""
        seen = 0
        while "$ref" in obj and seen < 20:
            node: Any = self.doc
            for part in obj["$ref"].lstrip("#/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            obj, seen = node, seen + 1
        return obj

    # --- schemas as one line of text ----------------------------------------------------------

    def type_of(self, schema: dict | None) -> str:
        if not schema:
            return "any"
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
        if "allOf" in schema:
            return " ".join(self.type_of(s) for s in schema["allOf"])
        if "type" not in schema and "properties" in schema:  # a constraint inside allOf
            return "with " + ", ".join(
                f"{_code(name)} {self.type_of(prop)}" for name, prop in schema["properties"].items()
            )
        for key in ("oneOf", "anyOf"):
            if key in schema:
                return " or ".join(self.type_of(s) for s in schema[key])
        if "const" in schema:
            return "exactly " + _code(json.dumps(schema["const"]))
        if "enum" in schema:
            return "one of " + ", ".join(_code(json.dumps(v)) for v in schema["enum"])
        types = schema.get("type", "any")
        types = types if isinstance(types, list) else [types]
        words = []
        for kind in types:
            if kind == "array":
                words.append("array of " + self.type_of(schema.get("items")))
            elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
                words.append("object of " + self.type_of(schema["additionalProperties"]))
            else:
                words.append(escape(kind))
        text = " or ".join(words)
        if schema.get("format"):
            text += f" ({escape(schema['format'])})"
        return text + self._limits(schema)

    @staticmethod
    def _limits(schema: dict) -> str:
        """Bounds, pattern and default as escaped HTML, e.g. "; 1 to 500, default <code>50</code>"."""
        limits = []
        for low, high, unit in (
            ("minimum", "maximum", ""),
            ("minLength", "maxLength", " characters"),
            ("minItems", "maxItems", " items"),
        ):
            lo, hi = schema.get(low), schema.get(high)
            if lo is not None and hi is not None:
                limits.append(escape(f"{lo} to {hi}{unit}"))
            elif lo is not None:
                limits.append(escape(f"at least {lo}{unit}"))
            elif hi is not None:
                limits.append(escape(f"at most {hi}{unit}"))
        if "pattern" in schema:
            limits.append("matching " + _code(schema["pattern"]))
        if "default" in schema:
            limits.append("default " + _code(json.dumps(schema["default"])))
        return "; " + ", ".join(limits) if limits else ""

    def members(self, schema: dict) -> str:
        """A table of an object schema's properties, or nothing."""
        schema = self.resolve(schema) if "$ref" in schema else schema
        properties = schema.get("properties")
        if not properties:
            return ""
        required = set(schema.get("required", []))
        rows = "".join(
            f"<tr><td>{_code(name)}</td><td>{'yes' if name in required else 'no'}</td>"
            f"<td>{self.type_of(prop)}</td><td>{_md(prop.get('description'))}</td></tr>"
            for name, prop in properties.items()
        )
        return (
            '<table class="members"><thead><tr><th>member</th><th>required</th><th>type</th>'
            f"<th>meaning</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    # --- operations -----------------------------------------------------------------------------

    def operations(self):
        for path, item in self.doc.get("paths", {}).items():
            for method in HTTP_METHODS:
                if method in item:
                    yield method, path, item[method]

    def parameters(self, op: dict) -> str:
        params = [self.resolve(p) for p in op.get("parameters", [])]
        if not params:
            return ""
        rows = "".join(
            f"<tr><td>{_code(p['name'])}</td><td>{escape(p['in'])}</td>"
            f"<td>{'yes' if p.get('required') else 'no'}</td><td>{self.type_of(p.get('schema'))}</td>"
            f"<td>{_md(p.get('description'))}</td></tr>"
            for p in params
        )
        return (
            "<h4>Parameters</h4>"
            '<table class="members"><thead><tr><th>name</th><th>in</th><th>required</th><th>type</th>'
            f"<th>meaning</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    def request_body(self, op: dict) -> str:
        body = op.get("requestBody")
        if not body:
            return ""
        body = self.resolve(body)
        out = ["<h4>Request body</h4>", _md(body.get("description"))]
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            out.append(f"<p>{_code(media)}: {self.type_of(schema)}</p>")
            out.append(self.members(schema))
            out.append(self.example(content, "Example request"))
        return "".join(out)

    @staticmethod
    def example(content: dict, label: str) -> str:
        if "example" not in content:
            return ""
        text = json.dumps(content["example"], indent=2, ensure_ascii=False)
        return f"<details><summary>{escape(label)}</summary><pre><code>{escape(text)}</code></pre></details>"

    def responses(self, op: dict) -> str:
        rows = []
        for code, response in op.get("responses", {}).items():
            response = self.resolve(response)
            content = response.get("content", {})
            kinds = "<br>".join(f"{_code(m)} {self.type_of(c.get('schema'))}" for m, c in content.items())
            headers = "<br>".join(
                f"{_code(name)}: {self.type_of(self.resolve(h).get('schema'))}"
                for name, h in response.get("headers", {}).items()
            )
            examples = "".join(self.example(c, f"Example {code}") for c in content.values())
            rows.append(
                f'<tr><td class="resp resp-{escape(code[0])}">{escape(code)}</td>'
                f"<td>{_md(response.get('description'))}{examples}</td><td>{kinds}</td><td>{headers}</td></tr>"
            )
        return (
            "<h4>Responses</h4>"
            '<table class="members"><thead><tr><th>status</th><th>meaning</th><th>body</th>'
            f"<th>headers</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )

    def operation(self, method: str, path: str, op: dict) -> str:
        auth = (
            '<p class="auth">Needs <code>Authorization: Bearer &lt;token&gt;</code>.</p>'
            if op.get("security")
            else '<p class="auth">No authentication.</p>'
        )
        return (
            f'<section class="op" id="op-{escape(op["operationId"])}">'
            f'<h3><span class="method method-{method}">{method.upper()}</span> {_code(path)}</h3>'
            f'<p class="summary">{escape(op.get("summary", ""))}</p>{auth}{_md(op.get("description"))}'
            f"{self.parameters(op)}{self.request_body(op)}{self.responses(op)}</section>"
        )

    # --- the page -------------------------------------------------------------------------------

    def page(self) -> str:
        info = self.doc.get("info", {})
        by_tag: dict[str, list] = {t["name"]: [] for t in self.doc.get("tags", [])}
        for method, path, op in self.operations():
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((method, path, op))
        tag_text = {t["name"]: t.get("description") for t in self.doc.get("tags", [])}
        toc, body = [], []
        for tag, ops in by_tag.items():
            links = "".join(
                f'<li><a href="#op-{escape(op["operationId"])}"><span class="method method-{m}">'
                f"{m.upper()}</span> {escape(p)}</a></li>"
                for m, p, op in ops
            )
            toc.append(f'<li><a href="#tag-{escape(tag)}">{escape(tag)}</a><ul>{links}</ul></li>')
            body.append(
                f'<section class="tag" id="tag-{escape(tag)}"><h2>{escape(tag)}</h2>{_md(tag_text.get(tag))}'
                + "".join(self.operation(m, p, op) for m, p, op in ops)
                + "</section>"
            )
        schemas = self.doc.get("components", {}).get("schemas", {})
        schema_links = "".join(f'<li><a href="#schema-{escape(n)}">{escape(n)}</a></li>' for n in schemas)
        schema_sections = "".join(
            f'<section class="schema" id="schema-{escape(name)}"><h3>{escape(name)}</h3>'
            f"<p>{self.type_of({k: v for k, v in s.items() if k != 'properties'})}</p>"
            f"{_md(s.get('description'))}{self.members(s)}</section>"
            for name, s in schemas.items()
        )
        title = escape(info.get("title", "API"))
        return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API reference</title>
<link rel="icon" href="/ui/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/app.css">
</head>
<body class="docs">
<header class="topbar"><a class="brand" href="/">{title}</a>
<nav><a href="/">Dashboard</a> <a href="/openapi.json">openapi.json</a></nav></header>
<div class="docs-layout">
<nav class="toc" aria-label="Contents"><ul>
<li><a href="#intro">Introduction</a></li>
{"".join(toc)}
<li><a href="#schemas">Schemas</a><ul>{schema_links}</ul></li>
</ul></nav>
<main class="docs-main">
<section id="intro"><h1>{title} API reference <small>{escape(info.get("version", ""))}</small></h1>
<p class="summary">{escape(info.get("summary", ""))}</p>
{_md(info.get("description"))}</section>
{"".join(body)}
<section id="schemas"><h2>Schemas</h2>{schema_sections}</section>
</main>
</div>
</body>
</html>
"""


def render(document: bytes) -> str:
    """The reference page for an OpenAPI 3.1 document (JSON bytes)."""
    return _Doc(json.loads(document)).page()

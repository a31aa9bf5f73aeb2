"""The Jinja2 template of ``report.html``: one self-contained page (inline CSS, a few lines of
script, images as data: URIs), so the file can be mailed or opened offline."""

REPORT_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>safevlm scan report: {{ title }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
  h1 { font-size: 1.4em; margin-bottom: 4px; }
  h2 { font-size: 1.15em; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
  .meta { color: #555; font-size: 0.9em; }
  .counts { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
  .count { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 90px; }
  .count .value { font-size: 1.5em; font-weight: 600; display: block; }
  .count .label { color: #555; font-size: 0.85em; }
  table { border-collapse: collapse; font-size: 0.9em; }
  th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
  th { background: #f4f4f4; }
  td.name, th.name { text-align: left; }
  .grid { display: flex; flex-wrap: wrap; gap: 12px; }
  figure.thumb { margin: 0; width: {{ thumb }}px; font-size: 0.78em; }
  .frame { position: relative; width: {{ thumb }}px; height: {{ thumb }}px; overflow: hidden;
           border-radius: 4px; background: #eee; cursor: pointer; }
  .frame img { position: absolute; left: 0; top: 0; width: {{ thumb }}px; height: {{ thumb }}px; }
  .frame img.heat { opacity: 0.55; pointer-events: none; }
  body.no-heat .frame img.heat { display: none; }
  figure.blurred .frame img { filter: blur(14px); }
  figure.blurred .frame::after { content: "risk level >= 2: click to show"; position: absolute; left: 0; right: 0;
           top: 45%; text-align: center; color: #fff; font-weight: 600; text-shadow: 0 0 4px #000; }
  figcaption { margin-top: 4px; overflow-wrap: anywhere; }
  .prompt { color: #444; font-style: italic; }
  .action-refuse { color: #b00020; font-weight: 600; }
  .action-hint { color: #a15c00; font-weight: 600; }
  .action-allow { color: #2b7a0b; }
  svg text { font-size: 10px; fill: #333; }
</style>
</head>
<body>
<h1>Dataset scan: {{ title }}</h1>
<div class="meta">model {{ summary.model }}{% if summary.adapter %}, adapter {{ summary.adapter }}{% endif %};
policy {{ summary.policy }}; flagged = {{ summary.flagged_means }}; {{ summary.images_per_second }} images/s;
shard {{ summary.shard }}</div>

<div class="counts">
  <div class="count"><span class="value" id="count-total">{{ summary.total }}</span><span class="label">total</span></div>
  <div class="count"><span class="value" id="count-scanned">{{ summary.scanned }}</span><span class="label">scanned</span></div>
  <div class="count"><span class="value" id="count-duplicates">{{ summary.duplicates }}</span><span class="label">duplicates</span></div>
  <div class="count"><span class="value" id="count-failed">{{ summary.failed }}</span><span class="label">failed</span></div>
  <div class="count"><span class="value" id="count-flagged">{{ summary.flagged }}</span><span class="label">flagged</span></div>
  {% for action, n in summary.by_action.items() %}
  <div class="count"><span class="value" id="count-action-{{ action }}">{{ n }}</span><span class="label">{{ action }}</span></div>
  {% endfor %}
</div>

<h2>Risk type &times; risk level</h2>
<table id="heat-table">
  <tr><th class="name">type \ level</th>{% for level in level_names %}<th>{{ loop.index0 }} {{ level }}</th>{% endfor %}<th>all</th></tr>
  {% for type_name, row in heat.items() %}
  <tr data-type="{{ type_name }}"><td class="name">{{ type_name }}</td>
    {% for n in row %}<td data-count="{{ n }}" style="background: rgba(200, 30, 30, {{ '%.3f' % (0.85 * n / heat_max) }})">{{ n }}</td>{% endfor %}
    <td>{{ row | sum }}</td></tr>
  {% endfor %}
</table>

<h2>Risk scores</h2>
<p class="meta">risk_score = P(risk level &ge; 1) per item with a result ({{ histogram | sum }} items), {{ histogram | length }} bins.</p>
<svg id="histogram" width="{{ hist.width }}" height="{{ hist.height + 30 }}" role="img" aria-label="histogram of risk scores">
  {% for bar in hist.bars %}
  <rect x="{{ bar.x }}" y="{{ bar.y }}" width="{{ bar.w }}" height="{{ bar.h }}" fill="#c0392b" data-count="{{ bar.count }}"><title>{{ bar.label }}: {{ bar.count }}</title></rect>
  {% endfor %}
  <line x1="0" y1="{{ hist.height }}" x2="{{ hist.width }}" y2="{{ hist.height }}" stroke="#333"/>
  <text x="0" y="{{ hist.height + 14 }}">0</text>
  <text x="{{ hist.width / 2 - 8 }}" y="{{ hist.height + 14 }}">0.5</text>
  <text x="{{ hist.width - 10 }}" y="{{ hist.height + 14 }}">1</text>
  <text x="0" y="{{ hist.height + 28 }}">max bin: {{ histogram | max }}</text>
</svg>

<h2>Top-scoring images per risk type</h2>
<p class="meta">Ranked by p(type, level &ge; 1). The thumbnail is the part of the image the model sees (the
image processor's crop); the overlay is the safety head's attention over it ({{ attention_note }}).
Thumbnails at risk level &ge; 2 are blurred until clicked.
<label><input type="checkbox" id="show-heat" checked> show attention</label></p>
{% for type_name, cards in grids.items() %}
<h3 id="type-{{ type_name }}">{{ type_name }} ({{ cards | length }} shown)</h3>
{% if not cards %}<p class="meta">no item has this as its most probable type.</p>{% endif %}
<div class="grid">
  {% for card in cards %}
  <figure class="thumb{% if card.blurred %} blurred{% endif %}" data-id="{{ card.id }}" data-level="{{ card.risk_level }}">
    <div class="frame">
      {% if card.thumbnail %}<img class="photo" src="{{ card.thumbnail }}" alt="{{ card.id }}">{% endif %}
      {% if card.heatmap %}<img class="heat" src="{{ card.heatmap }}" alt="">{% endif %}
    </div>
    <figcaption>
      <b>{{ '%.3f' % card.type_score }}</b> <span class="action-{{ card.action }}">{{ card.action }}</span>,
      level {{ card.risk_level }} ({{ card.risk_level_name }})<br>
      <span title="{{ card.source }}">{{ card.id }}</span>
      {% if card.prompt %}<br><span class="prompt">{{ card.prompt | truncate(160) }}</span>{% endif %}
      {% if card.note %}<br><span class="meta">{{ card.note }}</span>{% endif %}
    </figcaption>
  </figure>
  {% endfor %}
</div>
{% endfor %}

<h2>Per input</h2>
<table id="per-source">
  <tr><th class="name">input</th><th>total</th><th>scanned</th><th>duplicates</th><th>failed</th><th>flagged</th><th>ignored files</th></tr>
  {% for name, s in summary.per_source.items() %}
  <tr><td class="name">{{ name }}</td><td>{{ s.total }}</td><td>{{ s.scanned }}</td><td>{{ s.duplicates }}</td>
      <td>{{ s.failed }}</td><td>{{ s.flagged }}</td><td>{{ s.ignored_files | default(0) }}</td></tr>
  {% endfor %}
</table>

<h2>Failed items ({{ summary.failed }})</h2>
{% if failed_rows %}
<table id="failed">
  <tr><th class="name">id</th><th class="name">reason</th><th class="name">error</th></tr>
  {% for row in failed_rows %}
  <tr><td class="name">{{ row.id }}</td><td class="name">{{ row.reason }}</td><td class="name">{{ row.error }}</td></tr>
  {% endfor %}
</table>
{% if summary.failed > failed_rows | length %}<p class="meta">the first {{ failed_rows | length }}; all of them are in failed.jsonl.</p>{% endif %}
{% else %}<p class="meta">none.</p>{% endif %}

<script>
  document.querySelectorAll("figure.thumb .frame").forEach(function (frame) {
    frame.addEventListener("click", function () { frame.parentElement.classList.remove("blurred"); });
  });
  document.getElementById("show-heat").addEventListener("change", function (e) {
    document.body.classList.toggle("no-heat", !e.target.checked);
  });
</script>
</body>
</html>
"""

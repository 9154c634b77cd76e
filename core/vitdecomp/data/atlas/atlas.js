// vitdecomp component atlas: sorting, filtering and pagination of the index table and the colours of the
// layer x head grid. Plain JavaScript, no libraries, works from file://.
(function () {
  "use strict";

  function colour(v, lo, hi) {
    // diverging blue-white-red scale centred on 0 when the range spans 0, else white to red
    if (!isFinite(v)) { return "#ccc"; }
    var t;
    if (lo < 0 && hi > 0) {
      var m = Math.max(-lo, hi);
      t = v / m;
      if (t >= 0) { return "rgb(255," + Math.round(255 * (1 - t)) + "," + Math.round(255 * (1 - t)) + ")"; }
      t = -t;
      return "rgb(" + Math.round(255 * (1 - t)) + "," + Math.round(255 * (1 - t)) + ",255)";
    }
    t = hi > lo ? (v - lo) / (hi - lo) : 0;
    return "rgb(255," + Math.round(255 * (1 - t)) + "," + Math.round(255 * (1 - t)) + ")";
  }

  var DATA = null;

  function data() {
    if (DATA === null) {
      var el = document.getElementById("atlas-data");
      DATA = el ? JSON.parse(el.textContent) : { props: [], rows: [] };
    }
    return DATA;
  }

  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function paintGrid() {
    var sel = document.getElementById("gridprop");
    if (!sel) { return; }
    var d = data(), key = sel.value === "variance" ? "v" : "s" + d.props.indexOf(sel.value);
    var cells = document.querySelectorAll("#grid a.cell");
    var vals = [], lo = Infinity, hi = -Infinity, i;
    for (i = 0; i < cells.length; i++) {
      var v = d.rows[parseInt(cells[i].getAttribute("data-i"), 10)][key];
      vals.push(v);
      if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    for (i = 0; i < cells.length; i++) { cells[i].style.background = colour(vals[i], lo, hi); }
    var leg = document.getElementById("legend");
    if (leg && isFinite(lo)) {
      leg.innerHTML = "";
      var steps = [lo, (lo + hi) / 2, hi];
      if (lo < 0 && hi > 0) { steps = [-Math.max(-lo, hi), 0, Math.max(-lo, hi)]; }
      steps.forEach(function (s) {
        var box = document.createElement("i");
        box.style.background = colour(s, lo, hi);
        leg.appendChild(box);
        leg.appendChild(document.createTextNode(" " + s.toFixed(3) + " "));
      });
    }
  }

  function setupTable() {
    var table = document.getElementById("list");
    if (!table) { return; }
    var d = data();
    var tbody = table.tBodies[0];
    var rows = d.rows.slice();
    var filter = document.getElementById("filter");
    var kind = document.getElementById("kind");
    var pager = document.getElementById("pager");
    var page = 0, visible = rows;
    var PAGE = parseInt(table.getAttribute("data-page-size"), 10) || 100;
    var num = function (v) { return v === null || v === undefined ? "" : String(v); };

    function rowHtml(r) {
      var h = "<tr data-kind='" + esc(r.k) + "'><td>" + r.i + "</td><td><a href='" + esc(r.p) + "'>" + esc(r.n)
        + "</a></td><td>" + esc(r.k) + "</td><td>" + num(r.st) + "</td><td>" + num(r.b) + "</td><td>" + num(r.h)
        + "</td><td class='sc'>" + (100 * r.v).toFixed(2) + "%</td>";
      for (var j = 0; j < d.props.length; j++) { h += "<td class='sc'>" + r["s" + j].toFixed(3) + "</td>"; }
      return h + "<td>" + esc(r.t) + "</td></tr>";
    }

    function render() {
      var pages = Math.max(1, Math.ceil(visible.length / PAGE));
      if (page >= pages) { page = pages - 1; }
      tbody.innerHTML = visible.slice(page * PAGE, (page + 1) * PAGE).map(rowHtml).join("");
      pager.innerHTML = "";
      var info = document.createElement("span");
      info.textContent = visible.length + " of " + rows.length + " components · page " + (page + 1) + " / " + pages + " ";
      pager.appendChild(info);
      [["previous", -1], ["next", 1]].forEach(function (b) {
        var btn = document.createElement("button");
        btn.textContent = b[0];
        btn.id = "page-" + b[0];
        btn.disabled = (b[1] < 0 && page === 0) || (b[1] > 0 && page >= pages - 1);
        btn.onclick = function () { page += b[1]; render(); };
        pager.appendChild(btn);
      });
    }

    function apply() {
      var q = (filter.value || "").toLowerCase(), k = kind.value;
      visible = rows.filter(function (r) {
        return (!k || r.k === k) && (!q || (r.n + " " + r.k + " " + r.t).toLowerCase().indexOf(q) >= 0);
      });
      page = 0;
      render();
    }

    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th) {
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-c"), numeric = th.getAttribute("data-k") === "n" || key === "i";
        var desc = !th.classList.contains("desc");
        Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(desc ? "desc" : "asc");
        rows.sort(function (a, b) {
          var x = a[key], y = b[key], c;
          if (numeric) {
            x = x === null ? -Infinity : x; y = y === null ? -Infinity : y;
            c = x < y ? -1 : (x > y ? 1 : 0);
          } else { c = String(x).localeCompare(String(y)); }
          return desc ? -c : c;
        });
        apply();
      });
    });
    filter.addEventListener("input", apply);
    kind.addEventListener("change", apply);
    apply();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var sel = document.getElementById("gridprop");
    if (sel) { sel.addEventListener("change", paintGrid); }
    paintGrid();
    setupTable();
  });
}());

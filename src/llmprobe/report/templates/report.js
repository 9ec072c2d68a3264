// Sortable, filterable tables. Cells of numbers carry their full value in data-v; blanks sort
// last in either direction. A numeric column sorts largest-first on its first click.
(function () {
  "use strict";

  function numberOf(cell) {
    var v = cell ? cell.getAttribute("data-v") : null;
    if (v === null || v === "") { return null; }
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }

  function isNumeric(table, col) {
    var rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var cell = rows[i].cells[col];
      if (cell && cell.textContent !== "") { return numberOf(cell) !== null; }
    }
    return false;
  }

  function sortBy(table, col, th) {
    var current = th.getAttribute("aria-sort");
    var numeric = isNumeric(table, col);
    var dir;
    if (current === "descending") { dir = "ascending"; }
    else if (current === "ascending") { dir = "descending"; }
    else { dir = numeric ? "descending" : "ascending"; }
    var headers = table.tHead.rows[0].cells;
    for (var h = 0; h < headers.length; h++) { headers[h].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var ca = a.cells[col], cb = b.cells[col];
      var ta = ca ? ca.textContent : "", tb = cb ? cb.textContent : "";
      if (ta === "" || tb === "") { return (ta === "") - (tb === ""); }
      if (numeric) {
        var xa = numberOf(ca), xb = numberOf(cb);
        if (xa !== null && xb !== null && xa !== xb) { return sign * (xa < xb ? -1 : 1); }
        if (xa === null || xb === null) { return (xa === null) - (xb === null); }
        return 0;
      }
      return sign * ta.localeCompare(tb, undefined, { numeric: true });
    });
    for (var r = 0; r < rows.length; r++) { body.appendChild(rows[r]); }
  }

  function filterRows(input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    if (!table) { return; }
    var query = input.value.trim().toLowerCase();
    var rows = table.tBodies[0].rows;
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var match = query === "" || rows[i].textContent.toLowerCase().indexOf(query) !== -1;
      rows[i].hidden = !match;
      if (match) { shown++; }
    }
    var counter = document.getElementById(input.getAttribute("data-count"));
    if (counter) { counter.textContent = shown + " of " + rows.length + " rows"; }
  }

  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, col) {
      th.tabIndex = 0;
      th.title = "Sort by " + th.textContent;
      th.addEventListener("click", function () { sortBy(table, col, th); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, col, th); }
      });
    });
  });
  var inputs = document.querySelectorAll("input.filter");
  Array.prototype.forEach.call(inputs, function (input) {
    input.addEventListener("input", function () { filterRows(input); });
  });
})();

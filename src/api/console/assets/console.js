// dinghook console: the pages work without this script. It only (1) asks before a form
// marked data-confirm is sent and (2) refreshes the element marked data-live="seconds" by
// fetching this same page again and swapping that element, while the tab is visible and
// the user is not working inside it.
(function () {
  'use strict';
  document.addEventListener('submit', function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute('data-confirm');
    if (!question && ev.submitter) {
      var owner = ev.submitter.form;
      question = owner && owner.getAttribute('data-confirm');
    }
    if (question && !window.confirm(question)) {
      ev.preventDefault();
    }
  });

  var live = document.querySelector('[data-live]');
  if (!live || !window.fetch || !window.DOMParser) {
    return;
  }
  var every = Math.max(2, parseInt(live.getAttribute('data-live'), 10) || 5) * 1000;

  function busy() {
    var active = document.activeElement;
    return (active && active !== document.body && live.contains(active)) ||
      live.querySelector('input[type=checkbox]:checked') !== null;
  }

  function tick() {
    if (document.hidden || busy()) {
      return later();
    }
    fetch(window.location.href, { credentials: 'same-origin', headers: { 'X-Console-Live': '1' } })
      .then(function (r) {
        if (!r.ok || r.redirected) { throw new Error('status ' + r.status); }
        return r.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, 'text/html');
        var fresh = doc.querySelector('[data-live]');
        if (fresh && !busy()) {
          live.replaceWith(fresh);
          live = fresh;
        }
      })
      .catch(function () { /* try again next time */ })
      .then(later);
  }

  function later() {
    window.setTimeout(tick, every);
  }
  later();
})();

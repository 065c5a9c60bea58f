// The dead-letter page's "select all" box and the overview's auto-refresh; everything else works
// without script.
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('input[name="id"][type="checkbox"]')) box.checked = all.checked;
    });
  }
  // Auto-refresh: off until switched on; remembered in this browser (localStorage), not in the URL.
  const refresh = document.getElementById("auto-refresh");
  if (refresh) {
    const key = "igr-ops-auto-refresh";
    let timer = null;
    const schedule = () => {
      clearTimeout(timer);
      if (refresh.checked) timer = setTimeout(() => window.location.reload(), 1000 * Number(refresh.dataset.seconds));
    };
    refresh.checked = window.localStorage.getItem(key) === "on";
    refresh.addEventListener("change", () => {
      window.localStorage.setItem(key, refresh.checked ? "on" : "off");
      schedule();
    });
    schedule();
  }
});

// The dead-letter page's "select all" box; everything else works without script.
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll('input[name="id"][type="checkbox"]')) box.checked = all.checked;
  });
});

"use strict";
// The login form keeps where the user was going (?next=, a console path only) and says when a key was wrong.
(function () {
  const params = new URLSearchParams(location.search);
  const next = params.get("next") || "";
  if (/^\/console\/[^\\]*$/.test(next) && !next.startsWith("//")) document.getElementById("next").value = next;
  if (params.has("failed")) document.getElementById("failed").classList.remove("hidden");
})();

// Tiny DOM helpers for the console and admin pages (text always via textContent).

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | ((event: Event) => void)> = {},
  ...children: (Node | string | null | undefined | false)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (typeof value === "function") node.addEventListener(key.replace(/^on/, ""), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined && child !== false) node.append(child);
  return node;
}

export function $(selector: string): HTMLElement {
  const node = document.querySelector(selector);
  if (!node) throw new Error("missing " + selector);
  return node as HTMLElement;
}

/** A login form; calls `submit(name, password)` and shows its error. */
export function loginForm(title: string, problem: string, submit: (name: string, password: string) => Promise<void>): HTMLElement {
  const name = h("input", { name: "name", autocomplete: "username", required: true, "aria-label": "Name" });
  const password = h("input", {
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    "aria-label": "Password",
  });
  const error = h("p", { class: "error", role: "alert" }, problem);
  const form = h(
    "form",
    { class: "login card" },
    h("h1", {}, title),
    h("label", {}, "Name", name),
    h("label", {}, "Password", password),
    h("button", { type: "submit" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await submit(name.value.trim(), password.value);
    } catch (err) {
      error.textContent = err instanceof Error ? err.message : String(err);
    }
  });
  return form;
}

export function clock(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

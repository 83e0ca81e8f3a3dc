//! The built-in review page, `/review/JOB`: a reviewer goes through the doubtful answers of a job by keyboard (or touch) in any browser.
//!
//! Server-rendered HTML (minijinja, HTML auto-escaping) with a little inline
//! JavaScript and no build step. It lists the answers waiting for review,
//! least confident first, each with its document, the model's answer, its
//! confidence and the parts of it (and every model's vote for an
//! ensemble). Decisions go through the same path as `sluice review import`
//! (`review::import`: checked, audited, the token's holder recorded as the
//! reviewer); undo through `review::undo`.
//!
//! It sits behind the API's authentication: the page's login form takes an
//! API token (role reviewer or above) and keeps it in an HttpOnly,
//! SameSite=Strict cookie scoped to `/review` (Secure when the API serves
//! HTTPS); the guard accepts that cookie on `/review/` routes only, and a
//! decision sent with it must carry the page's own header (`CSRF_HEADER`).

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::api::AppState;
use crate::auth::Actor;
use crate::{review, store, Error};

/// Where the page's routes live.
pub const PREFIX: &str = "/review/";
/// The cookie holding the reviewer's token.
pub const COOKIE: &str = "sluice_review";
/// The header the page's script sends with every decision.
pub const CSRF_HEADER: &str = "x-sluice-review";
/// Most answers one page shows; reload for the next.
const PAGE_ITEMS: usize = 500;

/// The page's routes, behind the API's guard.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/review/{id}", get(page))
        .route("/review/{id}/decide", post(decide))
        .route("/review/{id}/undo", post(undo))
}

/// The reviewer's token from the page's cookie, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty())
}

/// The page's templates, parsed once.
fn env() -> &'static minijinja::Environment<'static> {
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_template("login", LOGIN).expect("the login template parses");
        env.add_template("page", PAGE).expect("the page template parses");
        env
    })
}

fn render(name: &str, ctx: Value) -> String {
    env()
        .get_template(name)
        .and_then(|t| t.render(minijinja::value::Serde(&ctx)))
        .unwrap_or_else(|e| format!("cannot render the page: {e}"))
}

/// The login form, answered to a browser without a valid cookie; `next` is
/// where it goes once signed in.
pub fn login_page(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let next = if safe_next(next) { next } else { "/review/" };
    let body = render("login", serde_json::json!({"next": next, "error": error}));
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

/// Only a path of the page itself: never another site.
fn safe_next(next: &str) -> bool {
    next.starts_with(PREFIX) && !next.contains("//") && !next.contains('\\')
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /review/login`: checks the token (a failure is throttled and
/// audited as the API's are) and keeps it in the cookie.
pub async fn login(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    match crate::auth::sign_in(&st, peer.ip(), "/review/login", token).await {
        Ok(Ok(p)) => {
            let next = if safe_next(&form.next) { form.next.as_str() } else { "/review/" };
            let secure = if st.https { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={token}; Path=/review; HttpOnly; SameSite=Strict; Max-Age=43200{secure}");
            tracing::info!(reviewer = %p.name, "signed in to the review page");
            (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, next.to_string())])
                .into_response()
        }
        Ok(Err(reason)) => login_page(StatusCode::UNAUTHORIZED, &form.next, Some(&reason)),
        Err(e) => e.into_response(),
    }
}

/// One answer as the page shows it.
#[derive(Serialize)]
struct PageItem {
    id: String,
    stage: Option<String>,
    fields: Vec<(String, String)>,
    answer: String,
    confidence: String,
    components: Vec<(String, String)>,
    votes: Vec<(String, String, String)>,
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(|f| format!("{f:.3}")).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

fn page_item(q: &review::QueueItem, input_fields: &[String]) -> PageItem {
    let fields = match &q.input {
        Value::Object(m) if !input_fields.is_empty() => {
            input_fields.iter().map(|f| (f.clone(), m.get(f).map(show).unwrap_or_default())).collect()
        }
        other => vec![("input".to_string(), serde_json::to_string_pretty(other).unwrap_or_default())],
    };
    let detail = q.confidence_detail.as_ref().and_then(Value::as_object);
    let components = detail
        .map(|d| {
            let empty = |v: &Value| {
                v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(|o| o.is_empty())
            };
            d.iter().filter(|(k, v)| *k != "votes" && !empty(v)).map(|(k, v)| (k.clone(), show(v))).collect()
        })
        .unwrap_or_default();
    let votes = detail
        .and_then(|d| d.get("votes"))
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    let answer = v["answer"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| format!("({})", v["error"].as_str().unwrap_or("no answer")));
                    let c = v["confidence"].as_f64().map(|c| format!("{c:.2}")).unwrap_or_default();
                    (v["model"].as_str().unwrap_or("?").to_string(), answer, c)
                })
                .collect()
        })
        .unwrap_or_default();
    PageItem {
        id: q.id.clone(),
        stage: q.stage.clone(),
        fields,
        answer: q.answer.clone().unwrap_or_default(),
        confidence: q.confidence.map(|c| format!("{c:.2}")).unwrap_or_else(|| "none".into()),
        components,
        votes,
    }
}

/// `GET /review/JOB`: the answers waiting for review, least confident first.
async fn page(State(st): State<AppState>, actor: Actor, Path(job_id): Path<Uuid>) -> Result<Response, Error> {
    let spec = store::job_spec(&st.pool, job_id).await?;
    let queue = review::queue(&st.pool, job_id, None).await?;
    let (done, waiting) = review::progress(&st.pool, job_id).await?;
    let items: Vec<PageItem> = queue.iter().take(PAGE_ITEMS).map(|q| page_item(q, &spec.input_fields)).collect();
    let body = render(
        "page",
        serde_json::json!({
            "job": job_id,
            "kind": spec.kind,
            "reviewer": actor.name,
            "labels": spec.labels,
            "items": items,
            "more": queue.len().saturating_sub(PAGE_ITEMS),
            "done": done,
            "total": done + waiting,
            "csrf": CSRF_HEADER,
        }),
    );
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(body)).into_response())
}

#[derive(Deserialize)]
struct Decide {
    id: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    reject: Option<String>,
}

#[derive(Serialize)]
struct Progress {
    done: u64,
    total: u64,
}

async fn progress(st: &AppState, job_id: Uuid) -> Result<Json<Progress>, Error> {
    let (done, waiting) = review::progress(&st.pool, job_id).await?;
    Ok(Json(Progress { done, total: done + waiting }))
}

/// `POST /review/JOB/decide`: one decision, through `review::import`.
async fn decide(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Json(d): Json<Decide>,
) -> Result<Response, Error> {
    let line = serde_json::json!({"id": d.id, "answer": d.answer.unwrap_or_default(), "reject": d.reject});
    let body = serde_json::to_vec(&line).expect("a decision serialises");
    let names = Default::default();
    let report = review::import(&st.pool, job_id, &body, false, "review-page", &actor, &names).await?;
    if let Some(e) = report.errors.first() {
        return Err(Error::Invalid(e.reason.clone()));
    }
    Ok(progress(&st, job_id).await?.into_response())
}

#[derive(Deserialize)]
struct Undo {
    id: String,
}

/// `POST /review/JOB/undo`: takes back the reviewer's last decision on an item.
async fn undo(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Json(u): Json<Undo>,
) -> Result<Response, Error> {
    review::undo(&st.pool, job_id, &u.id, &actor).await?;
    Ok(progress(&st, job_id).await?.into_response())
}

const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sluice review: sign in</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;max-width:30em;margin:3em auto;padding:0 1em;color:#222}
input{font:inherit;width:100%;padding:.5em;box-sizing:border-box}button{font:inherit;padding:.5em 1.5em;margin-top:1em}
.error{color:#a00}
</style></head>
<body>
<h1>Sluice review</h1>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/review/login">
<label for="token">Your API token (role reviewer or above; <code>sluice admin token create --role reviewer</code>)</label>
<input type="password" id="token" name="token" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{{ next }}">
<button type="submit">Sign in</button>
</form>
</body></html>
"#;

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review {{ kind }} {{ job }}</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{position:sticky;top:0;background:#223;color:#fff;padding:.5em 1em;display:flex;flex-wrap:wrap;gap:.3em 1.5em;align-items:baseline}
header b{font-size:1.1em}main{max-width:50em;margin:0 auto;padding:1em}
article{background:#fff;border-radius:6px;padding:1em;box-shadow:0 1px 3px #0002}
.doc{white-space:pre-wrap;background:#fafafa;border-left:3px solid #99a;padding:.5em .8em;margin:.3em 0 1em}
.answer{font-size:1.3em;font-weight:600}.conf{color:#555}
table{border-collapse:collapse;font-size:.9em;margin:.3em 0}td{padding:.1em .8em .1em 0}
.labels{display:flex;flex-wrap:wrap;gap:.4em;margin:1em 0}
button{font:inherit;padding:.5em .9em;border:1px solid #889;border-radius:4px;background:#fff;min-height:2.6em}
button.accept{background:#dfe;border-color:#6a6}kbd{font-size:.8em;color:#667}
textarea{font:inherit;width:100%;box-sizing:border-box;min-height:5em}
.decided{opacity:.55}.keys{color:#667;font-size:.85em}#msg{min-height:1.5em;color:#a00}
#finished{background:#fff;padding:1em;border-radius:6px}
</style></head>
<body>
<header><b>Sluice review</b><span>{{ kind }} · job {{ job }}</span>
<span id="progress" data-done="{{ done }}" data-total="{{ total }}">{{ done }} of {{ total }} reviewed</span>
<span>{{ reviewer }}</span></header>
<main>
<p id="msg" role="status"></p>
{% for it in items %}
<article class="item" data-id="{{ it.id }}" data-answer="{{ it.answer }}"{% if it.stage %} data-stage="{{ it.stage }}"{% endif %} hidden>
<div class="keys">{{ loop.index }} of {{ items|length }} on this page · item <code>{{ it.id }}</code>{% if it.stage %} · held after stage <b>{{ it.stage }}</b>{% endif %}</div>
{% for f in it.fields %}<div><small>{{ f[0] }}</small><div class="doc">{{ f[1] }}</div></div>{% endfor %}
<div>Model's answer: <span class="answer">{{ it.answer }}</span> <span class="conf">confidence {{ it.confidence }}</span></div>
{% if it.components %}<table>{% for c in it.components %}<tr><td>{{ c[0] }}</td><td>{{ c[1] }}</td></tr>{% endfor %}</table>{% endif %}
{% if it.votes %}<table><tr><td colspan="3"><small>votes</small></td></tr>{% for v in it.votes %}<tr><td>{{ v[0] }}</td><td>{{ v[1] }}</td><td>{{ v[2] }}</td></tr>{% endfor %}</table>{% endif %}
<div class="labels">
<button class="accept" data-act="accept">Accept <kbd>Enter</kbd></button>
{% if labels and not it.stage %}{% for l in labels %}<button data-label="{{ l }}">{{ l }}{% if loop.index <= 9 %} <kbd>{{ loop.index }}</kbd>{% endif %}</button>{% endfor %}{% endif %}
{% if it.stage %}<button data-act="reject">Reject <kbd>x</kbd></button>{% endif %}
<button data-act="undo">Undo <kbd>u</kbd></button>
</div>
{% if not labels or it.stage %}<textarea aria-label="your answer" placeholder="Type the right answer, then Ctrl+Enter (e focuses here)">{{ it.answer }}</textarea>
<button data-act="text">Save text <kbd>Ctrl+Enter</kbd></button>{% endif %}
</article>
{% endfor %}
<div id="finished" hidden><p>Nothing left on this page.{% if more %} {{ more }} more wait: reload for them.{% endif %}</p>
<p>Export the answers: <code>sluice results {{ job }}</code></p></div>
<p class="keys">Enter: accept · 1–9: pick that label · e: edit the text · Ctrl+Enter: save it · u: undo the last decision · j/k: next/previous</p>
</main>
<script>
(() => {
  const job = "{{ job }}", header = "{{ csrf }}";
  const items = [...document.querySelectorAll("article.item")];
  const progress = document.getElementById("progress"), msg = document.getElementById("msg");
  const decided = new Set(), history = [];
  let at = 0;
  function show(i) {
    at = i;
    items.forEach((el, k) => el.hidden = k !== i);
    document.getElementById("finished").hidden = i < items.length;
    if (i < items.length) items[i].querySelector("button.accept").focus({preventScroll: true});
  }
  function next() {
    for (let k = at + 1; k < items.length; k++) if (!decided.has(k)) return show(k);
    for (let k = 0; k < items.length; k++) if (!decided.has(k)) return show(k);
    show(items.length);
  }
  function setProgress(p) {
    progress.dataset.done = p.done; progress.dataset.total = p.total;
    progress.textContent = p.done + " of " + p.total + " reviewed";
  }
  async function post(path, body) {
    const r = await fetch("/review/" + job + path, {method: "POST", credentials: "same-origin",
      headers: {"content-type": "application/json", [header]: "1"}, body: JSON.stringify(body)});
    const text = await r.text();
    let data = {};
    try { data = JSON.parse(text); } catch (e) {}
    if (!r.ok) throw new Error(data.error || text || r.statusText);
    return data;
  }
  let busy = false;
  async function decide(body) {
    if (busy || at >= items.length) return;
    busy = true;
    const i = at, el = items[i];
    try {
      setProgress(await post("/decide", Object.assign({id: el.dataset.id}, body)));
      msg.textContent = "";
      decided.add(i); history.push(i); el.classList.add("decided");
      next();
    } catch (e) { msg.textContent = e.message; }
    busy = false;
  }
  async function undo() {
    if (busy || !history.length) return;
    const i = history[history.length - 1], el = items[i];
    if (el.dataset.stage) { msg.textContent = "a decision at a gate cannot be undone: its item has gone on"; return; }
    busy = true;
    try {
      setProgress(await post("/undo", {id: el.dataset.id}));
      history.pop(); decided.delete(i); el.classList.remove("decided");
      msg.textContent = "undone: " + el.dataset.id;
      show(i);
    } catch (e) { msg.textContent = e.message; }
    busy = false;
  }
  function labelButtons() { return at < items.length ? [...items[at].querySelectorAll("button[data-label]")] : []; }
  document.addEventListener("click", ev => {
    const b = ev.target.closest("button");
    if (!b) return;
    if (b.dataset.label) decide({answer: b.dataset.label});
    else if (b.dataset.act === "accept") decide({answer: items[at].dataset.answer});
    else if (b.dataset.act === "undo") undo();
    else if (b.dataset.act === "text") decide({answer: items[at].querySelector("textarea").value});
    else if (b.dataset.act === "reject") { const why = prompt("Why is it rejected?"); if (why) decide({reject: why}); }
  });
  document.addEventListener("keydown", ev => {
    if (at >= items.length && ev.key !== "u") return;
    const typing = ev.target.tagName === "TEXTAREA";
    if (typing) {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); decide({answer: ev.target.value}); }
      else if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const n = parseInt(ev.key, 10);
    if (ev.key === "Enter" || ev.key === "a") { ev.preventDefault(); decide({answer: items[at].dataset.answer}); }
    else if (n >= 1 && n <= 9 && labelButtons()[n - 1]) { ev.preventDefault(); decide({answer: labelButtons()[n - 1].dataset.label}); }
    else if (ev.key === "u") { ev.preventDefault(); undo(); }
    else if (ev.key === "e") { const t = items[at].querySelector("textarea"); if (t) { ev.preventDefault(); t.focus(); } }
    else if (ev.key === "x" && items[at].dataset.stage) { const why = prompt("Why is it rejected?"); if (why) decide({reject: why}); }
    else if (ev.key === "j" || ev.key === "ArrowRight") { ev.preventDefault(); if (at + 1 < items.length) show(at + 1); }
    else if (ev.key === "k" || ev.key === "ArrowLeft") { ev.preventDefault(); if (at > 0) show(at - 1); }
  });
  show(items.length ? 0 : 0);
})();
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_read_among_others_and_next_stays_on_the_page() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; sluice_review=sluice_abc; b=2".parse().unwrap());
        assert_eq!(cookie_token(&h).as_deref(), Some("sluice_abc"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
        assert!(safe_next("/review/0190"));
        assert!(!safe_next("https://evil.example/review/"));
        assert!(!safe_next("/review//evil.example"));
    }

    #[test]
    fn documents_and_answers_are_escaped() {
        let q = review::QueueItem {
            id: "d<1>".into(),
            input: serde_json::json!({"text": "<script>alert(1)</script>"}),
            answer: Some("\"sports\"".into()),
            output: None,
            confidence: Some(0.4),
            confidence_detail: Some(
                serde_json::json!({"strategy": "logprobs", "penalties": [], "components": null, "votes": [
                {"model": "sim-small", "answer": "sports", "confidence": 0.9},
                {"model": "sim-large", "error": "timeout"}]}),
            ),
            model: None,
            state: "needs_review".into(),
            stage: None,
            seq: 1,
        };
        let item = page_item(&q, &["text".into()]);
        assert_eq!(item.votes[1], ("sim-large".into(), "(timeout)".into(), String::new()));
        assert_eq!(item.components, [("strategy".to_string(), "logprobs".to_string())]);
        let html = render(
            "page",
            serde_json::json!({"job": "j", "kind": "k", "reviewer": "ann", "labels": ["sports"], "items": [item],
                               "more": 0, "done": 0, "total": 1, "csrf": CSRF_HEADER}),
        );
        assert!(!html.contains("<script>alert"), "the document is escaped");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;"));
        assert!(html.contains("data-id=\"d&lt;1&gt;\""), "attributes too");
        assert!(html.contains("0 of 1 reviewed"));
    }
}

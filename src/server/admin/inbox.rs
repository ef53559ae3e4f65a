//! The approvals inbox (`/ui/`): a server-rendered page where an approver signs in, reads the
//! calls held for their groups — agent, tool, rule and reason, the redacted arguments, the
//! session's earlier calls, when it expires — and approves or denies each with a comment; and
//! the history of decisions. No JavaScript: plain forms, each with a CSRF token, under a
//! Content-Security-Policy that allows no script at all. Every value is escaped by the
//! template (maud escapes whatever is spliced in).
//!
//! Sign-in: a personal token (or the shared one) on the sign-in form, exchanged for a session
//! cookie (`session`); or the auth proxy's identity headers, from the proxy only.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::session::{COOKIE, cookie_of};
use super::who::Admin;
use super::{AdminPlane, request_id};
use crate::approval::{Approval, Status};
use crate::audit::{AdminSignedIn, By};
use crate::config::Role;
use crate::server::request::Source;

/// No script, no inline style, no frames, forms only to this origin.
const CSP: &str =
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = include_str!("inbox.css");

pub(super) fn routes(plane: Arc<AdminPlane>) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(inbox))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/approvals/{id}/{verdict}", post(decide))
        .route("/ui/style.css", get(style))
        .with_state(plane)
}

/// A page with the headers every page gets.
fn page(status: StatusCode, title: &str, who: Option<(&Admin, &str)>, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · toolgate" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                header {
                    span.brand { "toolgate" }
                    @if let Some((admin, csrf)) = who {
                        span.who { "Signed in as " strong { (admin.name) } " (" (admin.roles_text()) ")" }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    with_headers(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            markup.into_string(),
        )
            .into_response(),
    )
}

fn with_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: with it, browsers send `Origin: null` on the page's own form posts,
    // and the origin check below could not tell them from a foreign site's.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

/// The signed-in person and the subject of their CSRF tokens: the auth proxy's identity (from
/// the proxy only), else the session cookie's.
fn signed_in(plane: &AdminPlane, req: &Request) -> Option<(Admin, String)> {
    let peer = req.extensions().get::<Source>().map(|s| s.0);
    if let Some(admin) = plane.auth.by_proxy_headers(req.headers(), peer) {
        let subject = format!("proxy\0{}", admin.name);
        return Some((admin, subject));
    }
    let cookie = cookie_of(req.headers())?;
    plane.sessions.get(cookie).map(|a| (a, cookie.to_owned()))
}

async fn inbox(State(plane): State<Arc<AdminPlane>>, req: Request) -> Response {
    let Some((admin, subject)) = signed_in(&plane, &req) else {
        return Redirect::to("/ui/login").into_response();
    };
    let csrf = plane.sessions.csrf(&subject);
    let rid = request_id(&req);
    let now = crate::state::unix_now();
    let all = match plane.gw.approvals.list(None, now).await {
        Ok(all) => all,
        Err(e) => {
            tracing::error!(request_id = &*rid, "approvals could not be listed: {e}");
            let body = html! { h1 { "Approvals" } p.error role="alert" { "The approval store is unavailable. Try again later. (request " (rid) ")" } };
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Approvals",
                Some((&admin, &csrf)),
                body,
            );
        }
    };
    let me = admin.approver();
    let sees_all = admin.has(Role::Operator) || admin.has(Role::Auditor);
    let (mine, others): (Vec<&Approval>, Vec<&Approval>) = all
        .iter()
        .filter(|a| a.status == Status::Pending)
        .partition(|a| me.may_decide(a) && !a.votes.iter().any(|v| v.by == admin.name));
    let decided: Vec<&Approval> = all
        .iter()
        .filter(|a| a.status != Status::Pending && (sees_all || me.may_decide(a)))
        .take(50)
        .collect();
    let mut earlier = Vec::with_capacity(mine.len());
    for a in &mine {
        earlier.push(session_calls(&plane, a).await);
    }
    let body = html! {
        h1 { "Approvals" }
        section #pending aria-labelledby="pending-h" {
            h2 #pending-h { "Waiting for you" }
            @if mine.is_empty() { p { "Nothing is waiting for your decision." } }
            @for (a, calls) in mine.iter().zip(&earlier) { (pending(a, calls, &csrf, now)) }
        }
        @if !others.is_empty() {
            section #others aria-labelledby="others-h" {
                h2 #others-h { "Pending for other approvers" }
                @for a in &others {
                    article.approval.other id=(a.id) {
                        h3 { (a.tool) " by " (a.agent) }
                        p {
                            @if a.votes.iter().any(|v| v.by == admin.name) {
                                "You approved this; it waits for another approver (" (a.votes.len()) " of " (a.quorum) ")."
                            } @else {
                                "You are not an approver in '" (a.group) "', so you cannot decide this."
                            }
                            " Expires " (crate::audit::format_unix(a.expires_at)) "."
                        }
                    }
                }
            }
        }
        section #decided aria-labelledby="decided-h" {
            h2 #decided-h { "Decided" }
            @if decided.is_empty() { p { "No decisions yet." } } @else {
                table {
                    thead { tr { th scope="col" { "Approval" } th scope="col" { "Call" } th scope="col" { "Status" } th scope="col" { "By" } th scope="col" { "Comment" } th scope="col" { "When" } } }
                    tbody {
                        @for a in &decided {
                            tr id=(format!("decided-{}", a.id)) {
                                td { code { (a.id) } }
                                td { (a.tool) " by " (a.agent) }
                                td { (a.status.as_str()) }
                                td { (a.decided_by.as_deref().unwrap_or("—")) }
                                td { (a.comment.as_deref().unwrap_or("")) }
                                td { (a.decided_at.map(crate::audit::format_unix).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, "Approvals", Some((&admin, &csrf)), body)
}

/// One held call the signed-in person may decide.
fn pending(a: &Approval, calls: &[String], csrf: &str, now: u64) -> Markup {
    let arguments = a
        .arguments
        .as_ref()
        .map(|v| serde_json::to_string_pretty(v).unwrap_or_default());
    let left = a.expires_at.saturating_sub(now);
    html! {
        article.approval id=(a.id) aria-labelledby=(format!("{}-h", a.id)) {
            h3 id=(format!("{}-h", a.id)) { (a.tool) " by " (a.agent) }
            dl {
                dt { "Agent" } dd { (a.agent) }
                dt { "Tool" } dd { (a.tool) }
                dt { "Rule" } dd { code { (a.rule) } }
                dt { "Reason" } dd { (a.reason) }
                dt { "Approver group" } dd { (a.group) @if a.quorum > 1 { " — " (a.votes.len()) " of " (a.quorum) " approvals" } }
                dt { "Arguments (redacted)" }
                dd { @match &arguments { Some(text) => pre.arguments { (text) }, None => em { "not recorded" } } }
                dt { "Earlier calls in this session" }
                dd {
                    @if calls.is_empty() { "none recorded" } @else { ol { @for c in calls { li { (c) } } } }
                }
                dt { "Expires" } dd { (crate::audit::format_unix(a.expires_at)) " (in " (left / 60) " min)" }
                dt { "Request" } dd { code { (a.request_id) } }
            }
            div.decide {
                form method="post" action=(format!("/ui/approvals/{}/approve", a.id)) {
                    input type="hidden" name="csrf" value=(csrf);
                    label for=(format!("{}-approve-comment", a.id)) { "Comment" }
                    textarea id=(format!("{}-approve-comment", a.id)) name="comment" rows="2" maxlength="2000" {}
                    button.approve type="submit" { "Approve" }
                }
                form method="post" action=(format!("/ui/approvals/{}/deny", a.id)) {
                    input type="hidden" name="csrf" value=(csrf);
                    label for=(format!("{}-deny-comment", a.id)) { "Comment" }
                    textarea id=(format!("{}-deny-comment", a.id)) name="comment" rows="2" maxlength="2000" {}
                    button.deny type="submit" { "Deny" }
                }
            }
        }
    }
}

/// The session's earlier calls the state keeps (those rules may look back at), oldest first.
async fn session_calls(plane: &AdminPlane, a: &Approval) -> Vec<String> {
    let Some(session) = a.session.as_deref() else {
        return Vec::new();
    };
    let retention = plane.gw.policy().history_retention;
    let Ok(turn) = plane.gw.state.history_turn(&a.agent, retention).await else {
        return Vec::new();
    };
    let since = crate::state::unix_now_ms().saturating_sub(retention.as_millis() as u64);
    let mut out = Vec::new();
    turn.history(&plane.gw.state).visit(&a.agent, since, &mut |c| {
        if c.session.as_deref() == Some(session) && out.len() < 20 {
            out.push((c.at_ms, c.tool.to_string()));
        }
    });
    drop(turn);
    out.sort();
    out.into_iter()
        .map(|(at, tool)| format!("{tool} at {}", crate::audit::format_unix(at / 1000)))
        .collect()
}

async fn login_page(State(plane): State<Arc<AdminPlane>>, req: Request) -> Response {
    if signed_in(&plane, &req).is_some() {
        return Redirect::to("/ui/").into_response();
    }
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/ui/login" {
            label for="token" { "Personal token" }
            input #token type="password" name="token" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
        p.hint { "Your token is exchanged for a session cookie; it is not stored in the browser." }
    };
    page(status, "Sign in", None, body)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(plane): State<Arc<AdminPlane>>, req: Request) -> Response {
    if !same_origin(&req) {
        return forbidden_page("The form was not sent from this page.");
    }
    let Some(form) = read_form::<LoginForm>(req).await else {
        return login_form(StatusCode::BAD_REQUEST, Some("Enter your personal token."));
    };
    let Some(admin) = plane.auth.by_token(form.token.trim()) else {
        return login_form(StatusCode::UNAUTHORIZED, Some("That token is not valid."));
    };
    tracing::info!(by = %admin.name, "signed in on the inbox page");
    let roles: Vec<&str> = admin.roles.iter().map(|r| r.as_str()).collect();
    let ttl = plane.sessions.ttl().as_secs();
    plane
        .gw
        .audit
        .emit_or_log(&AdminSignedIn {
            by: By {
                name: &admin.name,
                role: None,
                via: Some(admin.via),
            },
            roles: &roles,
            expires_at: crate::state::unix_now() + ttl,
        })
        .await;
    let cookie = plane.sessions.start(admin);
    let mut res = Redirect::to("/ui/").into_response();
    let set = format!(
        "{COOKIE}={cookie}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        plane.sessions.ttl().as_secs()
    );
    res.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&set).expect("hex and ASCII"));
    res
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
}

async fn logout(State(plane): State<Arc<AdminPlane>>, req: Request) -> Response {
    let cookie = cookie_of(req.headers()).map(str::to_owned);
    if let Some((_, subject)) = signed_in(&plane, &req) {
        let Some(form) = read_form::<CsrfForm>(req).await else {
            return forbidden_page("The form's CSRF token is missing.");
        };
        if !plane.sessions.csrf_ok(&subject, &form.csrf) {
            return forbidden_page("The form's CSRF token is not valid.");
        }
    }
    if let Some(c) = cookie {
        plane.sessions.end(&c);
    }
    let mut res = Redirect::to("/ui/login").into_response();
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    res.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("ASCII"));
    res
}

async fn decide(
    State(plane): State<Arc<AdminPlane>>,
    Path((id, verdict)): Path<(String, String)>,
    req: Request,
) -> Response {
    let approve = match verdict.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return with_headers(StatusCode::NOT_FOUND.into_response()),
    };
    let Some((admin, subject)) = signed_in(&plane, &req) else {
        return Redirect::to("/ui/login").into_response();
    };
    let rid = request_id(&req);
    let action = format!("POST {}", req.uri().path());
    let why = if !same_origin(&req) {
        Some("The form was not sent from this page.")
    } else {
        None
    };
    let form = match why {
        Some(_) => None,
        None => read_form::<CsrfForm>(req).await,
    };
    let form = match (why, form) {
        (None, Some(f)) if plane.sessions.csrf_ok(&subject, &f.csrf) => f,
        (why, form) => {
            let why = why.unwrap_or(if form.is_some() {
                "The form's CSRF token is not valid."
            } else {
                "The form's CSRF token is missing."
            });
            let r = super::refuse(&plane.gw, &admin, Role::Approver, &action, why, Some(&id), &rid).await;
            return forbidden_page_with(r.status(), why);
        }
    };
    match super::api::decide(&plane.gw, &admin, &id, approve, form.comment.trim(), &action, &rid).await {
        Ok(_) => Redirect::to("/ui/").into_response(),
        Err(r) => {
            let status = r.status();
            let message = error_message(r).await;
            forbidden_page_with(status, &message)
        }
    }
}

/// The `message` of an error answer, for the page.
async fn error_message(r: Response) -> String {
    let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024).await.unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "The decision was not recorded.".to_owned())
}

fn forbidden_page(why: &str) -> Response {
    forbidden_page_with(StatusCode::FORBIDDEN, why)
}

fn forbidden_page_with(status: StatusCode, why: &str) -> Response {
    let body = html! {
        h1 { "Not done" }
        p.error role="alert" { (why) }
        p { a href="/ui/" { "Back to the inbox" } }
    };
    page(status, "Not done", None, body)
}

/// A browser that sends `Origin` (every browser does on a POST) sent it from this host: a form
/// on another site cannot post here, whatever cookies ride along. Clients that send no
/// `Origin` still need the CSRF token.
fn same_origin(req: &Request) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// A form body (at most 16 KiB).
async fn read_form<T: serde::de::DeserializeOwned>(req: Request) -> Option<T> {
    let bytes = axum::body::to_bytes(req.into_body(), 16 * 1024).await.ok()?;
    serde_urlencoded::from_bytes(&bytes).ok()
}

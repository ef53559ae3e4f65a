//! One JSON-RPC exchange's answer: the HTTP status, the message (a tree, or a tool's answer
//! written straight from its bytes), and for a refusal the contract code its event records.
//! Sent as JSON, or as one SSE event to a client that accepts only `text/event-stream`.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::policy::Code;

/// JSON-RPC error code for a call the gateway blocked (the server-defined range).
pub const BLOCKED: i64 = -32001;
pub(super) const PARSE_ERROR: i64 = -32700;
pub(super) const INVALID_REQUEST: i64 = -32600;
pub(super) const METHOD_NOT_FOUND: i64 = -32601;
pub(super) const INVALID_PARAMS: i64 = -32602;
pub(super) const UNSUPPORTED_VERSION: i64 = -32022;

/// One JSON-RPC exchange's outcome: the HTTP status and the JSON-RPC message (or nothing, 202).
pub(super) struct Reply {
    pub status: StatusCode,
    pub body: Option<Message>,
    pub session_id: Option<String>,
    /// The contract code of a protocol-level refusal, when the reply carries one in its
    /// `error.data` (else its status says which).
    pub code: Option<Code>,
}

/// A reply's JSON-RPC message: a tree, or already written out (a tool's answer, serialised
/// straight from its bytes rather than parsed into a tree and written back).
pub(super) enum Message {
    Tree(Value),
    Json(Vec<u8>),
}

impl Message {
    fn tree(&self) -> Option<&Value> {
        match self {
            Message::Tree(v) => Some(v),
            Message::Json(_) => None,
        }
    }
}

/// The contract's error object, as `error.data`.
pub(super) fn contract_error(code: Code, message: &str, request_id: &str) -> Value {
    json!({"code": code.as_str(), "message": message, "request_id": request_id})
}

impl Reply {
    pub fn result(id: &Value, result: Value) -> Reply {
        // Built as a map: `json!` would serialise `result` into a copy of itself (the tool's
        // whole answer, twice over for a structured one).
        let mut body = Map::with_capacity(3);
        body.insert("jsonrpc".to_owned(), Value::from("2.0"));
        body.insert("id".to_owned(), id.clone());
        body.insert("result".to_owned(), result);
        Reply::message(Message::Tree(Value::Object(body)))
    }

    /// A message written out already (200).
    pub fn message(message: Message) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: Some(message),
            session_id: None,
            code: None,
        }
    }

    pub fn error(status: StatusCode, id: &Value, code: i64, message: impl Into<String>, data: Option<Value>) -> Reply {
        let mut error = json!({"code": code, "message": message.into()});
        if let Some(d) = data {
            error["data"] = d;
        }
        Reply {
            status,
            body: Some(Message::Tree(json!({"jsonrpc": "2.0", "id": id, "error": error}))),
            session_id: None,
            code: None,
        }
    }

    /// A refusal with the contract's error object as `data` (`contract`: its code and
    /// message), recorded as that code.
    pub fn refused(
        status: StatusCode,
        id: &Value,
        rpc_code: i64,
        message: impl Into<String>,
        contract: (Code, &str),
        request_id: &str,
    ) -> Reply {
        let data = contract_error(contract.0, contract.1, request_id);
        Reply {
            code: Some(contract.0),
            ..Reply::error(status, id, rpc_code, message, Some(data))
        }
    }

    pub fn accepted() -> Reply {
        Reply {
            status: StatusCode::ACCEPTED,
            body: None,
            session_id: None,
            code: None,
        }
    }

    pub fn with_id(mut self, id: &Value) -> Reply {
        if let Some(Message::Tree(body)) = &mut self.body {
            body["id"] = id.clone();
        }
        self
    }

    /// The JSON-RPC error message, for the refusal's event.
    pub fn error_message(&self) -> &str {
        self.body
            .as_ref()
            .and_then(Message::tree)
            .and_then(|b| b["error"]["message"].as_str())
            .unwrap_or("")
    }

    /// As JSON, or as one SSE event when the client accepts only `text/event-stream`.
    pub fn into_response(self, headers: &HeaderMap) -> Response {
        let json = |m: Message| match m {
            Message::Tree(v) => serde_json::to_vec(&v).expect("JSON serialises"),
            Message::Json(bytes) => bytes,
        };
        let mut res = match self.body {
            None => Response::new(Body::empty()),
            Some(body) if wants_sse(headers) => {
                // A tool's answer is embedded as the tool wrote it, so it may have line breaks
                // between its tokens (JSON allows them nowhere else): each line is its own
                // `data:` line, which the client joins back with `\n`.
                let mut event = b"event: message".to_vec();
                for line in json(body).split(|&b| b == b'\n' || b == b'\r') {
                    event.extend_from_slice(b"\ndata: ");
                    event.extend_from_slice(line);
                }
                event.extend_from_slice(b"\n\n");
                let mut r = Response::new(Body::from(event));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
            Some(body) => {
                // Straight into bytes: `to_string` goes through `fmt` a piece at a time.
                let mut r = Response::new(Body::from(json(body)));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
        };
        *res.status_mut() = self.status;
        if let Some(id) = self.session_id.and_then(|s| HeaderValue::from_str(&s).ok()) {
            res.headers_mut().insert("mcp-session-id", id);
        }
        res
    }
}

fn wants_sse(headers: &HeaderMap) -> bool {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    accept.contains("text/event-stream") && !accept.contains("application/json") && !accept.contains("*/*")
}

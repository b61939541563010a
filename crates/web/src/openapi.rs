//! The OpenAPI 3.1 document of `/api/v1`, served at `/api/v1/openapi.json`.
//!
//! Written here as data rather than derived by a macro crate: the API is small, the document
//! says what the use cases check (the permission of every operation, the idempotency header,
//! the error codes), and nothing is downloaded at build or run time. The test
//! `web/tests/endpoints.rs` keeps it true: every path the router serves is in the document,
//! and every operation in the document answers (401 without a login, unless it is public).

use serde_json::{Map, Value, json};

/// One operation: method, path, summary, the permission it needs (`None`: public, `Some("")`:
/// any logged-in operator), request body schema, response schema.
#[derive(Debug)]
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub permission: Option<&'static str>,
    pub body: Option<Value>,
    pub response: Value,
    pub idempotent: bool,
    pub query: &'static [(&'static str, &'static str)],
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn list(name: &str) -> Value {
    json!({ "type": "array", "items": schema(name) })
}

fn obj(fields: &[(&str, &str)]) -> Value {
    let mut props = Map::new();
    for (name, ty) in fields {
        let ty = match *ty {
            "int" => json!({ "type": "integer", "format": "int64" }),
            "str" => json!({ "type": "string" }),
            "bool" => json!({ "type": "boolean" }),
            "str?" => json!({ "type": ["string", "null"] }),
            "int?" => json!({ "type": ["integer", "null"], "format": "int64" }),
            other => schema(other),
        };
        props.insert((*name).to_owned(), ty);
    }
    json!({ "type": "object", "properties": props })
}

/// Every operation of the API.
pub fn operations() -> Vec<Operation> {
    let op = |method, path, summary, permission: Option<&'static str>, body, response| Operation {
        method,
        path,
        summary,
        permission,
        body,
        response,
        idempotent: false,
        query: &[],
    };
    let page: &'static [(&str, &str)] = &[
        ("before", "the previous page's last id or seq"),
        ("limit", "rows, at most 1000"),
    ];
    let range = obj(&[
        ("first", "str"),
        ("count", "int"),
        ("batch", "str"),
        ("reason", "str"),
    ]);
    let mut ops = vec![
        op(
            "get",
            "/healthz",
            "Liveness: the database answers",
            None,
            None,
            json!({"type": "object"}),
        ),
        op(
            "get",
            "/api/v1/openapi.json",
            "This document",
            None,
            None,
            json!({"type": "object"}),
        ),
        op(
            "post",
            "/api/v1/login",
            "Log in: a session token for the Authorization header (Bearer). Five failures for a username (twenty from one address) within 15 minutes lock further attempts: 429",
            None,
            Some(obj(&[("username", "str"), ("password", "str")])),
            schema("Session"),
        ),
        op(
            "post",
            "/api/v1/logout",
            "End this session",
            Some(""),
            None,
            obj(&[("logged_out", "bool")]),
        ),
        op(
            "get",
            "/api/v1/me",
            "The operator logged in",
            Some(""),
            None,
            schema("Operator"),
        ),
        op(
            "get",
            "/api/v1/operators",
            "Operators",
            Some("operators.manage"),
            None,
            obj(&[("operators", "OperatorList")]),
        ),
        op(
            "post",
            "/api/v1/operators",
            "Create an operator (password at least 10 characters, Argon2id)",
            Some("operators.manage"),
            Some(obj(&[
                ("username", "str"),
                ("display_name", "str?"),
                ("role", "Role"),
                ("merchant_account_id", "int?"),
                ("password", "str"),
            ])),
            schema("Operator"),
        ),
        op(
            "patch",
            "/api/v1/operators/{id}",
            "Change an operator's name, role, merchant, disabled flag or password (operators may change their own password with old_password)",
            Some(""),
            Some(obj(&[
                ("display_name", "str?"),
                ("role", "Role"),
                ("merchant_account_id", "int?"),
                ("disabled", "bool"),
                ("password", "str?"),
                ("old_password", "str?"),
            ])),
            schema("Operator"),
        ),
        op(
            "get",
            "/api/v1/accounts",
            "Ledger accounts in id order",
            Some("ledger.read"),
            None,
            json!({"type": "object"}),
        ),
        op(
            "get",
            "/api/v1/accounts/{id}",
            "One ledger account with its four sums",
            Some("ledger.read"),
            None,
            json!({"type": "object"}),
        ),
        op(
            "get",
            "/api/v1/accounts/{id}/transfers",
            "An account's history, newest first",
            Some("ledger.read"),
            None,
            json!({"type": "object"}),
        ),
        op(
            "get",
            "/api/v1/transfers/{id}",
            "One transfer with its answer",
            Some("ledger.read"),
            None,
            json!({"type": "object"}),
        ),
        Operation {
            query: &[
                ("q", "number prefix or part of a name"),
                ("department", "exact department"),
                ("kind", "student, staff or temporary"),
                ("after", "ids above this"),
                ("limit", "rows, at most 1000"),
            ],
            ..op(
                "get",
                "/api/v1/cardholders",
                "Search cardholders (identity and phone numbers masked)",
                Some("cardholders.read"),
                None,
                list("Cardholder"),
            )
        },
        op(
            "post",
            "/api/v1/cardholders",
            "Create a cardholder and their online account",
            Some("cardholders.write"),
            Some(schema("NewCardholder")),
            schema("Cardholder"),
        ),
        Operation {
            query: &[(
                "issue_cards",
                "true: issue each new cardholder a card from initialised stock, with the deposit",
            )],
            ..op(
                "post",
                "/api/v1/cardholders/import",
                "Import cardholders from CSV (text/csv, UTF-8, header number,name,kind,department[,id_number,phone]); valid rows are imported, invalid rows listed with line numbers",
                Some("cardholders.write"),
                Some(json!({"type": "string", "contentMediaType": "text/csv"})),
                schema("ImportReport"),
            )
        },
        op(
            "get",
            "/api/v1/cardholders/{id}",
            "One cardholder (whole identity and phone numbers only for cardholders.write)",
            Some("cardholders.read"),
            None,
            schema("Cardholder"),
        ),
        op(
            "patch",
            "/api/v1/cardholders/{id}",
            "Edit a cardholder; an empty id_number or phone clears it",
            Some("cardholders.write"),
            Some(obj(&[
                ("name", "str?"),
                ("kind", "CardholderKind"),
                ("department", "str?"),
                ("id_number", "str?"),
                ("phone", "str?"),
            ])),
            schema("Cardholder"),
        ),
        op(
            "get",
            "/api/v1/cardholders/{id}/cards",
            "Every card the cardholder has had",
            Some("cards.read"),
            None,
            list("Card"),
        ),
        Operation {
            query: page,
            ..op(
                "get",
                "/api/v1/cardholders/{id}/history",
                "Money movements across the online account and every card, newest first",
                Some("cardholders.read"),
                None,
                list("HistoryEntry"),
            )
        },
        Operation {
            idempotent: true,
            ..op(
                "post",
                "/api/v1/cardholders/{id}/top-up",
                "Cash top-up of the online account at the card desk",
                Some("cash_desk"),
                Some(obj(&[("amount_fen", "int")])),
                schema("Receipt"),
            )
        },
        Operation {
            idempotent: true,
            ..op(
                "post",
                "/api/v1/cardholders/{id}/refund",
                "Cash refund from the online account",
                Some("cash_desk"),
                Some(obj(&[("amount_fen", "int")])),
                schema("Receipt"),
            )
        },
        op(
            "post",
            "/api/v1/cards",
            "Issue a card: an initialised card from stock, the deposit in cash, the expiry",
            Some("cards.write"),
            Some(obj(&[
                ("cardholder_id", "int"),
                ("asn", "str?"),
                ("deposit_fen", "int?"),
                ("expires_on", "str?"),
            ])),
            schema("Card"),
        ),
        op(
            "get",
            "/api/v1/cards/by-asn/{asn}",
            "One card by its ASN",
            Some("cards.read"),
            None,
            schema("Card"),
        ),
        op(
            "get",
            "/api/v1/cards/{id}",
            "One card",
            Some("cards.read"),
            None,
            schema("Card"),
        ),
        op(
            "get",
            "/api/v1/cards/{id}/events",
            "A card's status history",
            Some("cards.read"),
            None,
            list("CardEvent"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/loss",
            "Report a card lost (挂失); it goes on the blacklist",
            Some("cards.write"),
            None,
            schema("CardChange"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/unlock",
            "A lost card is found (解挂); it comes off the blacklist",
            Some("cards.write"),
            None,
            schema("CardChange"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/freeze",
            "Freeze an active card",
            Some("cards.write"),
            Some(obj(&[("reason", "str")])),
            schema("CardChange"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/unfreeze",
            "Unfreeze a card",
            Some("cards.write"),
            None,
            schema("CardChange"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/replace",
            "Replace a card (补卡): new card, deposit carried, fee in cash, old purse to the online account after the waiting period",
            Some("cards.write"),
            Some(obj(&[("asn", "str?"), ("fee_fen", "int?")])),
            schema("CardChange"),
        ),
        op(
            "post",
            "/api/v1/cards/{id}/cancel",
            "Cancel a card (销户): online balance and deposit refunded in cash (needs cash_desk too)",
            Some("cards.write"),
            None,
            schema("CardChange"),
        ),
        Operation {
            query: &[("since", "the blacklist version the terminal holds")],
            ..op(
                "get",
                "/api/v1/blacklist",
                "Blacklist changes after a version, in version order",
                Some("cards.read"),
                None,
                schema("BlacklistDelta"),
            )
        },
        op(
            "get",
            "/api/v1/stock",
            "Cards in stock per state",
            Some("stock.read"),
            None,
            schema("StockCounts"),
        ),
        Operation {
            query: page,
            ..op(
                "get",
                "/api/v1/stock/movements",
                "The stock movement log, newest first",
                Some("stock.read"),
                None,
                list("Movement"),
            )
        },
        op(
            "post",
            "/api/v1/stock/receive",
            "Receive blank cards: count cards from first on, all new",
            Some("stock.write"),
            Some(range.clone()),
            schema("Movement"),
        ),
        op(
            "post",
            "/api/v1/stock/initialise",
            "Mark blank cards initialised",
            Some("stock.write"),
            Some(range.clone()),
            schema("Movement"),
        ),
        op(
            "post",
            "/api/v1/stock/void",
            "Void blank or initialised cards (reason required)",
            Some("stock.write"),
            Some(range),
            schema("Movement"),
        ),
        Operation {
            idempotent: true,
            ..op(
                "post",
                "/api/v1/payments",
                "A third party (merchant operator) charges a cardholder's online account for its merchant (以库为准); the card must be active",
                Some("payments"),
                Some(obj(&[
                    ("card_asn", "str?"),
                    ("cardholder_number", "str?"),
                    ("amount_fen", "int"),
                    ("description", "str"),
                ])),
                schema("Receipt"),
            )
        },
        Operation {
            query: &[("after", "ids above this"), ("limit", "rows, at most 1000")],
            ..op(
                "get",
                "/api/v1/terminals",
                "Registered terminals",
                Some("terminals.read"),
                None,
                list("Terminal"),
            )
        },
        op(
            "post",
            "/api/v1/terminals",
            "Register a terminal (12 hex digit terminal number; a POS needs a merchant)",
            Some("terminals.manage"),
            Some(obj(&[
                ("terminal_no", "str"),
                ("kind", "TerminalKind"),
                ("merchant_account_id", "int?"),
                ("location", "str"),
                ("psam_serial", "str?"),
            ])),
            schema("Terminal"),
        ),
        op(
            "get",
            "/api/v1/terminals/{id}",
            "One terminal: merchant, PSAM, enabled, last seen, blacklist version held",
            Some("terminals.read"),
            None,
            schema("Terminal"),
        ),
        op(
            "patch",
            "/api/v1/terminals/{id}",
            "Enable or disable a terminal, move it, or bind another PSAM (empty unbinds)",
            Some("terminals.manage"),
            Some(obj(&[
                ("enabled", "bool"),
                ("merchant_account_id", "int?"),
                ("location", "str?"),
                ("psam_serial", "str?"),
            ])),
            schema("Terminal"),
        ),
        Operation {
            query: page,
            ..op(
                "get",
                "/api/v1/offline-records/quarantined",
                "Offline records kept out of the ledger, with the reason, newest first",
                Some("terminals.read"),
                None,
                list("Quarantined"),
            )
        },
        op(
            "get",
            "/api/v1/cards/by-asn/{asn}/anomalies",
            "A card's purse anomalies (missing records, balance mismatches), open ones first",
            Some("terminals.read"),
            None,
            list("Anomaly"),
        ),
        Operation {
            query: &[
                (
                    "state",
                    "one state: queued, requested, credited, loading, loaded, returned, refused, reversing, reversed, manual",
                ),
                ("cardholder_id", "one cardholder's"),
                ("limit", "rows, at most 1000"),
            ],
            ..op(
                "get",
                "/api/v1/topups",
                "Bank top-ups (圈存), newest first, each with its one state",
                Some("bank.read"),
                None,
                list("TopUp"),
            )
        },
        op(
            "get",
            "/api/v1/topups/{id}",
            "One bank top-up: its state, the bank's answer, the campus serial, the load deadline",
            Some("bank.read"),
            None,
            schema("TopUp"),
        ),
        Operation {
            query: &[("all", "true: cleared alarms too")],
            ..op(
                "get",
                "/api/v1/alarms",
                "Alarms, newest first (open ones unless all=true)",
                Some("terminals.read"),
                None,
                list("Alarm"),
            )
        },
        Operation {
            query: &[
                ("actor", "exact actor"),
                ("action", "exact action"),
                ("target", "target prefix"),
                ("from_ms", "at or after"),
                ("to_ms", "before"),
                ("before", "seq below this"),
                ("limit", "rows, at most 1000"),
            ],
            ..op(
                "get",
                "/api/v1/audit",
                "The audit log, newest first, filtered",
                Some("audit.read"),
                None,
                list("AuditEntry"),
            )
        },
        op(
            "get",
            "/api/v1/audit/verify",
            "Recompute the audit hash chain",
            Some("audit.read"),
            None,
            obj(&[("rows", "int"), ("ok", "bool"), ("problems", "Strings")]),
        ),
    ];
    ops.sort_by_key(|o| (o.path, o.method));
    ops
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for o in operations() {
        let mut operation = json!({
            "summary": o.summary,
            "responses": {
                "200": { "description": "OK", "content": { "application/json": { "schema": o.response } } },
                "default": { "description": "An error with a stable code", "content": { "application/json": { "schema": schema("Error") } } },
            },
        });
        let mut parameters = Vec::new();
        for segment in o.path.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                parameters.push(json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }));
            }
        }
        for (name, description) in o.query {
            parameters.push(json!({ "name": name, "in": "query", "required": false, "description": description, "schema": { "type": "string" } }));
        }
        if o.idempotent {
            parameters.push(json!({
                "name": "Idempotency-Key", "in": "header", "required": true,
                "description": "1 to 64 printable ASCII characters; a retry with the same key and body gets the first answer (also a refusal), another body gets 409 idempotency_key_reused",
                "schema": { "type": "string" },
            }));
        }
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        match o.permission {
            None => operation["security"] = json!([]),
            Some("") => operation["x-permission"] = json!("any operator"),
            Some(p) => operation["x-permission"] = json!(p),
        }
        if let Some(body) = o.body {
            let media = if o.path.ends_with("/import") {
                "text/csv"
            } else {
                "application/json"
            };
            operation["requestBody"] =
                json!({ "required": true, "content": { media: { "schema": body } } });
        }
        let entry = paths
            .entry(o.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[o.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "onecard API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The JSON API of onecard, the campus card platform. Log in with POST /api/v1/login and send the token as `Authorization: Bearer <token>`. Every operation names the permission it needs (x-permission); roles grant permissions: administrator (all but payments), card_desk (cardholders, cards, stock, cash_desk), finance (reads, ledger.read, terminals.read, cash_desk), auditor (reads, ledger.read, terminals.read, audit.read), merchant_operator (payments for its merchant). Errors are JSON {code, message}; 401 no login, 403 the role does not allow it, 409 a conflict with the current state. Money is in fen (1 yuan = 100 fen).",
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(),
        },
        "security": [{ "bearer": [] }],
        "paths": paths,
    })
}

fn schemas() -> Value {
    let kind = json!({ "type": "string", "enum": ["student", "staff", "temporary"] });
    json!({
        "Error": obj(&[("code", "str"), ("message", "str")]),
        "Strings": { "type": "array", "items": { "type": "string" } },
        "Role": { "type": "string", "enum": ["administrator", "card_desk", "finance", "auditor", "merchant_operator"] },
        "Operator": obj(&[("id", "int"), ("username", "str"), ("display_name", "str"), ("role", "Role"), ("merchant_account_id", "int?"), ("disabled", "bool"), ("created_at_ms", "int"), ("updated_at_ms", "int")]),
        "OperatorList": list("Operator"),
        "Session": obj(&[("token", "str"), ("expires_at_ms", "int"), ("operator", "Operator")]),
        "CardholderKind": kind,
        "NewCardholder": obj(&[("number", "str"), ("name", "str"), ("kind", "CardholderKind"), ("department", "str"), ("id_number", "str?"), ("phone", "str?")]),
        "Cardholder": obj(&[("id", "int"), ("number", "str"), ("name", "str"), ("kind", "CardholderKind"), ("department", "str"), ("id_number", "str?"), ("phone", "str?"), ("online_account", "int"), ("created_at_ms", "int"), ("updated_at_ms", "int")]),
        "RowError": obj(&[("line", "int"), ("number", "str?"), ("message", "str")]),
        "ImportReport": {
            "type": "object",
            "properties": {
                "rows": { "type": "integer" }, "imported": { "type": "integer" }, "cards_issued": { "type": "integer" },
                "first_id": { "type": ["integer", "null"] }, "errors": list("RowError"),
            },
        },
        "CardStatus": { "type": "string", "enum": ["active", "lost", "frozen", "replaced", "cancelled"] },
        "Card": obj(&[("id", "int"), ("asn", "str"), ("cardholder_id", "int"), ("status", "CardStatus"), ("purse_account", "int"), ("deposit_fen", "int"), ("expires_on", "str"), ("issued_at_ms", "int"), ("replaced_by", "int?"), ("purse_settle_at_ms", "int?"), ("purse_settled_at_ms", "int?"), ("updated_at_ms", "int")]),
        "CardChange": {
            "type": "object",
            "properties": {
                "card": schema("Card"), "new_card": { "oneOf": [schema("Card"), { "type": "null" }] },
                "blacklist_version": { "type": ["integer", "null"] },
                "money": { "type": "array", "items": { "type": "array", "prefixItems": [{ "type": "string" }, { "type": "integer" }] } },
            },
        },
        "CardEvent": obj(&[("id", "int"), ("at_ms", "int"), ("action", "str"), ("from", "str?"), ("to", "CardStatus"), ("actor", "str"), ("note", "str")]),
        "BlacklistChange": obj(&[("version", "int"), ("asn", "str"), ("listed", "bool"), ("reason", "str"), ("at_ms", "int")]),
        "BlacklistDelta": {
            "type": "object",
            "properties": { "version": { "type": "integer" }, "more": { "type": "boolean" }, "changes": list("BlacklistChange") },
        },
        "StockCounts": obj(&[("blank", "int"), ("initialised", "int"), ("issued", "int"), ("void", "int")]),
        "Movement": obj(&[("id", "int"), ("at_ms", "int"), ("actor", "str"), ("action", "str"), ("asn_first", "str"), ("asn_last", "str"), ("count", "int"), ("from", "str?"), ("to", "str"), ("note", "str")]),
        "Receipt": obj(&[("transfer_id", "str"), ("cardholder_id", "int"), ("amount_fen", "int"), ("balance_fen", "int"), ("at_ms", "int")]),
        "HistoryEntry": obj(&[("seq", "int"), ("transfer_id", "str"), ("at_ms", "int"), ("account", "int"), ("card_asn", "str?"), ("code", "int"), ("amount_fen", "int")]),
        "TerminalKind": { "type": "string", "enum": ["pos", "kiosk", "gateway"] },
        "Terminal": obj(&[("id", "int"), ("terminal_no", "str"), ("kind", "TerminalKind"), ("merchant_account_id", "int?"), ("location", "str"), ("psam_serial", "str?"), ("enabled", "bool"), ("last_seen_at_ms", "int?"), ("signed_in_at_ms", "int?"), ("blacklist_version", "int"), ("created_at_ms", "int"), ("updated_at_ms", "int")]),
        "Quarantined": obj(&[("id", "int"), ("asn", "str"), ("counter", "int"), ("terminal_no", "str"), ("amount_fen", "int"), ("reason", "str"), ("received_at_ms", "int")]),
        "Anomaly": obj(&[("id", "int"), ("asn", "str"), ("kind", "str"), ("counter", "int"), ("detail", "str"), ("created_at_ms", "int"), ("resolved_at_ms", "int?")]),
        "TopUpState": { "type": "string", "enum": ["requested", "approved", "credited", "loading", "loaded", "returned", "refused", "reversing", "reversed", "manual", "queued"] },
        "TopUp": obj(&[("id", "int"), ("origin", "str"), ("kind", "str"), ("state", "TopUpState"), ("bank_id", "str"), ("batch", "str"), ("stan", "str"), ("pan_masked", "str"), ("cardholder_id", "int"), ("amount_fen", "int"), ("terminal_no", "str?"), ("bank_code", "str?"), ("bank_reference", "str?"), ("auth_code", "str?"), ("settle_date", "str"), ("credit_transfer", "str?"), ("load_deadline_ms", "int?"), ("load_card_id", "int?"), ("requested_at_ms", "int"), ("updated_at_ms", "int")]),
        "Alarm": obj(&[("id", "int"), ("kind", "str"), ("subject", "str"), ("message", "str"), ("raised_at_ms", "int"), ("cleared_at_ms", "int?")]),
        "AuditEntry": obj(&[("seq", "int"), ("at_ms", "int"), ("actor", "str"), ("source", "str"), ("action", "str"), ("target", "str"), ("summary", "str")]),
    })
}

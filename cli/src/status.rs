//! `leasehold status`: who holds which key, on any backend.
//!
//! Exit codes, as grep(1) has them: 0 shown (an empty list included); 1 the key asked for has
//! no record (never leased; for etcd, not held, since etcd deletes free keys); 2 no answer:
//! a usage or configuration error (bad key, URL, TLS file, missing credentials), a store that
//! cannot be reached, or one that refused (wrong token, missing table).

use std::process::ExitCode;
use std::time::Duration;

use leasehold_core::{parse_key, Fence, Key, OwnerId};
use leasehold_http::{HttpClient, TransportError};
use leasehold_stores::{
    DynamoDbBackend, EtcdBackend, EtcdSessions, Filter, Holder, KeyStatus, ListError, QueueStatus,
};
use serde_json::{json, Value};

use crate::run::{BackendKind, Protocol};

/// How long one request to the store may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The key to show, held or free; the held keys when omitted.
    key: Option<String>,
    /// List free keys too (that the store still has a record of).
    #[arg(long, conflicts_with = "key")]
    all: bool,
    /// Only keys that start with this.
    #[arg(long, value_name = "P", conflicts_with = "key")]
    prefix: Option<String>,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// The lease server (or the etcd / DynamoDB endpoint).
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Which kind of store `--server` is.
    #[arg(long, value_enum, default_value = "builtin")]
    backend: BackendKind,
    /// etcd: the prefix under which lease keys are stored (`run --etcd-prefix`).
    #[arg(long, default_value = "leasehold/")]
    etcd_prefix: String,
    /// DynamoDB: the table (partition key `key`, string).
    #[arg(long, default_value = "leases")]
    table: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Whose keys to show (`run --protocol`): `v2` (the default on the built-in server and
    /// etcd, as for `run`) shows keys by the sessions holding them, by their public label
    /// (never anything that authorises), and on the built-in server keys held by a v1 lease as
    /// such; `v1` (the default on DynamoDB) shows v1 records with their owner ids.
    #[arg(long, value_enum, env = "LEASEHOLD_PROTOCOL")]
    protocol: Option<Protocol>,
    #[command(flatten)]
    tls: crate::TlsArgs,
}

/// Exit code: the key asked for has no record.
const EXIT_UNKNOWN_KEY: u8 = 1;
/// Exit code: no answer (usage, configuration, unreachable or refusing store).
const EXIT_NO_ANSWER: u8 = 2;

/// Why `status` has nothing to show.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("{0}")]
    Usage(String),
    #[error("{server}: {source}")]
    Backend {
        server: String,
        #[source]
        source: TransportError,
    },
    #[error("server {server} unreachable: {source}")]
    Unreachable {
        server: String,
        #[source]
        source: ListError,
    },
    #[error("server {server}: {source}")]
    Refused {
        server: String,
        #[source]
        source: ListError,
    },
    #[error("key {key:?} {why}")]
    UnknownKey { key: String, why: &'static str },
}

impl StatusError {
    fn exit_code(&self) -> u8 {
        match self {
            StatusError::UnknownKey { .. } => EXIT_UNKNOWN_KEY,
            _ => EXIT_NO_ANSWER,
        }
    }
}

pub(crate) fn main(args: Args) -> ExitCode {
    // The default is `run`'s, so `status` shows what a plain `run` holds.
    let protocol = Protocol::or_default_for(args.protocol, args.backend);
    if protocol == Protocol::V2 {
        return sessions::main(&args);
    }
    match smol::block_on(status(&args)) {
        Ok(rows) => {
            if args.json {
                println!("{}", document(&rows));
            } else {
                print!("{}", table(&rows));
                if rows.is_empty() && !args.all {
                    eprintln!("leasehold status: no key is held (--all lists free keys too)");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leasehold status: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn status(args: &Args) -> Result<Vec<KeyStatus>, StatusError> {
    let store = Store::open(args)?;
    let failed = |source: ListError| match source {
        ListError::Transport(_) => StatusError::Unreachable { server: args.server.clone(), source },
        _ => StatusError::Refused { server: args.server.clone(), source },
    };
    let mut rows = match &args.key {
        Some(k) => {
            let key = parse_key(k).map_err(|e| StatusError::Usage(format!("key {k:?}: {e}")))?;
            match store.status(&key).await.map_err(failed)? {
                Some(row) => vec![row],
                None => {
                    let why = match args.backend {
                        BackendKind::Etcd => "is not held (etcd keeps no record of free keys)",
                        _ => "has never been leased",
                    };
                    return Err(StatusError::UnknownKey { key: k.clone(), why });
                }
            }
        }
        None => {
            let prefix = args.prefix.clone().unwrap_or_default();
            // A prefix outside the key alphabet could match nothing: say so instead.
            if !prefix.is_empty() {
                parse_key(&prefix).map_err(|e| StatusError::Usage(format!("--prefix {prefix:?}: {e}")))?;
            }
            let filter = Filter { prefix, held_only: !args.all };
            let mut rows = store.list(&filter).await.map_err(failed)?;
            // Also here, whatever the store did: an older server ignores the query.
            rows.retain(|r| filter.admits(r));
            rows
        }
    };
    // Byte order of the key, whatever order the store answered in.
    rows.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    Ok(rows)
}

/// `status --protocol v2`: session-held keys, from the built-in server (`GET /v2/leases`) or
/// from etcd's queues under `PREFIX`v2/ (a paged range).
mod sessions {
    use super::*;

    /// One holder of a v2 key (a key with a limit above 1 has up to that many).
    #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
    pub(super) struct SessionHolder {
        pub(super) session: u64,
        pub(super) label: String,
        pub(super) fence: u64,
        pub(super) ttl: u64,
        pub(super) remaining: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub(super) value: Option<String>,
    }

    /// A v2 key as `GET /v2/leases` shows it (times in microseconds).
    #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
    pub(super) struct SessionKey {
        pub(super) key: String,
        /// Every holder; older servers list only `holder`.
        #[serde(default)]
        pub(super) holders: Vec<SessionHolder>,
        #[serde(default, skip_serializing)]
        holder: Option<SessionHolder>,
        pub(super) last_fence: u64,
        #[serde(default)]
        pub(super) waiting: u64,
        #[serde(default = "one")]
        pub(super) limit: u16,
        /// Held by a v1 lease (the key namespace is shared): at most this long (µs) left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub(super) v1_remaining: Option<u64>,
    }

    fn one() -> u16 {
        1
    }

    impl SessionKey {
        /// A v2 queue on etcd, in the built-in server's shape: etcd keeps no free key, so its
        /// last fence is its newest holder's.
        pub(super) fn of_etcd(q: QueueStatus) -> SessionKey {
            let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
            let holders: Vec<SessionHolder> = q
                .holders
                .into_iter()
                .map(|h| SessionHolder {
                    session: h.session,
                    label: h.label,
                    fence: h.fence.0,
                    ttl: us(h.ttl),
                    remaining: us(h.remaining),
                    value: Some(h.value).filter(|v| !v.is_empty()),
                })
                .collect();
            let v1_fence = q.v1_holder.as_ref().map(|h| h.fence.0);
            let last_fence = holders.iter().map(|h| h.fence).chain(v1_fence).max().unwrap_or(0);
            SessionKey {
                key: q.key,
                holders,
                holder: None,
                last_fence,
                waiting: q.waiting as u64,
                limit: q.limit,
                v1_remaining: q.v1_holder.map(|h| h.remaining.as_micros() as u64),
            }
        }

        pub(super) fn normalise(mut self) -> SessionKey {
            if self.holders.is_empty() {
                self.holders.extend(self.holder.take());
            }
            self.holder = None;
            self
        }
    }

    pub(super) fn main(args: &Args) -> ExitCode {
        match smol::block_on(list(args)) {
            Ok(rows) => {
                if args.json {
                    println!("{}", json!({ "leases": rows }));
                } else {
                    print!("{}", table(&rows));
                    if rows.is_empty() && args.key.is_none() && !args.all {
                        eprintln!("leasehold status: no key is held (--all lists free keys too)");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("leasehold status: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    }

    async fn list(args: &Args) -> Result<Vec<SessionKey>, StatusError> {
        let tls = args.tls.config().map_err(StatusError::Usage)?;
        let backend = |source| StatusError::Backend { server: args.server.clone(), source };
        let (prefix, held_only) = match &args.key {
            Some(k) => {
                parse_key(k).map_err(|e| StatusError::Usage(format!("key {k:?}: {e}")))?;
                (k.clone(), false)
            }
            None => {
                let prefix = args.prefix.clone().unwrap_or_default();
                if !prefix.is_empty() {
                    parse_key(&prefix)
                        .map_err(|e| StatusError::Usage(format!("--prefix {prefix:?}: {e}")))?;
                }
                (prefix, !args.all)
            }
        };
        let failed = |source: ListError| match source {
            ListError::Transport(_) => StatusError::Unreachable { server: args.server.clone(), source },
            _ => StatusError::Refused { server: args.server.clone(), source },
        };
        let mut rows: Vec<SessionKey> = match args.backend {
            BackendKind::Builtin => {
                let http = HttpClient::new(&args.server, REQUEST_TIMEOUT).map_err(backend)?.with_tls(tls);
                let doc = get(&http, &args.token, &format!("/v2/leases?held={held_only}&prefix={prefix}"))
                    .await
                    .map_err(failed)?;
                let bad = |detail: String| {
                    failed(ListError::Malformed { operation: "GET /v2/leases".into(), detail })
                };
                let rows = doc.get("leases").cloned().ok_or_else(|| bad("a list without leases".into()))?;
                serde_json::from_value::<Vec<SessionKey>>(rows)
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(SessionKey::normalise)
                    .collect()
            }
            BackendKind::Etcd => {
                let etcd = EtcdSessions::new(&args.server, &args.etcd_prefix, REQUEST_TIMEOUT)
                    .map_err(backend)?
                    .with_tls(tls);
                let filter = Filter { prefix, held_only };
                etcd.list(&filter).await.map_err(failed)?.into_iter().map(SessionKey::of_etcd).collect()
            }
            BackendKind::Dynamodb => {
                return Err(StatusError::Usage(
                    "--protocol v2 is for the built-in server and etcd (on DynamoDB, session holders show in the v1 listing, by label)".into(),
                ))
            }
        };
        rows.retain(|r| args.key.as_ref().is_none_or(|k| &r.key == k));
        if let (Some(k), true) = (&args.key, rows.is_empty()) {
            let why = match args.backend {
                BackendKind::Etcd => "is not held over protocol v2 (etcd keeps no record of free keys)",
                _ => "has never been leased over protocol v2",
            };
            return Err(StatusError::UnknownKey { key: k.clone(), why });
        }
        rows.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        Ok(rows)
    }

    /// What the HOLDER column says of a key held by a v1 lease (`status --protocol v1` shows
    /// its owner).
    const V1_HOLDER: &str = "(v1 lease)";

    /// KEY FENCE HOLDER SESSION TTL REMAINING WAITING: a row per holder (a semaphore's key
    /// has several); a free key shows its last fence, `-` and `free`.
    pub(super) fn table(rows: &[SessionKey]) -> String {
        let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0).max("KEY".len());
        let label = rows
            .iter()
            .flat_map(|r| &r.holders)
            .map(|h| h.label.len())
            .max()
            .unwrap_or(0)
            .max("HOLDER".len());
        let secs = |us: u64| format!("{:.1}s", us as f64 / 1e6);
        let mut out = format!(
            "{:<width$} {:>8} {:<label$} {:>8} {:>8} {:>9} {:>7}\n",
            "KEY", "FENCE", "HOLDER", "SESSION", "TTL", "REMAINING", "WAITING"
        );
        let label = label.max(V1_HOLDER.len());
        for r in rows {
            if let (true, Some(left)) = (r.holders.is_empty(), r.v1_remaining) {
                out.push_str(&format!(
                    "{:<width$} {:>8} {:<label$} {:>8} {:>8} {:>9} {:>7}\n",
                    r.key,
                    r.last_fence,
                    V1_HOLDER,
                    "-",
                    "-",
                    secs(left),
                    r.waiting
                ));
            } else if r.holders.is_empty() {
                out.push_str(&format!(
                    "{:<width$} {:>8} {:<label$} {:>8} {:>8} {:>9} {:>7}\n",
                    r.key, r.last_fence, "-", "-", "-", "free", r.waiting
                ));
            }
            for h in &r.holders {
                out.push_str(&format!(
                    "{:<width$} {:>8} {:<label$} {:>8} {:>8} {:>9} {:>7}\n",
                    r.key,
                    h.fence,
                    h.label,
                    format!("s{}", h.session),
                    secs(h.ttl),
                    secs(h.remaining),
                    r.waiting
                ));
            }
        }
        out
    }
}

/// The store `status` reads.
enum Store {
    Builtin { http: HttpClient, token: Option<String> },
    Etcd(EtcdBackend),
    Dynamodb(DynamoDbBackend),
}

impl Store {
    fn open(args: &Args) -> Result<Store, StatusError> {
        let tls = args.tls.config().map_err(StatusError::Usage)?;
        let backend = |source| StatusError::Backend { server: args.server.clone(), source };
        Ok(match args.backend {
            BackendKind::Builtin => Store::Builtin {
                http: HttpClient::new(&args.server, REQUEST_TIMEOUT).map_err(backend)?.with_tls(tls),
                token: args.token.clone(),
            },
            BackendKind::Etcd => Store::Etcd(
                EtcdBackend::new(&args.server, &args.etcd_prefix, REQUEST_TIMEOUT)
                    .map_err(backend)?
                    .with_tls(tls),
            ),
            BackendKind::Dynamodb => Store::Dynamodb(
                DynamoDbBackend::from_env(&args.server, &args.table, REQUEST_TIMEOUT)
                    .map_err(backend)?
                    .with_tls(tls),
            ),
        })
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<KeyStatus>, ListError> {
        match self {
            Store::Builtin { http, token } => {
                // Key prefixes are made of characters a query may carry as they are.
                let query = format!("?held={}&prefix={}", filter.held_only, filter.prefix);
                let list = get(http, token, &format!("/v1/leases{query}")).await?;
                let rows = list["leases"].as_array().ok_or_else(|| malformed("a list without leases"))?;
                rows.iter().map(builtin_row).collect()
            }
            Store::Etcd(b) => b.list(filter).await,
            Store::Dynamodb(b) => b.list(filter).await,
        }
    }

    async fn status(&self, key: &Key) -> Result<Option<KeyStatus>, ListError> {
        match self {
            Store::Builtin { http, token } => match get(http, token, &format!("/v1/leases/{key}")).await {
                Ok(v) => builtin_row(&v).map(Some),
                Err(ListError::Refused { status: 404, .. }) => Ok(None),
                Err(e) => Err(e),
            },
            Store::Etcd(b) => b.status(key).await,
            Store::Dynamodb(b) => b.status(key).await,
        }
    }
}

/// A GET on the built-in server; any answer but 200 is `Refused` with the server's message.
async fn get(http: &HttpClient, token: &Option<String>, path: &str) -> Result<Value, ListError> {
    let mut req = http.request(hyper::Method::GET, path);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .map_err(|e| malformed(&format!("cannot build a request for {path:?}: {e}")))?;
    let resp = http.send(req).await?;
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    if resp.status != 200 {
        let message = body["message"].as_str().unwrap_or("unexpected answer").to_string();
        return Err(ListError::Refused { operation: format!("GET {path}"), status: resp.status, message });
    }
    Ok(body)
}

fn malformed(detail: &str) -> ListError {
    ListError::Malformed { operation: "GET /v1/leases".into(), detail: detail.into() }
}

/// A key as the built-in server shows it (times in microseconds).
fn builtin_row(v: &Value) -> Result<KeyStatus, ListError> {
    let bad = || malformed(&format!("not a lease: {v}"));
    let micros = |f: &Value| f.as_u64().map(Duration::from_micros);
    let holder = match &v["holder"] {
        Value::Null => None,
        h => Some(Holder {
            owner: OwnerId(h["owner"].as_u64().ok_or_else(bad)?),
            fence: Fence(h["fence"].as_u64().ok_or_else(bad)?),
            ttl: micros(&h["ttl"]),
            remaining: micros(&h["remaining"]),
            label: None,
        }),
    };
    Ok(KeyStatus {
        key: v["key"].as_str().ok_or_else(bad)?.to_string(),
        holder,
        last_fence: Fence(v["last_fence"].as_u64().ok_or_else(bad)?),
    })
}

/// `{"leases":[…]}` in the built-in server's shape, whatever the backend: times in
/// microseconds, `null` where the store cannot tell.
fn document(rows: &[KeyStatus]) -> Value {
    let micros = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
    let leases: Vec<Value> = rows
        .iter()
        .map(|r| {
            let holder = r.holder.as_ref().map(|h| {
                let mut holder = json!({"owner": h.owner.0, "fence": h.fence.0, "ttl": micros(h.ttl), "remaining": micros(h.remaining)});
                if let Some(label) = &h.label {
                    holder["label"] = json!(label);
                }
                holder
            });
            json!({"key": r.key, "holder": holder, "last_fence": r.last_fence.0})
        })
        .collect();
    json!({ "leases": leases })
}

/// KEY FENCE OWNER TTL REMAINING, one row per key; a free key shows its last fence, `-` and
/// `free`. A LABEL column is added when a holder has one (a v2 session on DynamoDB).
fn table(rows: &[KeyStatus]) -> String {
    let width = rows.iter().map(|r| r.key.len()).max().unwrap_or(0).max("KEY".len());
    let secs = |d: Option<Duration>| d.map_or("unknown".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    let labelled = rows.iter().any(|r| r.holder.as_ref().is_some_and(|h| h.label.is_some()));
    let mut out = format!("{:<width$} {:>8} {:>20} {:>8} {:>9}", "KEY", "FENCE", "OWNER", "TTL", "REMAINING");
    out.push_str(if labelled { " LABEL\n" } else { "\n" });
    for r in rows {
        let line = match &r.holder {
            Some(h) => format!(
                "{:<width$} {:>8} {:>20} {:>8} {:>9}{}",
                r.key,
                h.fence.0,
                h.owner.0,
                secs(h.ttl),
                secs(h.remaining),
                match (&h.label, labelled) {
                    (Some(l), _) => format!(" {l}"),
                    (None, true) => " -".to_string(),
                    (None, false) => String::new(),
                }
            ),
            None if labelled => {
                format!("{:<width$} {:>8} {:>20} {:>8} {:>9} -", r.key, r.last_fence.0, "-", "-", "free")
            }
            None => format!("{:<width$} {:>8} {:>20} {:>8} {:>9}", r.key, r.last_fence.0, "-", "-", "free"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, holder: Option<(u64, u64)>) -> KeyStatus {
        KeyStatus {
            key: key.into(),
            holder: holder.map(|(owner, fence)| Holder {
                owner: OwnerId(owner),
                fence: Fence(fence),
                ttl: Some(Duration::from_secs(15)),
                remaining: None,
                label: None,
            }),
            last_fence: Fence(holder.map_or(3, |h| h.1)),
        }
    }

    #[test]
    fn table_rows_line_up_and_say_what_is_unknown() {
        let text = table(&[row("pump", Some((18446744073709551615, 4))), row("a-much-longer-key", None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines.iter().all(|l| l.len() == lines[0].len() || l.ends_with("free")), "{text}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cells, ["pump", "4", "18446744073709551615", "15.0s", "unknown"], "{text}");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["a-much-longer-key", "3", "-", "-", "free"]
        );
    }

    #[test]
    fn an_etcd_queue_is_shown_in_the_servers_shape() {
        use leasehold_stores::{QueueStatus, SlotHolder};
        let holder = |session, fence, value: &str| SlotHolder {
            session,
            label: format!("h{session}"),
            fence: Fence(fence),
            value: value.into(),
            ttl: Some(Duration::from_secs(6)),
            remaining: None,
        };
        let q = QueueStatus {
            key: "sem".into(),
            limit: 2,
            holders: vec![holder(7, 10, "addr"), holder(8, 14, "")],
            waiting: 3,
            v1_holder: None,
        };
        let row = serde_json::to_value(sessions::SessionKey::of_etcd(q)).unwrap();
        assert_eq!(
            row,
            json!({"key": "sem", "limit": 2, "waiting": 3, "last_fence": 14, "holders": [
                {"session": 7, "label": "h7", "fence": 10, "ttl": 6_000_000, "remaining": 0, "value": "addr"},
                {"session": 8, "label": "h8", "fence": 14, "ttl": 6_000_000, "remaining": 0}]})
        );
        // A v1 holder shows as on the built-in server: no session holder, its time left.
        let v1 = leasehold_stores::V1Holder { fence: Fence(20), remaining: Duration::from_secs(4) };
        let q =
            QueueStatus { key: "pump".into(), limit: 1, holders: vec![], waiting: 1, v1_holder: Some(v1) };
        let row = serde_json::to_value(sessions::SessionKey::of_etcd(q)).unwrap();
        assert_eq!(
            row,
            json!({"key": "pump", "limit": 1, "waiting": 1, "last_fence": 20, "holders": [],
                   "v1_remaining": 4_000_000})
        );
    }

    #[test]
    fn v2_rows_show_each_holder_by_label_and_accept_older_servers() {
        let older = json!({"key":"pump","holder":{"session":3,"label":"host-a","fence":9,"ttl":6000000,"remaining":5500000},"last_fence":9,"waiting":2});
        let newer = json!({"key":"sem","holder":null,"holders":[
            {"session":4,"label":"b","fence":11,"ttl":6000000,"remaining":1000000,"value":"10.0.0.2:80"},
            {"session":5,"label":"c","fence":12,"ttl":6000000,"remaining":2000000}],"last_fence":12,"waiting":0,"limit":2});
        let free = json!({"key":"idle","holder":null,"last_fence":4,"waiting":0});
        let rows: Vec<sessions::SessionKey> = [older, newer, free]
            .into_iter()
            .map(|v| serde_json::from_value::<sessions::SessionKey>(v).unwrap().normalise())
            .collect();
        let text = sessions::table(&rows);
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 1 + 1 + 2 + 1, "{text}");
        assert_eq!(lines[0], ["KEY", "FENCE", "HOLDER", "SESSION", "TTL", "REMAINING", "WAITING"]);
        assert_eq!(lines[1], ["pump", "9", "host-a", "s3", "6.0s", "5.5s", "2"], "{text}");
        assert_eq!(lines[2], ["sem", "11", "b", "s4", "6.0s", "1.0s", "0"], "{text}");
        assert_eq!(lines[3], ["sem", "12", "c", "s5", "6.0s", "2.0s", "0"], "{text}");
        assert_eq!(lines[4], ["idle", "4", "-", "-", "-", "free", "0"], "{text}");
    }

    #[test]
    fn the_document_has_the_servers_shape() {
        let doc = document(&[row("pump", Some((7, 4))), row("valve", None)]);
        assert_eq!(
            doc,
            json!({"leases": [
                {"key": "pump", "holder": {"owner": 7, "fence": 4, "ttl": 15_000_000, "remaining": null}, "last_fence": 4},
                {"key": "valve", "holder": null, "last_fence": 3},
            ]})
        );
        let served = json!({"key":"pump","holder":{"owner":7,"fence":4,"ttl":15000000,"remaining":null},"last_fence":4});
        assert_eq!(builtin_row(&served).unwrap(), row("pump", Some((7, 4))));
        assert!(matches!(builtin_row(&json!({"key": "k"})), Err(ListError::Malformed { .. })));
    }
}

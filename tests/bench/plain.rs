//! The benchmark's plain implementation: a GET by id and a create on a durable store with the
//! least work and no tuning, on the same HTTP server, SQLite build, allocator and durability as
//! the service (WAL, `synchronous = NORMAL`: a change is in the WAL when it is answered).
//! `make bench` measures it beside the bare handler and the service in the same rounds, so that
//! the service's ratio to the bare handler (which reads and writes nothing) can be read against
//! what a straightforward service on the same store reaches.
//!
//! What it does, per request, and no more:
//! - the bearer token looked up in a map of verified tokens (the service keeps such a cache:
//!   verifying a JWT at every request would cost more);
//! - GET `/items/{id}`: one row read by its key, in a read transaction of its own, from a
//!   connection of the worker's thread (a cached statement), answered with its `ETag`;
//! - POST `/items`: the body parsed as a JSON object with string `providerId` and `name`, the
//!   stored document built (id, tenant, status, version, timestamps, caller) and inserted in a
//!   transaction of its own on the one write connection, answered 201 with `Location` and `ETag`.
//!
//! What the service does beyond it is the product's: the caller's role checked, the config
//! validated against the provider's schema and the provider's version checked in the write, the
//! event written with the change when the tenant has endpoints, the request counted in metrics
//! and given an id. What the service does otherwise is how: reads that keep their snapshot while
//! nothing changed (no lock taken a read), writes committed in groups by one writer thread.
//!
//! Usage: bench-plain PORT DATA_DIR ITEM_JSON_FILE TOKEN
//! (the item, whose `id` and `tenantId` it keeps, is stored at start; TOKEN is the one verified
//! token, for the item's tenant).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use actix_web::http::header::{self, ContentType};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use mimalloc::MiMalloc;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

struct Plain {
    db: PathBuf,
    tokens: HashMap<String, String>,
    /// The caller the token names (the item's `createdBy`).
    user: String,
    writer: Mutex<Connection>,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

thread_local! {
    static READER: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

fn tenant<'a>(plain: &'a Plain, req: &HttpRequest) -> Option<&'a str> {
    let token = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?;
    plain.tokens.get(token).map(String::as_str)
}

fn read(plain: &Plain, tenant: &str, id: &str) -> rusqlite::Result<Option<(String, String)>> {
    READER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(open(&plain.db)?);
        }
        let conn = slot.as_ref().expect("opened above");
        conn.prepare_cached("SELECT etag, body FROM items WHERE tenant = ?1 AND id = ?2")?
            .query_row(params![tenant, id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    })
}

async fn get(plain: web::Data<Plain>, id: web::Path<String>, req: HttpRequest) -> HttpResponse {
    let Some(tenant) = tenant(&plain, &req) else { return HttpResponse::Unauthorized().finish() };
    match read(&plain, tenant, &id) {
        Ok(Some((etag, body))) => {
            HttpResponse::Ok().insert_header((header::ETAG, format!("\"{etag}\""))).content_type(ContentType::json()).body(body)
        }
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

async fn create(plain: web::Data<Plain>, body: web::Bytes, req: HttpRequest) -> HttpResponse {
    let Some(tenant) = tenant(&plain, &req) else { return HttpResponse::Unauthorized().finish() };
    let Ok(mut doc) = serde_json::from_slice::<Map<String, Value>>(&body) else { return HttpResponse::BadRequest().finish() };
    if !doc.get("providerId").is_some_and(Value::is_string) || !doc.get("name").is_some_and(Value::is_string) {
        return HttpResponse::BadRequest().finish();
    }
    let id = uuid::Uuid::now_v7().to_string();
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    doc.insert("id".into(), Value::String(id.clone()));
    doc.insert("tenantId".into(), Value::String(tenant.to_owned()));
    doc.insert("status".into(), Value::String("active".into()));
    doc.insert("version".into(), Value::from(1));
    doc.insert("createdAt".into(), Value::String(now.clone()));
    doc.insert("updatedAt".into(), Value::String(now));
    doc.insert("createdBy".into(), Value::String(plain.user.clone()));
    doc.insert("updatedBy".into(), Value::String(plain.user.clone()));
    let Ok(text) = serde_json::to_string(&doc) else { return HttpResponse::InternalServerError().finish() };
    let etag = uuid::Uuid::new_v4().simple().to_string();
    let written = {
        let conn = plain.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        conn.prepare_cached("INSERT INTO items (tenant, id, etag, body) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut insert| insert.execute(params![tenant, id, etag, text]))
    };
    match written {
        Ok(_) => HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/items/{id}")))
            .insert_header((header::ETAG, format!("\"{etag}\"")))
            .content_type(ContentType::json())
            .body(text),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, data_dir, item, token] = args.as_slice() else {
        eprintln!("usage: bench-plain PORT DATA_DIR ITEM_JSON_FILE TOKEN");
        std::process::exit(2);
    };
    let port: u16 = port.parse().map_err(|_| std::io::Error::other("bad port"))?;
    let item = std::fs::read_to_string(item)?;
    let parsed: Value = serde_json::from_str(&item).map_err(std::io::Error::other)?;
    let field = |name: &str| {
        parsed.get(name).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| std::io::Error::other(format!("the item has no {name}")))
    };
    let (id, tenant, user) = (field("id")?, field("tenantId")?, field("createdBy")?);
    std::fs::create_dir_all(data_dir)?;
    let db = Path::new(data_dir).join("plain.db");
    let writer = open(&db).map_err(std::io::Error::other)?;
    writer
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS items (
                tenant TEXT NOT NULL, id TEXT NOT NULL, etag TEXT NOT NULL, body TEXT NOT NULL,
                PRIMARY KEY (tenant, id)
            ) WITHOUT ROWID",
        )
        .map_err(std::io::Error::other)?;
    writer
        .execute("INSERT OR REPLACE INTO items (tenant, id, etag, body) VALUES (?1, ?2, ?3, ?4)", params![tenant, id, "1", item])
        .map_err(std::io::Error::other)?;
    let plain = web::Data::from(Arc::new(Plain { db, tokens: HashMap::from([(token.clone(), tenant)]), user, writer: Mutex::new(writer) }));
    HttpServer::new(move || {
        App::new()
            .app_data(plain.clone())
            .route("/items/{id}", web::get().to(get))
            .route("/items", web::post().to(create))
            .route("/ready", web::get().to(|| async { HttpResponse::Ok().finish() }))
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await
}

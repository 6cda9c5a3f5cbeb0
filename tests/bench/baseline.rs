//! The benchmark's baseline: a bare actix-web server that answers fixed JSON bodies read from
//! files, as fast as actix-web can. `make bench` compares the service against it in one run.
//!
//! Usage: bench-baseline PORT ITEM_JSON_FILE LIST_JSON_FILE

use actix_web::{App, HttpResponse, HttpServer, web};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, item, list] = args.as_slice() else {
        eprintln!("usage: bench-baseline PORT ITEM_JSON_FILE LIST_JSON_FILE");
        std::process::exit(2);
    };
    let item = web::Bytes::from(std::fs::read(item)?);
    let list = web::Bytes::from(std::fs::read(list)?);
    let port: u16 = port.parse().map_err(|_| std::io::Error::other("bad port"))?;
    HttpServer::new(move || {
        let (item, list) = (item.clone(), list.clone());
        App::new()
            .route(
                "/item",
                web::get().to(move || {
                    let b = item.clone();
                    async move { HttpResponse::Ok().content_type("application/json").body(b) }
                }),
            )
            .route(
                "/list",
                web::get().to(move || {
                    let b = list.clone();
                    async move { HttpResponse::Ok().content_type("application/json").body(b) }
                }),
            )
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await
}

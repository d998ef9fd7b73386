//! What one request costs inside the server, without the network: the same read-only request
//! (read a counter of one hot session, with its signed cookie) through `locktable::web` and
//! through tower-sessions 0.15, each an axum `Router` called in process on a current-thread
//! tokio runtime. This isolates the per-request work of the session layers (cookie check,
//! session lookup, extractor, response), which the loopback benchmark (`benches/web.rs`) mixes
//! with TCP and thread wake-ups.
//!
//! `cargo bench --features axum --bench web_layer -- --warm-up-time 1 --measurement-time 3`

#[path = "web_support/apps.rs"]
mod apps;

use apps::{call, Side};
use criterion::{criterion_group, criterion_main, Criterion};
use hyper::{Method, StatusCode};

fn read_hot_session(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("web_layer/read_hot_session");
    for side in [
        Side::LocktableFile,
        Side::LocktableMemory,
        Side::TowerSessionsMemory,
    ] {
        let dir = tempfile::tempdir().unwrap();
        // The router is built inside the runtime (tower-sessions spawns nothing, locktable's
        // layer needs none, but both may look for one).
        let app = rt.block_on(async { side.router(dir.path()) });
        let (status, cookie, _) = call(&rt, &app, Method::POST, "/api/incr/a", None);
        assert_eq!(status, StatusCode::OK);
        let cookie = cookie.expect("session cookie");
        let (status, _, body) = call(&rt, &app, Method::GET, "/api/get/a", Some(&cookie));
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "1"),
            "{}",
            side.name()
        );
        g.bench_function(side.name(), |b| {
            b.iter(|| call(&rt, &app, Method::GET, "/api/get/a", Some(&cookie)))
        });
    }
    g.finish();
}

criterion_group!(benches, read_hot_session);
criterion_main!(benches);

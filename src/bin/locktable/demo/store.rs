//! `--store`: which session store the demo's locktable side runs on, and how a worker opens
//! the same one.
//!
//! Owns: parsing the option and opening a manager on it. Stores behind a cargo feature the
//! binary was built without are refused with a message naming the feature. May not touch: the
//! library's internals (public API only, like the rest of the demo).

use std::path::{Path, PathBuf};

use locktable::session::{SessionConfig, SessionManager};
use locktable::{Error, Result};

/// A store named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreSpec {
    /// `memory`: one process's map (workers become threads).
    Memory,
    /// `file` or `file:DIR`: the embedded default, in DIR or a temporary directory.
    File(Option<PathBuf>),
    /// `kv` or `kv:DIR`: LMDB, in DIR or a temporary directory.
    Kv(Option<PathBuf>),
    /// `redis://...`: a Redis server.
    Redis(String),
    /// `memcached://...`: a memcached server.
    Memcached(String),
    /// `postgres://...` or `postgresql://...`: sessions and locks both on a PostgreSQL server;
    /// workers share nothing else (no lock table, no directory), as separate hosts would.
    Postgres(String),
}

impl StoreSpec {
    /// Parses `memory`, `file[:DIR]`, `kv[:DIR]`, `redis://..`, `memcached://..`,
    /// `postgres://..` (or `postgresql://..`).
    pub(crate) fn parse(s: &str) -> std::result::Result<StoreSpec, String> {
        let dir = |d: &str| (!d.is_empty()).then(|| PathBuf::from(d));
        if s == "memory" {
            Ok(StoreSpec::Memory)
        } else if s == "file" {
            Ok(StoreSpec::File(None))
        } else if let Some(d) = s.strip_prefix("file:") {
            Ok(StoreSpec::File(dir(d)))
        } else if s == "kv" {
            Ok(StoreSpec::Kv(None))
        } else if let Some(d) = s.strip_prefix("kv:") {
            Ok(StoreSpec::Kv(dir(d)))
        } else if s.starts_with("redis://") || s.starts_with("redis+unix://") {
            Ok(StoreSpec::Redis(s.to_owned()))
        } else if s.starts_with("memcached://") {
            Ok(StoreSpec::Memcached(s.to_owned()))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(s.to_owned()))
        } else {
            Err(format!(
                "--store {s:?}: want memory, file[:DIR], kv[:DIR], redis://HOST:PORT/, \
                 memcached://HOST:PORT or postgres://USER@HOST:PORT/DB"
            ))
        }
    }

    /// The form [`StoreSpec::parse`] reads back (passed to worker processes).
    pub(crate) fn to_arg(&self) -> String {
        let with_dir = |kind: &str, d: &Option<PathBuf>| match d {
            Some(d) => format!("{kind}:{}", d.display()),
            None => kind.to_owned(),
        };
        match self {
            StoreSpec::Memory => "memory".into(),
            StoreSpec::File(d) => with_dir("file", d),
            StoreSpec::Kv(d) => with_dir("kv", d),
            StoreSpec::Redis(u) | StoreSpec::Memcached(u) | StoreSpec::Postgres(u) => u.clone(),
        }
    }

    /// False for the memory store: its workers must be threads of one process.
    pub(crate) fn shared_across_processes(&self) -> bool {
        !matches!(self, StoreSpec::Memory)
    }

    /// The directory of the lock table (and of the store, for file and kv): the one named on
    /// the command line, or `default`.
    pub(crate) fn system_dir(&self, default: &Path) -> PathBuf {
        match self {
            StoreSpec::File(Some(d)) | StoreSpec::Kv(Some(d)) => d.clone(),
            _ => default.to_path_buf(),
        }
    }

    /// One line for the report's header.
    pub(crate) fn describe(&self, fsync: bool) -> String {
        let sync = if fsync {
            "durable (fsync)"
        } else {
            "no fsync (--fsync for durable saves)"
        };
        match self {
            StoreSpec::Memory => "memory (one process; workers are threads)".into(),
            StoreSpec::File(_) => format!("file, atomic rename, {sync}"),
            StoreSpec::Kv(_) => format!("kv (LMDB), one write transaction per save, {sync}"),
            StoreSpec::Redis(u) => format!("redis at {u}, Lua compare-and-swap"),
            StoreSpec::Memcached(u) => format!("memcached at {u}, gets/cas"),
            StoreSpec::Postgres(u) => format!(
                "postgres at {}, version compare-and-set + advisory locks; \
                 workers share nothing else (no lock table, no directory)",
                without_password(u)
            ),
        }
    }

    /// A manager on this store: the lock table `dir/locks.table` (shared by every worker
    /// process) and the store; server keys under `prefix`.
    pub(crate) fn open(
        &self,
        dir: &Path,
        cfg: SessionConfig,
        prefix: &str,
    ) -> Result<SessionManager> {
        match self {
            StoreSpec::Memory => {
                let table = locktable::LockTable::anonymous(&locktable::TableOptions::default())?;
                Ok(SessionManager::new(
                    table,
                    locktable::session::MemoryStore::new(),
                    cfg,
                ))
            }
            StoreSpec::File(_) => SessionManager::new_embedded(dir, cfg),
            StoreSpec::Kv(_) => open_kv(dir, cfg),
            StoreSpec::Redis(url) => open_redis(url, dir, cfg, prefix),
            StoreSpec::Memcached(url) => open_memcached(url, dir, cfg, prefix),
            // No `dir`, no lock table: the server holds the records and the locks, so each
            // worker process is a host of its own. The random session IDs keep runs apart.
            StoreSpec::Postgres(url) => open_postgres(url, cfg),
        }
    }
}

/// `url` with any password replaced by `***`, for printing.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(not(all(
    feature = "lmdb",
    feature = "redis",
    feature = "memcached",
    feature = "postgres"
)))]
fn without(feature: &str) -> Error {
    Error::Backend(format!(
        "this locktable binary was built without the `{feature}` feature \
         (cargo build --features {feature})"
    ))
}

fn table_in(dir: &Path) -> Result<locktable::LockTable> {
    std::fs::create_dir_all(dir)?;
    locktable::LockTable::open(dir.join("locks.table"), &locktable::TableOptions::default())
}

#[cfg(feature = "lmdb")]
fn open_kv(dir: &Path, cfg: SessionConfig) -> Result<SessionManager> {
    SessionManager::new_kv(dir, cfg)
}

#[cfg(not(feature = "lmdb"))]
fn open_kv(_dir: &Path, _cfg: SessionConfig) -> Result<SessionManager> {
    Err(without("lmdb"))
}

#[cfg(feature = "redis")]
fn open_redis(url: &str, dir: &Path, cfg: SessionConfig, prefix: &str) -> Result<SessionManager> {
    let store = locktable::session::RedisStore::open(url)?
        .with_prefix(prefix)
        .with_rule_of(&cfg);
    Ok(SessionManager::new(table_in(dir)?, store, cfg))
}

#[cfg(not(feature = "redis"))]
fn open_redis(_: &str, dir: &Path, _: SessionConfig, _: &str) -> Result<SessionManager> {
    let _ = table_in(dir);
    Err(without("redis"))
}

#[cfg(feature = "memcached")]
fn open_memcached(
    url: &str,
    dir: &Path,
    cfg: SessionConfig,
    prefix: &str,
) -> Result<SessionManager> {
    let store = locktable::session::MemcachedStore::open(url)?
        .with_prefix(prefix)
        .with_rule_of(&cfg);
    Ok(SessionManager::new(table_in(dir)?, store, cfg))
}

#[cfg(not(feature = "memcached"))]
fn open_memcached(_: &str, dir: &Path, _: SessionConfig, _: &str) -> Result<SessionManager> {
    let _ = table_in(dir);
    Err(without("memcached"))
}

#[cfg(feature = "postgres")]
fn open_postgres(url: &str, cfg: SessionConfig) -> Result<SessionManager> {
    SessionManager::postgres_with(url, locktable::session::PgStoreOptions::default(), cfg)
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &str, _: SessionConfig) -> Result<SessionManager> {
    Err(without("postgres"))
}

/// A key prefix of this demo run: runs on one server never see each other's sessions.
pub(crate) fn run_prefix() -> Result<String> {
    let mut r = [0u8; 6];
    getrandom::fill(&mut r).map_err(|e| Error::Random(e.to_string()))?;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("locktable-demo:{}:{hex}:", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_round_trips() {
        for s in [
            "memory",
            "file",
            "file:/tmp/x",
            "kv",
            "kv:/tmp/y",
            "redis://127.0.0.1:6379/",
            "memcached://127.0.0.1:11211",
            "postgres://u@127.0.0.1:5432/db",
            "postgresql://u@127.0.0.1/db",
        ] {
            let spec = StoreSpec::parse(s).unwrap();
            assert_eq!(StoreSpec::parse(&spec.to_arg()).unwrap(), spec, "{s}");
        }
        assert_eq!(StoreSpec::parse("file:").unwrap(), StoreSpec::File(None));
        for bad in ["", "mem", "postgres:x", "pg://x", "kv/tmp"] {
            assert!(StoreSpec::parse(bad).is_err(), "{bad}");
        }
        assert!(!StoreSpec::Memory.shared_across_processes());
        assert_eq!(
            StoreSpec::Kv(Some("/d".into())).system_dir(Path::new("/x")),
            PathBuf::from("/d")
        );
    }

    #[test]
    fn a_postgres_password_is_never_printed() {
        let d = StoreSpec::parse("postgres://app:s3cret@db:5432/app")
            .unwrap()
            .describe(false);
        assert!(!d.contains("s3cret"), "{d}");
        assert!(d.contains("postgres://app:***@db:5432/app"), "{d}");
        assert_eq!(
            without_password("postgresql://app@db:5432/x"),
            "postgresql://app@db:5432/x"
        );
    }
}

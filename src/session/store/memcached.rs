//! [`MemcachedStore`]: sessions on a memcached server, shared by every process and host that
//! reaches it, with a small client of its own for memcached's text protocol.
//!
//! Owns: the items under its prefix on the server, and its connections. It takes no lock of the
//! lock table: its compare-and-swap is memcached's `cas`, atomic on the server, so
//! [`Capabilities::atomic_cas`] holds against every client. Exclusive requests still need a lock
//! shared by all processes: the lock table on one host, PostgreSQL advisory locks across hosts.
//!
//! # Layout: never half-present
//! memcached may evict any item at any time, so a session is two kinds of item with one
//! anchor:
//! - `<prefix>m:<ID>`, the **metadata** (`version created last_accessed expiry size nonce
//!   expires`, text, a few dozen bytes): the anchor. Every write of a session is a `cas` (or an
//!   `add`) on it.
//! - `<prefix>d:<ID>:<nonce>`, the **record**, written once under a fresh random nonce before
//!   the metadata that names it, never overwritten, deleted after the metadata moved on.
//!
//! A save writes the new record item, then swaps the metadata by `cas` (the version check and
//! the switch to the new record are one server operation), then deletes the old record item. A
//! reader follows the metadata to the record it names. If that record is missing while the
//! metadata still names it (evicted), the session is **gone**: `load`, `meta` and `touch` say
//! so, and the metadata is expired by a `cas` (only if unchanged). If the metadata is missing,
//! the session is gone and a record item left behind is unreachable (it expires by itself). So
//! no caller ever sees metadata without its record, or a record of another version.
//!
//! # Expiry
//! Native: both items carry the session's remaining life plus a grace (see `native_ttl.rs`) as
//! an absolute time, kept equal on both (`touch` extends the record item with memcached's
//! `touch` command, then `cas`es the new access time into the metadata). Touches and
//! `remove_expired` check expiry by the metadata and write with `cas`, so a touch never revives
//! a session that `remove_expired` (or a request) saw expired. memcached cannot list its keys:
//! `scan_expired` returns nothing and the server's expiry collects sessions.
//!
//! # Why a client of its own
//! The `memcache` crate returns a connection to its pool after any error (`has_broken` is
//! always false): after a timeout, the late reply of one command would be read as the reply to
//! the next one, which for a `cas` means a wrong answer. Here a connection that saw any error
//! is dropped, every reply is checked against the command sent, and a `cas` whose reply was lost
//! is reported as [`Error::OutcomeUnknown`]. The protocol subset (`gets`, `set`, `add`, `cas`,
//! `touch`, `delete`) is small, and this adds no dependency.
//!
//! May not touch: keys outside its prefix (it never flushes), the lock table, the record format.

use super::native_ttl::{expiry_text, parse_expiry_text, TtlRule};
use super::{
    touch_refusal, Capabilities, Cutoffs, ExpiredScan, SessionMeta, Store, StoredSession,
    Timestamp, Touch,
};
use crate::session::id::SessionId;
use crate::session::SessionConfig;
use crate::{Error, Result};
use parking_lot::Mutex;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Idle connections kept for reuse.
const POOL_MAX_IDLE: usize = 16;
/// memcached's default item limit is 1 MiB, key and item header included.
const DEFAULT_MAX_ITEM: usize = (1 << 20) - 512;
/// Attempts of a compare-and-swap loop that lost to concurrent writers before giving up.
const CAS_ATTEMPTS: usize = 64;

/// A [`Store`] on a memcached server; see the module docs.
///
/// ```no_run
/// use locktable::session::{MemcachedStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let cfg = SessionConfig::default();
/// let store = MemcachedStore::open("memcached://127.0.0.1:11211")?.with_rule_of(&cfg);
/// let table = LockTable::open("/run/myapp/locks.table", &TableOptions::default())?;
/// let mgr = SessionManager::new(table, store, cfg);
/// let mut s = mgr.create()?;
/// s.insert("user", &"ann")?;
/// s.commit()?;
/// # Ok::<(), locktable::Error>(())
/// ```
pub struct MemcachedStore {
    addrs: Vec<SocketAddr>,
    pool: Mutex<(u64, Vec<Conn>)>,
    prefix: String,
    timeout: Duration,
    max_item: usize,
    rule: TtlRule,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedStore")
            .field("addrs", &self.addrs)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

// ---- the protocol client ----

/// What went wrong talking to the server.
#[derive(Debug)]
enum Failure {
    /// No connection: nothing was sent.
    Unreached(String),
    /// The connection failed after the command may have been sent.
    Lost(String),
    /// The server answered with an error line: nothing was stored.
    Refused(String),
    /// The server refused an item as too large.
    TooLarge,
    /// The item found is larger than its caller allows (a record item bigger than its
    /// metadata says, a metadata item longer than any this store writes): what the server
    /// holds is not what this store wrote. The item's bytes are left unread, so the
    /// connection is dropped like after any error.
    Oversized,
}

type McResult<T> = std::result::Result<T, Failure>;

fn lost(e: std::io::Error) -> Failure {
    Failure::Lost(format!("{:?}", e.kind()))
}

/// Reply to a storage command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Stored,
    NotStored,
    Exists,
    NotFound,
}

/// One item of a `gets` reply.
struct Item {
    data: Vec<u8>,
    cas: u64,
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn connect(addrs: &[SocketAddr], timeout: Duration) -> McResult<Conn> {
        let mut last = String::from("no address");
        for a in addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => {
                    let setup = (|| {
                        s.set_read_timeout(Some(timeout))?;
                        s.set_write_timeout(Some(timeout))?;
                        s.set_nodelay(true)?;
                        let writer = s.try_clone()?;
                        Ok::<_, std::io::Error>(Conn {
                            reader: BufReader::new(s),
                            writer,
                        })
                    })();
                    return setup.map_err(|e| Failure::Unreached(format!("{:?}", e.kind())));
                }
                Err(e) => last = format!("connect: {:?}", e.kind()),
            }
        }
        Err(Failure::Unreached(last))
    }

    fn send(&mut self, head: &str, data: Option<&[u8]>) -> McResult<()> {
        let mut buf = Vec::with_capacity(head.len() + data.map_or(0, |d| d.len() + 2) + 2);
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(b"\r\n");
        if let Some(d) = data {
            buf.extend_from_slice(d);
            buf.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&buf).map_err(lost)
    }

    fn line(&mut self) -> McResult<String> {
        let mut line = Vec::new();
        // Bounded: a reply line is short; anything longer is not memcached talking.
        let n = (&mut self.reader)
            .take(1024)
            .read_until(b'\n', &mut line)
            .map_err(lost)?;
        if n == 0 {
            return Err(Failure::Lost("connection closed".into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(Failure::Lost("malformed reply line".into()));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| Failure::Lost("malformed reply line".into()))
    }

    /// An error line of the server, or `None` for any other line.
    fn error_line(line: &str) -> Option<Failure> {
        if line.starts_with("SERVER_ERROR object too large") {
            Some(Failure::TooLarge)
        } else if line == "ERROR"
            || line.starts_with("SERVER_ERROR")
            || line.starts_with("CLIENT_ERROR")
        {
            // The server's words name the failure, never our data.
            Some(Failure::Refused(line.chars().take(80).collect()))
        } else {
            None
        }
    }

    /// `gets key`: the item with its CAS unique, if present.
    fn gets(&mut self, key: &str, max_len: usize) -> McResult<Option<Item>> {
        self.send(&format!("gets {key}"), None)?;
        let mut found = None;
        loop {
            let line = self.line()?;
            if line == "END" {
                return Ok(found);
            }
            if let Some(f) = Self::error_line(&line) {
                return Err(f);
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let [b"VALUE", k, _flags, len, cas] =
                parts.iter().map(|p| p.as_bytes()).collect::<Vec<_>>()[..]
            else {
                return Err(Failure::Lost("unexpected reply to gets".into()));
            };
            let (Some(len), Some(cas)) = (
                std::str::from_utf8(len)
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok()),
                std::str::from_utf8(cas)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok()),
            ) else {
                return Err(Failure::Lost("unexpected reply to gets".into()));
            };
            if k != key.as_bytes() || found.is_some() {
                return Err(Failure::Lost("unexpected item in the reply to gets".into()));
            }
            if len > max_len {
                return Err(Failure::Oversized);
            }
            let mut data = vec![0u8; len + 2];
            self.reader.read_exact(&mut data).map_err(lost)?;
            if !data.ends_with(b"\r\n") {
                return Err(Failure::Lost("malformed item".into()));
            }
            data.truncate(len);
            found = Some(Item { data, cas });
        }
    }

    /// `set`, `add` or `cas` (with `cas = Some(unique)`).
    fn store(
        &mut self,
        cmd: &str,
        key: &str,
        exptime: i64,
        data: &[u8],
        cas: Option<u64>,
    ) -> McResult<Reply> {
        let head = match cas {
            Some(c) => format!("{cmd} {key} 0 {exptime} {} {c}", data.len()),
            None => format!("{cmd} {key} 0 {exptime} {}", data.len()),
        };
        self.send(&head, Some(data))?;
        let line = self.line()?;
        match line.as_str() {
            "STORED" => Ok(Reply::Stored),
            "NOT_STORED" => Ok(Reply::NotStored),
            "EXISTS" => Ok(Reply::Exists),
            "NOT_FOUND" => Ok(Reply::NotFound),
            other => Err(Self::error_line(other)
                .unwrap_or_else(|| Failure::Lost("unexpected reply to a store".into()))),
        }
    }

    /// `version`: a round trip that touches no item.
    fn version(&mut self) -> McResult<()> {
        self.send("version", None)?;
        let line = self.line()?;
        if line.starts_with("VERSION ") {
            Ok(())
        } else {
            Err(Self::error_line(&line)
                .unwrap_or_else(|| Failure::Lost("unexpected reply to version".into())))
        }
    }

    /// `touch key exptime`: whether the item exists.
    fn touch(&mut self, key: &str, exptime: i64) -> McResult<bool> {
        self.send(&format!("touch {key} {exptime}"), None)?;
        let line = self.line()?;
        match line.as_str() {
            "TOUCHED" => Ok(true),
            "NOT_FOUND" => Ok(false),
            other => Err(Self::error_line(other)
                .unwrap_or_else(|| Failure::Lost("unexpected reply to touch".into()))),
        }
    }

    /// `delete key`: whether the item existed.
    fn delete(&mut self, key: &str) -> McResult<bool> {
        self.send(&format!("delete {key}"), None)?;
        let line = self.line()?;
        match line.as_str() {
            "DELETED" => Ok(true),
            "NOT_FOUND" => Ok(false),
            other => Err(Self::error_line(other)
                .unwrap_or_else(|| Failure::Lost("unexpected reply to delete".into()))),
        }
    }
}

// ---- metadata ----

/// The metadata item: the session's metadata, the nonce of its record item and the absolute
/// expiry time (unix seconds) both items carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    meta: SessionMeta,
    nonce: u64,
    exptime: i64,
}

impl Anchor {
    fn encode(&self) -> Vec<u8> {
        let m = &self.meta;
        format!(
            "{} {} {} {} {} {:016x} {}",
            m.version,
            m.created.0,
            m.last_accessed.0,
            expiry_text(m.expiry),
            m.size,
            self.nonce,
            self.exptime
        )
        .into_bytes()
    }

    fn decode(b: &[u8]) -> Result<Anchor> {
        let corrupt = || Error::SessionCorrupt("memcached session metadata unreadable".into());
        let s = std::str::from_utf8(b).map_err(|_| corrupt())?;
        let f: Vec<&str> = s.split(' ').collect();
        let [v, c, la, e, n, nonce, x] = f[..] else {
            return Err(corrupt());
        };
        let num = |t: &str| t.parse::<u64>().map_err(|_| corrupt());
        Ok(Anchor {
            meta: SessionMeta {
                version: num(v)?,
                created: Timestamp(num(c)?),
                last_accessed: Timestamp(num(la)?),
                expiry: parse_expiry_text(e).ok_or_else(corrupt)?,
                size: num(n)?,
            },
            nonce: u64::from_str_radix(nonce, 16).map_err(|_| corrupt())?,
            exptime: x.parse().map_err(|_| corrupt())?,
        })
    }
}

fn random_nonce() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(b))
}

/// An absolute memcached expiry time (unix seconds) `ttl` from now, rounded up.
fn exptime_after(ttl: Duration) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.saturating_add(ttl).as_secs_f64().ceil();
    // Far beyond any session, and inside memcached's 32-bit time arithmetic.
    secs.min(f64::from(u32::MAX >> 1)) as i64
}

fn backend(op: &str, f: Failure) -> Error {
    match f {
        Failure::TooLarge => Error::Backend(format!("memcached {op}: item too large")),
        Failure::Oversized => Error::SessionCorrupt(format!(
            "memcached {op}: an item larger than its session's metadata allows"
        )),
        Failure::Unreached(w) | Failure::Lost(w) | Failure::Refused(w) => {
            Error::Backend(format!("memcached {op}: {w}"))
        }
    }
}

impl MemcachedStore {
    /// A store on the server at `url` (`memcached://host:port`), with the default key prefix
    /// `lt:`. Connects once to check the server.
    pub fn open(url: &str) -> Result<MemcachedStore> {
        let bad = || Error::Backend("memcached open: bad URL (want memcached://host:port)".into());
        let rest = url
            .strip_prefix("memcached://")
            .or_else(|| url.strip_prefix("memcache://"))
            .ok_or_else(bad)?;
        let hostport = rest.trim_end_matches('/');
        let addrs: Vec<SocketAddr> = hostport.to_socket_addrs().map_err(|_| bad())?.collect();
        if addrs.is_empty() {
            return Err(bad());
        }
        let d = SessionConfig::default();
        let store = MemcachedStore {
            addrs,
            pool: Mutex::new((crate::fork::epoch(), Vec::new())),
            prefix: "lt:".to_owned(),
            timeout: Duration::from_secs(2),
            max_item: DEFAULT_MAX_ITEM,
            rule: TtlRule::new(d.idle_timeout, d.max_lifetime, Duration::from_secs(60)),
        };
        store.with_conn("open", |c| c.version())?;
        Ok(store)
    }

    /// Keys are `<prefix>m:<ID>` and `<prefix>d:<ID>:<nonce>`: give each application (or test)
    /// its own prefix. It must be printable ASCII without spaces, at most 150 bytes; anything
    /// else is refused with [`Error::Backend`] at the first call.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest wait for connecting, sending or receiving (default 2 s).
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d.max(Duration::from_millis(1));
        self
    }

    /// The largest record stored (default 1 MiB less 512 bytes, memcached's default item
    /// limit with room for key and header; raise it with memcached's `-I`). Bigger records
    /// are refused by `save` with [`Error::TooLarge`].
    pub fn with_max_item_size(mut self, bytes: usize) -> Self {
        self.max_item = bytes;
        self
    }

    /// The expiry rule the native TTL assumes at a save (see
    /// `RedisStore::with_rule_of`, which this mirrors).
    pub fn with_rule_of(mut self, cfg: &SessionConfig) -> Self {
        self.rule = self.rule.of_config(cfg);
        self
    }

    /// Extra time the server keeps a session after the manager would find it expired
    /// (default 60 s).
    pub fn with_native_grace(mut self, d: Duration) -> Self {
        self.rule = self.rule.with_grace(d);
        self
    }

    fn check_prefix(&self) -> Result<()> {
        let ok = self.prefix.len() <= 150 && self.prefix.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(())
        } else {
            Err(Error::Backend(
                "memcached: the key prefix must be printable ASCII without spaces, at most 150 bytes"
                    .into(),
            ))
        }
    }

    fn meta_key(&self, id: &SessionId) -> String {
        format!("{}m:{}", self.prefix, id.as_str())
    }

    fn data_key(&self, id: &SessionId, nonce: u64) -> String {
        format!("{}d:{}:{nonce:016x}", self.prefix, id.as_str())
    }

    fn take(&self) -> Option<Conn> {
        let mut pool = self.pool.lock();
        let epoch = crate::fork::epoch();
        if pool.0 != epoch {
            // Inherited across fork(): the parent's sockets; dropping closes only our copies.
            pool.1.clear();
            pool.0 = epoch;
        }
        pool.1.pop()
    }

    fn give_back(&self, c: Conn) {
        let mut pool = self.pool.lock();
        if pool.0 == crate::fork::epoch() && pool.1.len() < POOL_MAX_IDLE {
            pool.1.push(c);
        }
    }

    /// Runs `f` once on a connection (an idle one, else a new one); one that errs is dropped,
    /// never reused. A `Lost` failure on a pooled connection says so in its text (`pooled: `),
    /// for [`MemcachedStore::with_conn`]'s retry.
    fn run<T>(&self, f: &mut dyn FnMut(&mut Conn) -> McResult<T>) -> McResult<T> {
        self.check_prefix()
            .map_err(|_| Failure::Refused("bad key prefix".into()))?;
        let (mut conn, pooled) = match self.take() {
            Some(c) => (c, true),
            None => (Conn::connect(&self.addrs, self.timeout)?, false),
        };
        match f(&mut conn) {
            Ok(v) => {
                self.give_back(conn);
                Ok(v)
            }
            // A pooled connection may be stale (a restarted server): one more try on a fresh
            // one, for callers whose operation is safe to repeat.
            Err(Failure::Lost(w)) if pooled => {
                // An idle connection died: most likely the server restarted, and the other idle
                // connections are dead too. Drop them all, so that a retry connects afresh.
                self.pool.lock().1.clear();
                Err(Failure::Lost(format!("pooled: {w}")))
            }
            Err(e) => Err(e),
        }
    }

    /// [`MemcachedStore::run`] for operations safe to repeat: retried once after a failure on
    /// a pooled connection.
    fn with_conn<T>(&self, op: &str, mut f: impl FnMut(&mut Conn) -> McResult<T>) -> Result<T> {
        match self.run(&mut f) {
            Ok(v) => Ok(v),
            Err(Failure::Lost(w)) if w.starts_with("pooled: ") => {
                self.run(&mut f).map_err(|e| backend(op, e))
            }
            Err(e) => Err(backend(op, e)),
        }
    }

    /// The metadata item and its CAS unique.
    fn anchor(&self, id: &SessionId) -> Result<Option<(Anchor, u64)>> {
        let key = self.meta_key(id);
        match self.with_conn("read", |c| c.gets(&key, 4096))? {
            None => Ok(None),
            Some(item) => Ok(Some((Anchor::decode(&item.data)?, item.cas))),
        }
    }

    /// The record item named by `a` was found missing: if the metadata still names it, the
    /// session was evicted by halves; expire the metadata (only if unchanged) and report the
    /// session gone (`true`). `false`: the metadata moved on; look again.
    fn gone_if_unchanged(&self, id: &SessionId, a: &Anchor) -> Result<bool> {
        match self.anchor(id)? {
            None => Ok(true),
            Some((now, _)) if now.nonce != a.nonce => Ok(false),
            Some((now, cas_now)) => {
                let key = self.meta_key(id);
                let bytes = now.encode();
                // Negative expiry: the item expires at once, if nobody changed it.
                let _ = self.with_conn("read", |c| c.store("cas", &key, -1, &bytes, Some(cas_now)));
                Ok(true)
            }
        }
    }

    /// Best effort: a record item that nothing names any more (it would expire anyway).
    fn drop_record(&self, id: &SessionId, nonce: u64) {
        let key = self.data_key(id, nonce);
        let _ = self.with_conn("delete", |c| c.delete(&key));
    }

    /// One `cas` (or `add` when `cas` is `None`) of the metadata item. A lost reply is retried
    /// once on a fresh connection: the same `cas`/`add` cannot succeed twice, so a success of the
    /// retry settles it; a refusal of the retry leaves the first attempt's outcome unknown.
    fn swap_anchor(&self, id: &SessionId, a: &Anchor, cas: Option<u64>) -> Result<Reply> {
        let key = self.meta_key(id);
        let bytes = a.encode();
        let cmd = if cas.is_some() { "cas" } else { "add" };
        let mut attempt = |c: &mut Conn| c.store(cmd, &key, a.exptime, &bytes, cas);
        match self.run(&mut attempt) {
            Ok(r) => Ok(r),
            Err(Failure::Lost(w)) => match self.run(&mut attempt) {
                Ok(Reply::Stored) => Ok(Reply::Stored),
                Ok(_) => Err(Error::OutcomeUnknown(format!(
                    "memcached save: {w}; the session changed since, maybe by this save"
                ))),
                Err(e) => Err(Error::OutcomeUnknown(format!(
                    "memcached save: {w}, then {}",
                    backend("save", e)
                ))),
            },
            Err(e) => Err(backend("save", e)),
        }
    }
}

impl Store for MemcachedStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, true, true)
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((a, _)) = self.anchor(id)? else {
                return Ok(None);
            };
            let limit = max_size.min(self.max_item);
            if a.meta.size > limit as u64 {
                return Err(Error::TooLarge {
                    size: usize::try_from(a.meta.size).unwrap_or(usize::MAX),
                    limit,
                });
            }
            let key = self.data_key(id, a.nonce);
            let size = a.meta.size as usize;
            match self.with_conn("load", |c| c.gets(&key, size))? {
                Some(item) => {
                    return Ok(Some(StoredSession {
                        meta: a.meta,
                        bytes: item.data,
                    }))
                }
                None => {
                    if self.gone_if_unchanged(id, &a)? {
                        return Ok(None);
                    }
                }
            }
        }
        Err(Error::Backend(
            "memcached load: the session kept changing while it was read".into(),
        ))
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        if new.bytes.len() > self.max_item {
            return Err(Error::TooLarge {
                size: new.bytes.len(),
                limit: self.max_item,
            });
        }
        let mut current = match self.anchor(id) {
            Ok(c) => c,
            // Unreadable metadata never matches: delete the session first.
            Err(Error::SessionCorrupt(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if current.map(|(a, _)| a.meta.version) != expected {
            return Ok(false);
        }
        let nonce = random_nonce()?;
        let mut meta = new.meta;
        meta.size = new.bytes.len() as u64;
        let mut written_exptime: Option<i64> = None;
        for _ in 0..CAS_ATTEMPTS {
            if let Some((old, _)) = current {
                meta.last_accessed = new.meta.last_accessed.max(old.meta.last_accessed);
            }
            let anchor = Anchor {
                meta,
                nonce,
                exptime: exptime_after(self.rule.ttl_at_save(&meta)),
            };
            // The record item first (once; later rounds only extend it), so the metadata never
            // names a record that is not there.
            let dkey = self.data_key(id, nonce);
            match written_exptime {
                None => {
                    let r = self.with_conn("save", |c| {
                        c.store("set", &dkey, anchor.exptime, &new.bytes, None)
                    });
                    match r {
                        Ok(Reply::Stored) => {}
                        Ok(other) => {
                            return Err(Error::Backend(format!(
                                "memcached save: record not stored ({other:?})"
                            )))
                        }
                        Err(Error::Backend(w)) if w.ends_with("item too large") => {
                            return Err(Error::TooLarge {
                                size: new.bytes.len(),
                                limit: self.max_item,
                            })
                        }
                        Err(e) => return Err(e),
                    }
                }
                Some(x) if x < anchor.exptime => {
                    self.with_conn("save", |c| c.touch(&dkey, anchor.exptime))?;
                }
                Some(_) => {}
            }
            written_exptime = Some(anchor.exptime);
            match self.swap_anchor(id, &anchor, current.map(|(_, cas)| cas))? {
                Reply::Stored => {
                    if let Some((old, _)) = current {
                        self.drop_record(id, old.nonce);
                    }
                    return Ok(true);
                }
                Reply::Exists => {
                    // Touched (or saved) meanwhile: look again.
                    current = self.anchor(id)?;
                    if current.map(|(a, _)| a.meta.version) != expected {
                        self.drop_record(id, nonce);
                        return Ok(false);
                    }
                }
                Reply::NotStored | Reply::NotFound => {
                    self.drop_record(id, nonce);
                    return Ok(false);
                }
            }
        }
        self.drop_record(id, nonce);
        Err(Error::Backend(
            "memcached save: the session kept changing (too many concurrent touches)".into(),
        ))
    }

    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((a, _)) = self.anchor(id)? else {
                return Ok(None);
            };
            // The record must be there too (and stays as long as the metadata: same expiry).
            let key = self.data_key(id, a.nonce);
            if self.with_conn("meta", |c| c.touch(&key, a.exptime))? {
                return Ok(Some(a.meta));
            }
            if self.gone_if_unchanged(id, &a)? {
                return Ok(None);
            }
        }
        Err(Error::Backend(
            "memcached meta: the session kept changing while it was read".into(),
        ))
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        self.rule.learn(cutoffs);
        for _ in 0..CAS_ATTEMPTS {
            let Some((a, cas)) = self.anchor(id)? else {
                return Ok(Touch::Missing);
            };
            if let Some(refused) = touch_refusal(&a.meta, at, coalesce, cutoffs) {
                return Ok(refused);
            }
            let mut next = a;
            next.meta.last_accessed = at;
            next.exptime = exptime_after(self.rule.ttl(&next.meta, cutoffs)).max(a.exptime);
            // The record first: its expiry never falls behind the metadata's.
            let dkey = self.data_key(id, a.nonce);
            if !self.with_conn("touch", |c| c.touch(&dkey, next.exptime))? {
                if self.gone_if_unchanged(id, &a)? {
                    return Ok(Touch::Missing);
                }
                continue;
            }
            let key = self.meta_key(id);
            let bytes = next.encode();
            match self.with_conn("touch", |c| {
                c.store("cas", &key, next.exptime, &bytes, Some(cas))
            })? {
                Reply::Stored => return Ok(Touch::Written),
                Reply::Exists => continue,
                Reply::NotFound | Reply::NotStored => return Ok(Touch::Missing),
            }
        }
        Err(Error::Backend(
            "memcached touch: the session kept changing (too many concurrent writers)".into(),
        ))
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        // A corrupt metadata item must be deletable too (the manager deletes corrupt
        // sessions): its record, if any, is then unreachable and expires by itself.
        let nonce = match self.anchor(id) {
            Ok(Some((a, _))) => Some(a.nonce),
            Ok(None) => return Ok(false),
            Err(Error::SessionCorrupt(_)) => None,
            Err(e) => return Err(e),
        };
        let key = self.meta_key(id);
        let existed = self.with_conn("delete", |c| c.delete(&key))?;
        if let Some(nonce) = nonce {
            self.drop_record(id, nonce);
        }
        Ok(existed)
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        self.rule.learn(cutoffs);
        for _ in 0..CAS_ATTEMPTS {
            let Some((a, cas)) = self.anchor(id)? else {
                return Ok(false);
            };
            if !cutoffs.meta_expired(&a.meta) {
                return Ok(false);
            }
            let key = self.meta_key(id);
            let bytes = a.encode();
            // Expire the metadata only if nobody touched or saved it since the check.
            match self.with_conn("remove_expired", |c| {
                c.store("cas", &key, -1, &bytes, Some(cas))
            })? {
                Reply::Stored => {
                    self.drop_record(id, a.nonce);
                    return Ok(true);
                }
                Reply::Exists => continue,
                Reply::NotFound | Reply::NotStored => return Ok(false),
            }
        }
        Err(Error::Backend(
            "memcached remove_expired: the session kept changing".into(),
        ))
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, _budget: usize) -> Result<ExpiredScan> {
        // memcached cannot list keys; its own expiry (set from the metadata) collects sessions.
        self.rule.learn(cutoffs);
        Ok(ExpiredScan::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Expiry;

    #[test]
    fn the_anchor_round_trips_and_refuses_junk() {
        let a = Anchor {
            meta: SessionMeta {
                version: 3,
                created: Timestamp(1),
                last_accessed: Timestamp(2),
                expiry: Expiry::Idle(Duration::from_millis(5)),
                size: 10,
            },
            nonce: 0xdead_beef,
            exptime: 1_900_000_000,
        };
        assert_eq!(Anchor::decode(&a.encode()).unwrap(), a);
        for junk in [
            &b""[..],
            b"1 2 3",
            b"1 2 3 d 4 zz 5",
            b"1 2 3 q 4 00 5",
            b"\xff",
        ] {
            assert!(matches!(
                Anchor::decode(junk),
                Err(Error::SessionCorrupt(_))
            ));
        }
    }

    #[test]
    fn expiry_times_are_absolute_and_bounded() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let x = exptime_after(Duration::from_millis(1500));
        assert!((now + 1..=now + 3).contains(&x), "{x} vs {now}");
        assert_eq!(exptime_after(Duration::MAX), i64::from(u32::MAX >> 1));
    }
}

//! [`RedisStore`]: sessions on a Redis server, shared by every process and host that reaches it.
//!
//! Owns: the keys under its prefix on the server, and its connections. It takes no lock of the
//! lock table: every operation that checks and writes is one Lua script, which Redis runs
//! atomically, so the compare-and-swap holds against every client of the server, whatever lock
//! table each uses ([`Capabilities::atomic_cas`]). Exclusive requests still need a lock shared
//! by all processes: the lock table on one host, PostgreSQL advisory locks across hosts.
//!
//! Layout: one hash per session, `<prefix><ID>`, with the fields `v` (version), `c` (created,
//! ms), `la` (last accessed, ms), `e` (expiry rule: `d`, `i<ms>`, `a<ms>`), `n` (record size) and
//! `d` (the record). Metadata is `HMGET` of the small fields, never the record; a session is one
//! key, so expiry, eviction and deletion take metadata and record together: a session is
//! present whole or not at all. A key of another type at a session's name (written by another
//! program), or a hash without the version `v` (which every write sets), is
//! [`Error::SessionCorrupt`] to every read, so the manager's corruption policy and `gc` delete it
//! like any unreadable record.
//!
//! A session stored **by key** ([`Store::save_delta`]) has, instead of `d`, the field `h` (its
//! head: versions and sizes of the keys) and one field `k:<key>` per value; `n` is then the
//! head's size plus the values'. `load_head` reads `h` (and every `k:` field when the session is
//! small enough), `load_values` checks the version and reads the asked fields in one script,
//! and `save_delta` checks the version and writes the head and the changed fields in one script
//! (a session still saved whole is converted first, by the same compare-and-swap). A whole
//! `save` replaces the hash.
//!
//! Native expiry: every save and every written touch sets `PEXPIRE` to the session's remaining
//! life plus a grace (see `native_ttl.rs`), so Redis drops a session only after the manager
//! would find it expired. The touch script re-checks expiry by the stored metadata before it
//! writes, so it never revives an expired session. `scan_expired` also walks the prefix with
//! `SCAN` (reading metadata only) so that `gc` deletes expired sessions before their TTL.
//!
//! Failures: connections come from a small pool; a connection that saw any error is dropped,
//! never reused (its replies could be out of step). A failed call on a pooled connection is
//! retried once on a fresh one (a server restart leaves every pooled connection dead). An
//! unreachable server gives [`Error::Backend`]; a save whose reply was lost gives
//! [`Error::OutcomeUnknown`] unless its retry settles it (the retry is the same
//! compare-and-swap, so it cannot apply the change twice).
//!
//! May not touch: keys outside its prefix, the lock table, the record format.

use super::native_ttl::{expiry_text, parse_expiry_text, TtlRule};
use super::{
    record_of_split, split_record, values_of_whole, Capabilities, ChangedValue, Cutoffs,
    ExpiredScan, SessionMeta, Store, Stored, StoredHead, StoredSession, Timestamp, Touch,
};
use crate::session::id::SessionId;
use crate::session::SessionConfig;
use crate::{Error, Result};
use parking_lot::Mutex;
use redis::{Connection, RedisError, RedisResult, Script};
use std::collections::VecDeque;
use std::time::Duration;

/// Idle connections kept for reuse.
const POOL_MAX_IDLE: usize = 16;
/// Longest TTL set, in ms (about 31,700 years): far beyond any session, and safe for
/// Redis's own arithmetic.
const TTL_MAX_MS: u64 = 1_000_000_000_000_000;

/// `load` and `load_head`: ARGV = max size, size up to which the values of a session stored by
/// key come along. Replies `whole` + meta + record, or `head` + meta + head + (key, value)*.
///
/// Every script first asks the key's `TYPE`: a key of another type at a session's name (another
/// program's `SET`) reads as corrupt, or as a version mismatch for the saves, where a command
/// on it would fail with `WRONGTYPE`. So does a hash without a version `v`, which no script
/// writes (every write sets `v`).
const LOAD: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'hash' then return {'corrupt'} end
local m = redis.call('HMGET', KEYS[1], 'v', 'c', 'la', 'e', 'n')
if not m[1] then return {'corrupt'} end
if not (m[2] and m[3] and m[4] and m[5] and tonumber(m[5])) then return {'corrupt'} end
if tonumber(m[5]) > tonumber(ARGV[1]) then return {'big', m[1], m[2], m[3], m[4], m[5]} end
local d = redis.call('HGET', KEYS[1], 'd')
if d then return {'whole', m[1], m[2], m[3], m[4], m[5], d} end
local h = redis.call('HGET', KEYS[1], 'h')
if not h then return {'corrupt'} end
local out = {'head', m[1], m[2], m[3], m[4], m[5], h}
if tonumber(m[5]) <= tonumber(ARGV[2]) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'k:' then
      out[#out + 1] = string.sub(all[i], 3)
      out[#out + 1] = all[i + 1]
    end
  end
end
return out
";

/// ARGV = version, keys. Replies nil (another version or gone), `whole` + record, or `vals` +
/// one value (nil when absent) per key.
const LOAD_VALUES: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'hash' then return {'corrupt'} end
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {'corrupt'} end
if v ~= ARGV[1] then return false end
local d = redis.call('HGET', KEYS[1], 'd')
if d then return {'whole', d} end
local out = {'vals'}
-- HMGET in batches: Lua's unpack takes at most a few thousand arguments.
local i = 2
while i <= #ARGV do
  local last = math.min(i + 999, #ARGV)
  local fields = {}
  for j = i, last do fields[#fields + 1] = 'k:' .. ARGV[j] end
  local vals = redis.call('HMGET', KEYS[1], unpack(fields))
  for j = 1, #fields do out[#out + 1] = vals[j] end
  i = last + 1
end
return out
";

/// ARGV = expected version ('' = absent), version, created, last accessed, expiry, size, head,
/// ttl, mode ('full': drop a whole record `d` too), then (key, value) pairs, '' = removed.
/// Replies 1 (written), 0 (the version did not match), 2 (saved whole: convert, mode 'full').
const SAVE_DELTA: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= 'hash' then return 0 end
local cur = redis.call('HGET', KEYS[1], 'v')
if t == 'hash' and not cur then return 0 end
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
if ARGV[9] ~= 'full' and cur and redis.call('HEXISTS', KEYS[1], 'd') == 1 then return 2 end
local la = ARGV[4]
local later = 0
if cur then
  local old = redis.call('HGET', KEYS[1], 'la')
  if old and tonumber(old) and tonumber(old) > tonumber(la) then
    later = tonumber(old) - tonumber(la)
    la = old
  end
end
redis.call('HDEL', KEYS[1], 'd')
for i = 10, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], 'k:' .. ARGV[i])
  else
    redis.call('HSET', KEYS[1], 'k:' .. ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'c', ARGV[3], 'la', la, 'e', ARGV[5], 'n', ARGV[6], 'h', ARGV[7])
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.min(tonumber(ARGV[8]) + later, 1e15)))
return 1
";

const SAVE: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= 'hash' then return 0 end
local cur = redis.call('HGET', KEYS[1], 'v')
if t == 'hash' and not cur then return 0 end
if ARGV[1] == '' then
  if cur then return 0 end
elseif cur ~= ARGV[1] then
  return 0
end
local la = ARGV[4]
local later = 0
if cur then
  local old = redis.call('HGET', KEYS[1], 'la')
  if old and tonumber(old) and tonumber(old) > tonumber(la) then
    later = tonumber(old) - tonumber(la)
    la = old
  end
  -- A session stored by key has other fields: a whole save replaces them all.
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'c', ARGV[3], 'la', la, 'e', ARGV[5], 'n', ARGV[6], 'd', ARGV[7])
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.min(tonumber(ARGV[8]) + later, 1e15)))
return 1
";

/// The end of life of a session (the formula of `Cutoffs::expires_at`), shared by the scripts
/// below: `m` = HMGET c, e; `last` = a last-accessed time; `idle`, `life` = the manager's rule.
const EXPIRES_AT: &str = r"
local function expires_at(c, e, last, idle, life)
  c = tonumber(c)
  if not c or not e then return nil end
  local kind = string.sub(e, 1, 1)
  local eol = c + life
  if kind == 'd' and #e == 1 then return math.min(last + idle, eol) end
  local arg = tonumber(string.sub(e, 2))
  if not arg then return nil end
  if kind == 'i' then return math.min(last + arg, eol) end
  if kind == 'a' then return arg end
  return nil
end
";

const TOUCH: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 'missing' end
if t ~= 'hash' then return 'corrupt' end
local m = redis.call('HMGET', KEYS[1], 'v', 'c', 'la', 'e')
if not m[1] then return 'corrupt' end
local la = tonumber(m[3])
if not la then return 'corrupt' end
if la >= tonumber(ARGV[2]) then return 'skipped' end
local now, idle, life = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ends = expires_at(m[2], m[4], la, idle, life)
if not ends then return 'corrupt' end
if now > ends then return 'expired' end
redis.call('HSET', KEYS[1], 'la', ARGV[1])
local ttl = expires_at(m[2], m[4], tonumber(ARGV[1]), idle, life) - now
if ttl < 0 then ttl = 0 end
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.min(ttl + tonumber(ARGV[6]), 1e15)))
return 'written'
";

const REMOVE_EXPIRED: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'hash' then return -1 end
local m = redis.call('HMGET', KEYS[1], 'v', 'c', 'la', 'e')
if not m[1] then return -1 end
local la = tonumber(m[3])
if not la then return -1 end
local ends = expires_at(m[2], m[4], la, tonumber(ARGV[2]), tonumber(ARGV[3]))
if not ends then return -1 end
if tonumber(ARGV[1]) > ends then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The small fields `v c la e n` (`HMGET`), or `corrupt` for a key of another type.
const META: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'hash' then return {'corrupt'} end
return redis.call('HMGET', KEYS[1], 'v', 'c', 'la', 'e', 'n')
";

struct Scripts {
    meta: Script,
    load: Script,
    load_values: Script,
    save: Script,
    save_delta: Script,
    touch: Script,
    remove_expired: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            meta: Script::new(META),
            load: Script::new(LOAD),
            load_values: Script::new(LOAD_VALUES),
            save: Script::new(SAVE),
            save_delta: Script::new(SAVE_DELTA),
            touch: Script::new(&format!("{EXPIRES_AT}{TOUCH}")),
            remove_expired: Script::new(&format!("{EXPIRES_AT}{REMOVE_EXPIRED}")),
        }
    }
}

/// Where the expiry scan stands: the server's `SCAN` cursor and keys it returned that the
/// previous call's budget left unexamined.
#[derive(Default)]
struct ScanState {
    cursor: u64,
    /// Keys as bytes: another program sharing the server may have written any key under the
    /// prefix, and one that is not UTF-8 must not make the batch unreadable.
    pending: VecDeque<Vec<u8>>,
}

/// A [`Store`] on a Redis server; see the module docs.
///
/// ```no_run
/// use locktable::session::{RedisStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let cfg = SessionConfig::default();
/// let store = RedisStore::open("redis://127.0.0.1:6379/")?.with_rule_of(&cfg);
/// // One host: the lock table orders exclusive requests; the store's CAS protects the rest.
/// let table = LockTable::open("/run/myapp/locks.table", &TableOptions::default())?;
/// let mgr = SessionManager::new(table, store, cfg);
/// let mut s = mgr.create()?;
/// s.insert("user", &"ann")?;
/// s.commit()?;
/// # Ok::<(), locktable::Error>(())
/// ```
pub struct RedisStore {
    client: redis::Client,
    /// Idle connections, with the fork epoch they belong to (a forked child must not share
    /// the parent's sockets).
    pool: Mutex<(u64, Vec<Connection>)>,
    prefix: String,
    timeout: Duration,
    rule: TtlRule,
    scripts: Scripts,
    scan: Mutex<ScanState>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What an error of the client means for the call.
enum Failure {
    /// No request reached the server (no connection).
    Unreached(String),
    /// The request may have reached the server (an I/O error or timeout on the connection).
    Lost(String),
    /// The server answered with an error: nothing was applied.
    Refused(String),
}

fn classify(e: &RedisError) -> Failure {
    let what = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connection_refusal() {
        "connection refused".to_owned()
    } else if e.is_connection_dropped() {
        "connection dropped".to_owned()
    } else if e.is_io_error() {
        "I/O error".to_owned()
    } else {
        // The server's error code (OOM, LOADING, READONLY, ...), without arguments that could
        // carry data.
        format!("server error {:?}", e.kind())
    };
    if e.is_connection_refusal() {
        Failure::Unreached(what)
    } else if e.is_io_error() {
        Failure::Lost(what)
    } else {
        Failure::Refused(what)
    }
}

fn backend(op: &str, what: &str) -> Error {
    Error::Backend(format!("redis {op}: {what}"))
}

fn num(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Metadata from the hash's small fields `v c la e n`.
fn parse_meta(f: &[Vec<u8>]) -> Result<SessionMeta> {
    let corrupt = || Error::SessionCorrupt("redis session metadata unreadable".into());
    let [v, c, la, e, n] = f else {
        return Err(corrupt());
    };
    Ok(SessionMeta {
        version: num(v).ok_or_else(corrupt)?,
        created: Timestamp(num(c).ok_or_else(corrupt)?),
        last_accessed: Timestamp(num(la).ok_or_else(corrupt)?),
        expiry: std::str::from_utf8(e)
            .ok()
            .and_then(parse_expiry_text)
            .ok_or_else(corrupt)?,
        size: num(n).ok_or_else(corrupt)?,
    })
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl RedisStore {
    /// A store on the server at `url` (`redis://host:port/db`), with the
    /// default key prefix `locktable:session:`. Connects once to check the server.
    pub fn open(url: &str) -> Result<RedisStore> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::Backend(format!("redis open: bad URL ({:?})", e.kind())))?;
        let d = SessionConfig::default();
        let store = RedisStore {
            client,
            pool: Mutex::new((crate::fork::epoch(), Vec::new())),
            prefix: "locktable:session:".to_owned(),
            timeout: Duration::from_secs(2),
            rule: TtlRule::new(d.idle_timeout, d.max_lifetime, Duration::from_secs(60)),
            scripts: Scripts::new(),
            scan: Mutex::new(ScanState::default()),
        };
        store.with_conn("open", |c| redis::cmd("PING").query::<String>(c))?;
        Ok(store)
    }

    /// Keys are `<prefix><ID>`: give each application (or test) its own prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest wait for connecting, sending or receiving (default 2 s); then
    /// [`Error::Backend`] (or [`Error::OutcomeUnknown`] for a save).
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = d.max(Duration::from_millis(1));
        self
    }

    /// The expiry rule the native TTL assumes at a save: the manager's `idle_timeout` and
    /// `max_lifetime`. Touches and gc pass the manager's rule anyway and the store only ever
    /// raises what it assumes; give it the manager's configuration so that even a session saved
    /// before any touch keeps a TTL long enough.
    pub fn with_rule_of(mut self, cfg: &SessionConfig) -> Self {
        self.rule = self.rule.of_config(cfg);
        self
    }

    /// Extra time the server keeps a session after the manager would find it expired (default
    /// 60 s), so clock differences between hosts never lose a live session.
    pub fn with_native_grace(mut self, d: Duration) -> Self {
        self.rule = self.rule.with_grace(d);
        self
    }

    fn key(&self, id: &SessionId) -> String {
        format!("{}{}", self.prefix, id.as_str())
    }

    fn connect(&self) -> std::result::Result<Connection, Failure> {
        let unreached = |e: RedisError| match classify(&e) {
            Failure::Unreached(w) | Failure::Lost(w) | Failure::Refused(w) => {
                Failure::Unreached(format!("connect: {w}"))
            }
        };
        let c = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(unreached)?;
        c.set_read_timeout(Some(self.timeout)).map_err(unreached)?;
        c.set_write_timeout(Some(self.timeout)).map_err(unreached)?;
        Ok(c)
    }

    /// An idle connection, if any.
    fn take(&self) -> Option<Connection> {
        let mut pool = self.pool.lock();
        let epoch = crate::fork::epoch();
        if pool.0 != epoch {
            // Inherited across fork(): these sockets are the parent's. Forget them without
            // closing anything the parent uses (dropping closes only this process's copy).
            pool.1.clear();
            pool.0 = epoch;
        }
        pool.1.pop()
    }

    fn give_back(&self, c: Connection) {
        let mut pool = self.pool.lock();
        if pool.0 == crate::fork::epoch() && pool.1.len() < POOL_MAX_IDLE {
            pool.1.push(c);
        }
    }

    /// Runs `f` once on a connection (an idle one, else a new one). A connection that errs is
    /// dropped, never reused. The error comes classified, with whether the connection came from
    /// the pool (a failure there may only mean the pooled connection was stale).
    fn run<T>(
        &self,
        f: &mut dyn FnMut(&mut Connection) -> RedisResult<T>,
    ) -> std::result::Result<T, (Failure, bool)> {
        let (mut conn, pooled) = match self.take() {
            Some(c) => (c, true),
            None => match self.connect() {
                Ok(c) => (c, false),
                Err(f) => return Err((f, false)),
            },
        };
        match f(&mut conn) {
            Ok(v) => {
                self.give_back(conn);
                Ok(v)
            }
            Err(e) => {
                let failure = classify(&e);
                if pooled && matches!(failure, Failure::Lost(_)) {
                    // A connection that was idle in the pool died: most likely the server
                    // restarted, and every other idle connection is dead too. Drop them all, so
                    // that the caller's retry gets a fresh connection.
                    self.pool.lock().1.clear();
                }
                Err((failure, pooled))
            }
        }
    }

    /// [`RedisStore::run`] for an operation that is safe to repeat (reads, touches, deletes):
    /// retried once on a fresh connection after a failure on a pooled one.
    fn with_conn<T>(
        &self,
        op: &str,
        mut f: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let mut first = true;
        loop {
            match self.run(&mut f) {
                Ok(v) => return Ok(v),
                Err((Failure::Lost(_), true)) if first => first = false,
                Err((Failure::Unreached(w) | Failure::Lost(w) | Failure::Refused(w), _)) => {
                    return Err(backend(op, &w));
                }
            }
        }
    }

    fn meta_of(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        let key = self.key(id);
        let f: Option<Vec<Option<Vec<u8>>>> =
            self.with_conn("meta", |c| self.scripts.meta.key(&key).invoke(c))?;
        let Some(f) = f else {
            return Ok(None);
        };
        if f.len() != 5 {
            return Err(Error::SessionCorrupt(
                "redis session key is not a hash".into(),
            ));
        }
        // The key exists (the script said so): a field missing, even every one, is damage.
        let f: Option<Vec<Vec<u8>>> = f.into_iter().collect();
        match f {
            Some(f) => parse_meta(&f).map(Some),
            None => Err(Error::SessionCorrupt(
                "redis session metadata incomplete".into(),
            )),
        }
    }

    /// Up to `budget` keys under the prefix, continuing the server-side `SCAN`; `more` is false
    /// once a whole pass is done.
    fn scan_keys(&self, budget: usize) -> Result<(Vec<Vec<u8>>, bool)> {
        let mut st = self.scan.lock();
        let pattern = format!("{}*", glob_escape(&self.prefix));
        let mut out = Vec::new();
        loop {
            while out.len() < budget {
                match st.pending.pop_front() {
                    Some(k) => out.push(k),
                    None => break,
                }
            }
            if out.len() == budget {
                return Ok((out, true));
            }
            let cursor = st.cursor;
            let (next, keys): (u64, Vec<Vec<u8>>) = self.with_conn("scan", |c| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(budget.clamp(10, 1000))
                    .query(c)
            })?;
            st.pending.extend(keys);
            st.cursor = next;
            if next == 0 {
                // A whole pass: hand out what is left within the budget.
                while out.len() < budget {
                    match st.pending.pop_front() {
                        Some(k) => out.push(k),
                        None => break,
                    }
                }
                let more = !st.pending.is_empty();
                return Ok((out, more));
            }
        }
    }
}

/// What one run of the `save_delta` script did.
enum DeltaSaved {
    Written,
    Mismatch,
    /// The session is stored whole: run again with every value (`full`).
    StoredWhole,
}

impl RedisStore {
    fn load_entry(
        &self,
        id: &SessionId,
        max_size: usize,
        values_up_to: u64,
    ) -> Result<Option<Stored>> {
        let key = self.key(id);
        let reply: Option<Vec<Vec<u8>>> = self.with_conn("load", |c| {
            self.scripts
                .load
                .key(&key)
                .arg(max_size)
                .arg(values_up_to)
                .invoke(c)
        })?;
        let Some(mut reply) = reply else {
            return Ok(None);
        };
        let corrupt = || Error::SessionCorrupt("redis session metadata unreadable".into());
        match reply.first().map(Vec::as_slice) {
            Some(b"whole") if reply.len() == 7 => {
                let meta = parse_meta(&reply[1..6])?;
                let bytes = reply.pop().unwrap_or_default();
                if bytes.len() as u64 != meta.size {
                    return Err(Error::SessionCorrupt(
                        "redis record size disagrees with its metadata".into(),
                    ));
                }
                Ok(Some(Stored::Whole(StoredSession { meta, bytes })))
            }
            Some(b"head") if reply.len() >= 7 && reply.len() % 2 == 1 => {
                let meta = parse_meta(&reply[1..6])?;
                let rest = reply.split_off(6);
                let mut rest = rest.into_iter();
                let head = rest.next().ok_or_else(corrupt)?;
                let mut values = Vec::new();
                while let (Some(k), Some(v)) = (rest.next(), rest.next()) {
                    let k = String::from_utf8(k).map_err(|_| corrupt())?;
                    values.push((k, v));
                }
                let values = (meta.size <= values_up_to).then_some(values);
                Ok(Some(Stored::ByKey(StoredHead { meta, head, values })))
            }
            Some(b"big") if reply.len() == 6 => {
                let meta = parse_meta(&reply[1..6])?;
                Err(Error::TooLarge {
                    size: usize::try_from(meta.size).unwrap_or(usize::MAX),
                    limit: max_size,
                })
            }
            _ => Err(corrupt()),
        }
    }

    /// One run of the `save_delta` script, with `save`'s handling of a lost reply.
    fn save_delta_once(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
        full: bool,
    ) -> Result<DeltaSaved> {
        let key = self.key(id);
        let m = &new.meta;
        let ttl = ms(self.rule.ttl_at_save(m)).min(TTL_MAX_MS);
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let mut attempt = |c: &mut Connection| -> RedisResult<i64> {
            let mut call = self.scripts.save_delta.key(&key);
            call.arg(&expected)
                .arg(m.version)
                .arg(m.created.0)
                .arg(m.last_accessed.0)
                .arg(expiry_text(m.expiry))
                .arg(m.size)
                .arg(&new.head)
                .arg(ttl)
                .arg(if full { "full" } else { "" });
            for (k, v) in changed {
                call.arg(k).arg(v.as_deref().unwrap_or_default());
            }
            call.invoke(c)
        };
        let outcome = |n: i64| match n {
            1 => DeltaSaved::Written,
            2 => DeltaSaved::StoredWhole,
            _ => DeltaSaved::Mismatch,
        };
        match self.run(&mut attempt) {
            Ok(n) => Ok(outcome(n)),
            Err((Failure::Unreached(w) | Failure::Refused(w), _)) => Err(backend("save", &w)),
            Err((Failure::Lost(w), _)) => match self.run(&mut attempt) {
                // As in `save`: the retry is the same compare-and-swap.
                Ok(1) => Ok(DeltaSaved::Written),
                Ok(2) => Ok(DeltaSaved::StoredWhole),
                Ok(_) => Err(Error::OutcomeUnknown(format!(
                    "redis save: {w}; the session changed since, maybe by this save"
                ))),
                Err((Failure::Refused(w2) | Failure::Unreached(w2) | Failure::Lost(w2), _)) => {
                    Err(Error::OutcomeUnknown(format!("redis save: {w}, then {w2}")))
                }
            },
        }
    }
}

/// `prefix` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len());
    for ch in prefix.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            s.push('\\');
        }
        s.push(ch);
    }
    s
}

impl Store for RedisStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, true, true).with_per_key(true)
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        match self.load_entry(id, max_size, u64::MAX)? {
            None => Ok(None),
            Some(Stored::Whole(st)) => Ok(Some(st)),
            Some(Stored::ByKey(st)) => {
                let values = st.values.unwrap_or_default().into_iter().collect();
                record_of_split(st.meta, &st.head, &values).map(Some)
            }
        }
    }

    fn load_head(
        &self,
        id: &SessionId,
        max_size: usize,
        values_up_to: u64,
    ) -> Result<Option<Stored>> {
        self.load_entry(id, max_size, values_up_to)
    }

    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>> {
        let key = self.key(id);
        let reply: Option<Vec<Option<Vec<u8>>>> = self.with_conn("load_values", |c| {
            let mut call = self.scripts.load_values.key(&key);
            call.arg(version);
            for k in keys {
                call.arg(*k);
            }
            call.invoke(c)
        })?;
        let Some(mut reply) = reply else {
            return Ok(None);
        };
        let corrupt = || Error::SessionCorrupt("redis values reply unreadable".into());
        match reply.first().cloned().flatten().as_deref() {
            Some(b"vals") if reply.len() == keys.len() + 1 => Ok(Some(reply.split_off(1))),
            Some(b"whole") if reply.len() == 2 => {
                let whole = reply.pop().flatten().ok_or_else(corrupt)?;
                values_of_whole(&whole, keys).map(Some)
            }
            _ => Err(corrupt()),
        }
    }

    fn save_delta(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> Result<bool> {
        match self.save_delta_once(id, expected, new, changed, false)? {
            DeltaSaved::Written => Ok(true),
            DeltaSaved::Mismatch => Ok(false),
            DeltaSaved::StoredWhole => {
                // Convert: every value of the whole record, then the change, in one script
                // whose compare-and-swap fails if the session moved on meanwhile.
                let Some(cur) = self.load(id, usize::MAX)? else {
                    return Ok(false);
                };
                if Some(cur.meta.version) != expected {
                    return Ok(false);
                }
                let mut all: std::collections::BTreeMap<String, Option<Vec<u8>>> =
                    split_record(&cur.bytes)?
                        .1
                        .into_iter()
                        .map(|(k, v)| (k, Some(v)))
                        .collect();
                all.extend(changed.iter().cloned());
                let all: Vec<ChangedValue> = all.into_iter().collect();
                let r = self.save_delta_once(id, expected, new, &all, true)?;
                Ok(matches!(r, DeltaSaved::Written))
            }
        }
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        let key = self.key(id);
        let m = &new.meta;
        let ttl = ms(self.rule.ttl_at_save(m)).min(TTL_MAX_MS);
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let mut attempt = |c: &mut Connection| -> RedisResult<i64> {
            self.scripts
                .save
                .key(&key)
                .arg(&expected)
                .arg(m.version)
                .arg(m.created.0)
                .arg(m.last_accessed.0)
                .arg(expiry_text(m.expiry))
                .arg(new.bytes.len())
                .arg(&new.bytes)
                .arg(ttl)
                .invoke(c)
        };
        match self.run(&mut attempt) {
            Ok(n) => Ok(n == 1),
            Err((Failure::Unreached(w) | Failure::Refused(w), _)) => Err(backend("save", &w)),
            Err((Failure::Lost(w), _)) => {
                // The script may have run. Run the same compare-and-swap again on a fresh
                // connection: if it succeeds, the first did not (and now cannot); if it fails,
                // either the first applied or someone else wrote: unknown.
                match self.run(&mut attempt) {
                    Ok(1) => Ok(true),
                    Ok(_) => Err(Error::OutcomeUnknown(format!(
                        "redis save: {w}; the session changed since, maybe by this save"
                    ))),
                    Err((Failure::Refused(w2) | Failure::Unreached(w2) | Failure::Lost(w2), _)) => {
                        Err(Error::OutcomeUnknown(format!("redis save: {w}, then {w2}")))
                    }
                }
            }
        }
    }

    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        self.meta_of(id)
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        self.rule.learn(cutoffs);
        let key = self.key(id);
        let fresh = at.saturating_sub(coalesce);
        let r: String = self.with_conn("touch", |c| {
            self.scripts
                .touch
                .key(&key)
                .arg(at.0)
                .arg(fresh.0)
                .arg(cutoffs.now.0)
                .arg(ms(cutoffs.idle_timeout))
                .arg(ms(cutoffs.max_lifetime))
                .arg(ms(self.rule.grace()))
                .invoke(c)
        })?;
        match r.as_str() {
            "missing" => Ok(Touch::Missing),
            "skipped" => Ok(Touch::Skipped),
            "expired" => Ok(Touch::Expired),
            "written" => Ok(Touch::Written),
            _ => Err(Error::SessionCorrupt(
                "redis session metadata unreadable".into(),
            )),
        }
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        let key = self.key(id);
        let n: i64 = self.with_conn("delete", |c| redis::cmd("DEL").arg(&key).query(c))?;
        Ok(n > 0)
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        self.rule.learn(cutoffs);
        let key = self.key(id);
        let r: i64 = self.with_conn("remove_expired", |c| {
            self.scripts
                .remove_expired
                .key(&key)
                .arg(cutoffs.now.0)
                .arg(ms(cutoffs.idle_timeout))
                .arg(ms(cutoffs.max_lifetime))
                .invoke(c)
        })?;
        match r {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(Error::SessionCorrupt(
                "redis session metadata unreadable".into(),
            )),
        }
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        self.rule.learn(cutoffs);
        let (keys, more) = self.scan_keys(budget.max(1))?;
        let mut scan = ExpiredScan {
            more,
            ..ExpiredScan::default()
        };
        for key in keys {
            let Some(id) = key
                .strip_prefix(self.prefix.as_bytes())
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| SessionId::parse(s).ok())
            else {
                continue;
            };
            scan.examined += 1;
            match self.meta_of(&id) {
                Ok(Some(m)) if cutoffs.meta_expired(&m) => scan.expired.push(id),
                Ok(_) => {}
                Err(Error::SessionCorrupt(_)) => scan.corrupt.push(id),
                Err(e) => {
                    tracing::warn!(session = ?id, error = %e, "session gc: redis entry unreadable, skipped");
                    scan.unreadable += 1;
                }
            }
        }
        Ok(scan)
    }
}

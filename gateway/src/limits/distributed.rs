//! Limits shared by every gateway node through Redis.
//!
//! **Design: the decision is made in Redis.** One Lua script per request runs the same GCRA as
//! [`super::gcra`] against the key's and the developer's buckets and checks the developer's
//! period quota, atomically, on Redis' clock (`TIME`), and commits all buckets or none. So the
//! global limits hold exactly across nodes (no over-admission from coordination); the price is
//! one Redis round trip per limited request (measured in `loadtests/results/limits-latest.md`),
//! two when tokens or a hard-stop quota are limited: the admission script runs before the
//! request's body is read (requests taken, tokens and quota checked with no cost of its own),
//! the reservation script once it is read (tokens taken, the quota must fit the request; a
//! refusal gives back the request the first script took, in the same script).
//! Settling (real tokens, quota counters) is a second script run after the response, off the
//! request's path.
//!
//! Quota counters live in one hash per developer and period. A missing hash (first use, or a
//! Redis that lost its data) is created from the node's own totals (ClickHouse seed plus what
//! it counted), so a Redis restart does not reset anybody's quota. Reservations of requests in
//! flight stay on their node: with several nodes a quota edge can be overshot by the other
//! nodes' reservations at most.
//!
//! **Outages.** A failed or slow (`limits.redis.timeout`) call marks Redis down: the node logs
//! once, sets `aihub_limits_redis_up` to 0 and decides locally with its share of each limit
//! (limit ÷ live nodes, from the node registry below). A monitor reconnects every second; when
//! Redis answers again, quota usage counted meanwhile is added to Redis and decisions move back.
//!
//! **Node registry.** Every node refreshes its entry in a sorted set each second; nodes seen in
//! the last 5 s are live. The count survives outages (last known value).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aihub_plans::Period;
use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::Script;

use super::gcra::Rate;
use super::headers::{RateHeaders, Shown};
use super::local::{Rates, Refused};
use super::quota::QuotaRule;
use crate::error::Reason;

/// Nodes that refreshed their registry entry within this window are live.
const NODE_TTL_MS: i64 = 5_000;

/// What every script starts with: Redis' clock (µs), the window, and bucket-key expiry.
/// Numbers are integers (µs, units) held exactly in Lua's doubles.
const PRELUDE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
-- A bucket hash lives until its fullest field is full again (never shortened).
local function extend(key, until_us)
  local ms = math.ceil((until_us - now) / 1000) + 1000
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"#;

/// Bucket functions of the admission and reservation scripts (after [`PRELUDE_LUA`]): `decide`
/// is [`super::gcra::decide`], `peek` a bucket's remaining units and reset, `tat` a bucket
/// field's theoretical arrival time.
const BUCKETS_LUA: &str = r#"
local function decide(tat, rate, burst, cost, lenient)
  local T = math.ceil(W / rate)
  if lenient then cost = math.min(cost, rate) end
  local tau = burst * T
  local base = math.max(tat, now)
  local new = base + cost * T
  local over
  if lenient then over = base - now - (tau - T) else over = new - now - tau end
  if over <= 0 then
    local span, rem = tau - (new - now), 0
    if span > 0 then rem = math.floor(span / T) end
    return {true, new, rem, new - now}
  end
  return {false, tat, 0, over}
end
local function peek(tat, rate, burst)
  local T = math.ceil(W / rate)
  local used = math.max(tat - now, 0)
  local span, rem = burst * T - used, 0
  if span > 0 then rem = math.floor(span / T) end
  return rem, used
end
local function tat(key, field)
  local v = redis.call('HGET', key, field)
  if v then return tonumber(v) end
  return 0
end
"#;

/// The admission script (after [`BUCKETS_LUA`]): [`super::gcra::decide`] for up to four
/// buckets plus the quota check.
const ADMIT_LUA: &str = r#"
local A = {}
for i = 1, #ARGV do A[i] = tonumber(ARGV[i]) end
-- A: 1 key req rate, 2 key req burst, 3 dev req rate, 4 dev req burst, 5 key tok rate,
--    6 dev tok rate, 7 cost, 8 quota mode (0 none, 1 track, 2 hard, 3 spend cap),
--    9 included, 10 spend cap, 11 reserved here, 12 seed tokens, 13 seed cost, 14 quota ttl s,
--    15 may create the quota hash from the seed (1) or must read a missing one as the seed (0)
local qt, qc, status, retry = 0, 0, 0, 0
if A[8] >= 1 then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if A[15] == 1 then
      redis.call('HSET', KEYS[3], 'tokens', ARGV[12], 'cost', ARGV[13])
      redis.call('EXPIRE', KEYS[3], ARGV[14])
    end
    qt, qc = A[12], A[13]
  else
    qt = tonumber(redis.call('HGET', KEYS[3], 'tokens'))
    qc = tonumber(redis.call('HGET', KEYS[3], 'cost'))
  end
  local refuse = 0
  if A[8] == 2 and qt + A[11] >= A[9] then refuse = 5 end
  if A[8] == 3 and qt >= A[9] then
    local over = 0
    if qt > 0 then over = math.floor(qc * (qt - A[9]) / qt) end
    if over >= A[10] then refuse = 6 end
  end
  status = refuse
end
local specs = {
  {KEYS[1], 'r', A[1], A[2], 1, false},
  {KEYS[2], 'r', A[3], A[4], 1, false},
  {KEYS[1], 't', A[5], A[5], A[7], true},
  {KEYS[2], 't', A[6], A[6], A[7], true},
}
local out, results = {}, {}
for i, s in ipairs(specs) do
  if s[3] > 0 and status < 5 then
    local d = decide(tat(s[1], s[2]), s[3], s[4], s[5], s[6])
    results[i] = d
    if not d[1] then
      if status == 0 then
        if i <= 2 then status = 1 else status = 2 end
      end
      retry = math.max(retry, d[4])
    end
  end
end
for i, s in ipairs(specs) do
  local d = results[i]
  if s[3] <= 0 then
    table.insert(out, -1); table.insert(out, 0); table.insert(out, 0)
  elseif d == nil or (status ~= 0 and d[1]) then
    local rem, reset = peek(tat(s[1], s[2]), s[3], s[4])
    table.insert(out, 1); table.insert(out, rem); table.insert(out, reset)
  else
    table.insert(out, 1); table.insert(out, d[3]); table.insert(out, d[4])
  end
end
if status == 0 then
  for i, s in ipairs(specs) do
    local d = results[i]
    if d ~= nil then
      redis.call('HSET', s[1], s[2], string.format('%.0f', d[2]))
      extend(s[1], d[2])
    end
  end
end
local r = {status, retry}
for _, v in ipairs(out) do table.insert(r, v) end
table.insert(r, qt); table.insert(r, qc)
return r
"#;

/// The reservation script (after [`BUCKETS_LUA`]): the second step of an admission, once the
/// request's body is read. The token buckets decide again with the reservation as cost (as
/// [`super::gcra::decide`], leniently) and a hard-stop quota must fit the tokens the request
/// declares; refused, nothing is taken and the request the admission script took is given back.
const RESERVE_LUA: &str = r#"
local A = {}
for i = 1, #ARGV do A[i] = tonumber(ARGV[i]) end
-- A: 1 key req rate, 2 dev req rate (given back on a refusal; 0 = none), 3 key tok rate,
--    4 dev tok rate, 5 cost, 6 hard quota (1/0), 7 included, 8 reserved here, 9 declared,
--    10 seed tokens (a missing quota hash reads as the seed)
local status, retry, qt = 0, 0, 0
if A[6] == 1 then
  local v = redis.call('HGET', KEYS[3], 'tokens')
  if v then qt = tonumber(v) else qt = A[10] end
  if qt + A[8] + A[9] > A[7] then status = 5 end
end
local specs = {{KEYS[1], A[3]}, {KEYS[2], A[4]}}
local results, out = {}, {}
for i, s in ipairs(specs) do
  if s[2] > 0 and status == 0 then
    local d = decide(tat(s[1], 't'), s[2], s[2], A[5], true)
    results[i] = d
    if not d[1] then
      status = 2
      retry = math.max(retry, d[4])
    end
  end
end
for i, s in ipairs(specs) do
  local d = results[i]
  if s[2] <= 0 then
    table.insert(out, -1); table.insert(out, 0); table.insert(out, 0)
  elseif d == nil or (status ~= 0 and d[1]) then
    local rem, used = peek(tat(s[1], 't'), s[2], s[2])
    table.insert(out, 1); table.insert(out, rem); table.insert(out, used)
  else
    table.insert(out, 1); table.insert(out, d[3]); table.insert(out, d[4])
  end
end
if status == 0 then
  for i, s in ipairs(specs) do
    local d = results[i]
    if d ~= nil then
      redis.call('HSET', s[1], 't', string.format('%.0f', d[2]))
      extend(s[1], d[2])
    end
  end
else
  for i, key in ipairs({KEYS[1], KEYS[2]}) do
    local v = redis.call('HGET', key, 'r')
    if A[i] > 0 and v then
      local back = math.max(tonumber(v) - math.ceil(W / A[i]), now)
      redis.call('HSET', key, 'r', string.format('%.0f', back))
    end
  end
end
local r = {status, retry}
for _, v in ipairs(out) do table.insert(r, v) end
table.insert(r, qt)
return r
"#;

/// The settle script: token buckets moved by (real − reserved, each counted at most one
/// window, as [`super::gcra::settle`]), quota counters increased.
const SETTLE_LUA: &str = r#"
-- ARGV: 1 key tok rate, 2 dev tok rate, 3 reserved, 4 tokens, 5 cost, 6 track quota,
--       7 seed tokens, 8 seed cost, 9 quota ttl s, 10 may create the quota hash (1/0)
local reserved, used = tonumber(ARGV[3]), tonumber(ARGV[4])
local function adjust(key, rate)
  if rate <= 0 then return end
  local delta = math.min(used, rate) - math.min(reserved, rate)
  local v = redis.call('HGET', key, 't')
  -- Usage beyond the reservation is charged even if the bucket expired meanwhile.
  if delta == 0 or (not v and delta < 0) then return end
  local tat = math.max(math.max(tonumber(v or 0), now) + delta * math.ceil(W / rate), now)
  redis.call('HSET', key, 't', string.format('%.0f', tat))
  extend(key, tat)
end
adjust(KEYS[1], tonumber(ARGV[1]))
adjust(KEYS[2], tonumber(ARGV[2]))
if ARGV[6] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    if ARGV[10] ~= '1' then return {2, 0, 0, 0} end
    redis.call('HSET', KEYS[3], 'tokens', ARGV[7], 'cost', ARGV[8])
    redis.call('EXPIRE', KEYS[3], ARGV[9])
  end
  local before = tonumber(redis.call('HGET', KEYS[3], 'tokens'))
  local after = redis.call('HINCRBY', KEYS[3], 'tokens', ARGV[4])
  local cost = redis.call('HINCRBY', KEYS[3], 'cost', ARGV[5])
  return {1, before, after, cost}
end
return {0, 0, 0, 0}
"#;

/// Errors talking to Redis (the caller falls back to local limits).
#[derive(Debug, thiserror::Error)]
pub enum RedisDown {
    #[error("not connected")]
    NotConnected,
    #[error("the settle queue is full")]
    QueueFull,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// What the quota part of a request sends to Redis.
#[derive(Debug, Clone, Copy)]
pub struct QuotaArgs {
    pub rule: Option<QuotaRule>,
    /// Tokens reserved by this node's requests in flight for the developer.
    pub reserved: u64,
    /// This node's totals: the hash's content if Redis has none.
    pub seed: (u64, i64),
    /// The current period and its end (unix ms).
    pub period: Period,
    pub period_end_ms: i64,
    /// This node's totals include the period's usage from ClickHouse, so a missing quota hash
    /// may be created from them (else it is read as `seed` without being created).
    pub seeded: bool,
}

/// What the reservation step sends to Redis about the quota and the request to give back.
#[derive(Debug, Clone, Copy)]
pub struct ReserveArgs {
    /// The request buckets the admission script took from (given back on a refusal); empty
    /// when that step was decided elsewhere.
    pub give_back: Rates,
    /// A hard-stop quota's included tokens.
    pub hard_included: Option<u64>,
    /// Tokens reserved by this node's other requests in flight for the developer.
    pub reserved: u64,
    /// The tokens the request itself declares (must fit what is left of a hard-stop quota).
    pub declared: u64,
    /// This node's committed tokens: what a missing quota hash is read as.
    pub seed: u64,
    pub period: Period,
}

/// A Redis reservation: the decision (tokens shown) and the developer's global committed
/// tokens (when a hard-stop quota was checked).
pub struct RemoteReservation {
    pub result: Result<Option<Shown>, Refused>,
    pub quota_tokens: Option<u64>,
}

/// A Redis admission: the decision and the developer's global totals (when tracked).
pub struct RemoteAdmission {
    pub result: Result<RateHeaders, Refused>,
    pub quota: Option<(u64, i64)>,
}

/// The quota a settle counts against.
#[derive(Debug, Clone, Copy)]
pub struct Track {
    pub period: Period,
    /// The node's totals before this usage (the hash's content if Redis has none).
    pub seed: (u64, i64),
    /// The node's totals include ClickHouse's: a missing hash may be created from them.
    pub seeded: bool,
}

/// What a settle did to the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Counted: the global totals.
    Counted(Settled),
    /// No quota tracked for this request.
    Untracked,
    /// Redis has no counter yet and this node may not create it (its ClickHouse seed has not
    /// arrived): the caller keeps the usage for later.
    NotSeeded,
}

/// One request's settle: its buckets, its reservation and real usage, its quota.
#[derive(Debug, Clone)]
pub struct SettleArgs {
    pub key_id: Arc<str>,
    pub dev_id: Arc<str>,
    pub rates: Rates,
    pub reserved: u64,
    /// Real tokens and cost (nano-USD).
    pub usage: (u64, i64),
    pub track: Option<Track>,
}

/// A batch of settles may take this long (off the request path).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

fn settle_outcome(r: &[i64]) -> SettleOutcome {
    match (r.first(), r.len()) {
        (Some(1), 4) => SettleOutcome::Counted(Settled {
            before: r[1].max(0) as u64,
            after: r[2].max(0) as u64,
            cost: r[3],
        }),
        (Some(2), _) => SettleOutcome::NotSeeded,
        _ => SettleOutcome::Untracked,
    }
}

/// Quota totals after a settle: tokens before and after, cost after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub before: u64,
    pub after: u64,
    pub cost: i64,
}

/// Usage counted while Redis was down: (tokens, cost) by period and developer.
type Deferred = HashMap<(Period, Arc<str>), (u64, i64)>;

/// The Redis side of the limiter.
pub struct Distributed {
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    nodes: AtomicU32,
    node_id: String,
    admit: Script,
    reserve: Script,
    settle: Script,
    /// Quota usage counted while Redis was down, by period and developer: (tokens, cost).
    pending: Mutex<Deferred>,
}

impl Distributed {
    /// Prepares the client (no I/O: the monitor connects).
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Distributed, redis::RedisError> {
        Ok(Distributed {
            client: redis::Client::open(url)?,
            conn: ArcSwapOption::empty(),
            prefix: prefix.to_owned(),
            timeout,
            up: AtomicBool::new(false),
            nodes: AtomicU32::new(1),
            node_id: uuid::Uuid::now_v7().simple().to_string(),
            admit: Script::new(&format!("{PRELUDE_LUA}{BUCKETS_LUA}{ADMIT_LUA}")),
            reserve: Script::new(&format!("{PRELUDE_LUA}{BUCKETS_LUA}{RESERVE_LUA}")),
            settle: Script::new(&format!("{PRELUDE_LUA}{SETTLE_LUA}")),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Whether decisions currently go to Redis.
    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Live gateway nodes (last known; at least 1).
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    fn quota_key(&self, period: Period, dev_id: &str) -> String {
        format!("{}:q:{period}:{dev_id}", self.prefix)
    }

    fn connection(&self) -> Result<MultiplexedConnection, RedisDown> {
        self.conn
            .load()
            .as_deref()
            .cloned()
            .ok_or(RedisDown::NotConnected)
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisDown> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RedisDown::Timeout(self.timeout)),
        }
    }

    /// Marks Redis down; true the first time (the caller logs once).
    pub fn mark_down(&self) -> bool {
        self.up.swap(false, Ordering::Relaxed)
    }

    /// Runs the admission script.
    pub async fn admit(
        &self,
        key_id: &str,
        dev_id: &str,
        rates: &Rates,
        cost: u64,
        quota: QuotaArgs,
    ) -> Result<RemoteAdmission, RedisDown> {
        let mut conn = self.connection()?;
        let rate = |r: Option<Rate>| r.map_or((0, 0), |r| (r.per_minute, r.burst));
        let (kr, kb) = rate(rates.key_requests);
        let (dr, db) = rate(rates.dev_requests);
        let (mode, included, cap) = match quota.rule {
            None => (0, 0, 0),
            Some(r) if r.hard && r.included.is_some() => (2, r.included.unwrap_or(0), 0),
            // Without included tokens nothing is overage: the cap cannot bind (as locally).
            Some(r) if !r.hard && r.spend_cap_nanos.is_some() && r.included.is_some() => {
                (3, r.included.unwrap_or(0), r.spend_cap_nanos.unwrap_or(0))
            }
            Some(_) => (1, 0, 0),
        };
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.key("rl:k", key_id))
            .key(self.key("rl:d", dev_id))
            .key(self.quota_key(quota.period, dev_id))
            .arg(kr)
            .arg(kb)
            .arg(dr)
            .arg(db)
            .arg(rates.key_tokens.map_or(0, |r| r.per_minute))
            .arg(rates.dev_tokens.map_or(0, |r| r.per_minute))
            .arg(cost)
            .arg(mode)
            .arg(included)
            .arg(cap)
            .arg(quota.reserved)
            .arg(quota.seed.0)
            .arg(quota.seed.1)
            .arg(quota_ttl_secs(quota.period_end_ms))
            .arg(u8::from(quota.seeded));
        let r: Vec<i64> = self.timed(inv.invoke_async(&mut conn)).await?;
        if r.len() != 16 {
            return Err(RedisDown::Redis(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected admission reply",
            ))));
        }
        let quota_totals = (mode > 0).then(|| (r[14].max(0) as u64, r[15]));
        let bucket = |i: usize, rate: Option<Rate>| -> Option<Shown> {
            let base = 2 + 3 * i;
            (r[base] == 1).then(|| Shown {
                limit: rate.map_or(0, |r| r.per_minute),
                remaining: r[base + 1].max(0) as u64,
                reset_us: r[base + 2],
            })
        };
        let headers = RateHeaders {
            requests: Shown::tighter(bucket(0, rates.key_requests), bucket(1, rates.dev_requests)),
            tokens: Shown::tighter(bucket(2, rates.key_tokens), bucket(3, rates.dev_tokens)),
        };
        let result = match r[0] {
            0 => Ok(headers),
            status => Err(Refused {
                reason: match status {
                    1 => Reason::Requests,
                    2 => Reason::Tokens,
                    5 => Reason::Quota,
                    _ => Reason::SpendCap,
                },
                retry_us: r[1],
                headers,
            }),
        };
        Ok(RemoteAdmission {
            result,
            quota: quota_totals,
        })
    }

    /// Runs the reservation script: takes `cost` tokens from the key's and the developer's
    /// token buckets (`rates`), checks a hard-stop quota against the request's declared tokens,
    /// and on a refusal gives back the request taken by [`Distributed::admit`].
    pub async fn reserve(
        &self,
        (key_id, dev_id): (&str, &str),
        rates: &Rates,
        cost: u64,
        q: ReserveArgs,
    ) -> Result<RemoteReservation, RedisDown> {
        let mut conn = self.connection()?;
        let per_minute = |r: Option<Rate>| r.map_or(0, |r| r.per_minute);
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.key("rl:k", key_id))
            .key(self.key("rl:d", dev_id))
            .key(self.quota_key(q.period, dev_id))
            .arg(per_minute(q.give_back.key_requests))
            .arg(per_minute(q.give_back.dev_requests))
            .arg(per_minute(rates.key_tokens))
            .arg(per_minute(rates.dev_tokens))
            .arg(cost)
            .arg(u8::from(q.hard_included.is_some()))
            .arg(q.hard_included.unwrap_or(0))
            .arg(q.reserved)
            .arg(q.declared)
            .arg(q.seed);
        let r: Vec<i64> = self.timed(inv.invoke_async(&mut conn)).await?;
        if r.len() != 9 {
            return Err(RedisDown::Redis(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected reservation reply",
            ))));
        }
        let bucket = |i: usize, rate: Option<Rate>| -> Option<Shown> {
            let base = 2 + 3 * i;
            (r[base] == 1).then(|| Shown {
                limit: rate.map_or(0, |r| r.per_minute),
                remaining: r[base + 1].max(0) as u64,
                reset_us: r[base + 2],
            })
        };
        let tokens = Shown::tighter(bucket(0, rates.key_tokens), bucket(1, rates.dev_tokens));
        let result = match r[0] {
            0 => Ok(tokens),
            status => Err(Refused {
                reason: if status == 5 {
                    Reason::Quota
                } else {
                    Reason::Tokens
                },
                retry_us: r[1],
                headers: RateHeaders {
                    requests: None,
                    tokens,
                },
            }),
        };
        Ok(RemoteReservation {
            result,
            quota_tokens: q.hard_included.map(|_| r[8].max(0) as u64),
        })
    }

    /// Runs the settle script for a batch of requests in one pipeline (one round trip). A
    /// Redis that lost its scripts (restart) gets them again and the batch is retried once.
    pub async fn settle_batch(&self, jobs: &[SettleArgs]) -> Result<Vec<SettleOutcome>, RedisDown> {
        let mut conn = self.connection()?;
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            for j in jobs {
                pipe.add_command(self.settle_cmd(j));
            }
            let sent = tokio::time::timeout(SETTLE_TIMEOUT, pipe.query_async(&mut conn)).await;
            match sent {
                Err(_) => return Err(RedisDown::Timeout(SETTLE_TIMEOUT)),
                Ok(Ok(rows)) => {
                    let rows: Vec<Vec<i64>> = rows;
                    return Ok(rows.iter().map(|r| settle_outcome(r)).collect());
                }
                Ok(Err(e)) if e.kind() == redis::ErrorKind::NoScriptError && attempt == 0 => {
                    self.timed(self.settle.prepare_invoke().load_async(&mut conn))
                        .await?;
                }
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        Err(RedisDown::NotConnected)
    }

    /// One request's settle as an `EVALSHA` command.
    fn settle_cmd(&self, j: &SettleArgs) -> redis::Cmd {
        let t = j.track.unwrap_or(Track {
            period: Period::of_unix_ms(0),
            seed: (0, 0),
            seeded: false,
        });
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.settle.get_hash())
            .arg(3)
            .arg(self.key("rl:k", &j.key_id))
            .arg(self.key("rl:d", &j.dev_id))
            .arg(self.quota_key(t.period, &j.dev_id))
            .arg(j.rates.key_tokens.map_or(0, |r| r.per_minute))
            .arg(j.rates.dev_tokens.map_or(0, |r| r.per_minute))
            .arg(j.reserved)
            .arg(j.usage.0)
            .arg(j.usage.1)
            .arg(u8::from(j.track.is_some()))
            .arg(t.seed.0)
            .arg(t.seed.1)
            .arg(quota_ttl_secs(t.period.end_ms()))
            .arg(u8::from(t.seeded));
        cmd
    }

    /// Remembers quota usage that could not reach Redis.
    pub fn defer(&self, period: Period, dev_id: &Arc<str>, tokens: u64, cost: i64) {
        let mut p = self.pending.lock().expect("pending lock");
        let e = p.entry((period, Arc::clone(dev_id))).or_default();
        e.0 += tokens;
        e.1 += cost;
    }

    /// One monitor round: connect if needed, refresh the node registry, hand over deferred
    /// usage. Returns whether Redis is up, and whether it just came back.
    pub async fn monitor_once(
        &self,
        totals: impl Fn(Period, &str) -> (u64, i64),
        seeded: bool,
    ) -> Result<bool, RedisDown> {
        let mut conn = match self.connection() {
            Ok(c) if self.is_up() => c,
            _ => {
                let c = self
                    .timed(self.client.get_multiplexed_async_connection())
                    .await?;
                self.conn.store(Some(Arc::new(c.clone())));
                c
            }
        };
        let now_ms = crate::clock::now_ms() as i64;
        let nodes_key = self.key("nodes", "live");
        let (_, _, count, _): ((), (), u32, ()) = self
            .timed(
                redis::pipe()
                    .zadd(&nodes_key, &self.node_id, now_ms)
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&nodes_key)
                    .arg("-inf")
                    .arg(now_ms - NODE_TTL_MS)
                    .zcard(&nodes_key)
                    .pexpire(&nodes_key, NODE_TTL_MS * 2)
                    .query_async(&mut conn),
            )
            .await?;
        self.nodes.store(count.max(1), Ordering::Relaxed);
        let pending: Vec<_> = std::mem::take(&mut *self.pending.lock().expect("pending lock"))
            .into_iter()
            .collect();
        for (i, ((period, dev), (tokens, cost))) in pending.iter().enumerate() {
            let (t, c) = totals(*period, dev);
            let track = Track {
                period: *period,
                seed: (t.saturating_sub(*tokens), c - cost),
                seeded,
            };
            let job = SettleArgs {
                key_id: "".into(),
                dev_id: Arc::clone(dev),
                rates: Rates::default(),
                reserved: 0,
                usage: (*tokens, *cost),
                track: Some(track),
            };
            match self.settle_batch(std::slice::from_ref(&job)).await {
                Ok(o) if o.first() == Some(&SettleOutcome::NotSeeded) => {
                    self.defer(*period, dev, *tokens, *cost)
                }
                Ok(_) => {}
                Err(e) => {
                    for ((p, d), (t, c)) in &pending[i..] {
                        self.defer(*p, d, *t, *c);
                    }
                    return Err(e);
                }
            }
        }
        let came_back = !self.up.swap(true, Ordering::Relaxed);
        Ok(came_back)
    }

    /// Leaves the node registry (at shutdown).
    pub async fn leave(&self) {
        if let Ok(mut conn) = self.connection() {
            let _: Result<(), _> = self
                .timed(
                    redis::cmd("ZREM")
                        .arg(self.key("nodes", "live"))
                        .arg(&self.node_id)
                        .query_async(&mut conn),
                )
                .await;
        }
    }
}

/// Quota hashes outlive their period by 35 days (invoices may still look at them).
fn quota_ttl_secs(period_end_ms: i64) -> i64 {
    let left = (period_end_ms - crate::clock::now_ms() as i64).max(0) / 1000;
    left + 35 * 86_400
}
